"""Decoding and the train/val transforms: timm's ImageNet recipe, plus ways to do less work per image.

* Fast crops (opt-in, because pixels change; by default train crops are timm's transform exactly and validation
  is PIL's Resize + CenterCrop): DATA.FAST_CROP resizes train crops with torch's uint8 antialiased kernels (SIMD;
  ~2.5x faster than PIL's resample at ImageNet sizes; PIL's filters rounded differently: most values within one
  level of PIL's, bicubic overshoot on high-contrast content more), DATA.FAST_DECODE decodes a JPEG at 1/2..1/8
  scale (PIL ``draft``: libjpeg scales in the DCT domain) when the crop still keeps at least IMG_SIZE pixels per
  side, DATA.VAL_FAST_RESIZE does both for validation.
* The pieces a data mode composes into its worker transform (data/mode.py): ``train_recipe`` (timm's recipe in
  three parts), ``val_steps`` / ``val_geometry`` and ``normalize_steps``. Where normalization happens (in the
  worker, or on the device) is the mode's choice, not this module's.

Every transform starts from a *lazily opened* PIL image (header parsed, pixels not decoded), so the decoder
can be told the size it needs. Decoding failures raise :class:`BadImage`.
"""
import io
import random
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, auto_augment, create_transform
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision import transforms
from torchvision.transforms import InterpolationMode
from torchvision.transforms.functional import pil_modes_mapping, resized_crop
from yacs.config import CfgNode

_DRAFT_FACTORS = (8, 4, 2)  # the JPEG DCT scalings PIL's draft() offers
# interpolations torch resizes on uint8 images; others fall back to PIL
_TORCH_MODES = {InterpolationMode.BILINEAR: 'bilinear', InterpolationMode.BICUBIC: 'bicubic'}


class BadImage(Exception):
    """A file that cannot be read or decoded as an image; the dataset substitutes another sample."""


def open_image(data: bytes) -> Image.Image:
    """A lazily decoded PIL image from raw bytes: only the header is parsed here."""
    try:
        return Image.open(io.BytesIO(data))
    except Exception as e:  # PIL signals unreadable headers with many exception types
        raise BadImage(f"{type(e).__name__}: {e}") from None


def load_rgb(img: Image.Image, draft_size: tuple[int, int] | None = None) -> Image.Image:
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


