"""Decoding and the train/val transforms: timm's ImageNet recipe, plus two ways to do less work per image.

* Reduced-size JPEG decoding (PIL ``draft``: libjpeg scales by 1/2, 1/4 or 1/8 in the DCT domain). Train
  crops use it when the crop still keeps at least IMG_SIZE pixels per side (DATA.FAST_DECODE); validation
  only behind DATA.VAL_FAST_RESIZE, because it changes pixels.
* uint8 output: with ``uint8=True`` a transform ends in a :class:`DeferredImage` (HWC uint8 pixels and the
  random-erasing boxes) instead of a normalized float tensor; ``data.to_device`` converts, normalizes and
  erases on the device. The same values as the float path (erasing noise aside), less host work and 4x
  smaller batches to pass between processes and copy to the GPU.

Every transform starts from a *lazily opened* PIL image (header parsed, pixels not decoded), so the decoder
can be told the size it needs. Decoding failures raise :class:`BadImage`.
"""
import io
import math
import random
from typing import NamedTuple, Optional, Tuple

import numpy as np
import torch
from PIL import Image, ImageOps
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, auto_augment, create_transform
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision import transforms
from torchvision.transforms import InterpolationMode
from torchvision.transforms.functional import pil_modes_mapping, resized_crop

_DRAFT_FACTORS = (8, 4, 2)  # the JPEG DCT scalings PIL's draft() offers


class BadImage(Exception):
    """A file that cannot be read or decoded as an image; the dataset substitutes another sample."""


def open_image(data):
    """A lazily decoded PIL image from raw bytes: only the header is parsed here."""
    try:
        return Image.open(io.BytesIO(data))
    except Exception as e:  # PIL signals unreadable headers with many exception types
        raise BadImage(f"{type(e).__name__}: {e}") from None


def load_rgb(img, draft_size=None):
    """Decode a lazily opened image to RGB. ``draft_size`` lets a JPEG decode at a reduced scale that keeps
    at least that (width, height)."""
    try:
        if draft_size is not None and img.format == 'JPEG':
            img.draft('RGB', draft_size)
        img.load()
        if img.mode == 'RGB':
            return img  # convert() would copy
        if img.mode == 'P' and 'transparency' in img.info:
            img = img.convert('RGBA')  # PIL warns when a palette with transparency goes straight to RGB
        return img.convert('RGB')
    except Exception as e:  # only PIL's decoder runs in this block: any failure means the file is unusable
        raise BadImage(f"{type(e).__name__}: {e}") from None


def _draft_factor(crop_w, crop_h, need_w, need_h):
    """Largest JPEG scale-down that keeps a crop of crop_w x crop_h source pixels at >= need_w x need_h."""
    for factor in _DRAFT_FACTORS:
        if crop_w / factor >= need_w and crop_h / factor >= need_h:
            return factor
    return 1


