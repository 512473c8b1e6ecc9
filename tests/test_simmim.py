"""SimMIM: the model (official keys, loss), mask generator and transform, the picture script, task selection,
fine-tuning loads, and pre-training through main.py (resumable exactly)."""
import importlib
import logging
import math
import os
import runpy
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from checkpoint import load_model_weights, load_pretrained
from config import load_config
from conftest import ROOT, make_tiny_config
from data import build_loader, to_device
from data.datasets import FolderDataset
from data.device_normalize import DEVICE_NORMALIZE
from data.host_float import HOST_FLOAT
from data.loader import collate
from data.samplers import sample_seed
from data.simmim import MaskGenerator, SimMIMTransform, build_mask_generator
from errors import ConfigError
from helpers import (
    assert_same_weights,
    child_env,
    load_weights,
    logged_losses,
    make_image_folder,
    randomized,
    read,
    run_main,
    sigterm_after,
    tiny_yaml,
)
from models import build_model
from models.simmim import norm_targets
from models.swin_transformer import SwinTransformer
from optimizer import swin_layer_id

OFFICIAL_REPO = '/work/.mirror/microsoft+Swin-Transformer/repo'
# tiny SimMIM: 32 px, patch 2, two stages -> encoder stride 4; mask patches of 8 px (4x4 = 16 of them)
SIMMIM_OPTS = ('DATA.MASK_PATCH_SIZE', 8, 'DATA.MASK_RATIO', 0.6, 'MODEL.DROP_PATH_RATE', 0.0)


def simmim_yaml(path, data_path, extra='', num_workers=0):
    """helpers.tiny_yaml as a SimMIM pre-training config (MODEL.NAME simmim_pretrain_tiny, 8 px mask patches)."""
    tiny_yaml(path, data_path, extra=extra, num_workers=num_workers)
    text = open(path).read().replace('NAME: tiny', 'NAME: simmim_pretrain_tiny')
    open(path, 'w').write(text.replace('  IMG_SIZE: 32\n', '  IMG_SIZE: 32\n  MASK_PATCH_SIZE: 8\n'))
    return str(path)


def official_file(path, binary=False):
    """A file of the official release from the bare mirror (the test is skipped on machines without it)."""
    if not os.path.isdir(OFFICIAL_REPO):
        pytest.skip(f'the official repository mirror {OFFICIAL_REPO} is not on this machine')
    return subprocess.run(['git', '-C', OFFICIAL_REPO, 'show', f'HEAD:{path}'], check=True, capture_output=True,
                          text=not binary).stdout


def simmim_config(*opts):
    return make_tiny_config(None, *SIMMIM_OPTS, *opts)


def random_mask(config, batch, seed=0):
    generator = MaskGenerator(config.DATA.IMG_SIZE, config.DATA.MASK_PATCH_SIZE, config.MODEL.SWIN.PATCH_SIZE,
                              config.DATA.MASK_RATIO)
    np.random.seed(seed)
    return torch.stack([generator() for _ in range(batch)])


# -----------------------------------------------------------------------------
# The model
# -----------------------------------------------------------------------------
def test_state_dict_has_the_official_keys():
    model = build_model(simmim_config(), is_pretrain=True)
    keys = model.state_dict().keys()
    assert 'encoder.mask_token' in keys and 'decoder.0.weight' in keys and 'decoder.0.bias' in keys
    assert 'encoder.patch_embed.proj.weight' in keys and 'encoder.norm.weight' in keys
    assert not any(key.startswith('encoder.head') for key in keys)
    assert model.decoder[0].out_channels == 4 ** 2 * 3 and model.encoder_stride == 4  # patch 2 x one merging
    plain = SwinTransformer(img_size=32, patch_size=2, embed_dim=24, depths=[2, 2], num_heads=[3, 6],
                            window_size=4, num_classes=0)
    assert {'encoder.' + k for k in plain.state_dict()} | {'encoder.mask_token', 'decoder.0.weight',
                                                           'decoder.0.bias'} == set(keys)
    assert model.no_weight_decay() == {'encoder.absolute_pos_embed', 'encoder.mask_token'}
    assert model.no_weight_decay_keywords() == {'encoder.relative_position_bias_table'}


