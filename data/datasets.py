"""Datasets of (image, class index): a torchvision ImageFolder tree, or the official zip layout.

Both read raw bytes and hand a lazily opened image to the transform (see transforms.py). A key is an index
or an ``(index, seed)`` pair from a train sampler; with a seed, python ``random``, ``numpy.random`` and
torch are seeded from it first, so a sample's augmentation depends only on that seed.

An unreadable file is replaced by the next readable sample (deterministic, and the batch keeps its size);
the :class:`Sample` carries its path and reason to the loader's batch, and the main process logs and counts
them (loader.ImageLoader).
"""
import contextlib
import os
import random
import zipfile
import zlib
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from errors import DataError

from .transforms import BadImage, load_rgb, open_image
from .zipdata import ZipReader, class_names, read_map_file

# consecutive unreadable samples tolerated before giving up on a key
MAX_SUBSTITUTES = 16
_ZIP_ERRORS = (KeyError, zipfile.BadZipFile, zlib.error, OSError, EOFError, NotImplementedError)


class BadImageReport(NamedTuple):
    """An unreadable file that was skipped: its path and why it could not be read."""
    path: str
    reason: str


class Sample(NamedTuple):
    """What a dataset returns for one key. ``image`` is the transformed image of the first readable sample
    from the key's index on (None when MAX_SUBSTITUTES in a row were unreadable); ``target`` its class;
    ``skipped`` the unreadable files passed over to get it."""
    image: Any
    target: int
    skipped: tuple[BadImageReport, ...] = ()


@contextlib.contextmanager
def seeded(seed: int | None):
    """Seed python, numpy and torch for one sample. In the main process (NUM_WORKERS 0) the global
    generators belong to the training loop, so their states are put back afterwards."""
    if seed is None:
        yield
        return
    saved = None
    if get_worker_info() is None:
        saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)
    torch.default_generator.manual_seed(seed)  # torch.manual_seed would also seed every GPU: 100x slower
    try:
        yield
    finally:
        if saved is not None:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.set_rng_state(saved[2])


class ImageDataset(Dataset):
    """Base class: ``samples`` [(path, class index)], ``targets``, ``classes``; subclasses read bytes."""

    def __init__(self, samples, classes, transform=None, root=''):
        self.samples = samples
        self.targets = [target for _, target in samples]
        self.classes = classes
        self.class_to_idx = {name: i for i, name in enumerate(classes)}
        self.transform = transform
        self.root = root

    def read_bytes(self, index):
        raise NotImplementedError

    def load(self, index):
        """The transformed image of sample ``index``; BadImage when it cannot be read."""
        img = open_image(self.read_bytes(index))
        return self.transform(img) if self.transform is not None else load_rgb(img)

    def __getitem__(self, key):
        """The Sample of an index, or of an ``(index, seed)`` key from a train sampler. Never raises for an
        unreadable file: that is reported in the sample (this may run in a loader worker)."""
        index, seed = key if isinstance(key, tuple) else (key, None)
        skipped = []
        for offset in range(MAX_SUBSTITUTES):
            i = (index + offset) % len(self)
            try:
                with seeded(seed):
                    return Sample(self.load(i), self.targets[i], tuple(skipped))
            except BadImage as e:
                skipped.append(BadImageReport(self.samples[i][0], str(e)))
        return Sample(None, self.targets[index], tuple(skipped))

    def __len__(self):
        return len(self.samples)

    def __repr__(self):
        return (f"{self.__class__.__name__}(root={self.root!r}, images={len(self)}, "
                f"classes={len(self.classes)})")


