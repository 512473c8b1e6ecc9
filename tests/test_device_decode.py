"""DATA.GPU_DECODE: JPEGs decoded, cropped and resized by data.to_device, against the CPU pipeline.

On the CPU the same code runs with TorchCodec's CPU decoder (libjpeg), which checks the crop geometry and the
resampling; the `cuda` test checks nvJPEG's pixels.
"""
import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_tiny_config
from data import build_loader, build_transform, collate, split_mode, to_device
from data.datasets import Sample, seeded
from data.device_decode import DEVICE_DECODE, EncodedBatch, EncodedImage, decode_batch
from data.device_normalize import DEVICE_NORMALIZE, DeferredImage
from data.transforms import open_image
from errors import ConfigError

PLAIN = ('DATA.IMG_SIZE', 64, 'AUG.AUTO_AUGMENT', 'none', 'AUG.COLOR_JITTER', 0.0, 'AUG.REPROB', 0.0,
         'DATA.FAST_CROP', False)


def photo(seed, size=(150, 120), fmt='JPEG'):
    rng = np.random.default_rng(seed)
    field = rng.integers(0, 256, (5, 4, 3), dtype=np.uint8)
    pixels = np.asarray(Image.fromarray(field).resize(size, Image.BICUBIC), dtype=np.int16)
    pixels = np.clip(pixels + rng.normal(0, 8, pixels.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **({'quality': 90} if fmt == 'JPEG' else {}))
    return buffer.getvalue()


def both_paths(is_train, device, samples, *opts):
    """uint8 batches of the CPU pipeline and of the device-decode pipeline, same per-sample seeds."""
    batches = []
    for gpu_decode in (False, True):
        config = make_tiny_config(None, *PLAIN, *opts, 'DATA.GPU_DECODE', gpu_decode)
        mode = split_mode(is_train, config, normalize_on_device=True)
        transform = mode.transform(is_train, config)
        items = []
        for i, data in enumerate(samples):
            with seeded(i):
                items.append(Sample(transform(open_image(data)), i))
        images = collate(items, mode).images
        if gpu_decode:
            assert isinstance(images, EncodedBatch)
            images, _ = decode_batch(images, device)
        batches.append(images.cpu())
    return batches


def assert_within_a_level(expected, got):
    assert got.dtype == torch.uint8 and got.shape == expected.shape
    diff = (expected.int() - got.int()).abs()
    assert (diff <= 1).float().mean() > 0.995 and diff.max() <= 3 and diff.float().mean() < 0.3


@pytest.mark.parametrize('is_train', [True, False], ids=['train', 'val'])
def test_device_decode_matches_the_cpu_path(is_train):
    expected, got = both_paths(is_train, 'cpu', [photo(seed) for seed in range(6)])
    assert_within_a_level(expected, got)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
@pytest.mark.parametrize('is_train', [True, False], ids=['train', 'val'])
def test_nvjpeg_decode_matches_the_cpu_path(is_train):
    expected, got = both_paths(is_train, 'cuda', [photo(seed, (400, 330)) for seed in range(8)])
    assert_within_a_level(expected, got)


def test_files_the_device_cannot_decode_are_decoded_in_the_worker():
    samples = [photo(0), photo(1, fmt='PNG'), photo(2)]
    transform = build_transform(False, make_tiny_config(None, *PLAIN, 'DATA.GPU_DECODE', True),
                                normalize_on_device=True)
    items = [transform(open_image(data)) for data in samples]
    assert [item.encoded for item in items] == [True, False, True] and isinstance(items[1], EncodedImage)
    expected, got = both_paths(False, 'cpu', samples)
    assert_within_a_level(expected, got)


def test_recipes_the_device_cannot_run_keep_the_cpu_path():
    """A train split with PIL-only augmentations loads in the device-normalize mode (decoded in the worker); its
    val split still decodes on the device; without DATA.GPU_DECODE nothing does."""
    with_randaugment = make_tiny_config(None, 'DATA.IMG_SIZE', 64, 'DATA.GPU_DECODE', True)
    for is_train, mode, item in ((True, DEVICE_NORMALIZE, DeferredImage), (False, DEVICE_DECODE, EncodedImage)):
        assert split_mode(is_train, with_randaugment, normalize_on_device=True) == mode
        image = build_transform(is_train, with_randaugment, normalize_on_device=True)(open_image(photo(0)))
        assert isinstance(image, item)
    off = make_tiny_config(None, *PLAIN)
    assert split_mode(False, off, normalize_on_device=True) == DEVICE_NORMALIZE
    assert isinstance(build_transform(False, off, normalize_on_device=True)(open_image(photo(0))), DeferredImage)
    with pytest.raises(ConfigError, match="DATA.INTERPOLATION 'nearest'"):
        build_transform(False, make_tiny_config(None, *PLAIN, 'DATA.GPU_DECODE', True,
                                                'DATA.INTERPOLATION', 'nearest'), normalize_on_device=True)


def test_loader_batches_decode_normalize_and_erase_in_to_device(tmp_path):
    root = tmp_path / 'ds'
    for split in ('train', 'val'):
        for c in range(2):
            os.makedirs(root / split / f'c{c}')
            for i in range(4):
                (root / split / f'c{c}' / f'{i}.jpg').write_bytes(photo(10 * c + i))
    config = make_tiny_config(None, *PLAIN, 'DATA.GPU_DECODE', True, 'DATA.DATA_PATH', str(root),
                              'MODEL.NUM_CLASSES', 2, 'DATA.BATCH_SIZE', 4, 'AUG.REPROB', 1.0,
                              'AUG.REMODE', 'const', 'DATA.NUM_WORKERS', 1)
    _, _, train, val, _ = build_loader(config, normalize_on_device=True)
    train.sampler.set_epoch(0)
    for loader, erased in ((train, True), (val, False)):
        batch = next(iter(loader))
        assert isinstance(batch.images, EncodedBatch) and len(batch.images) == 4
        moved, targets = to_device(batch, torch.device('cpu'))
        assert moved.dtype == torch.float32 and moved.shape == (4, 3, 64, 64)
        assert targets.shape == (4,)
        # const erasing writes zeros (the mean) into a box of every train image; none in validation
        assert bool((moved == 0).all(dim=1).flatten(1).any(dim=1).all()) == erased
