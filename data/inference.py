"""Images named on a command line, for prediction: expanding files / folders / glob patterns, and a dataset that
reports an unreadable file (for its row of the results) instead of replacing it as the training datasets do."""
import glob
import os
import re
from typing import NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS

from errors import DataError

from .transforms import BadImage, open_image

_GLOB_CHARS = ('*', '?', '[')


def _is_image_name(path):
    return path.lower().endswith(IMG_EXTENSIONS)


def _folder_images(folder):
    found = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs.sort()
        found += [os.path.join(root, name) for name in sorted(files) if _is_image_name(name)]
    return found


def find_images(inputs):
    """Image paths from INPUTS, in order, each once: a file as given (whatever its extension), a folder's
    image files (recursive, common image extensions, sorted), a glob pattern's matches (``**`` recursive;
    matched files with an image extension, matched folders expanded). DataError for an input matching nothing."""
    paths = []
    for item in inputs:
        if os.path.isfile(item):
            found = [item]
        elif os.path.isdir(item):
            found = _folder_images(item)
        elif any(char in item for char in _GLOB_CHARS):
            found = []
            for match in sorted(glob.glob(item, recursive=True)):
                if os.path.isdir(match):
                    found += _folder_images(match)
                elif _is_image_name(match):
                    found.append(match)
        else:
            raise DataError(f"input not found: {item}")
        if not found:
            raise DataError(f"input {item} matches no image file (extensions: {' '.join(IMG_EXTENSIONS)})")
        paths += found
    return list(dict.fromkeys(paths))  # the same file named twice is predicted once


class ImageFiles(Dataset):
    """(position, transformed image or None, error or '') for each path; the transform takes a lazily opened
    image (data.transforms), as in validation."""

    def __init__(self, paths, transform):
        self.paths = list(paths)
        self.transform = transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        try:
            with open(self.paths[index], 'rb') as f:
                data = f.read()
            return index, self.transform(open_image(data)), ''
        except OSError as e:
            return index, None, f"{type(e).__name__}: {e.strerror or e}"
        except BadImage as e:  # PIL names the in-memory buffer it read from: noise in a report about a file
            return index, None, re.sub(r' <_io\.BytesIO object at 0x[0-9a-f]+>', '', str(e))


class ImageBatch(NamedTuple):
    """One batch: ``images`` stacks the readable images; ``positions`` and ``errors`` cover every sample, in
    order ('' for a readable one); ``readable`` marks which samples ``images`` holds."""
    positions: list[int]
    images: torch.Tensor
    readable: list[bool]
    errors: list[str]


def collate_image_files(samples):
    positions, images, errors = zip(*samples, strict=True)
    readable = [image is not None for image in images]
    stacked = [image for image in images if image is not None]
    return ImageBatch(list(positions), torch.stack(stacked) if stacked else torch.empty(0), readable, list(errors))


def image_files_loader(paths, transform, batch_size, num_workers, pin_memory=False):
    """A DataLoader of ImageBatch over paths, in order (workers read ahead; memory stays bounded)."""
    return DataLoader(ImageFiles(paths, transform), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      collate_fn=collate_image_files, pin_memory=pin_memory)
