"""Data pipeline. What the engine uses:

* ``build_loader(config) -> (dataset_train, dataset_val, data_loader_train, data_loader_val, mixup_fn)``;
  train pieces are None in eval mode, mixup_fn is None when Mixup and CutMix are off. Datasets expose
  ``classes``. Train batches hold exactly DATA.BATCH_SIZE samples; validation shards exactly (each image once
  over all ranks; TEST.SEQUENTIAL: all on rank 0).
* ``data_loader_train.sampler.set_epoch(epoch, start_index=0)`` before each epoch: the order depends on
  (SEED, epoch) only; ``start_index`` skips that many of this rank's samples (mid-epoch resume).
  ``len(data_loader_train)`` stays the full epoch; ``sampler.num_remaining`` counts the samples left.
* ``to_device(images, targets, device)`` on every batch: moves it, and for uint8 batches (a CUDA run with
  DATA.DEVICE_NORMALIZE) converts, normalizes and random-erases on the device.
* ``check_bad_images(data_loader, logger)`` after each epoch: the number of unreadable images replaced in the
  loader's latest pass; DataError above DATA.MAX_BAD_FRACTION.
"""
from .build import build_dataset, build_loader, build_mixup
from .digits import ensure_digits
from .loader import check_bad_images, to_device

__all__ = ['build_loader', 'build_dataset', 'build_mixup', 'check_bad_images', 'to_device', 'ensure_digits']
