"""Opt-in JPEG decoding on the device (DATA.GPU_DECODE): nvJPEG through TorchCodec, torchvision.io as fallback.

The device-decode data mode. Loader workers only parse the JPEG header and draw the crop (the same random
draws as the CPU pipeline) and hand over the file's bytes with a :class:`CropPlan`; ``to_device`` decodes the
whole batch in one call on the device, then crops, resizes (antialiased, PIL's filters), flips and rounds to
uint8 there, and normalizes as the device-normalize mode does. The CPU decode, crop and resize (≈ 2.5-4 ms of a
core per ImageNet image) leave the workers.

Pixels: the same regions as the CPU path; nvJPEG's IDCT and the float resampler round differently from
libjpeg and torch's uint8 kernels, so nearly all values are within one level (measured by
scripts/benchmark_decode.py, bounded by tests). What cannot be done on the device falls back to decoding in
the worker (PIL) with the same plan: non-JPEG files, CMYK JPEGs. Training uses it only without PIL-only
augmentations (AUG.AUTO_AUGMENT none, AUG.COLOR_JITTER 0): those need decoded pixels in the worker, so such a
train split loads in the device-normalize mode (``DeviceDecode.for_split``).
"""
import random
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torchvision.transforms import InterpolationMode, RandomHorizontalFlip

from errors import ConfigError

from .device_normalize import DEVICE_NORMALIZE, ErasePlan, normalize_on_device, plan_erasing
from .mode import DataMode
from .transforms import BadImage, load_rgb, open_image, train_recipe, val_geometry

_DEVICE_MODES = {InterpolationMode.BILINEAR: 'bilinear', InterpolationMode.BICUBIC: 'bicubic'}


class CropPlan(NamedTuple):
    """What to do with a decoded image: crop ``box`` (top, left, height, width; None: all), resize to
    ``resize`` (h, w), crop ``after`` (top, left, height, width; None: all), flip, then erase."""
    box: tuple[int, int, int, int] | None
    resize: tuple[int, int]
    after: tuple[int, int, int, int] | None
    mode: str
    flip: bool
    erase: ErasePlan | None


class EncodedImage(NamedTuple):
    """A JPEG's bytes (uint8 tensor) or, when the device cannot decode it, HWC uint8 pixels; and its plan."""
    data: torch.Tensor
    encoded: bool
    plan: CropPlan


def device_mode(interpolation):
    if interpolation not in _DEVICE_MODES:
        raise ConfigError(f"DATA.INTERPOLATION {interpolation.value!r} has no device resampler for "
                          f"DATA.GPU_DECODE (use bicubic or bilinear)")
    return _DEVICE_MODES[interpolation]


def _encode(img, plan):
    """The lazily opened image as bytes for the device decoder, or decoded here when it cannot take it."""
    if img.format == 'JPEG' and img.mode in ('RGB', 'L') and hasattr(img.fp, 'getvalue'):
        return EncodedImage(torch.frombuffer(bytearray(img.fp.getvalue()), dtype=torch.uint8), True, plan)
    return EncodedImage(torch.from_numpy(_pixels(img)), False, plan)


def _pixels(img):
    import numpy as np
    return np.array(load_rgb(img))


class PlanRandomResizedCrop:
    """Train: timm's random resized crop and horizontal flip, drawn from the header only (same draws as the
    CPU pipeline: crop, interpolation, flip, erasing) into a plan that the device applies."""

    def __init__(self, crop, hflip, erasing=None):
        self.crop, self.hflip = crop, hflip  # crop: timm's RandomResizedCropAndInterpolation
        self.erasing = erasing

    def __call__(self, img):
        i, j, h, w = self.crop.get_params(img, self.crop.scale, self.crop.ratio)
        interpolation = self.crop.interpolation
        if isinstance(interpolation, (tuple, list)):
            interpolation = random.choice(interpolation)
        flip = self.hflip > 0 and torch.rand(1).item() < self.hflip  # torchvision's flip draws from torch
        out_h, out_w = self.crop.size
        erase = plan_erasing(self.erasing, out_h, out_w) if self.erasing is not None else None
        return _encode(img, CropPlan((i, j, h, w), (out_h, out_w), None, device_mode(interpolation), flip, erase))


class PlanResizeCenterCrop:
    """Validation: resize (shorter side to ``resize_size``, or straight to ``img_size``) and center crop,
    the geometry of torchvision's Resize + CenterCrop, planned here and applied on the device."""

    def __init__(self, img_size, resize_size, interpolation):
        self.img_size, self.resize_size = img_size, resize_size
        self.mode = device_mode(interpolation)

    def __call__(self, img):
        w, h = img.size
        size = self.img_size
        if self.resize_size is None:
            return _encode(img, CropPlan(None, (size, size), None, self.mode, False, None))
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = self.resize_size, int(self.resize_size * long / short)
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
        return _encode(img, CropPlan(None, (new_h, new_w), (top, left, size, size), self.mode, False, None))


class EncodedBatch:
    """A batch of EncodedImage as the loader yields it; the mode's ``to_device`` decodes it."""

    def __init__(self, images):
        self.images = list(images)

    def pin_memory(self):  # the DataLoader's pin thread: bytes are small, decoded on the device anyway
        return self

    def __len__(self):
        return len(self.images)