def _independent_loss(model, images, mask):
    """The SimMIM loss written out from the plain Swin network and explicit tensor ops."""
    config = simmim_config()
    encoder = SwinTransformer(img_size=32, patch_size=2, embed_dim=24, depths=[2, 2], num_heads=[3, 6],
                              window_size=4, num_classes=0, drop_path_rate=0.0).eval()
    weights = {k[len('encoder.'):]: v for k, v in model.state_dict().items() if k.startswith('encoder.')}
    mask_token = weights.pop('mask_token').view(-1)
    encoder.load_state_dict(weights, strict=True)
    tokens = encoder.patch_embed(images)                       # B, 256, C
    tokens[mask.flatten(1).bool()] = mask_token                 # masked tokens become the mask token
    for layer in encoder.layers:
        tokens = layer(tokens)
    features = encoder.norm(tokens)                            # B, 8 * 8, 48
    B, r, C = images.shape[0], 4, 3
    pixels = features @ model.decoder[0].weight.view(r * r * C, -1).t() + model.decoder[0].bias  # B, 64, 48
    # pixel-shuffle by hand: output channel c * r * r + i * r + j of position (y, x) is pixel (y * r + i, x * r + j)
    recon = pixels.view(B, 8, 8, C, r, r).permute(0, 3, 1, 4, 2, 5).reshape(B, C, 32, 32)
    target = images if not model.norm_target_window else norm_targets(images, model.norm_target_window)
    errors = []
    p = config.MODEL.SWIN.PATCH_SIZE
    for b, y, x in mask.nonzero().tolist():                   # every masked patch, every channel and pixel
        patch = (slice(None), slice(y * p, (y + 1) * p), slice(x * p, (x + 1) * p))
        errors.append((recon[b][patch] - target[b][patch]).abs().flatten())
    return torch.cat(errors).mean()


def test_loss_equals_an_independent_computation():
    model = randomized(build_model(simmim_config(), is_pretrain=True))
    images = torch.randn(2, 3, 32, 32)
    mask = random_mask(simmim_config(), 2)
    assert 0 < mask.sum() < mask.numel()
    with torch.no_grad():
        loss = model(images, mask)
        expected = _independent_loss(model, images, mask)
        assert torch.allclose(loss, expected, rtol=1e-5), (loss, expected)


def _local_stats_by_loop(image, window):
    """Mean and unbiased std of each pixel's window (clipped at the border), one pixel at a time."""
    C, H, W = image.shape
    half = window // 2
    mean, std = torch.empty_like(image), torch.empty_like(image)
    for y in range(H):
        for x in range(W):
            region = image[:, max(0, y - half):y + half + 1, max(0, x - half):x + half + 1].flatten(1)
            mean[:, y, x] = region.mean(1)
            std[:, y, x] = (region.var(1, unbiased=True) + 1e-6).sqrt()
    return mean, std


def test_norm_target_matches_a_per_pixel_computation():
    image = torch.rand(1, 3, 9, 11)
    mean, std = _local_stats_by_loop(image[0], 5)
    assert torch.allclose(norm_targets(image, 5)[0], (image[0] - mean) / std, atol=1e-5)
    model = randomized(build_model(simmim_config('MODEL.SIMMIM.NORM_TARGET.ENABLE', True,
                                                 'MODEL.SIMMIM.NORM_TARGET.PATCH_SIZE', 7), is_pretrain=True))
    images, mask = torch.randn(2, 3, 32, 32), random_mask(simmim_config(), 2, seed=1)
    with torch.no_grad():
        assert model.norm_target_window == 7
        assert torch.allclose(model(images, mask), _independent_loss(model, images, mask), rtol=1e-5)


def test_even_norm_target_window_is_a_config_error():
    with pytest.raises(ConfigError, match='MODEL.SIMMIM.NORM_TARGET.PATCH_SIZE must be odd'):
        build_model(simmim_config('MODEL.SIMMIM.NORM_TARGET.ENABLE', True,
                                  'MODEL.SIMMIM.NORM_TARGET.PATCH_SIZE', 8), is_pretrain=True)


