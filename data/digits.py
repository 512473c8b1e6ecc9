"""The embedded demo set: scikit-learn's ``load_digits`` (1797 8x8 images, 10 classes, shipped with the
package, no download) written once as 32x32 grayscale PNGs in an ImageFolder tree:
``root/{train,val}/<digit>/<index>.png`` (stratified 80/20 split, fixed seed).

The tree is built in a temporary folder beside ``root`` and renamed into place with a marker file inside,
so ``root`` is either absent or complete: a killed first run leaves only a temporary folder (removed by a
later run on the same host once its process is gone). Concurrent ranks each build their own temporary
tree; the first rename wins and the others discard theirs.
"""
import json
import os
import shutil
import socket
import tempfile

import numpy as np
from PIL import Image

from errors import DataError

MARKER = '.digits-complete'
IMAGE_SIZE = 32
VAL_FRACTION = 0.2
SPLIT_SEED = 0
DEFAULT_ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'datasets', 'digits')


def ensure_digits(root: str = '') -> str:
    """Path of the complete digits tree at ``root`` (default: datasets/digits in the repository), writing
    it first if needed. A second call finds the marker and writes nothing."""
    root = os.path.abspath(root or DEFAULT_ROOT)
    if os.path.isfile(os.path.join(root, MARKER)):
        return root
    if os.path.isdir(root) and os.listdir(root):
        raise DataError(f"DATA.DATA_PATH {root} is not a digits demo set (DATA.DATASET digits, e.g. from "
                        f"configs/demo.yaml): for your own train/ and val/ class folders add --opts DATA.DATASET "
                        f"imagenet (or use --cfg configs/finetune_own_data.yaml); for the demo, give a new or empty "
                        f"--data-path")
    parent, name = os.path.split(root)
    os.makedirs(parent, exist_ok=True)
    prefix = f".{name}.tmp-{socket.gethostname()}-"
    _remove_abandoned(parent, prefix)
    tmp = tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent)
    try:
        counts = _write_tree(tmp)
        with open(os.path.join(tmp, MARKER), 'w') as f:
            json.dump(counts, f)
        try:
            os.rename(tmp, root)  # atomic; replaces an empty root, fails if another process got there first
        except OSError:
            if not os.path.isfile(os.path.join(root, MARKER)):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing left there after a successful rename
    return root


def _remove_abandoned(parent, prefix):
    """Delete temporary trees of processes on this host that no longer run (killed first runs)."""
    for entry in os.listdir(parent):
        if not entry.startswith(prefix):
            continue
        try:
            pid = int(entry[len(prefix):].split('-', 1)[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
        except (ValueError, PermissionError):
            pass  # not ours to judge, or alive under another user


def _write_tree(folder):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    indices = np.arange(len(digits.target))
    train, val = train_test_split(indices, test_size=VAL_FRACTION, stratify=digits.target,
                                  random_state=SPLIT_SEED)
    for split, split_indices in (('train', train), ('val', val)):
        for i in sorted(split_indices):
            label = int(digits.target[i])
            class_dir = os.path.join(folder, split, str(label))
            os.makedirs(class_dir, exist_ok=True)
            pixels = np.round(digits.images[i] * (255.0 / 16.0)).astype(np.uint8)  # values are 0..16
            image = Image.fromarray(pixels).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC)
            image.save(os.path.join(class_dir, f"{i:04d}.png"))
    return {'train': len(train), 'val': len(val), 'classes': 10}
