"""Data pipeline: folder/zip/cache equivalence, bad images, exact sharded validation, reproducible
augmentation, uint8 device path, digits materialization, error messages."""
import contextlib
import logging
import os
import random
import re
import signal
import subprocess
import sys
import time
import warnings
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

import data.transforms as transforms_module
import main
from config import load_config
from conftest import ROOT, make_tiny_config
from data import (
    Batch,
    build_loader,
    build_mixup,
    build_transform,
    build_val_transform,
    check_bad_images,
    dataset_num_classes,
    ensure_digits,
    to_device,
    usable_workers,
)
from data.datasets import BadImageReport
from data.digits import MARKER
from data.samplers import DistributedEpochSampler, ShardSampler, ValSampler
from data.transforms import open_image
from errors import DataError

CLASSES = ('ant', 'bee', 'cat')


def _save(path, size=(56, 44), mode='RGB', seed=0, **save_args):
    rng = np.random.default_rng(seed)
    w, h = size
    base = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    noisy = np.clip(np.asarray(base, dtype=np.int16) + rng.integers(-20, 20, (h, w, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(noisy)
    if mode == 'P':
        img = img.quantize(16)
        save_args.setdefault('transparency', 0)
    elif mode != 'RGB':
        img = img.convert(mode)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img.save(path, **save_args)
    return path


def make_tree(root, train_per_class=4, val_per_class=3):
    """root/{train,val}/<class>/NN.jpg; val gets 3 x 3 = 9 images (odd)."""
    seed = 0
    for split, count in (('train', train_per_class), ('val', val_per_class)):
        for name in CLASSES:
            for i in range(count):
                seed += 1
                _save(os.path.join(root, split, name, f'{i:02d}.jpg'), size=(50 + seed % 13, 40 + seed % 7), seed=seed)
    return str(root)


def make_zip(root, split):
    """The official zip layout from an ImageFolder split: <split>.zip + <split>_map.txt."""
    folder = os.path.join(root, split)
    with zipfile.ZipFile(os.path.join(root, f'{split}.zip'), 'w') as zf, \
            open(os.path.join(root, f'{split}_map.txt'), 'w') as map_file:
        for label, name in enumerate(sorted(os.listdir(folder))):
            for file in sorted(os.listdir(os.path.join(folder, name))):
                zf.write(os.path.join(folder, name, file), f'{name}/{file}')
                map_file.write(f'{name}/{file}\t{label}\n')


def config_for(root, *opts, environ=None):
    base = ('DATA.DATA_PATH', str(root), 'MODEL.NUM_CLASSES', 3, 'DATA.IMG_SIZE', 48, 'DATA.BATCH_SIZE', 4)
    return make_tiny_config(None, *(base + opts), environ=environ)


def epoch_batches(loader, epoch, start_index=0):
    loader.sampler.set_epoch(epoch, start_index=start_index)
    return list(loader)


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for batch_a, batch_b in zip(a, b, strict=True):
        assert torch.equal(batch_a.targets, batch_b.targets)
        assert torch.equal(batch_a.images, batch_b.images)


@contextlib.contextmanager
def data_log(caplog):
    """Capture the 'swin.data' logger even when another test made its 'swin' parent stop propagating."""
    logger = logging.getLogger('swin.data')
    logger.addHandler(caplog.handler)
    try:
        yield caplog
    finally:
        logger.removeHandler(caplog.handler)


# ----------------------------------------------------------------------------- folder / zip / cache
def test_folder_zip_and_cache_modes_give_the_same_samples(tmp_path):
    root = make_tree(tmp_path / 'ds')
    make_zip(root, 'train')
    make_zip(root, 'val')
    results = {}
    for mode in ('folder', 'no', 'full', 'part'):
        zip_opts = () if mode == 'folder' else ('DATA.ZIP_MODE', True, 'DATA.CACHE_MODE', mode)
        dataset_train, dataset_val, loader_train, loader_val, _ = build_loader(config_for(root, *zip_opts))
        assert dataset_train.classes == dataset_val.classes == list(CLASSES)
        if mode in ('full', 'part'):  # one rank: part caches everything too
            assert dataset_train.num_cached == len(dataset_train) == 12
            assert dataset_val.num_cached == len(dataset_val) == 9
        results[mode] = (epoch_batches(loader_train, 1), list(loader_val))
    for mode in ('no', 'full', 'part'):
        assert_same_batches(results[mode][0], results['folder'][0])
        assert_same_batches(results[mode][1], results['folder'][1])


def test_more_workers_than_cores_are_capped_with_one_line_and_no_loader_warning(tmp_path, caplog):
    """The official DATA.NUM_WORKERS 8 on a machine with fewer cores: capped at the cores this process may use,
    said once for both loaders, and the DataLoader has nothing to warn about; the batches are the same."""
    cores = len(os.sched_getaffinity(0))
    root = make_tree(tmp_path / 'ds')
    usable_workers.cache_clear()
    with data_log(caplog), warnings.catch_warnings():
        caplog.set_level(logging.INFO, logger='swin.data')
        warnings.simplefilter('error')  # the DataLoader's "creates N worker processes" warning would raise
        _, _, loader_train, loader_val, _ = build_loader(config_for(root, 'DATA.NUM_WORKERS', cores + 6))
        capped = epoch_batches(loader_train, 1)
    assert loader_train.num_workers == loader_val.num_workers == cores
    records = {id(r): r for r in caplog.records}.values()  # one record may reach caplog by two handlers
    said = [r.getMessage() for r in records if 'capped' in r.getMessage()]
    assert said == [f"DATA.NUM_WORKERS {cores + 6} capped at {cores}: this process may use {cores} CPU cores"]
    _, _, loader_train, _, _ = build_loader(config_for(root, 'DATA.NUM_WORKERS', 0))
    assert_same_batches(capped, epoch_batches(loader_train, 1))
    assert usable_workers(cores) == cores and usable_workers(0) == 0


def test_part_cache_keeps_each_rank_on_its_shard(tmp_path):
    root = make_tree(tmp_path / 'ds', train_per_class=3)  # 9 train images: shards of 5 and 4
    make_zip(root, 'train')
    make_zip(root, 'val')
    lengths = []
    for rank in (0, 1):
        config = config_for(root, 'DATA.ZIP_MODE', True, 'DATA.CACHE_MODE', 'part',
                            environ={'RANK': str(rank), 'WORLD_SIZE': '2'})
        dataset_train, dataset_val, loader_train, _, _ = build_loader(config)
        sampler = loader_train.sampler
        assert isinstance(sampler, ShardSampler)
        assert sorted(dataset_train._cache) == list(range(rank, 9, 2))
        assert sorted(dataset_val._cache) == list(range(rank, 9, 2))
        orders = []
        for epoch in range(3):
            sampler.set_epoch(epoch)
            indices = [index for index, _ in sampler]
            assert set(indices) == set(range(rank, 9, 2)) and len(indices) == 5  # shard of 4 padded to 5
            orders.append(tuple(indices))
        assert len(set(orders)) > 1  # reshuffled per epoch
        lengths.append(len(loader_train))
    assert lengths[0] == lengths[1]  # same number of steps on every rank


# ----------------------------------------------------------------------------- unreadable images
def _add_bad_images(root):
    good = _save(os.path.join(root, 'train', 'ant', '00_trunc.jpg'), size=(60, 60), seed=99)
    with open(good, 'rb') as f:
        head = f.read()
    with open(good, 'wb') as f:
        f.write(head[:len(head) // 2])
    with open(os.path.join(root, 'train', 'bee', 'zz_notes.jpg'), 'w') as f:
        f.write('not an image\n')
    return good, os.path.join(root, 'train', 'bee', 'zz_notes.jpg')


def test_unreadable_images_are_replaced_logged_and_counted(tmp_path, caplog):
    root = make_tree(tmp_path / 'ds')
    truncated, text_file = _add_bad_images(root)  # 14 train images, 2 unreadable
    config = config_for(root, 'DATA.BATCH_SIZE', 2, 'DATA.NUM_WORKERS', 2, 'DATA.MAX_BAD_FRACTION', 0.2)
    _, _, loader_train, _, _ = build_loader(config)
    with data_log(caplog):
        batches = epoch_batches(loader_train, 0)
    assert [len(batch) for batch in batches] == [2] * 7
    assert check_bad_images(loader_train) == 2
    messages = [r.getMessage() for r in caplog.records if r.name == 'swin.data']
    assert any(truncated in m for m in messages) and any(text_file in m for m in messages)

    strict = config_for(root, 'DATA.BATCH_SIZE', 2, 'DATA.MAX_BAD_FRACTION', 0.1)
    _, _, loader_train, _, _ = build_loader(strict)
    with pytest.raises(DataError, match='MAX_BAD_FRACTION'):
        epoch_batches(loader_train, 0)  # stops mid-pass, once 2 of 14 exceed 10%
    with pytest.raises(DataError, match='MAX_BAD_FRACTION'):
        check_bad_images(loader_train)  # the aborted pass's count is over the fraction too


def test_batches_carry_the_files_skipped_to_fill_them(tmp_path):
    """Bad-image reports go one way: dataset Sample -> Batch -> the loader's count in the main process, with
    no state shared between a direct dataset read and a loader pass, in a worker or not."""
    root = make_tree(tmp_path / 'ds')
    bad_files = sorted(_add_bad_images(root))
    for workers in (0, 2):
        config = config_for(root, 'DATA.BATCH_SIZE', 2, 'DATA.NUM_WORKERS', workers, 'DATA.MAX_BAD_FRACTION', 0.2,
                            'DATA.PERSISTENT_WORKERS', False)
        _, _, loader_train, _, _ = build_loader(config)
        dataset = loader_train.dataset
        bad_index = [path for path, _ in dataset.samples].index(bad_files[0])
        sample = dataset[bad_index]  # the next file stands in; the skipped one travels with the sample
        assert [report.path for report in sample.skipped] == [bad_files[0]]
        assert isinstance(sample.skipped[0], BadImageReport) and sample.skipped[0].reason
        assert sample.image.shape == (3, 48, 48) and sample.target == dataset.targets[bad_index + 1]

        batches = epoch_batches(loader_train, 0)
        assert all(isinstance(batch, Batch) for batch in batches)
        assert all(batch.images.dtype == torch.float32 and batch.targets.dtype == torch.long for batch in batches)
        assert all(batch.erase == () and batch.error == '' for batch in batches)  # float batches: erased on host
        assert sorted(report.path for batch in batches for report in batch.bad_images) == bad_files
        assert (loader_train.bad_images, loader_train.images_loaded) == (2, 14)


def test_nothing_readable_is_a_data_error(tmp_path):
    root = tmp_path / 'ds'
    for split in ('train', 'val'):
        for name in CLASSES:
            os.makedirs(root / split / name)
            for i in range(20):
                (root / split / name / f'{i}.png').write_bytes(b'garbage')
    _, _, loader_train, _, _ = build_loader(config_for(root, 'DATA.NUM_WORKERS', 1, 'DATA.MAX_BAD_FRACTION', 1.0))
    with pytest.raises(DataError, match='unreadable images in a row') as info:
        epoch_batches(loader_train, 0)
    assert '\n' not in str(info.value)


# ----------------------------------------------------------------------------- validation sharding
def test_two_ranks_validate_every_image_once(tmp_path):
    root = make_tree(tmp_path / 'ds')  # 9 val images, batch 4
    seen = []
    for rank in (0, 1):
        config = config_for(root, 'EVAL_MODE', True, environ={'RANK': str(rank), 'WORLD_SIZE': '2'})
        dataset_train, dataset_val, loader_train, loader_val, mixup_fn = build_loader(config)
        assert dataset_train is None and loader_train is None and mixup_fn is None
        assert sum(len(batch) for batch in loader_val) == [5, 4][rank]
        seen += list(loader_val.sampler)
    assert sorted(seen) == list(range(9))

    sequential = [list(ValSampler(9, rank, 2, sequential=True)) for rank in (0, 1)]
    assert sequential == [list(range(9)), []]
    shuffled = [ValSampler(9, rank, 2, shuffle=True, seed=3).indices for rank in (0, 1)]
    assert sorted(shuffled[0] + shuffled[1]) == list(range(9))


def test_distributed_sampler_semantics():
    samplers = [DistributedEpochSampler(7, rank, 2, seed=5) for rank in (0, 1)]
    for sampler in samplers:
        sampler.set_epoch(2)
    shards = [[index for index, _ in sampler] for sampler in samplers]
    assert [len(s) for s in samplers] == [4, 4]
    assert set(shards[0] + shards[1]) == set(range(7))  # one index repeated as padding
    sampler = samplers[0]
    keys = list(sampler)
    sampler.set_epoch(2, start_index=3)
    assert list(sampler) == keys[3:] and len(sampler) == 4 and sampler.num_remaining == 1
    sampler.set_epoch(3)
    assert list(sampler) != keys
    with pytest.raises(ValueError):
        sampler.set_epoch(0, start_index=5)


# ----------------------------------------------------------------------------- reproducibility
def test_augmentation_is_reproducible_across_workers_and_resume(tmp_path):
    root = make_tree(tmp_path / 'ds', train_per_class=6)  # 18 images: 4 batches of 4
    opts = ('AUG.REPROB', 0.5, 'DATA.PERSISTENT_WORKERS', False)
    _, _, loader0, _, _ = build_loader(config_for(root, *opts, 'DATA.NUM_WORKERS', 0))
    _, _, loader2, _, _ = build_loader(config_for(root, *opts, 'DATA.NUM_WORKERS', 2))
    rng_before = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())

    full = epoch_batches(loader0, 3)
    assert len(full) == len(loader0) == 4
    assert_same_batches(epoch_batches(loader2, 3), full)
    tail = epoch_batches(loader2, 3, start_index=2 * 4)
    assert len(loader2) == 4 and loader2.sampler.num_remaining == 10
    assert_same_batches(tail, full[2:])
    assert_same_batches(epoch_batches(loader0, 3, start_index=4), full[1:])
    assert not torch.equal(epoch_batches(loader0, 4)[0].images, full[0].images)

    # loaders never touch the global generators (workers 0 runs transforms in this process)
    assert random.getstate() == rng_before[0]
    assert np.array_equal(np.random.get_state()[1], rng_before[1])
    assert torch.equal(torch.get_rng_state(), rng_before[2])


def test_uint8_batches_normalized_by_to_device_match_the_float_path(tmp_path):
    root = make_tree(tmp_path / 'ds')
    for reprob in (0.0, 1.0):
        config = config_for(root, 'AUG.REPROB', reprob)
        floats, uint8s = build_loader(config, normalize_on_device=False), build_loader(config, normalize_on_device=True)
        pairs = list(zip(epoch_batches(floats[2], 0), epoch_batches(uint8s[2], 0), strict=True))
        pairs += list(zip(floats[3], uint8s[3], strict=True))
        erased = 0
        for float_batch, batch in pairs:
            expected, expected_targets = float_batch.images, float_batch.targets
            assert float_batch.erase == ()
            assert batch.images.dtype == torch.uint8 and batch.images.shape == expected.shape
            plans = batch.erase
            moved, targets = to_device(batch, 'cpu')
            assert torch.equal(targets, expected_targets)
            assert moved.dtype == torch.float32 and moved.is_contiguous()
            # erasing: the boxes timm drew on the host are the planned ones; only the noise differs
            kept = torch.ones(moved.shape[0], *moved.shape[2:], dtype=torch.bool)
            for i, plan in plans:
                for top, left, h, w in plan.boxes:
                    kept[i, top:top + h, left:left + w] = False
            erased += len(plans)
            assert torch.equal(moved.permute(1, 0, 2, 3)[:, kept], expected.permute(1, 0, 2, 3)[:, kept])
            if plans:
                assert (moved.permute(1, 0, 2, 3)[:, ~kept] != expected.permute(1, 0, 2, 3)[:, ~kept]).all()
        assert (erased > 0) == (reprob > 0)  # REPROB 1: every train image erased, val never


def test_val_transform_for_tools_preprocesses_like_the_val_loader(tmp_path):
    config = config_for(make_tree(tmp_path / 'ds'), 'EVAL_MODE', True)
    _, dataset_val, _, loader_val, _ = build_loader(config)
    with Image.open(dataset_val.samples[2][0]) as image:  # a decoded RGB image, as a prediction tool has it
        out = build_val_transform(config)(image.convert('RGB'))
    assert torch.equal(out, next(iter(loader_val)).images[2])


# ----------------------------------------------------------------------------- mixup
def test_mixup_targets_sum_to_one_and_off_gives_none(tmp_path):
    config = make_tiny_config(None, 'AUG.MIXUP', 0.8, 'AUG.CUTMIX', 1.0)
    mixup_fn = build_mixup(config)
    images, targets = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    for _ in range(4):  # mixup and cutmix batches
        _, mixed = mixup_fn(images.clone(), targets)
        assert mixed.shape == (8, 10)
        assert torch.allclose(mixed.sum(1), torch.ones(8))
    root = make_tree(tmp_path / 'ds')
    assert build_loader(config_for(root, 'AUG.MIXUP', 0.0, 'AUG.CUTMIX', 0.0))[4] is None


# ----------------------------------------------------------------------------- image kinds and fast paths
def test_grayscale_rgba_palette_cmyk_and_tiny_images_load(tmp_path):
    config = config_for(tmp_path, 'DATA.IMG_SIZE', 48)
    train, val = build_transform(True, config), build_transform(False, config)
    files = [_save(str(tmp_path / 'gray.png'), mode='L'), _save(str(tmp_path / 'rgba.png'), mode='RGBA'),
             _save(str(tmp_path / 'palette.png'), mode='P'), _save(str(tmp_path / 'cmyk.jpg'), mode='CMYK'),
             _save(str(tmp_path / 'tiny.jpg'), size=(5, 7)), _save(str(tmp_path / 'gray.jpg'), mode='L')]
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # e.g. PIL's palette-transparency warning
        for path in files:
            for transform in (train, val):
                with open(path, 'rb') as f:
                    out = transform(open_image(f.read()))
                assert out.shape == (3, 48, 48) and out.dtype == torch.float32, path


def _pixels(transform, data, seed):
    random.seed(seed)
    torch.manual_seed(seed)
    return transform(open_image(data)).pixels.int()  # device-normalize pipelines end in a DeferredImage


def _near(a, b):
    """uint8 images that differ only by resampler rounding: no value off by more than 2 levels and under half a
    level on average (a crop box shifted by one pixel, or a missing antialias filter, is far off on grain)."""
    diff = (a - b).abs()
    return diff.max() <= 2 and diff.float().mean() < 0.5


def test_fast_crops_stay_within_a_level_of_the_reference(tmp_path, monkeypatch):
    drafts = []
    load_rgb = transforms_module.load_rgb

    def recording_load_rgb(img, draft_size=None):
        drafts.append(draft_size)
        return load_rgb(img, draft_size)
    monkeypatch.setattr(transforms_module, 'load_rgb', recording_load_rgb)
    images = {}
    for name, size in (('small', (90, 80)), ('big', (400, 360))):
        with open(_save(str(tmp_path / f'{name}.jpg'), size=size, seed=7, quality=95), 'rb') as f:
            images[name] = f.read()
    plain = ('AUG.REPROB', 0.0, 'AUG.AUTO_AUGMENT', 'none', 'AUG.COLOR_JITTER', 0.0)  # crop + flip only
    fast = build_transform(True, config_for(tmp_path, *plain, 'DATA.FAST_CROP', True, 'DATA.FAST_DECODE', True),
                           normalize_on_device=True)
    exact = build_transform(True, config_for(tmp_path, *plain), normalize_on_device=True)
    reduced = 0
    for seed in range(6):
        # 90x80: no crop can be decoded at reduced size, so only the resampler differs: torch's uint8
        # kernels against PIL's, the same crop box and filter
        drafts.clear()
        assert _near(_pixels(fast, images['small'], seed), _pixels(exact, images['small'], seed))
        assert drafts == [None, None]
        # 400x360: crops decoded at reduced size (DCT-domain scaling) differ more on this grainy image
        drafts.clear()
        assert (_pixels(fast, images['big'], seed) - _pixels(exact, images['big'], seed)).abs().float().mean() < 3
        reduced += drafts[0] is not None  # the fast transform's decode
    assert reduced >= 3  # 400x360: most crops keep >= 96 px, decoded at 1/2 or less

    val_exact = build_transform(False, config_for(tmp_path), normalize_on_device=True)
    val_fast = build_transform(False, config_for(tmp_path, 'DATA.VAL_FAST_RESIZE', True), normalize_on_device=True)
    drafts.clear()
    assert _near(_pixels(val_fast, images['small'], 0), _pixels(val_exact, images['small'], 0))
    assert (_pixels(val_fast, images['big'], 0) - _pixels(val_exact, images['big'], 0)).abs().float().mean() < 3
    assert drafts == [None, None, (100, 90), None]  # 400x360 decoded at 1/4 for its 60x54 resize

    # interpolations torch has no uint8 kernel for take timm's own path: identical pixels
    nearest = ('DATA.INTERPOLATION', 'nearest') + plain
    fast = build_transform(True, config_for(tmp_path, *nearest, 'DATA.FAST_CROP', True), normalize_on_device=True)
    exact = build_transform(True, config_for(tmp_path, *nearest), normalize_on_device=True)
    assert torch.equal(_pixels(fast, images['big'], 3), _pixels(exact, images['big'], 3))


# ----------------------------------------------------------------------------- digits
def _files(root):
    return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
            for d, _, names in os.walk(root) for f in names}


@pytest.mark.slow
def test_digits_written_once_and_used_as_image_folder(tmp_path):
    root = str(tmp_path / 'digits')
    assert ensure_digits(root) == root
    files = _files(root)
    assert sum(f.endswith('.png') for f in files) == 1797
    assert len(os.listdir(os.path.join(root, 'train', '3'))) + len(os.listdir(os.path.join(root, 'val', '3'))) == 183
    time.sleep(0.01)
    ensure_digits(root)
    assert _files(root) == files  # nothing rewritten
    config = make_tiny_config(None, 'DATA.DATASET', 'digits', 'DATA.DATA_PATH', root)
    dataset_train, dataset_val, _, loader_val, _ = build_loader(config)
    assert (len(dataset_train), len(dataset_val)) == (1437, 360)
    assert dataset_train.classes == [str(d) for d in range(10)]
    assert next(iter(loader_val)).images.shape == (8, 3, 32, 32)


def _digits_process(target, slow=False):
    """A process running ensure_digits(target); it loads data/digits.py alone (not the data package, which
    imports torch) to start fast. ``slow``: sleep after each image, so it can be killed mid-write."""
    code = f"""
import importlib.util, sys, time
sys.path.insert(0, {ROOT!r})
spec = importlib.util.spec_from_file_location('digits', {os.path.join(ROOT, 'data', 'digits.py')!r})
digits = importlib.util.module_from_spec(spec)
spec.loader.exec_module(digits)
if {slow!r}:
    save = digits.Image.Image.save
    def slow_save(self, *args, **kwargs):
        save(self, *args, **kwargs)
        time.sleep(0.01)
    digits.Image.Image.save = slow_save
digits.ensure_digits({target!r})
"""
    return subprocess.Popen([sys.executable, '-c', code])


@pytest.mark.slow
def test_digits_survive_a_killed_first_run(tmp_path):
    target = str(tmp_path / 'digits')
    proc = _digits_process(target, slow=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            written = [f for f in _files(tmp_path) if f.endswith('.png')]
            if len(written) >= 20:
                break
            time.sleep(0.05)
        assert len(written) >= 20, 'the first run never started writing'
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not os.path.exists(target)  # only a temporary tree is left, never a half tree at the path
    assert [e for e in os.listdir(tmp_path) if e.startswith('.digits.tmp-')]

    ensure_digits(target)
    assert sum(f.endswith('.png') for f in _files(target)) == 1797
    assert os.path.isfile(os.path.join(target, MARKER))
    assert os.listdir(tmp_path) == ['digits']  # the abandoned temporary tree is gone


@pytest.mark.slow
def test_concurrent_ranks_build_digits_once(tmp_path):
    target = str(tmp_path / 'digits')
    procs = [_digits_process(target) for _ in range(2)]
    assert [proc.wait(timeout=120) for proc in procs] == [0, 0]
    assert sum(f.endswith('.png') for f in _files(target)) == 1797
    assert os.listdir(tmp_path) == ['digits']


# ----------------------------------------------------------------------------- errors
def _error(config):
    with pytest.raises(DataError) as info:
        build_loader(config)
    message = str(info.value)
    assert '\n' not in message
    return message


def test_bad_paths_and_settings_give_one_line_data_errors(tmp_path):
    missing = tmp_path / 'nope'
    assert str(missing) in _error(config_for(missing))
    assert 'DATA.DATA_PATH is not set' in _error(config_for(''))

    root = make_tree(tmp_path / 'ds')
    assert 'MODEL.NUM_CLASSES is 5' in _error(config_for(root, 'MODEL.NUM_CLASSES', 5))
    zip_error = _error(config_for(root, 'DATA.ZIP_MODE', True))
    assert os.path.join(root, 'val.zip') in zip_error
    make_zip(root, 'val')
    os.remove(os.path.join(root, 'val_map.txt'))
    assert os.path.join(root, 'val_map.txt') in _error(config_for(root, 'DATA.ZIP_MODE', True))

    os.makedirs(tmp_path / 'ds' / 'train' / 'dog')
    message = _error(config_for(root))
    assert os.path.join(root, 'train', 'dog') in message and 'no images' in message

    empty = tmp_path / 'empty'
    os.makedirs(empty / 'train')
    os.makedirs(empty / 'val')
    assert os.path.join(empty, 'val') in _error(config_for(empty))
    only_train = tmp_path / 'only_train'
    os.makedirs(only_train / 'train' / 'ant')
    assert os.path.join(only_train, 'val') in _error(config_for(only_train))

    occupied = tmp_path / 'occupied'
    os.makedirs(occupied / 'something')
    assert str(occupied) in _error(make_tiny_config(None, 'DATA.DATASET', 'digits', 'DATA.DATA_PATH', str(occupied)))

    # 12 train images on one rank cannot fill one optimizer step of 4 x 4 micro-batches
    message = _error(config_for(make_tree(tmp_path / 'ds2'), 'TRAIN.ACCUMULATION_STEPS', 4))
    assert '12 images' in message and 'TRAIN.ACCUMULATION_STEPS 4' in message


def test_dataset_num_classes_when_the_user_left_it(tmp_path):
    """What MODEL.NUM_CLASSES becomes when no YAML file or flag sets it (main.classes_from_dataset)."""
    root = make_tree(tmp_path / 'ds')
    unset = ['DATA.DATA_PATH', str(root), 'DATA.IMG_SIZE', 48, 'DATA.BATCH_SIZE', 4, 'DATA.NUM_WORKERS', 0]
    config = load_config(None, unset, environ={})
    assert config.MODEL.NUM_CLASSES_FROM_DATA and config.MODEL.NUM_CLASSES == 1000
    assert dataset_num_classes(config) == (3, f"class folders in {os.path.join(root, 'train')}")
    resolved = main.classes_from_dataset(config, logging.getLogger('test_data'))
    assert resolved.MODEL.NUM_CLASSES == 3 and config.MODEL.NUM_CLASSES == 1000   # a new frozen config
    dataset_train, _, _, _, mixup_fn = build_loader(resolved)
    assert len(dataset_train.classes) == 3 and mixup_fn.num_classes == 3
    with pytest.raises(AttributeError):
        resolved.MODEL.NUM_CLASSES = 4
    # eval mode reads val/, the official zip layout means ImageNet-1K, as in the official code
    os.makedirs(tmp_path / 'ds' / 'val' / 'extra')
    assert dataset_num_classes(load_config(None, unset + ['EVAL_MODE', True], environ={}))[0] == 4
    assert dataset_num_classes(load_config(None, unset + ['DATA.ZIP_MODE', True], environ={}))[0] == 1000
    with pytest.raises(DataError, match=re.escape(f"split folder {os.path.join(tmp_path, 'train')} not found")):
        dataset_num_classes(load_config(None, ['DATA.DATA_PATH', str(tmp_path)], environ={}))


def test_data_benchmark_times_whole_waves_of_workers(tmp_path):
    """scripts/benchmark_data.py: with 2 workers a timed window of 1 batch would fall inside one wave of
    batches made in parallel; the script widens warm-up and timing to whole waves and runs to its table."""
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, 'scripts', 'benchmark_data.py'), '--device', 'cpu', '--classes', '2',
         '--images-per-class', '6', '--side', '40', '60', '--img-size', '32', '--batch-size', '2', '--workers', '2',
         '--warmup', '1', '--batches', '1', '--rounds', '1'],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert 'each measurement: 2 warm-up + 2 timed batches (whole waves of the workers; in-process CPU time: 1 + 1)' \
        in out.stdout
    assert re.search(r'^val ours-u8 +[\d.]+ +[\d.]+x', out.stdout, re.M), out.stdout


def test_class_folders_that_differ_are_named_on_each_side(tmp_path):
    root = make_tree(tmp_path / 'ds')
    os.rename(os.path.join(root, 'val', 'bee'), os.path.join(root, 'val', 'bees'))  # a typo in val
    with pytest.raises(DataError) as error:
        build_loader(config_for(root))
    assert str(error.value).endswith(": missing in val: bee; missing in train: bees")
    for name in ('dog', 'eel', 'fox', 'gnu', 'hen', 'ibis'):  # six train-only classes: the first five are named
        os.makedirs(os.path.join(root, 'train', name))
        _save(os.path.join(root, 'train', name, '00.jpg'), size=(40, 40), seed=1)
    with pytest.raises(DataError) as error:
        build_loader(config_for(root, 'MODEL.NUM_CLASSES', 9))
    assert "missing in val: bee, dog, eel, fox, gnu, ... (7 in all); missing in train: bees" in str(error.value)
