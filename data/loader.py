"""What the engine iterates: :class:`Batch`, the loader that yields it, and the two calls made around it,
``to_device`` for every batch and ``check_bad_images`` after every epoch. What a batch's images are, and how
they become the model's input, is its data mode's business (data/mode.py).

Unreadable images are reported one way: the dataset puts each skipped file in its Sample (in a worker or in
this process), ``collate`` gathers them into the batch, and ImageLoader logs and counts them in the main
process, which alone decides when there are too many.
"""
import functools
import logging
import signal
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch.utils.data import DataLoader

from errors import DataError

from .datasets import BadImageReport, Sample
from .host_float import HOST_FLOAT
from .mode import DataMode
from .recovery import survive_worker_deaths
from .simmim import MaskedImage

_logger = logging.getLogger('swin.data')


@dataclass(frozen=True)
class Batch:
    """One batch of a loader built by ``build_loader``.

    images: what ``mode`` collated: NCHW float, normalized (host_float); uint8 pixels (device_normalize); or an
        EncodedBatch of JPEG bytes and crop plans (device_decode). ``to_device`` makes them the model's input.
    targets: int64 class indices.
    mode: the data mode that made the batch and finishes it on the device.
    erase: random-erasing plans the mode applies on the device, ``(position in batch, ErasePlan)``.
    masks: SimMIM pre-training batches only: the patch masks, (N, H / patch, W / patch) int64, 1 = masked.
    bad_images: the unreadable files skipped (each replaced by the next readable sample) to fill this batch.
    error: set when a sample found no readable image (images and targets are then empty); the loader
        raises it as DataError in the main process.
    """
    images: Any
    targets: torch.Tensor
    mode: DataMode = HOST_FLOAT
    erase: tuple[tuple[int, Any], ...] = ()
    bad_images: tuple[BadImageReport, ...] = ()
    error: str = ''
    masks: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.targets)

    def pin_memory(self) -> 'Batch':
        """Called by the DataLoader's pin-memory thread (DATA.PIN_MEMORY on CUDA)."""
        masks = self.masks.pin_memory() if self.masks is not None else None
        return replace(self, images=self.images.pin_memory(), targets=self.targets.pin_memory(), masks=masks)


def collate(samples: Sequence[Sample], mode: DataMode) -> Batch:
    """The Batch of a list of dataset Samples (runs in the loader's workers); ``mode`` stacks the images."""
    bad_images = tuple(report for sample in samples for report in sample.skipped)
    failed = next((sample for sample in samples if sample.image is None), None)
    if failed is not None:
        first, last = failed.skipped[0], failed.skipped[-1]
        return Batch(torch.empty(0), torch.empty(0, dtype=torch.long), mode, bad_images=bad_images,
                     error=f"{len(failed.skipped)} unreadable images in a row from {first.path} on "
                           f"(last: {last.reason})")
    images = [sample.image for sample in samples]
    targets = torch.tensor([sample.target for sample in samples], dtype=torch.long)
    masks = None
    if isinstance(images[0], MaskedImage):  # SimMIM pre-training: any mode's image, and its patch mask
        masks = torch.stack([image.mask for image in images])
        images = [image.image for image in images]
    images, erase = mode.collate_images(images)
    return Batch(images, targets, mode, erase=erase, bad_images=bad_images, masks=masks)


class ImageLoader(DataLoader):
    """A DataLoader of :class:`Batch` that logs every unreadable image (path and reason, logger
    ``swin.data``) and counts them per pass: ``bad_images`` and ``images_loaded`` describe the latest pass
    and are reset when the next one starts. A pass stops with DataError as soon as its unreadable images
    exceed DATA.MAX_BAD_FRACTION of this rank's epoch, since check_bad_images would fail anyway.
    Train loaders are ordered by ``sampler.set_epoch`` (see samplers.EpochSampler.set_epoch)."""

    def __init__(self, dataset, mode: DataMode, max_bad_fraction: float, **kwargs):
        if kwargs.get('num_workers'):
            kwargs.setdefault('worker_init_fn', _leave_stop_signals_to_main)
        super().__init__(dataset, collate_fn=functools.partial(collate, mode=mode), **kwargs)
        self.mode = mode
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
    """(images, targets) of a batch on ``device`` (non_blocking), ready for the model: the batch's data mode
    finishes its images there (a uint8 batch is converted, normalized and random-erased; JPEG bytes are decoded,
    cropped and resized first)."""
    device = torch.device(device)
    return batch.mode.to_device(batch, device), batch.targets.to(device, non_blocking=True)
