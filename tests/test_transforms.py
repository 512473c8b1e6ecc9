"""Faithful defaults: the train crop is timm's transform (within one level) at every image size, large JPEGs
included; the fast paths that change pixels are opt-in."""
import io
import random

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import create_transform

from conftest import make_tiny_config
from data import build_transform
from data.transforms import open_image

SIZES = ((1600, 1200), (1200, 1600), (500, 375), (224, 224), (120, 90))
PLAIN = ('AUG.REPROB', 0.0, 'AUG.AUTO_AUGMENT', 'none', 'AUG.COLOR_JITTER', 0.0)  # crop + flip: the part we own


def photo_jpeg(width, height, seed):
    """A smooth colour field with grain, as JPEG (quality 90): photo-like, with edges where resamplers differ."""
    rng = np.random.default_rng(seed)
    smooth = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    grain = rng.integers(-25, 26, (height, width, 3))
    pixels = np.clip(np.asarray(smooth, dtype=np.int16) + grain, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format='JPEG', quality=90)
    return buffer.getvalue()


def timm_crop(interpolation):
    """timm's own train transform (create_transform), cropped and flipped only, as PIL."""
    primary, _, _ = create_transform(224, is_training=True, interpolation=interpolation, hflip=0.5,
                                     color_jitter=None, auto_augment=None, re_prob=0.0, separate=True)
    return primary


def max_diffs(transform, reference, data, seeds):
    """Largest per-value difference of each draw (seeded alike) between our uint8 pixels and timm's."""
    diffs = []
    for seed in seeds:
        random.seed(seed)
        torch.manual_seed(seed)
        ours = transform(open_image(data)).pixels.to(torch.int16)
        random.seed(seed)
        torch.manual_seed(seed)
        theirs = torch.from_numpy(np.array(reference(Image.open(io.BytesIO(data)).convert('RGB')))).to(torch.int16)
        assert ours.shape == theirs.shape == (224, 224, 3)
        diffs.append(int((ours - theirs).abs().max()))
    return diffs


@pytest.mark.parametrize('interpolation', ['bicubic', 'bilinear'])
def test_default_train_crop_is_within_one_level_of_timm_at_every_size(interpolation):
    config = make_tiny_config(None, 'DATA.IMG_SIZE', 224, 'DATA.INTERPOLATION', interpolation, *PLAIN)
    assert not config.DATA.FAST_CROP and not config.DATA.FAST_DECODE
    ours, reference = build_transform(True, config, normalize_on_device=True), timm_crop(interpolation)
    for width, height in SIZES:
        data = photo_jpeg(width, height, seed=width + height)
        assert max(max_diffs(ours, reference, data, range(4))) <= 1, (width, height)


def test_reduced_decode_is_opt_in_and_changes_large_jpeg_crops():
    """What the default avoids: FAST_DECODE resamples from a 1/2..1/8 decode, several levels off on 1600x1200."""
    config = make_tiny_config(None, 'DATA.IMG_SIZE', 224, 'DATA.FAST_DECODE', True, *PLAIN)
    diffs = max_diffs(build_transform(True, config, normalize_on_device=True), timm_crop('bicubic'),
                      photo_jpeg(1600, 1200, seed=1), range(6))
    assert max(diffs) > 1
