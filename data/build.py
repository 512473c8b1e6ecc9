"""build_loader: the datasets, samplers and loaders of a run and the Mixup/CutMix function (the structure
of the official Swin data/build.py)."""
import functools
import logging
import os
from collections.abc import Callable

import torch
from timm.data import Mixup
from yacs.config import CfgNode

from errors import DataError

from .datasets import FolderDataset, ImageDataset, UnlabeledFolderDataset, ZipDataset
from .device_decode import DEVICE_DECODE, jpeg_decoder
from .device_normalize import DEVICE_NORMALIZE
from .digits import ensure_digits
from .host_float import HOST_FLOAT
from .imagenet22k import NUM_CLASSES as IMAGENET22K_CLASSES
from .imagenet22k import ImageNet22KDataset
from .loader import ImageLoader
from .mode import DataMode
from .samplers import DistributedEpochSampler, RepeatedAugSampler, ShardSampler, ValSampler
from .simmim import SimMIMTransform

_logger = logging.getLogger('swin.data')


def build_loader(config: CfgNode, device: torch.device | str = 'cpu', normalize_on_device: bool | None = None
                 ) -> tuple[ImageDataset | None, ImageDataset, ImageLoader | None, ImageLoader, Mixup | None]:
    """(dataset_train, dataset_val, data_loader_train, data_loader_val, mixup_fn) for a run computing on
    ``device``.

    In eval mode the train pieces are None (and train/ is not read). Loaders yield ``loader.Batch``es.
    Train batches hold exactly DATA.BATCH_SIZE samples, in the order ``data_loader_train.sampler.set_epoch``
    selects (see samplers.EpochSampler.set_epoch). Validation shards exactly (each image once over all
    ranks). ``normalize_on_device``: whether ``data.to_device`` normalizes (and, with DATA.GPU_DECODE, decodes)
    on the device, the data mode of ``select_mode``; by default when DATA.DEVICE_NORMALIZE and ``device`` is a GPU.
    """
    on_cuda = torch.device(device).type == 'cuda'
    if normalize_on_device is None:
        normalize_on_device = config.DATA.DEVICE_NORMALIZE and on_cuda
    mode = select_mode(config, normalize_on_device)
    root = data_root(config)
    if config.MODEL.TASK == 'simmim':
        return build_pretrain_loader(config, root, on_cuda, mode)
    dataset_val = build_dataset(False, config, root, mode)
    dataset_train = None if config.EVAL_MODE else build_dataset(True, config, root, mode)
    _check_classes(config, dataset_train, dataset_val)

    sampler_val = ValSampler(len(dataset_val), config.RANK, config.WORLD_SIZE, sequential=config.TEST.SEQUENTIAL,
                             shuffle=config.TEST.SHUFFLE, seed=config.SEED)
    _fill_cache(config, dataset_val, sampler_val.indices)
    loader_val = _make_loader(config, dataset_val, mode.for_split(False, config), sampler_val, on_cuda,
                              drop_last=False)
    if dataset_train is None:
        return None, dataset_val, None, loader_val, None

    if config.DATA.ZIP_MODE and config.DATA.CACHE_MODE == 'part':
        sampler_train = ShardSampler(len(dataset_train), config.RANK, config.WORLD_SIZE, config.SEED)
        _fill_cache(config, dataset_train, sampler_train.shard)
    else:
        if config.AUG.REPEATS > 1:
            sampler_train = RepeatedAugSampler(len(dataset_train), config.RANK, config.WORLD_SIZE, config.SEED,
                                               config.AUG.REPEATS)
        else:
            sampler_train = DistributedEpochSampler(len(dataset_train), config.RANK, config.WORLD_SIZE, config.SEED)
        _fill_cache(config, dataset_train, range(len(dataset_train)))
    step_samples = config.DATA.BATCH_SIZE * config.TRAIN.ACCUMULATION_STEPS
    if len(sampler_train) < step_samples:
        raise DataError(f"{dataset_train.root} gives each of {config.WORLD_SIZE} processes {len(sampler_train)} "
                        f"images, fewer than one optimizer step takes (DATA.BATCH_SIZE {config.DATA.BATCH_SIZE} "
                        f"x TRAIN.ACCUMULATION_STEPS {config.TRAIN.ACCUMULATION_STEPS})")
    train_mode = mode.for_split(True, config)
    loader_train = _make_loader(config, dataset_train, train_mode, sampler_train, on_cuda, drop_last=True)
    _logger.info(f"rank {config.RANK}: train {dataset_train}, {len(loader_train)} batches per epoch; "
                 f"val {dataset_val}, {len(loader_val)} batches on this rank{_where(config, mode, train_mode)}")
    return dataset_train, dataset_val, loader_train, loader_val, build_mixup(config)


