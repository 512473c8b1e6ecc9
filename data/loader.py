"""The loader the engine iterates and the two calls it makes around it: ``to_device`` for every batch and
``check_bad_images`` after every epoch."""
import logging

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader, default_collate

from errors import DataError
from .datasets import take_bad_images
from .transforms import DeferredImage

_logger = logging.getLogger('swin.data')
_normalize_constants = {}  # device -> (mean, std), shaped (1, 3, 1, 1)
_erase_generators = {}  # device -> torch.Generator for random-erasing noise


def collate(samples):
    """(images, targets, extras) of one batch. extras: the unreadable images met while loading it and, for
    uint8 batches, the random-erasing plans [(position in batch, ErasePlan)]."""
    images, targets = zip(*samples)
    erasing = []
    if isinstance(images[0], DeferredImage):
        erasing = [(i, image.erase) for i, image in enumerate(images) if image.erase is not None]
        # stacked HWC (one plain copy per image), viewed as NCHW; to_device makes it contiguous
        images = default_collate([image.pixels for image in images]).permute(0, 3, 1, 2)
    else:
        images = default_collate(list(images))
    targets = torch.tensor(targets, dtype=torch.long)
    return images, targets, {'bad_images': take_bad_images(), 'erasing': erasing}


class ImageLoader(DataLoader):
    """A DataLoader of (images, targets) that logs every unreadable image (path and reason, logger
    ``swin.data``) and counts them per pass: ``bad_images`` and ``images_loaded`` describe the latest pass
    and are reset when the next one starts. A pass stops with DataError as soon as its unreadable images
    exceed DATA.MAX_BAD_FRACTION of this rank's epoch, since check_bad_images would fail anyway."""

    def __init__(self, dataset, max_bad_fraction, **kwargs):
        super().__init__(dataset, collate_fn=collate, **kwargs)
        self.max_bad_fraction = max_bad_fraction
        self.bad_images = 0
        self.images_loaded = 0

    def __iter__(self):
        self.bad_images = self.images_loaded = 0
        if self.num_workers == 0:
            take_bad_images()  # forget reports from direct dataset use in this process
        allowance = self.max_bad_fraction * len(self.sampler)
        batches = super().__iter__()
        while True:
            try:
                images, targets, extras = next(batches)
            except StopIteration:
                return
            except DataError as e:  # raised in a worker: torch put the worker's traceback in the message
                raise DataError(str(e).strip().splitlines()[-1].split('DataError: ', 1)[-1]) from None
            for path, reason in extras['bad_images']:
                _logger.warning(f"skipped unreadable image {path}: {reason}")
            self.bad_images += len(extras['bad_images'])
            self.images_loaded += len(targets)
            if self.bad_images > allowance:
                raise DataError(_too_many_message(self, len(self.sampler)))
            if extras['erasing']:
                images.deferred_erasing = extras['erasing']  # read by to_device
            yield images, targets


def _too_many_message(loader, total):
    return (f"{loader.bad_images} of {total} images of {loader.dataset.root} are unreadable, more than "
            f"DATA.MAX_BAD_FRACTION {loader.max_bad_fraction} (paths in the warnings above)")


def check_bad_images(data_loader, logger=None):
    """Number of unreadable (skipped and replaced) images in the loader's latest pass; call it after each
    epoch. Raises DataError when they are more than DATA.MAX_BAD_FRACTION of the images loaded. Loaders not
    built by build_loader do not track unreadable images: 0."""
    if not isinstance(data_loader, ImageLoader):
        return 0
    bad, loaded = data_loader.bad_images, data_loader.images_loaded
    if bad > data_loader.max_bad_fraction * loaded:
        raise DataError(_too_many_message(data_loader, loaded))
    if bad and logger is not None:
        logger.warning(f"{bad} of {loaded} images were unreadable and replaced by other samples")
    return bad


def to_device(images, targets, device):
    """Move a batch to ``device`` (non_blocking). A uint8 batch (DATA.DEVICE_NORMALIZE with CUDA) is then
    converted, normalized with the ImageNet mean/std and random-erased there: the values the float host
    path computes (ToTensor + Normalize), except that erasing noise comes from a device generator."""
    erasing = getattr(images, 'deferred_erasing', None)
    images = images.to(device, non_blocking=True)
    targets = targets.to(device, non_blocking=True)
    if images.dtype != torch.uint8:
        return images, targets
    mean, std = _constants(images.device)
    images = images.contiguous().float().div_(255).sub_(mean).div_(std)  # ToTensor, Normalize: same ops
    if erasing:
        _erase(images, erasing)
    return images, targets


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
