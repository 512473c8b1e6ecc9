"""How far each train-crop mode is from timm's transform, and how fast, side by side.

    python scripts/crop_fidelity.py                      # 1600x1200, 500x375, 224x224 photo-like JPEGs
    python scripts/crop_fidelity.py --sizes 800x600 --draws 50

For each image size and mode (default = timm's pixels; DATA.FAST_CROP; DATA.FAST_DECODE; both) it applies our
train crop + flip and timm's to the same JPEG with the same random draws and prints the largest per-value
difference, the share of values more than one level apart, and CPU ms per image (decode + crop) with the ratio
to timm's.
"""
import argparse
import io
import os
import random
import sys
import time

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from config import load_config  # noqa: E402
from data import build_transform  # noqa: E402
from data.transforms import open_image  # noqa: E402

MODES = {'default': (), 'FAST_CROP': ('DATA.FAST_CROP', True), 'FAST_DECODE': ('DATA.FAST_DECODE', True),
         'both': ('DATA.FAST_CROP', True, 'DATA.FAST_DECODE', True)}
PLAIN = ['AUG.REPROB', 0.0, 'AUG.AUTO_AUGMENT', 'none', 'AUG.COLOR_JITTER', 0.0]


def photo_jpeg(width, height, seed):
    rng = np.random.default_rng(seed)
    smooth = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    pixels = np.clip(np.asarray(smooth, dtype=np.int16) + rng.integers(-25, 26, (height, width, 3)), 0, 255)
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format='JPEG', quality=90)
    return buffer.getvalue()


def run(transform, data, seeds):
    """[uint8 HWC pixels] of each seeded draw and the CPU seconds per image."""
    outputs, start = [], time.process_time()
    for seed in seeds:
        random.seed(seed)
        torch.manual_seed(seed)  # torchvision's flip draws from torch
        out = transform(data)
        outputs.append(out if isinstance(out, torch.Tensor) else torch.from_numpy(np.array(out)))
    return outputs, (time.process_time() - start) / len(seeds)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--sizes', nargs='+', default=['1600x1200', '500x375', '224x224'])
    parser.add_argument('--draws', type=int, default=30)
    parser.add_argument('--interpolation', default='bicubic')
    args = parser.parse_args()
    torch.set_num_threads(1)
    primary, _, _ = create_transform(224, is_training=True, interpolation=args.interpolation, hflip=0.5,
                                     color_jitter=None, auto_augment=None, re_prob=0.0, separate=True)

    def timm(data):
        return primary(Image.open(io.BytesIO(data)).convert('RGB'))

    print(f"{'size':>10} {'mode':>12} {'max diff':>8} {'>1 level':>9} {'ms/image':>9} {'vs timm':>8}")
    for size in args.sizes:
        width, height = map(int, size.split('x'))
        data = photo_jpeg(width, height, seed=width * height)
        seeds = range(args.draws)
        reference, timm_seconds = run(timm, data, seeds)
        for mode, opts in MODES.items():
            config = load_config(None, ['DATA.INTERPOLATION', args.interpolation, *PLAIN, *opts], environ={})
            transform = build_transform(True, config, normalize_on_device=True)
            outputs, seconds = run(lambda d, t=transform: t(open_image(d)).pixels, data, seeds)
            diffs = torch.stack([(o.to(torch.int16) - r.to(torch.int16)).abs()
                                 for o, r in zip(outputs, reference, strict=True)])
            print(f"{size:>10} {mode:>12} {int(diffs.max()):>8} {(diffs > 1).double().mean().item():>9.4%} "
                  f"{seconds * 1e3:>9.2f} {timm_seconds / seconds:>7.2f}x")


if __name__ == '__main__':
    main()