def select_mode(config: CfgNode, normalize_on_device: bool) -> DataMode:
    """The run's data mode (data/mode.py): host_float, unless images are normalized on the device; then
    device_decode with DATA.GPU_DECODE, else device_normalize."""
    if not normalize_on_device:
        return HOST_FLOAT
    return DEVICE_DECODE if config.DATA.GPU_DECODE else DEVICE_NORMALIZE


def split_mode(is_train: bool, config: CfgNode, normalize_on_device: bool = False) -> DataMode:
    """The data mode that loads one split (select_mode's, or a simpler one where it cannot do that split)."""
    return select_mode(config, normalize_on_device).for_split(is_train, config)


def build_transform(is_train: bool, config: CfgNode, normalize_on_device: bool = False) -> Callable:
    """The worker transform of a split in its data mode (``split_mode``): a lazily opened PIL image -> that
    mode's image item (``collate(items, split_mode(...))`` stacks them)."""
    return split_mode(is_train, config, normalize_on_device).transform(is_train, config)


def _where(config, mode, train_mode):
    """Where images are normalized and decoded, for the loader's log line."""
    if mode == HOST_FLOAT:
        return '; DATA.GPU_DECODE has no effect (it needs DATA.DEVICE_NORMALIZE on a CUDA run)' \
            if config.DATA.GPU_DECODE else ''
    where = '; uint8 batches normalized on the device'
    if mode != DEVICE_DECODE:
        return where
    if train_mode == DEVICE_DECODE:
        return f"{where}; JPEGs decoded on the device ({jpeg_decoder()[0]}): train and val"
    return (f"{where}; JPEGs decoded on the device ({jpeg_decoder()[0]}): val only (train crops stay on the CPU: "
            f"PIL-only augmentations or tiny images)")


def build_pretrain_loader(config, root, on_cuda, mode):
    """SimMIM pre-training: (dataset_train, None, data_loader_train, None, None). Every image under
    ``root/train`` (class folders or not; labels unused), or train.zip in zip mode; batches carry the patch
    masks (``Batch.masks``) and are seeded and resumable like classification batches."""
    transform = SimMIMTransform(config, mode)
    if config.DATA.ZIP_MODE:
        dataset = ZipDataset(root, 'train', config.MODEL.NUM_CLASSES, transform)
    else:
        dataset = UnlabeledFolderDataset(os.path.join(root, 'train'), transform)
    sampler = DistributedEpochSampler(len(dataset), config.RANK, config.WORLD_SIZE, config.SEED)
    _fill_cache(config, dataset, range(len(dataset)))
    if len(sampler) < config.DATA.BATCH_SIZE:
        raise DataError(f"{dataset.root} gives each of {config.WORLD_SIZE} processes {len(sampler)} images, "
                        f"fewer than DATA.BATCH_SIZE {config.DATA.BATCH_SIZE}")
    loader = _make_loader(config, dataset, mode.decoded(), sampler, on_cuda, drop_last=True)
    _logger.info(f"rank {config.RANK}: SimMIM pre-training on {dataset}, {len(loader)} batches per epoch; "
                 f"{transform}")
    return dataset, None, loader, None, None


def data_root(config: CfgNode) -> str:
    """The dataset root folder; for digits, written on first use. (DATA.DATASET is validated by config.)"""
    path = config.DATA.DATA_PATH
    if config.DATA.DATASET != 'imagenet' and config.DATA.ZIP_MODE:
        layout = 'a folder tree' if config.DATA.DATASET == 'digits' else 'map files of image files'
        raise DataError(f"DATA.ZIP_MODE does not apply to DATA.DATASET {config.DATA.DATASET} ({layout})")
    if config.DATA.DATASET == 'digits':
        return ensure_digits(path)
    if not path:
        raise DataError(f"DATA.DATA_PATH is not set (--data-path): {config.DATA.DATASET} needs a dataset folder")
    if not os.path.isdir(path):
        raise DataError(f"DATA.DATA_PATH {path} does not exist or is not a folder")
    return path


def build_dataset(is_train: bool, config: CfgNode, root: str, mode: DataMode = HOST_FLOAT) -> ImageDataset:
    """The train or val split under ``root``: ``<split>/<class>/<image>``, or ``<split>.zip`` +
    ``<split>_map.txt`` with DATA.ZIP_MODE, or the official ImageNet-22K map files (DATA.DATASET imagenet22K).
    Images go through the worker transform of ``mode`` for this split. (build_loader checks its classes against
    MODEL.NUM_CLASSES.)"""
    transform = mode.for_split(is_train, config).transform(is_train, config)
    split = 'train' if is_train else 'val'
    if config.DATA.DATASET == 'imagenet22K':
        return ImageNet22KDataset(root, split, transform)
    if config.DATA.ZIP_MODE:
        return ZipDataset(root, split, config.MODEL.NUM_CLASSES, transform)
    return FolderDataset(_split_folder(root, split), transform)


def _split_folder(root, split):
    folder = os.path.join(root, split)
    if not os.path.isdir(folder):
        raise DataError(f"split folder {folder} not found (DATA.DATA_PATH must hold train/ and val/ class folders)")
    return folder