def _decode_scaled(img, factor):
    """Decode at 1/factor scale (1: full size); also return the scale actually applied (1 unless a JPEG)."""
    full_size = img.size
    img = load_rgb(img, (full_size[0] // factor, full_size[1] // factor) if factor > 1 else None)
    # libjpeg scales by exactly 1/factor (a partial last block rounds the size up)
    return img, (factor if img.size != full_size else 1)


def _resize_uint8(pixels, size, mode):
    """Resize a 1x3xHxW uint8 tensor to size (h, w): torch's antialiased uint8 kernels, PIL's filters."""
    return F.interpolate(pixels, size=size, mode=mode, antialias=True)


def _to_pil(pixels):
    """A 1x3xHxW uint8 tensor as an RGB PIL image."""
    # merging the planes is ~5x faster than transposing the uint8 tensor to HWC (torch returns NCHW here)
    return Image.merge('RGB', [Image.fromarray(plane) for plane in pixels[0].numpy()])


def _to_nchw(img):
    """An RGB PIL image as a 1x3xHxW uint8 tensor: a channels-last view of HWC pixels, the layout torch's SIMD
    uint8 resize works in."""
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).unsqueeze(0)  # np.array: writable, unlike asarray


class Decode:
    """First step of a pipeline without a decode-aware crop: decode to RGB at full size."""

    def __call__(self, img):
        return load_rgb(img)


class DecodeRandomResizedCrop(RandomResizedCropAndInterpolation):
    """timm's RandomResizedCropAndInterpolation on a lazily opened image (same random draws, same region).

    By default exactly timm's pixels. ``fast_decode``: a JPEG crop that keeps at least the output size per side
    at 1/2..1/8 scale is decoded at that scale and resampled by PIL from the reduced image. ``fast_resize``: other
    crops are resized by torch's uint8 kernels (bilinear/bicubic; most values within a level of PIL's).
    """

    def __init__(self, size, scale, ratio, interpolation, fast_resize=False, fast_decode=False):
        super().__init__(size, scale=scale, ratio=ratio, interpolation=interpolation)
        self.fast_resize, self.fast_decode = fast_resize, fast_decode

    def __call__(self, img):
        i, j, h, w = self.get_params(img, self.scale, self.ratio)  # needs only the header's size
        if isinstance(self.interpolation, (tuple, list)):
            interpolation = random.choice(self.interpolation)
        else:
            interpolation = self.interpolation
        out_h, out_w = self.size
        factor = _draft_factor(w, h, out_w, out_h) if self.fast_decode else 1
        img, factor = _decode_scaled(img, factor)
        if factor > 1:  # the reduced image is small: PIL resamples the crop's exact (sub-pixel) box from it
            box = (j / factor, i / factor, (j + w) / factor, (i + h) / factor)
            return img.resize((out_w, out_h), pil_modes_mapping[interpolation], box=box)
        mode = _TORCH_MODES.get(interpolation)
        if not self.fast_resize or mode is None:
            return resized_crop(img, i, j, h, w, self.size, interpolation)  # exactly timm's
        crop = _to_nchw(img.crop((j, i, j + w, i + h)))
        return _to_pil(_resize_uint8(crop, self.size, mode))


class FastResizeCenterCrop:
    """Validation resize (+ center crop), fast: a JPEG at least twice the resized size is decoded at reduced
    scale and PIL resamples only the crop's region from it; other images are resized by torch's uint8 kernels.
    Pixels differ slightly from PIL's Resize + CenterCrop (nearly all within a level on the torch path), so it
    is opt-in (DATA.VAL_FAST_RESIZE)."""

    def __init__(self, img_size, resize_size, interpolation):
        self.img_size, self.resize_size = img_size, resize_size  # resize_size None: straight to img_size
        self.interpolation = interpolation
        self.mode = _TORCH_MODES.get(interpolation)

    def __call__(self, img):
        w, h = img.size
        size = self.img_size
        if self.resize_size is None:
            new_w = new_h = size
        else:  # torchvision Resize(int): shorter side -> resize_size, longer side truncated
            short, long = (w, h) if w <= h else (h, w)
            new_short, new_long = self.resize_size, int(self.resize_size * long / short)
            new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
        img, factor = _decode_scaled(img, _draft_factor(w, h, new_w, new_h))
        if factor == 1 and self.mode is not None:
            resized = _resize_uint8(_to_nchw(img), (new_h, new_w), self.mode)
            return _to_pil(resized[:, :, top:top + size, left:left + size])
        # PIL resamples only the crop's region (in the coordinates of the reduced image)
        sx, sy = w / new_w / factor, h / new_h / factor
        box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
        return img.resize((size, size), pil_modes_mapping[self.interpolation], box=box)


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


def val_interpolation(name: str) -> InterpolationMode:
    """DATA.INTERPOLATION for validation: 'random' (timm picks per image in training) falls back to bilinear, as
    in the official code."""
    return InterpolationMode.BILINEAR if name == 'random' else InterpolationMode(name)


class TrainRecipe(NamedTuple):
    """The official train augmentation (timm's create_transform) in the three parts a data mode composes:
    ``steps`` decode, crop and flip a lazily opened image (PIL out); ``augment`` are the PIL-only augmentations
    (RandAugment / AutoAugment / AugMix, color jitter); ``final`` is timm's ToTensor, Normalize and RandomErasing,
    whose eraser (None when AUG.REPROB is 0) is also ``erasing``, for modes that erase elsewhere."""
    steps: list
    augment: list
    final: list
    erasing: object | None


def train_recipe(config: CfgNode) -> TrainRecipe:
    """The official Swin train transform (timm create_transform), starting with a decode-aware crop."""
    size, aug = config.DATA.IMG_SIZE, config.AUG
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
        primary.transforms[0] = DecodeRandomResizedCrop(
            crop.size, crop.scale, crop.ratio, config.DATA.INTERPOLATION,
            fast_resize=config.DATA.FAST_CROP, fast_decode=config.DATA.FAST_DECODE)
    else:  # tiny inputs (CIFAR-like): the official code replaces the random resized crop
        primary.transforms[0:1] = [Decode(), transforms.RandomCrop(size, padding=4, pad_if_needed=True)]
    for step in secondary.transforms:
        fix_posterize(step)
    erasing = final.transforms[-1] if aug.REPROB > 0 else None
    return TrainRecipe(primary.transforms, secondary.transforms, final.transforms, erasing)


class ValGeometry(NamedTuple):
    """The validation resize: shorter side to ``resize_size`` then a center crop of ``img_size``, or (resize_size
    None) straight to img_size x img_size."""
    img_size: int
    resize_size: int | None
    interpolation: InterpolationMode


def val_geometry(config: CfgNode) -> ValGeometry:
    """TEST.CROP: the official 256/224 resize + center crop (not for tiny images, which are resized directly)."""
    size = config.DATA.IMG_SIZE
    crop = config.TEST.CROP and size > 32
    return ValGeometry(size, int((256 / 224) * size) if crop else None, val_interpolation(config.DATA.INTERPOLATION))


def val_steps(config: CfgNode) -> list:
    """The validation steps of a lazily opened image up to the resized PIL image."""
    size, resize_size, interpolation = val_geometry(config)
    if config.DATA.VAL_FAST_RESIZE:
        return [FastResizeCenterCrop(size, resize_size, interpolation)]
    if resize_size is not None:
        return [Decode(), transforms.Resize(resize_size, interpolation=interpolation), transforms.CenterCrop(size)]
    # direct resize; a no-op copy for images already at size (the official code skips it at <= 32 px)
    return [Decode(), transforms.Resize((size, size), interpolation=interpolation)]


def normalize_steps() -> list:
    """PIL image -> float CHW tensor normalized with the ImageNet mean and std (the official preprocessing)."""
    return [transforms.ToTensor(), transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)]
