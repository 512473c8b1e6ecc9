"""The device-normalize data mode (DATA.DEVICE_NORMALIZE on a CUDA run): workers stop at uint8 pixels and the
random-erasing boxes; the device converts, normalizes and erases.

The same values as the host-float mode (ToTensor + Normalize are the same ops in the same order), except that
erasing noise comes from a device generator seeded per image; 4x smaller batches to pass between processes and
copy to the GPU, and less host work. DATA.GPU_DECODE's mode (device_decode.py) ends the same way.
"""
import math
import random
from typing import NamedTuple

import numpy as np
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import default_collate
from torchvision import transforms

from .mode import DataMode
from .transforms import train_recipe, val_steps

_normalize_constants = {}  # device -> (mean, std), shaped (1, 3, 1, 1)
_erase_generators = {}  # device -> torch.Generator for random-erasing noise


class ErasePlan(NamedTuple):
    """Random-erasing boxes (top, left, height, width) of one image, filled on the device."""
    mode: str
    noise_seed: int
    boxes: tuple[tuple[int, int, int, int], ...]


class DeferredImage(NamedTuple):
    """uint8 HWC pixels whose normalization (and random erasing) happen on the device."""
    pixels: torch.Tensor
    erase: ErasePlan | None


def plan_erasing(erasing, img_h: int, img_w: int) -> ErasePlan | None:
    """The boxes timm's RandomErasing (``erasing``) would erase on an image of img_h x img_w, drawn from the same
    Python random draws in the same order (its ``_erase``), and a seed for the noise that fills them."""
    if random.random() > erasing.probability:
        return None
    area = img_h * img_w
    count = (erasing.min_count if erasing.min_count == erasing.max_count
             else random.randint(erasing.min_count, erasing.max_count))
    boxes = []
    for _ in range(count):
        for _attempt in range(10):
            target_area = random.uniform(erasing.min_area, erasing.max_area) * area / count
            aspect_ratio = math.exp(random.uniform(*erasing.log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < img_w and h < img_h:
                boxes.append((random.randint(0, img_h - h), random.randint(0, img_w - w), h, w))
                break
    if not boxes:
        return None
    return ErasePlan(erasing.mode, random.getrandbits(63), tuple(boxes))


class ToDeferredImage:
    """Final step of a device-normalize pipeline: the pixels as a HWC uint8 tensor, plus the erasing boxes that
    timm's RandomErasing (given as ``erasing``) would have drawn."""

    def __init__(self, erasing=None):
        self.erasing = erasing

    def __call__(self, img):
        pixels = torch.from_numpy(np.array(img))  # np.array: a writable copy (asarray's is read-only)
        erase = plan_erasing(self.erasing, img.size[1], img.size[0]) if self.erasing is not None else None
        return DeferredImage(pixels, erase)

    def __repr__(self):
        return f"{self.__class__.__name__}(erasing={self.erasing})"


def normalize_on_device(images: torch.Tensor, erase) -> torch.Tensor:
    """uint8 NCHW images (on their device) as normalized float, random-erased by the plans
    ``((position, ErasePlan), ...)``."""
    mean, std = _constants(images.device)
    images = images.contiguous().float().div_(255).sub_(mean).div_(std)  # ToTensor, Normalize: same ops
    if erase:
        _erase(images, erase)
    return images


class DeviceNormalize(DataMode):
    name = 'device_normalize'

    def transform(self, is_train, config):
        if is_train:
            recipe = train_recipe(config)
            return transforms.Compose(recipe.steps + recipe.augment + self.finish_steps(recipe.erasing))
        return transforms.Compose(val_steps(config) + self.finish_steps())

    def finish_steps(self, erasing=None):
        return [ToDeferredImage(erasing)]

    def collate_images(self, images):
        erase = tuple((i, image.erase) for i, image in enumerate(images) if image.erase is not None)
        # stacked HWC (one plain copy per image), viewed as NCHW; to_device makes it contiguous
        return default_collate([image.pixels for image in images]).permute(0, 3, 1, 2), erase

    def to_device(self, batch, device):
        return normalize_on_device(batch.images.to(device, non_blocking=True), batch.erase)


DEVICE_NORMALIZE = DeviceNormalize()


def _constants(device):
    if device not in _normalize_constants:
        _normalize_constants[device] = tuple(torch.tensor(v, dtype=torch.float32, device=device).view(1, -1, 1, 1)
                                             for v in (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD))
    return _normalize_constants[device]


def _erase(images, plans):
    """Fill the boxes like timm's RandomErasing: per-pixel normal noise (pixel), one normal value per
    channel (rand) or zeros (const); each image's noise comes from its own seed, not from the batch."""
    if images.device not in _erase_generators:
        _erase_generators[images.device] = torch.Generator(device=images.device)
    generator = _erase_generators[images.device]
    for i, plan in plans:
        generator.manual_seed(plan.noise_seed)
        for top, left, h, w in plan.boxes:
            region = images[i, :, top:top + h, left:left + w]
            if plan.mode == 'pixel':
                region.normal_(generator=generator)
            elif plan.mode == 'rand':
                region.copy_(torch.empty((images.shape[1], 1, 1), device=images.device)
                             .normal_(generator=generator).expand_as(region))
            else:
                region.zero_()