def test_pretraining_model_trains():
    """A few AdamW steps on one batch lower the loss; every parameter (mask token, decoder) gets a gradient."""
    torch.manual_seed(0)
    model = build_model(simmim_config(), is_pretrain=True).train()
    images, mask = torch.randn(2, 3, 32, 32), random_mask(simmim_config(), 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(6):
        loss = model(images, mask)
        optimizer.zero_grad()
        loss.backward()
        losses.append(loss.item())
        optimizer.step()
    assert losses[-1] < 0.9 * losses[0], losses
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


# -----------------------------------------------------------------------------
# Against the official code (the bare mirror of microsoft/Swin-Transformer)
# -----------------------------------------------------------------------------
@pytest.fixture(scope='module')
def official_models(tmp_path_factory):
    """The official models package (simmim.py and the Swin files it imports), written from the mirror."""
    root = tmp_path_factory.mktemp('official')
    package = root / 'official_swin_models'
    package.mkdir()
    (package / '__init__.py').write_text('')
    for name in ('simmim.py', 'swin_transformer.py', 'swin_transformer_v2.py'):
        (package / name).write_text(official_file(f'models/{name}'))
    sys.path.insert(0, str(root))
    try:
        with warnings.catch_warnings():  # the official files import timm.models.layers (deprecated) and print a note
            warnings.simplefilter('ignore')
            yield importlib.import_module('official_swin_models.simmim')
    finally:
        sys.path.remove(str(root))


# the tiny SwinV2 of these tests: the same shapes as the v1 one (MODEL.SWINV2 node)
V2_OPTS = ('MODEL.TYPE', 'swinv2', 'MODEL.SWINV2.PATCH_SIZE', 2, 'MODEL.SWINV2.WINDOW_SIZE', 4,
           'MODEL.SWINV2.EMBED_DIM', 24, 'MODEL.SWINV2.DEPTHS', [2, 2], 'MODEL.SWINV2.NUM_HEADS', [3, 6])


@pytest.mark.parametrize('family, norm_target', [('swin', False), ('swin', True), ('swinv2', True)])
def test_official_simmim_weights_load_strictly_and_give_the_same_loss(official_models, tmp_path, family,
                                                                      norm_target):
    config = simmim_config(*(V2_OPTS if family == 'swinv2' else ()), 'MODEL.SIMMIM.NORM_TARGET.ENABLE', norm_target,
                           'MODEL.SIMMIM.NORM_TARGET.PATCH_SIZE', 5)
    encoder_class = {'swin': official_models.SwinTransformerForSimMIM,
                     'swinv2': official_models.SwinTransformerV2ForSimMIM}[family]
    torch.manual_seed(0)
    encoder = encoder_class(img_size=32, patch_size=2, in_chans=3, num_classes=0, embed_dim=24, depths=[2, 2],
                            num_heads=[3, 6], window_size=4, drop_path_rate=0.0)
    official = randomized(official_models.SimMIM(config=config.MODEL.SIMMIM, encoder=encoder, encoder_stride=4,
                                                 in_chans=3, patch_size=2))
    ours = build_model(config, is_pretrain=True).eval()
    assert type(ours.encoder).__name__ == type(encoder).__name__
    ours.load_state_dict(official.state_dict(), strict=True)
    # and the way the picture script and fine-tuning read files: {'model': state_dict} through checkpoint.py
    torch.save({'model': official.state_dict()}, tmp_path / 'official_simmim.pth')
    reloaded = build_model(config, is_pretrain=True).eval()
    load_model_weights(reloaded, str(tmp_path / 'official_simmim.pth'), logging.getLogger('test'),
                       model_type=family)
    images, mask = torch.randn(2, 3, 32, 32), random_mask(config, 2)
    with torch.no_grad():
        expected = official(images, mask)
        assert torch.allclose(ours(images, mask), expected, rtol=1e-5, atol=1e-6)
        assert torch.allclose(reloaded(images, mask), expected, rtol=1e-5, atol=1e-6)


def test_official_mask_generator_draws_the_same_masks():
    """Same numpy draws as the official MaskGenerator (data/data_simmim_pt.py), so same masks per seed."""
    source = official_file('data/data_simmim_pt.py')
    namespace = {}
    exec(compile(source.split('class SimMIMTransform')[0], 'data_simmim_pt.py', 'exec'), namespace)
    official = namespace['MaskGenerator'](input_size=192, mask_patch_size=32, model_patch_size=4, mask_ratio=0.6)
    ours = MaskGenerator(192, 32, 4, 0.6)
    for seed in range(3):
        np.random.seed(seed)
        expected = official()
        np.random.seed(seed)
        assert np.array_equal(ours().numpy(), expected)


def test_layer_decay_ids_are_the_official_finetune_ids():
    """TRAIN.LAYER_DECAY groups parameters like the official SimMIM fine-tune (get_swin_layer)."""
    source = official_file('optimizer.py')
    namespace = {}
    exec(source[source.index('def get_swin_layer'):source.index('def get_finetune_param_groups')], namespace)
    depths = [2, 2]
    model = SwinTransformer(img_size=32, patch_size=2, embed_dim=24, depths=depths, num_heads=[3, 6],
                            window_size=4, ape=True, num_classes=10)
    names = [name for name, _ in model.named_parameters()] + ['mask_token']
    for name in names:
        assert swin_layer_id(name, depths) == namespace['get_swin_layer'](name, sum(depths) + 2, depths), name
    assert swin_layer_id('absolute_pos_embed', depths) == sum(depths) + 1


# -----------------------------------------------------------------------------
# Mask generator and transform
# -----------------------------------------------------------------------------
@pytest.mark.parametrize('size, mask_patch, model_patch, ratio', [(192, 32, 4, 0.6), (32, 8, 2, 0.6),
                                                                  (32, 4, 4, 0.75), (224, 32, 4, 0.5)])
def test_mask_has_the_requested_ratio_and_patch_structure(size, mask_patch, model_patch, ratio):
    generator = MaskGenerator(size, mask_patch, model_patch, ratio)
    grid, scale = size // mask_patch, mask_patch // model_patch
    masks = [generator() for _ in range(20)]
    for mask in masks:
        assert mask.shape == (size // model_patch, size // model_patch) and set(mask.unique().tolist()) <= {0, 1}
        blocks = mask.view(grid, scale, grid, scale)
        assert (blocks == blocks[:, :1, :, :1]).all()           # constant over each mask patch
        assert blocks[:, 0, :, 0].sum() == math.ceil(grid * grid * ratio)
    assert len({tuple(mask.flatten().tolist()) for mask in masks}) > 1  # random positions


@pytest.mark.parametrize('args, message', [((192, 28, 4, 0.6), 'DATA.MASK_PATCH_SIZE 28 must divide'),
                                           ((192, 32, 3, 0.6), "multiple of the model's patch size 3"),
                                           ((192, 32, 4, 0.0), 'DATA.MASK_RATIO must be in')])
def test_mask_generator_rejects_impossible_settings(args, message):
    with pytest.raises(ConfigError, match=message):
        MaskGenerator(*args)


def test_pretraining_transform_is_deterministic_per_seed(tmp_path):
    config = simmim_config('DATA.IMG_SIZE', 64, 'MODEL.SWIN.PATCH_SIZE', 4)
    root = make_image_folder(tmp_path, train_per_class=2, val_per_class=1, size=80)
    dataset = FolderDataset(os.path.join(root, 'train'), SimMIMTransform(config))
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    draws = {}
    for seed in (sample_seed(0, 0, 1), sample_seed(0, 1, 1), sample_seed(1, 0, 1)):
        image, mask = dataset[(1, seed)].image
        again, mask_again = dataset[(1, seed)].image
        assert torch.equal(image, again) and torch.equal(mask, mask_again)
        assert image.shape == (3, 64, 64) and mask.shape == (16, 16)
        assert mask.view(8, 2, 8, 2)[:, 0, :, 0].sum() == math.ceil(64 * 0.6)
        draws[seed] = (image, mask)
    images = [image for image, _ in draws.values()]
    assert not torch.equal(images[0], images[1]) and not torch.equal(images[0], images[2])
    assert torch.equal(torch.rand(3), expected_next)  # the training loop's global RNG is left as it was


def test_pretraining_transform_crops_like_the_official_recipe():
    config = simmim_config('DATA.IMG_SIZE', 64, 'MODEL.SWIN.PATCH_SIZE', 4)
    crop = SimMIMTransform(config).transform_img.transforms[0]
    assert crop.scale == (0.67, 1.) and crop.ratio == (3. / 4., 4. / 3.) and crop.size == (64, 64)


# -----------------------------------------------------------------------------
# The picture
# -----------------------------------------------------------------------------
def test_visualize_script_writes_a_grid_png(tmp_path):
    data = make_image_folder(tmp_path / 'images', train_per_class=2, val_per_class=1)
    config_path = simmim_yaml(tmp_path / 'simmim.yaml', data)
    config = simmim_config()
    torch.save({'model': build_model(config, is_pretrain=True).state_dict()}, tmp_path / 'ckpt.pth')
    output = tmp_path / 'grid.png'
    visualize = runpy.run_path(os.path.join(ROOT, 'scripts', 'simmim_visualize.py'))
    assert visualize['main']([str(tmp_path / 'ckpt.pth'), '--cfg', str(config_path), '--data-path', data,
                              '--output', str(output), '--num-images', '3', '--cell-size', '64']) == 0
    with Image.open(output) as grid:
        assert grid.format == 'PNG' and grid.size == (3 * 64, 3 * 64)
        pixels = torch.from_numpy(np.array(grid.convert('L'))).float()
    masked_column = pixels[:, 64:128]
    assert masked_column.std() > 0 and not torch.equal(pixels[:, :64], masked_column)
    assert F.mse_loss(pixels[:, :64], pixels[:, 128:]) > 0  # the reconstruction is the model's, not a copy


# -----------------------------------------------------------------------------
# The official config files
# -----------------------------------------------------------------------------
SIMMIM_CONFIGS = ('simmim_finetune__swin_base__img224_window7__800ep.yaml',
                  'simmim_finetune__swinv2_base__img224_window14__800ep.yaml',
                  'simmim_pretrain__swin_base__img192_window6__800ep.yaml',
                  'simmim_pretrain__swinv2_base__img192_window12__800ep.yaml')


def test_configs_are_the_official_files_byte_for_byte():
    assert sorted(os.listdir(os.path.join(ROOT, 'configs', 'simmim'))) == sorted(SIMMIM_CONFIGS)
    for name in SIMMIM_CONFIGS:
        official = official_file(f'configs/simmim/{name}', binary=True)
        with open(os.path.join(ROOT, 'configs', 'simmim', name), 'rb') as f:
            assert f.read() == official, name


# -----------------------------------------------------------------------------
# Selecting the task
# -----------------------------------------------------------------------------
@pytest.mark.parametrize('name, encoder, norm_window', [(SIMMIM_CONFIGS[2], 'SwinTransformerForSimMIM', 0),
                                                        (SIMMIM_CONFIGS[3], 'SwinTransformerV2ForSimMIM', 47)])
def test_official_pretrain_configs_select_simmim_and_build_the_official_model(name, encoder, norm_window):
    config = load_config(os.path.join(ROOT, 'configs', 'simmim', name))
    assert config.MODEL.TASK == 'simmim'
    model = build_model(config, is_pretrain=True)
    assert type(model.encoder).__name__ == encoder and model.norm_target_window == norm_window
    assert model.encoder_stride == 32 and model.decoder[0].out_channels == 32 ** 2 * 3  # official decoder
    mask = build_mask_generator(config)()
    assert mask.shape == (48, 48) and mask.view(6, 8, 6, 8)[:, 0, :, 0].sum() == math.ceil(36 * 0.6)


def test_task_is_chosen_by_model_name_or_by_the_key(tmp_path):
    finetune = load_config(os.path.join(ROOT, 'configs', 'simmim', SIMMIM_CONFIGS[0]))
    assert finetune.MODEL.TASK == 'classification'
    assert load_config(os.path.join(ROOT, 'configs', 'demo.yaml'), ['MODEL.TASK', 'simmim']).MODEL.TASK == 'simmim'
    assert simmim_config('MODEL.NAME', 'simmim_pretrain_x', 'MODEL.TASK', 'classification').MODEL.TASK \
        == 'classification'
    with pytest.raises(ConfigError, match="MODEL.TASK 'mim' is not supported"):
        simmim_config('MODEL.TASK', 'mim')
    with pytest.raises(ConfigError, match='--eval and --throughput apply to classifiers'):
        simmim_config('MODEL.TASK', 'simmim', 'EVAL_MODE', True)


def test_pretraining_loader_reads_unlabeled_images(tmp_path):
    """train/ without class folders and no val/: ((images, masks), targets) batches, masks of the config."""
    folder = tmp_path / 'data' / 'train' / 'nested'
    folder.mkdir(parents=True)
    for i in range(6):
        Image.fromarray(np.full((40, 48, 3), 20 * i, np.uint8)).save(folder / f'{i}.png')
    config = simmim_config('MODEL.TASK', 'simmim', 'DATA.DATA_PATH', str(tmp_path / 'data'), 'DATA.BATCH_SIZE', 4)
    dataset, dataset_val, loader, loader_val, mixup_fn = build_loader(config)
    assert dataset_val is None and loader_val is None and mixup_fn is None and len(dataset) == 6
    loader.sampler.set_epoch(0)
    batch = next(iter(loader))
    images, masks = batch.images, batch.masks
    assert images.shape == (4, 3, 32, 32) and masks.shape == (4, 16, 16) and masks.dtype == torch.int64
    assert (masks.view(4, 4, 4, 4, 4)[:, :, 0, :, 0].sum(dim=(1, 2)) == math.ceil(16 * 0.6)).all()


# -----------------------------------------------------------------------------
# Fine-tuning from SimMIM weights
# -----------------------------------------------------------------------------
@pytest.mark.parametrize('family', ['swin', 'swinv2'])
def test_finetuning_loads_the_encoder_and_reports_only_the_head_missing(tmp_path, caplog, family):
    family_opts = V2_OPTS if family == 'swinv2' else ()
    pretrained = randomized(build_model(simmim_config(*family_opts), is_pretrain=True))
    torch.save({'model': pretrained.state_dict()}, tmp_path / 'simmim.pth')
    # window 4 -> 8 (stage maps 16x16 and 8x8): v1 bias tables are interpolated, V2's are computed by its MLP
    node = family.upper()
    config = make_tiny_config(tmp_path, *family_opts, 'MODEL.PRETRAINED', str(tmp_path / 'simmim.pth'),
                              f'MODEL.{node}.WINDOW_SIZE', 8,
                              *(('MODEL.SWINV2.PRETRAINED_WINDOW_SIZES', [4, 4]) if family == 'swinv2' else ()))
    model = build_model(config)
    with caplog.at_level(logging.INFO, logger='test_simmim'):
        load_pretrained(config, model, logging.getLogger('test_simmim'))
    messages = [record.getMessage() for record in caplog.records]
    assert 'not in the pretrained weights (initialized here): head.weight, head.bias' in messages
    assert any('left out: encoder.mask_token, decoder.0.weight, decoder.0.bias' in m for m in messages)
    weights = pretrained.state_dict()
    assert torch.equal(model.patch_embed.proj.weight, weights['encoder.patch_embed.proj.weight'])
    assert torch.equal(model.layers[1].blocks[1].mlp.fc2.weight, weights['encoder.layers.1.blocks.1.mlp.fc2.weight'])
    assert not model.head.weight.any() and not model.head.bias.any()  # re-initialized
    if family == 'swin':
        assert any('resized by bicubic interpolation: layers.0.blocks.0.attn.relative_position_bias_table' in m
                   for m in messages)
        assert model.layers[0].blocks[0].attn.relative_position_bias_table.shape == (15 * 15, 3)
    else:
        assert torch.equal(model.layers[0].blocks[0].attn.cpb_mlp[0].weight,
                           weights['encoder.layers.0.blocks.0.attn.cpb_mlp.0.weight'])


# -----------------------------------------------------------------------------
# Pre-training with main.py: the one training loop, resumable exactly
# -----------------------------------------------------------------------------
PRETRAIN_RECIPE = """TRAIN:
  EPOCHS: 2
  WARMUP_EPOCHS: 1
  BASE_LR: 2e-3
  MIN_LR: 1e-5
  WARMUP_LR: 1e-6
"""


@pytest.fixture(scope='module')
def pretrain_setup(tmp_path_factory):
    """train/ only (no val/), real loader workers; the run's MODEL.NAME selects pre-training as officially."""
    data = make_image_folder(tmp_path_factory.mktemp('images'))
    shutil.rmtree(os.path.join(data, 'val'))
    config = simmim_yaml(tmp_path_factory.mktemp('cfg') / 'pretrain.yaml', data, PRETRAIN_RECIPE, num_workers=2)
    output = tmp_path_factory.mktemp('reference')
    result = run_main('--cfg', config, '--output', str(output))
    assert result.returncode == 0, result.stderr
    return config, output / 'simmim_pretrain_tiny' / 'default'


@pytest.mark.slow
def test_pretraining_run_writes_checkpoints_and_events(pretrain_setup):
    _, run_dir = pretrain_setup
    log = read(run_dir / 'log_rank0.txt')
    assert len(logged_losses(log)) == 2 * 12 and 'Acc@1' not in log and 'Pre-training done in' in log
    for name in ('config.yaml', 'last.pth', 'ckpt_epoch_0.pth', 'ckpt_epoch_1.pth'):
        assert (run_dir / name).is_file(), name
    assert not (run_dir / 'best.pth').exists()
    state = torch.load(run_dir / 'last.pth', map_location='cpu', weights_only=True)
    assert 'encoder.mask_token' in state['model'] and 'decoder.0.weight' in state['model']
    events = EventAccumulator(str(run_dir))
    events.Reload()
    for tag in ('train/loss', 'train/lr', 'train/epoch_loss'):
        assert tag in events.Tags()['scalars'], tag
    assert len(events.Scalars('train/loss')) == 24


@pytest.mark.slow
def test_pretraining_sigterm_mid_epoch_resumes_exactly(tmp_path, pretrain_setup):
    config, reference_dir = pretrain_setup
    output = tmp_path / 'out'
    run_dir, out = sigterm_after(config, output, 'Train: [0/2][3/12]', name='simmim_pretrain_tiny')
    assert 'SIGTERM received: stopped at epoch 0' in out
    result = run_main('--cfg', config, '--output', str(output))
    assert result.returncode == 0, result.stderr
    assert 'resumed from' in read(run_dir / 'log_rank0.txt')
    assert_same_weights(load_weights(run_dir / 'last.pth'), load_weights(reference_dir / 'last.pth'))
    assert logged_losses(read(run_dir / 'log_rank0.txt')) == logged_losses(read(reference_dir / 'log_rank0.txt'))


def test_uint8_pretraining_batches_normalize_on_the_device_like_the_float_path(tmp_path):
    """CUDA runs (DATA.DEVICE_NORMALIZE) load uint8 pixels; to_device gives the float path's values."""
    config = simmim_config('DATA.IMG_SIZE', 64, 'MODEL.SWIN.PATCH_SIZE', 4)
    root = make_image_folder(tmp_path, train_per_class=2, val_per_class=1, size=80)
    keys = [(i, sample_seed(0, 0, i)) for i in range(4)]
    batches = []
    for mode in (HOST_FLOAT, DEVICE_NORMALIZE):
        dataset = FolderDataset(os.path.join(root, 'train'), SimMIMTransform(config, mode))
        batches.append(collate([dataset[key] for key in keys], mode))
    float_batch, uint8_batch = batches
    assert uint8_batch.images.dtype == torch.uint8 and torch.equal(float_batch.masks, uint8_batch.masks)
    images, _ = to_device(uint8_batch, 'cpu')
    assert torch.allclose(images, to_device(float_batch, 'cpu')[0], atol=1e-5)


@pytest.mark.slow
def test_digits_demo_script_runs_the_comparison(tmp_path):
    """The demo end to end at one epoch per run: pre-training, the few-label split, both fine-tunings, the table."""
    result = subprocess.run([sys.executable, os.path.join(ROOT, 'scripts', 'simmim_digits_demo.py'),
                             '--output', str(tmp_path / 'demo'), '--data-path', str(tmp_path / 'digits'),
                             '--finetune-epochs', '1', '--opts', 'TRAIN.EPOCHS', '1', 'TRAIN.WARMUP_EPOCHS', '0'],
                            cwd=ROOT, env=child_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    train = tmp_path / 'demo' / 'digits_0.1_labels' / 'train'
    counts = [len(os.listdir(train / str(label))) for label in range(10)]
    assert sum(counts) == 142 and min(counts) >= 14                  # 10% of each class's ~144 train images
    assert len(list((tmp_path / 'demo' / 'digits_0.1_labels' / 'val').rglob('*.png'))) == 360
    table = result.stdout[result.stdout.index('142 labelled train images'):]
    assert 'from_simmim' in table and 'from_scratch' in table and 'SimMIM pre-training vs scratch:' in table