def jpeg_decoder():
    """(name, batched decode function): TorchCodec's decode_jpeg, or torchvision.io's when TorchCodec is not
    installed or cannot load (it needs FFmpeg's libraries)."""
    if _decoder:
        return _decoder[0]
    try:
        import torchcodec
        from torchcodec.decoders import decode_jpeg
        found = (f'TorchCodec {torchcodec.__version__}', lambda datas, device: decode_jpeg(datas, mode='RGB',
                                                                                          device=device))
    except (ImportError, RuntimeError, OSError) as e:
        found = _torchvision_decoder('not installed' if isinstance(e, ImportError) else type(e).__name__)
    _decoder.append(found)
    return found


def _torchvision_decoder(why_not_torchcodec):
    import torchvision
    from torchvision.io import ImageReadMode, decode_jpeg
    return (f'torchvision.io {torchvision.__version__} (TorchCodec: {why_not_torchcodec})',
            lambda datas, device: decode_jpeg(datas, mode=ImageReadMode.RGB, device=device))


_decoder = []
pil_fallbacks = [0]  # JPEGs the device decoder rejected and PIL decoded instead (benchmark_decode reports it)


def decode_jpegs(datas, device):
    """CHW uint8 RGB images decoded on ``device`` in one batched call. A TorchCodec build without CUDA
    support (the PyPI wheel) fails here: torchvision.io then takes over for the rest of the run."""
    name, decode = jpeg_decoder()
    try:
        return decode(list(datas), device)
    except RuntimeError as e:
        if not name.startswith('TorchCodec'):
            raise
        _decoder[0] = _torchvision_decoder(f'{type(e).__name__} on {device}: {str(e)[:80]}')
        return _decoder[0][1](list(datas), device)


def apply_plan(image, plan):
    """A CHW uint8 image on any device through its CropPlan: 1xCxHxW uint8 (erasing happens later)."""
    if plan.box is not None:
        top, left, h, w = plan.box
        image = image[:, top:top + h, left:left + w]
    image = image.unsqueeze(0)
    if tuple(image.shape[-2:]) != tuple(plan.resize):
        resized = F.interpolate(image.float(), size=plan.resize, mode=plan.mode, antialias=True,
                                align_corners=False)
        image = resized.round_().clamp_(0, 255).to(torch.uint8)
    if plan.after is not None:
        top, left, h, w = plan.after
        image = image[:, :, top:top + h, left:left + w]
    return image.flip(-1) if plan.flip else image


def decode_batch(batch, device):
    """(N x 3 x H x W uint8 on ``device``, erasing plans [(index, ErasePlan)]) of an EncodedBatch."""
    device = torch.device(device)
    encoded = [k for k, item in enumerate(batch.images) if item.encoded]
    decoded = dict(zip(encoded, _decode_or_fallback([batch.images[k].data for k in encoded], device), strict=True))
    outputs, erasing = [], []
    for k, item in enumerate(batch.images):
        image = decoded[k] if item.encoded else item.data.to(device, non_blocking=True).permute(2, 0, 1)
        outputs.append(apply_plan(image, item.plan))
        if item.plan.erase is not None:
            erasing.append((k, item.plan.erase))
    return torch.cat(outputs), erasing


def _decode_or_fallback(datas, device):
    """Batched device decoding; if the batch fails, image by image, PIL for those the device rejects."""
    if not datas:
        return []
    try:
        return decode_jpegs(datas, device)
    except RuntimeError:
        images = []
        for data in datas:
            try:
                images.append(decode_jpegs([data], device)[0])
            except RuntimeError:
                pil_fallbacks[0] += 1
                images.append(_pil_decode(data).to(device))
        return images


def _pil_decode(data):
    try:
        return torch.from_numpy(_pixels(open_image(data.numpy().tobytes()))).permute(2, 0, 1)
    except BadImage as e:
        raise BadImage(f"undecodable JPEG in a GPU_DECODE batch: {e}") from None


class DeviceDecode(DataMode):
    name = 'device_decode'

    def for_split(self, is_train, config):
        """Itself, except for train crops the device cannot make: those of tiny images (a padded random crop),
        recipes with PIL-only augmentations (RandAugment / AutoAugment / color jitter) or a vertical flip."""
        if is_train and self._train_crop(config) is None:
            return DEVICE_NORMALIZE
        return self

    def decoded(self):
        return DEVICE_NORMALIZE

    def transform(self, is_train, config):
        if is_train:
            return self._train_crop(config)
        size, resize_size, interpolation = val_geometry(config)
        return PlanResizeCenterCrop(size, resize_size, interpolation)

    def _train_crop(self, config):
        recipe = train_recipe(config)
        crop, *flips = recipe.steps
        if (config.DATA.IMG_SIZE <= 32 or recipe.augment
                or any(not isinstance(t, RandomHorizontalFlip) for t in flips)):
            return None
        return PlanRandomResizedCrop(crop, flips[0].p if flips else 0.0, recipe.erasing)

    def collate_images(self, images):
        return EncodedBatch(images), ()  # the erasing plans travel in the crop plans

    def to_device(self, batch, device):
        images, erase = decode_batch(batch.images, device)
        return normalize_on_device(images, erase)


DEVICE_DECODE = DeviceDecode()