def dataset_num_classes(config: CfgNode) -> tuple[int, str]:
    """The number of classes the dataset defines, and where it comes from (for the log): the class folders
    of the train split (val in eval mode), 1000 for the official ImageNet zip layout (as the official code),
    21841 for ImageNet-22K. Reads only folder names."""
    if config.DATA.DATASET == 'imagenet22K':
        return IMAGENET22K_CLASSES, 'ImageNet-22K'
    if config.DATA.ZIP_MODE:
        return 1000, 'the ImageNet zip layout'
    folder = _split_folder(data_root(config), 'val' if config.EVAL_MODE else 'train')
    return len(FolderDataset.find_classes(folder)), f"class folders in {folder}"


def build_val_transform(config: CfgNode) -> Callable:
    """The validation transform of a config: a PIL image (any mode) -> normalized float CHW tensor, exactly
    as the val loader preprocesses (for tools that predict on single images)."""
    return HOST_FLOAT.transform(False, config)


def _check_classes(config, dataset_train, dataset_val):
    """The class check, made once: the train split (val in eval mode) has MODEL.NUM_CLASSES classes, and
    val has train's classes. Zip val members are usually flat, so in zip mode val takes train's names."""
    reference = dataset_train if dataset_train is not None else dataset_val
    num_classes = config.MODEL.NUM_CLASSES
    if len(reference.classes) != num_classes:
        raise DataError(f"{reference.root} has {len(reference.classes)} class folders but MODEL.NUM_CLASSES "
                        f"is {num_classes}")
    if dataset_train is None:
        return
    if config.DATA.ZIP_MODE:
        dataset_val.classes = dataset_train.classes
    elif dataset_val.classes != dataset_train.classes:
        raise DataError(f"class folders of {dataset_val.root} differ from those of {dataset_train.root}: "
                        f"{_missing(dataset_train.classes, dataset_val.classes, 'val')}; "
                        f"{_missing(dataset_val.classes, dataset_train.classes, 'train')}")


def _missing(present, other, side, shown=5):
    """'missing in val: a, b, ... (N in all)' for the classes of ``present`` that ``other`` lacks."""
    missing = [name for name in present if name not in set(other)]
    if not missing:
        return f"none missing in {side}"
    more = f", ... ({len(missing)} in all)" if len(missing) > shown else ''
    return f"missing in {side}: {', '.join(missing[:shown])}{more}"


def _fill_cache(config, dataset, indices):
    """DATA.CACHE_MODE in zip mode: full caches every image, part only those this rank reads."""
    if not config.DATA.ZIP_MODE or config.DATA.CACHE_MODE == 'no':
        return
    indices = range(len(dataset)) if config.DATA.CACHE_MODE == 'full' else indices
    _logger.info(f"caching {len(indices)} images of {dataset.reader.path} in memory ({config.DATA.CACHE_MODE})")
    dataset.cache(indices)


@functools.cache  # one log line per process, not one per loader
def usable_workers(requested: int) -> int:
    """DATA.NUM_WORKERS capped at the CPU cores this process may run on (its affinity): the official configs ask
    for 8 loader processes, which on a 2-core machine only compete with each other and the training process."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
    if requested <= cores:
        return requested
    _logger.info(f"DATA.NUM_WORKERS {requested} capped at {cores}: this process may use {cores} CPU cores")
    return cores


def _make_loader(config, dataset, mode, sampler, on_cuda, drop_last):
    workers = usable_workers(config.DATA.NUM_WORKERS)
    worker_options = dict(persistent_workers=config.DATA.PERSISTENT_WORKERS,
                          prefetch_factor=config.DATA.PREFETCH_FACTOR) if workers > 0 else {}
    return ImageLoader(
        dataset, mode, config.DATA.MAX_BAD_FRACTION,
        sampler=sampler,
        batch_size=config.DATA.BATCH_SIZE,
        num_workers=workers,
        pin_memory=config.DATA.PIN_MEMORY and on_cuda,
        drop_last=drop_last,
        # the loader's own generator: starting an epoch never draws from the global torch RNG
        generator=torch.Generator().manual_seed(config.SEED),
        **worker_options,
    )


def build_mixup(config: CfgNode) -> Mixup | None:
    """timm Mixup/CutMix (label smoothing folded into the mixed targets), or None when both are off."""
    aug = config.AUG
    if not (aug.MIXUP > 0 or aug.CUTMIX > 0 or aug.CUTMIX_MINMAX is not None):
        return None
    return Mixup(mixup_alpha=aug.MIXUP, cutmix_alpha=aug.CUTMIX, cutmix_minmax=aug.CUTMIX_MINMAX,
                 prob=aug.MIXUP_PROB, switch_prob=aug.MIXUP_SWITCH_PROB, mode=aug.MIXUP_MODE,
                 label_smoothing=config.MODEL.LABEL_SMOOTHING, num_classes=config.MODEL.NUM_CLASSES)
