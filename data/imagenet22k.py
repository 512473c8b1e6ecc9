"""ImageNet-22K in the official layout (DATA.DATASET imagenet22K).

``DATA_PATH`` holds ``ILSVRC2011fall_whole_map_train.txt`` and ``ILSVRC2011fall_whole_map_val.txt``: each a JSON
list of ``[relative image path, label]`` pairs, labels 0..21840 (21841 classes: of the 21843 synsets two have no
images), image paths relative to ``DATA_PATH`` (the official code reads ``DATA_PATH + '/' + path``).
Images are files on disk, read like the folder dataset's (same bad-image substitution and reporting).
"""
import json
import os

from errors import DataError

from .datasets import FolderDataset, ImageDataset
from .zipdata import class_names

NUM_CLASSES = 21841
MAP_FILE = 'ILSVRC2011fall_whole_map_{split}.txt'


def map_file_path(root, split):
    return os.path.join(root, MAP_FILE.format(split=split))


def read_22k_map(path):
    """[(relative path, label)] from an official map file; DataError naming the file and the entry at fault."""
    if not os.path.isfile(path):
        raise DataError(f"ImageNet-22K map file {path} not found (DATA.DATASET imagenet22K reads "
                        f"{MAP_FILE.format(split='train')} / {MAP_FILE.format(split='val')} under DATA.DATA_PATH)")
    try:
        with open(path, encoding='utf-8') as f:
            database = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not a JSON list of [path, label] pairs: {e}") from None
    if not isinstance(database, list) or not database:
        raise DataError(f"{path} must be a non-empty JSON list of [path, label] pairs")
    entries = []
    for i, entry in enumerate(database):
        label = _label(entry)
        if label is None:
            raise DataError(f"{path} entry {i}: expected [path, label], got {entry!r}")
        if not 0 <= label < NUM_CLASSES:
            raise DataError(f"{path} entry {i}: label {label} of {entry[0]} is outside 0..{NUM_CLASSES - 1}")
        entries.append((entry[0], label))
    return entries


def _label(entry):
    """The integer label of a [path, label] entry (an int, or digits as the official int() accepts), else None."""
    if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str) and entry[0]):
        return None
    label = entry[1]
    if isinstance(label, str) and label.strip().lstrip('-').isdigit():
        return int(label)
    return label if isinstance(label, int) and not isinstance(label, bool) else None


class ImageNet22KDataset(ImageDataset):
    """One split of the official ImageNet-22K layout. ``classes``: the synset folder of each label when the
    paths have one folder per label (``n01440764/x.JPEG``), else the label numbers."""

    read_bytes = FolderDataset.read_bytes  # image files on disk, read (and reported when unreadable) alike

    def __init__(self, root, split, transform=None):
        map_path = map_file_path(root, split)
        entries = read_22k_map(map_path)
        samples = [(os.path.join(root, rel_path.lstrip('/')), label) for rel_path, label in entries]
        if not os.path.isfile(samples[0][0]):
            raise DataError(f"{map_path}: first image {samples[0][0]} not found (paths are relative to "
                            f"DATA.DATA_PATH {root})")
        super().__init__(samples, class_names(entries, NUM_CLASSES), transform, root)
        self.map_path = map_path