def _draft_to(img, factor, box):
    """Decode at 1/factor scale (1: full size); return the image and ``box`` mapped into its coordinates."""
    full_size = img.size
    img = load_rgb(img, (full_size[0] // factor, full_size[1] // factor) if factor > 1 else None)
    if img.size == full_size:  # not a JPEG, or factor 1
        return img, box
    # libjpeg scales by exactly 1/factor (a partial last block rounds the size up)
    return img, tuple(v / factor for v in box)


class Decode:
    """First step of a pipeline without a decode-aware crop: decode to RGB at full size."""

    def __call__(self, img):
        return load_rgb(img)


class DecodeRandomResizedCrop(RandomResizedCropAndInterpolation):
    """timm's RandomResizedCropAndInterpolation on a lazily opened image (same random draws).

    With ``fast_decode`` a JPEG is decoded at 1/2..1/8 scale when the chosen crop still keeps at least the
    output size per side; the crop is then resized from the reduced image (a slightly different, still
    downscaling, resampling of the same region).
    """

    def __init__(self, size, scale, ratio, interpolation, fast_decode=True):
        super().__init__(size, scale=scale, ratio=ratio, interpolation=interpolation)
        self.fast_decode = fast_decode

    def __call__(self, img):
        i, j, h, w = self.get_params(img, self.scale, self.ratio)  # needs only the header's size
        if isinstance(self.interpolation, (tuple, list)):
            interpolation = random.choice(self.interpolation)
        else:
            interpolation = self.interpolation
        out_h, out_w = self.size
        factor = _draft_factor(w, h, out_w, out_h) if self.fast_decode else 1
        if factor == 1:
            return resized_crop(load_rgb(img), i, j, h, w, self.size, interpolation)  # exactly timm's
        img, box = _draft_to(img, factor, (j, i, j + w, i + h))
        return img.resize((out_w, out_h), pil_modes_mapping[interpolation], box=box)


class FastResizeCenterCrop:
    """Validation resize (+ center crop) that decodes JPEGs at a reduced scale when the resized image stays
    at least as large, and resamples only the crop region. Pixels differ slightly from Resize + CenterCrop
    (DCT-domain downscaling; PIL takes the crop box in single precision, so some roundings flip), so it is
    opt-in (DATA.VAL_FAST_RESIZE)."""

    def __init__(self, img_size, resize_size, interpolation):
        self.img_size, self.resize_size = img_size, resize_size  # resize_size None: straight to img_size
        self.resample = pil_modes_mapping[interpolation]

    def __call__(self, img):
        w, h = img.size
        size = self.img_size
        if self.resize_size is None:
            new_w, new_h, box = size, size, (0, 0, w, h)
        else:
            # torchvision Resize(int): shorter side -> resize_size, longer side truncated
            short, long = (w, h) if w <= h else (h, w)
            new_short, new_long = self.resize_size, int(self.resize_size * long / short)
            new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
            top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
            sx, sy = w / new_w, h / new_h
            box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
        img, box = _draft_to(img, _draft_factor(w, h, new_w, new_h), box)
        return img.resize((size, size), self.resample, box=box)


class ErasePlan(NamedTuple):
    """Random-erasing boxes (top, left, height, width) of one image, filled on the device."""
    mode: str
    noise_seed: int
    boxes: Tuple[Tuple[int, int, int, int], ...]


class DeferredImage(NamedTuple):
    """uint8 HWC pixels whose normalization (and random erasing) happen in ``data.to_device``."""
    pixels: torch.Tensor
    erase: Optional[ErasePlan]


class ToDeferredImage:
    """Final step of a uint8 pipeline: the pixels as a HWC uint8 tensor, plus the erasing boxes that timm's
    RandomErasing (given as ``erasing``) would have drawn, from the same Python random draws."""

    def __init__(self, erasing=None):
        self.erasing = erasing

    def __call__(self, img):
        pixels = torch.from_numpy(np.array(img))  # np.array: a writable copy (asarray's is read-only)
        erase = self._plan(img.size[1], img.size[0]) if self.erasing is not None else None
        return DeferredImage(pixels, erase)

    def _plan(self, img_h, img_w):
        # mirrors timm.data.random_erasing.RandomErasing._erase draw for draw
        re = self.erasing
        if random.random() > re.probability:
            return None
        area = img_h * img_w
        count = re.min_count if re.min_count == re.max_count else random.randint(re.min_count, re.max_count)
        boxes = []
        for _ in range(count):
            for _attempt in range(10):
                target_area = random.uniform(re.min_area, re.max_area) * area / count
                aspect_ratio = math.exp(random.uniform(*re.log_aspect_ratio))
                h = int(round(math.sqrt(target_area * aspect_ratio)))
                w = int(round(math.sqrt(target_area / aspect_ratio)))
                if w < img_w and h < img_h:
                    top = random.randint(0, img_h - h)
                    left = random.randint(0, img_w - w)
                    boxes.append((top, left, h, w))
                    break
        if not boxes:
            return None
        return ErasePlan(re.mode, random.getrandbits(63), tuple(boxes))

    def __repr__(self):
        return f"{self.__class__.__name__}(erasing={self.erasing})"


def _posterize(img, bits_to_keep, **__):
    """timm's posterize op. PosterizeIncreasing at the top magnitude keeps 0 bits: old Pillow returned a
    black image, Pillow 13 raises ValueError (which would kill a worker), so give the old result."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def fix_posterize(transform):
    """Swap timm's posterize for ``_posterize`` in a RandAugment / AugMix (``ops``) or AutoAugment
    (``policy``) transform."""
    ops = list(getattr(transform, 'ops', []))
    for sub_policy in getattr(transform, 'policy', []):
        ops += list(sub_policy)
    for op in ops:
        if getattr(op, 'aug_fn', None) is auto_augment.posterize:
            op.aug_fn = _posterize


def _val_interpolation(name):
    # 'random' (timm picks per image in training) falls back to bilinear in validation, as in the official code
    return InterpolationMode.BILINEAR if name == 'random' else InterpolationMode(name)


def build_transform(is_train, config, uint8=False):
    """The official Swin transforms (timm create_transform for train; resize + center crop for val), each
    starting with the decode step. ``uint8`` ends them in a DeferredImage instead of a float tensor."""
    size = config.DATA.IMG_SIZE
    if is_train:
        aug = config.AUG
        primary, secondary, final = create_transform(
            input_size=size,
            is_training=True,
            color_jitter=aug.COLOR_JITTER if aug.COLOR_JITTER > 0 else None,
            auto_augment=aug.AUTO_AUGMENT if aug.AUTO_AUGMENT not in ('', 'none') else None,
            re_prob=aug.REPROB,
            re_mode=aug.REMODE,
            re_count=aug.RECOUNT,
            hflip=aug.HFLIP,
            interpolation=config.DATA.INTERPOLATION,
            separate=True,
        )
        crop = primary.transforms[0]
        if size > 32:
            primary.transforms[0] = DecodeRandomResizedCrop(crop.size, crop.scale, crop.ratio,
                                                            config.DATA.INTERPOLATION, config.DATA.FAST_DECODE)
        else:  # tiny inputs (CIFAR-like): the official code replaces the random resized crop
            primary.transforms[0:1] = [Decode(), transforms.RandomCrop(size, padding=4, pad_if_needed=True)]
        for step in secondary.transforms:
            fix_posterize(step)
        steps = primary.transforms + secondary.transforms
        if uint8:
            erasing = final.transforms[-1] if aug.REPROB > 0 else None
            return transforms.Compose(steps + [ToDeferredImage(erasing)])
        return transforms.Compose(steps + final.transforms)

    interpolation = _val_interpolation(config.DATA.INTERPOLATION)
    crop = config.TEST.CROP and size > 32
    resize_size = int((256 / 224) * size) if crop else None
    if config.DATA.VAL_FAST_RESIZE:
        steps = [FastResizeCenterCrop(size, resize_size, interpolation)]
    elif crop:
        steps = [Decode(), transforms.Resize(resize_size, interpolation=interpolation), transforms.CenterCrop(size)]
    else:  # direct resize; a no-op copy for images already at size (the official code skips it at <= 32 px)
        steps = [Decode(), transforms.Resize((size, size), interpolation=interpolation)]
    if uint8:
        return transforms.Compose(steps + [ToDeferredImage()])
    return transforms.Compose(steps + [transforms.ToTensor(),
                                       transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)])
