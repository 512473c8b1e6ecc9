"""Data pipeline. What the rest of the project uses:

* ``build_loader(config, device) -> (dataset_train, dataset_val, data_loader_train, data_loader_val,
  mixup_fn)``; train pieces are None in eval mode, mixup_fn is None when Mixup and CutMix are off. Datasets
  expose ``classes``. Loaders yield :class:`Batch` (images, targets, erase plan, unreadable files skipped).
  Train batches hold exactly DATA.BATCH_SIZE samples; validation shards exactly (each image once over all
  ranks; TEST.SEQUENTIAL: all on rank 0).
* ``data_loader_train.sampler.set_epoch(epoch, start_index)`` before each epoch: the contract is described
  once, in ``samplers.EpochSampler.set_epoch``.
* ``to_device(batch, device) -> (images, targets)`` on every batch: moves it, and the batch's data mode
  (data/mode.py: host_float, device_normalize, device_decode) finishes its images on the device.
* ``check_bad_images(data_loader, logger)`` after each epoch: the number of unreadable images replaced in the
  loader's latest pass; DataError above DATA.MAX_BAD_FRACTION.
* ``build_val_transform(config)``: the validation preprocessing of one PIL image (prediction tools);
  ``build_transform(is_train, config, normalize_on_device=False)``: a split's worker transform in the run's mode.
* ``usable_workers(requested)``: DATA.NUM_WORKERS capped at the CPU cores this process may use (logged once).
* ``dataset_num_classes(config) -> (count, source)``: the classes the dataset defines (folder names only), for
  MODEL.NUM_CLASSES when the user left it to the dataset.
"""
from .build import (
    build_dataset,
    build_loader,
    build_mixup,
    build_transform,
    build_val_transform,
    dataset_num_classes,
    select_mode,
    split_mode,
    usable_workers,
)
from .digits import ensure_digits
from .loader import Batch, check_bad_images, collate, to_device

__all__ = ['Batch', 'build_loader', 'build_dataset', 'build_mixup', 'build_transform', 'build_val_transform',
           'check_bad_images', 'collate', 'dataset_num_classes', 'select_mode', 'split_mode', 'to_device',
           'ensure_digits', 'usable_workers']