class FolderDataset(ImageDataset):
    """torchvision ImageFolder layout, file list and class order: ``root/<class>/**/<image>``."""

    def __init__(self, root, transform=None):
        classes = self.find_classes(root)
        class_to_idx = {name: i for i, name in enumerate(classes)}
        samples = make_dataset(root, class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
        found = {target for _, target in samples}
        empty = [name for name in classes if class_to_idx[name] not in found]
        if empty:
            more = f" (and {len(empty) - 1} more)" if len(empty) > 1 else ''
            raise DataError(f"class folder {os.path.join(root, empty[0])} has no images{more}; "
                            f"image extensions: {' '.join(IMG_EXTENSIONS)}")
        super().__init__(samples, classes, transform, root)

    @staticmethod
    def find_classes(root):
        """The sorted class folder names under ``root`` (torchvision's rule); DataError when there are none."""
        try:
            return find_classes(root)[0]
        except FileNotFoundError:
            raise DataError(f"no class folders in {root} (expected {root}/<class>/<image>)") from None

    def read_bytes(self, index):
        try:
            with open(self.samples[index][0], 'rb') as f:
                return f.read()
        except OSError as e:
            raise BadImage(f"{type(e).__name__}: {e.strerror or e}") from None


class UnlabeledFolderDataset(FolderDataset):
    """Every image under ``root`` at any depth (sorted paths), target 0: images for pre-training, in class
    folders or not."""

    def __init__(self, root, transform=None):
        if not os.path.isdir(root):
            raise DataError(f"image folder {root} not found (DATA.DATA_PATH must hold train/)")
        paths = sorted(os.path.join(folder, name) for folder, _, names in os.walk(root, followlinks=True)
                       for name in names if name.lower().endswith(IMG_EXTENSIONS))
        if not paths:
            raise DataError(f"no images in {root}; image extensions: {' '.join(IMG_EXTENSIONS)}")
        ImageDataset.__init__(self, [(path, 0) for path in paths], [], transform, root)


class ZipDataset(ImageDataset):
    """The official zip layout (see zipdata.py). Images are read straight out of ``<split>.zip``; ``cache``
    keeps chosen images' bytes in RAM (DATA.CACHE_MODE). Labels must lie in [0, num_classes)."""

    def __init__(self, root, split, num_classes, transform=None):
        zip_path, map_path = os.path.join(root, f'{split}.zip'), os.path.join(root, f'{split}_map.txt')
        for path in (zip_path, map_path):
            if not os.path.isfile(path):
                raise DataError(f"zip mode (DATA.ZIP_MODE): {path} not found")
        entries = read_map_file(map_path, f'{split}.zip')
        if not entries:
            raise DataError(f"{map_path} lists no images")
        outside = next(((member, label) for member, label in entries if not 0 <= label < num_classes), None)
        if outside:
            raise DataError(f"{map_path}: label {outside[1]} of {outside[0]} is outside 0..{num_classes - 1} "
                            f"(MODEL.NUM_CLASSES is {num_classes})")
        self.reader = ZipReader(zip_path)
        try:
            if not self.reader.contains(entries[0][0]):
                raise DataError(f"{map_path}: first image {entries[0][0]!r} is not in {zip_path}")
        except zipfile.BadZipFile as e:
            raise DataError(f"{zip_path} is not a readable zip file ({e})") from None
        finally:
            self.reader.close()  # each worker opens its own handle
        self.members = [member for member, _ in entries]
        self._cache = {}
        samples = [(f"{zip_path}@/{member}", label) for member, label in entries]
        super().__init__(samples, class_names(entries, num_classes), transform, root)

    def cache(self, indices):
        """Read these images into RAM now, in the main process, so forked workers share them."""
        for i in indices:
            if i not in self._cache:
                try:
                    self._cache[i] = self.reader.read(self.members[i])
                except _ZIP_ERRORS:
                    pass  # reported like any unreadable image when the sample is used
        self.reader.close()

    @property
    def num_cached(self):
        return len(self._cache)

    def read_bytes(self, index):
        data = self._cache.get(index)
        if data is not None:
            return data
        try:
            return self.reader.read(self.members[index])
        except _ZIP_ERRORS as e:
            raise BadImage(f"{type(e).__name__}: {e}") from None
