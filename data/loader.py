"""What the engine iterates: :class:`Batch`, the loader that yields it, and the two calls made around it,
``to_device`` for every batch and ``check_bad_images`` after every epoch.

Unreadable images are reported one way: the dataset puts each skipped file in its Sample (in a worker or in
this process), ``collate`` gathers them into the batch, and ImageLoader logs and counts them in the main
process, which alone decides when there are too many.
"""
import logging
import signal
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader, default_collate

from errors import DataError

from .datasets import BadImageReport, Sample
from .device_decode import EncodedBatch, EncodedImage, decode_batch
from .recovery import survive_worker_deaths
from .simmim import MaskedImage
from .transforms import DeferredImage, ErasePlan

_logger = logging.getLogger('swin.data')
_normalize_constants = {}  # device -> (mean, std), shaped (1, 3, 1, 1)
_erase_generators = {}  # device -> torch.Generator for random-erasing noise


@dataclass(frozen=True)
class Batch:
    """One batch of a loader built by ``build_loader``.

    images: NCHW, float and normalized; or uint8 pixels (a CUDA run with DATA.DEVICE_NORMALIZE) that
        ``to_device`` converts, normalizes and random-erases on the device; or, with DATA.GPU_DECODE, an
        EncodedBatch of JPEG bytes and crop plans that ``to_device`` decodes there first.
    targets: int64 class indices.
    erase: random-erasing plans of a uint8 batch, ``(position in batch, ErasePlan)``.
    masks: SimMIM pre-training batches only: the patch masks, (N, H / patch, W / patch) int64, 1 = masked.
    bad_images: the unreadable files skipped (each replaced by the next readable sample) to fill this batch.
    error: set when a sample found no readable image (images and targets are then empty); the loader
        raises it as DataError in the main process.
    """
    images: torch.Tensor | EncodedBatch
    targets: torch.Tensor
    erase: tuple[tuple[int, ErasePlan], ...] = ()
    bad_images: tuple[BadImageReport, ...] = ()
    error: str = ''
    masks: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.targets)

    def pin_memory(self) -> 'Batch':
        """Called by the DataLoader's pin-memory thread (DATA.PIN_MEMORY on CUDA)."""
        masks = self.masks.pin_memory() if self.masks is not None else None
        return replace(self, images=self.images.pin_memory(), targets=self.targets.pin_memory(), masks=masks)


def collate(samples: Sequence[Sample]) -> Batch:
    """The Batch of a list of dataset Samples (runs in the loader's workers)."""
    bad_images = tuple(report for sample in samples for report in sample.skipped)
    failed = next((sample for sample in samples if sample.image is None), None)
    if failed is not None:
        first, last = failed.skipped[0], failed.skipped[-1]
        return Batch(torch.empty(0), torch.empty(0, dtype=torch.long), bad_images=bad_images,
                     error=f"{len(failed.skipped)} unreadable images in a row from {first.path} on "
                           f"(last: {last.reason})")
    images = [sample.image for sample in samples]
    targets = torch.tensor([sample.target for sample in samples], dtype=torch.long)
    if isinstance(images[0], EncodedImage):  # DATA.GPU_DECODE: to_device decodes (erasing is in the plans)
        return Batch(EncodedBatch(images), targets, bad_images=bad_images)
    masks = None
    if isinstance(images[0], MaskedImage):
        masks = torch.stack([image.mask for image in images])
        images = [image.image for image in images]
    if not isinstance(images[0], DeferredImage):
        return Batch(default_collate(images), targets, bad_images=bad_images, masks=masks)
    erase = tuple((i, image.erase) for i, image in enumerate(images) if image.erase is not None)
    # stacked HWC (one plain copy per image), viewed as NCHW; to_device makes it contiguous
    pixels = default_collate([image.pixels for image in images]).permute(0, 3, 1, 2)
    return Batch(pixels, targets, erase=erase, bad_images=bad_images, masks=masks)


class ImageLoader(DataLoader):
    """A DataLoader of :class:`Batch` that logs every unreadable image (path and reason, logger
    ``swin.data``) and counts them per pass: ``bad_images`` and ``images_loaded`` describe the latest pass
    and are reset when the next one starts. A pass stops with DataError as soon as its unreadable images
    exceed DATA.MAX_BAD_FRACTION of this rank's epoch, since check_bad_images would fail anyway.
    Train loaders are ordered by ``sampler.set_epoch`` (see samplers.EpochSampler.set_epoch)."""

    def __init__(self, dataset, max_bad_fraction: float, **kwargs):
        if kwargs.get('num_workers'):
            kwargs.setdefault('worker_init_fn', _leave_stop_signals_to_main)
        super().__init__(dataset, collate_fn=collate, **kwargs)
        self.max_bad_fraction = max_bad_fraction
        self.bad_images = 0
        self.images_loaded = 0

    def __iter__(self) -> Iterator[Batch]:
        self.bad_images = self.images_loaded = 0
        allowance = self.max_bad_fraction * len(self.sampler)
        batches = survive_worker_deaths(self, super().__iter__) if self.num_workers else super().__iter__()
        for batch in batches:
            for report in batch.bad_images:
                _logger.warning(f"skipped unreadable image {report.path}: {report.reason}")
            self.bad_images += len(batch.bad_images)
            if batch.error:
                raise DataError(batch.error)
            self.images_loaded += len(batch)
            if self.bad_images > allowance:
                raise DataError(_too_many_message(self, len(self.sampler)))
            yield batch


def _leave_stop_signals_to_main(worker_id):
    """A terminal's Ctrl-C reaches the whole process group: workers ignore it, and the main process finishes its
    step (which may need more batches), saves, then shuts the workers down. SIGTERM keeps its default: it is how
    multiprocessing ends workers at exit (one that ignored it would hang the exit), and a worker a cluster's
    SIGTERM ends is replaced by the loader's recovery (data/recovery.py) while main finishes the step."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _too_many_message(loader, total):
    return (f"{loader.bad_images} of {total} images of {loader.dataset.root} are unreadable, more than "
            f"DATA.MAX_BAD_FRACTION {loader.max_bad_fraction} (paths in the warnings above)")


def check_bad_images(data_loader: DataLoader, logger: logging.Logger | None = None) -> int:
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


def to_device(batch: Batch, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, targets) of a batch on ``device`` (non_blocking), ready for the model. A uint8 batch is
    converted, normalized with the ImageNet mean/std and random-erased there: the values the float host path
    computes (ToTensor + Normalize), except that erasing noise comes from a device generator. A batch of
    JPEG bytes (DATA.GPU_DECODE) is decoded, cropped and resized on the device first."""
    images, erase = batch.images, batch.erase
    if isinstance(images, EncodedBatch):
        images, erase = decode_batch(images, device)
    images = images.to(device, non_blocking=True)
    targets = batch.targets.to(device, non_blocking=True)
    if images.dtype != torch.uint8:
        return images, targets
    mean, std = _constants(images.device)
    images = images.contiguous().float().div_(255).sub_(mean).div_(std)  # ToTensor, Normalize: same ops
    if erase:
        _erase(images, erase)
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
