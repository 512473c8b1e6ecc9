"""SimMIM pre-training input: the random patch mask and the official pre-training transform.

The transform maps an image to a ``MaskedImage`` (image, mask) like the official ``SimMIMTransform``; the
loader's collate stacks the masks into ``Batch.masks``. Its randomness
(crop, flip, mask) comes from python ``random``, torch and numpy, which the dataset seeds per sample from
``samplers.sample_seed(SEED, epoch, index)``: a sample's crop and mask depend only on that seed, so a resumed
pre-training run sees exactly the inputs of an uninterrupted one.
"""
import math
from typing import Any, NamedTuple

import numpy as np
import torch
from torchvision import transforms

from errors import ConfigError

from .host_float import HOST_FLOAT
from .mode import DataMode
from .transforms import DecodeRandomResizedCrop

# the official SimMIM pre-training crop
CROP_SCALE = (0.67, 1.)
CROP_RATIO = (3. / 4., 4. / 3.)


class MaskedImage(NamedTuple):
    """One pre-training sample: the image (the data mode's item: a normalized tensor, or uint8 pixels for the
    device to normalize) and its mask."""
    image: Any
    mask: torch.Tensor


class MaskGenerator:
    """Random mask over mask patches, returned at the model's patch resolution.

    ``ceil(mask_ratio * (input_size / mask_patch_size) ** 2)`` of the mask patches are masked (numpy's global
    RNG picks them, as in the official code); each covers (mask_patch_size / model_patch_size) ** 2 tokens.
    ``__call__()`` -> (input_size / model_patch_size) ** 2 int64 tensor of 0/1, 1 = masked.
    """

    def __init__(self, input_size=192, mask_patch_size=32, model_patch_size=4, mask_ratio=0.6):
        if input_size % mask_patch_size:
            raise ConfigError(f"DATA.MASK_PATCH_SIZE {mask_patch_size} must divide DATA.IMG_SIZE {input_size}")
        if mask_patch_size % model_patch_size:
            raise ConfigError(f"DATA.MASK_PATCH_SIZE {mask_patch_size} must be a multiple of the model's patch "
                              f"size {model_patch_size}")
        if not 0. < mask_ratio <= 1.:
            raise ConfigError(f"DATA.MASK_RATIO must be in (0, 1], got {mask_ratio}")
        self.rand_size = input_size // mask_patch_size
        self.scale = mask_patch_size // model_patch_size
        self.token_count = self.rand_size ** 2
        self.mask_count = int(math.ceil(self.token_count * mask_ratio))

    def __call__(self):
        masked = np.random.permutation(self.token_count)[:self.mask_count]
        mask = torch.zeros(self.token_count, dtype=torch.int64)
        mask[torch.from_numpy(masked)] = 1
        mask = mask.view(self.rand_size, self.rand_size)
        return mask.repeat_interleave(self.scale, 0).repeat_interleave(self.scale, 1)


def model_patch_size(config):
    """The encoder's patch size for MODEL.TYPE (one mask entry per patch token)."""
    family = {'swin': 'SWIN', 'swinv2': 'SWINV2'}.get(config.MODEL.TYPE)
    if family is None:
        raise ConfigError(f"MODEL.TYPE {config.MODEL.TYPE!r} has no SimMIM encoder (choose swin or swinv2)")
    return config.MODEL[family].PATCH_SIZE


def build_mask_generator(config):
    return MaskGenerator(input_size=config.DATA.IMG_SIZE, mask_patch_size=config.DATA.MASK_PATCH_SIZE,
                         model_patch_size=model_patch_size(config), mask_ratio=config.DATA.MASK_RATIO)


class SimMIMTransform:
    """image -> MaskedImage: random resized crop (scale 0.67-1, ratio 3/4-4/3, bilinear), horizontal flip
    (AUG.HFLIP, 0.5 as officially), ImageNet normalization; and a fresh MaskGenerator draw. The crop takes the
    decode-aware fast path of the classification pipeline unless DATA.FAST_CROP is False. ``mode`` (data/mode.py)
    ends the image: normalized here (host_float), or uint8 for the device to normalize."""

    def __init__(self, config, mode: DataMode = HOST_FLOAT):
        size = config.DATA.IMG_SIZE
        steps = [DecodeRandomResizedCrop((size, size), CROP_SCALE, CROP_RATIO, 'bilinear', config.DATA.FAST_CROP)]
        if config.AUG.HFLIP > 0:
            steps.append(transforms.RandomHorizontalFlip(config.AUG.HFLIP))
        steps += mode.decoded().finish_steps()  # the crop decodes in the worker, whatever the mode
        self.transform_img = transforms.Compose(steps)
        self.mask_generator = build_mask_generator(config)

    def __call__(self, img):
        return MaskedImage(self.transform_img(img), self.mask_generator())

    def __repr__(self):
        return f"{self.__class__.__name__}({self.transform_img}, mask {self.mask_generator.__dict__})"
