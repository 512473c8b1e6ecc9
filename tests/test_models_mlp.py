"""Swin MLP: equivalence with the official code, shift padding, official configs and counts, config mapping."""
import glob
import os

import pytest
import torch

from config import load_config
from helpers import ROOT, assert_same_outputs_and_grads, load_official_module
from models import SwinMLP, build_model

SHIFTED = dict(img_size=32, patch_size=2, window_size=4, embed_dim=24, depths=[2, 2], num_heads=[3, 6])  # 16, 8
ODD = dict(img_size=84, patch_size=2, window_size=7, embed_dim=24, depths=[2, 2], num_heads=[3, 6])  # 42, 21
CLAMPED = dict(img_size=64, patch_size=4, window_size=8, embed_dim=24,  # 16, 8 (one window), 4 (window 4)
               depths=[2, 2, 2], num_heads=[3, 6, 12])
CASES = {'shifted': SHIFTED, 'odd': ODD, 'clamped': CLAMPED}


pytestmark = pytest.mark.usefixtures('one_thread')  # tiny models: one thread is faster


@pytest.fixture(scope='module')
def official(tmp_path_factory):
    return load_official_module('models/swin_mlp.py', tmp_path_factory.mktemp('official'), required=True)


@pytest.mark.parametrize('name', CASES)
def test_official_weights_load_strict_and_match(official, name):
    """Same seed, same init; the official state_dict loads strictly; outputs, gradients and flops agree."""
    cfg = dict(CASES[name], num_classes=10, drop_path_rate=0.0, ape=True)
    torch.manual_seed(0)
    theirs = official.SwinMLP(**cfg).train()
    torch.manual_seed(0)
    ours = SwinMLP(**cfg).train()
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key  # the official init, draw for draw
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert_same_outputs_and_grads(ours, theirs, torch.randn(2, 3, cfg['img_size'], cfg['img_size']), 1e-6, 1e-5)
    assert ours.flops() == theirs.flops()


def test_shifted_block_pads_instead_of_rolling():
    """A shifted block mixes the tokens of windows offset by the shift; an unshifted one never crosses windows."""
    torch.manual_seed(0)
    model = SwinMLP(num_classes=10, drop_path_rate=0.0, **SHIFTED).eval()
    unshifted, shifted = model.layers[0].blocks
    assert (unshifted.shift_size, shifted.shift_size, shifted.padding) == (0, 2, [2, 2, 2, 2])
    assert shifted.spatial_mlp.weight.shape == (3 * 16, 16, 1) and shifted.spatial_mlp.groups == 3
    x = torch.zeros(1, 16 * 16, 24)
    x.view(1, 16, 16, 24)[0, 1, 1] = torch.randn(24)  # one token in window (0, 0), 1 from its top-left corner
    with torch.no_grad():
        for block, window in ((unshifted, (slice(0, 4), slice(0, 4))), (shifted, (slice(0, 2), slice(0, 2)))):
            # only the spatial MLP mixes tokens: the tokens that see the change are the token's window
            reached = (block(x) - block(torch.zeros_like(x))).abs().sum(-1).view(16, 16) > 0
            expected = torch.zeros(16, 16, dtype=torch.bool)
            expected[window] = True
            assert torch.equal(reached, expected)


@pytest.mark.parametrize('cfg', [SHIFTED, CLAMPED], ids=['shifted', 'clamped'])
def test_gradient_checkpointing_same_outputs_and_grads(cfg):
    torch.manual_seed(0)
    plain = SwinMLP(num_classes=10, drop_path_rate=0.2, **cfg).train()
    ckpt = SwinMLP(num_classes=10, drop_path_rate=0.2, use_checkpoint=True, **cfg).train()
    ckpt.load_state_dict(plain.state_dict())
    assert_same_outputs_and_grads(ckpt, plain, torch.randn(2, 3, cfg['img_size'], cfg['img_size']), 1e-6, seed=1)


# ----------------------------------------------------------------------------- official configs, sizes, counts
README = {  # params (M), GFLOPs of the official README
    'swin_mlp_tiny_c24_patch4_window8_256': (20, 4.0),
    'swin_mlp_tiny_c12_patch4_window8_256': (21, 4.0),
    'swin_mlp_tiny_c6_patch4_window8_256': (23, 4.0),
    'swin_mlp_base_patch4_window7_224': (61, 10.4),
}


@pytest.mark.parametrize('name', README)
def test_official_config_builds_with_readme_params_and_flops(name):
    config = load_config(os.path.join(ROOT, 'configs', 'swinmlp', name + '.yaml'), environ={})
    with torch.device('meta'):
        model = build_model(config)
    assert isinstance(model, SwinMLP)
    params_m, gflops = README[name]
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(params_m, abs=0.5)
    assert model.flops() / 1e9 == pytest.approx(gflops, abs=0.05)


def test_every_official_config_is_here():
    names = {os.path.basename(p)[:-5] for p in glob.glob(os.path.join(ROOT, 'configs', 'swinmlp', '*.yaml'))}
    assert names == set(README)


def test_build_model_maps_config_keys(tiny_config):
    config = tiny_config('MODEL.TYPE', 'swin_mlp', 'MODEL.SWIN_MLP.PATCH_SIZE', 2, 'MODEL.SWIN_MLP.WINDOW_SIZE', 4,
                         'MODEL.SWIN_MLP.EMBED_DIM', 24, 'MODEL.SWIN_MLP.DEPTHS', [2, 2],
                         'MODEL.SWIN_MLP.NUM_HEADS', [2, 4], 'MODEL.SWIN_MLP.MLP_RATIO', 2.0,
                         'MODEL.SWIN_MLP.APE', True, 'TRAIN.USE_CHECKPOINT', True, 'MODEL.DROP_PATH_RATE', 0.2)
    model = build_model(config)
    assert model.layers[1].blocks[0].spatial_mlp.groups == 4 and model.ape
    assert all(layer.use_checkpoint for layer in model.layers)
    assert model.layers[0].blocks[0].mlp.fc1.out_features == 48 and model.head.out_features == 10
    assert model.layers[-1].blocks[-1].drop_path.drop_prob == pytest.approx(0.2)


def test_forward_intermediates_are_the_stage_maps():
    """v1's backbone API, inherited: stride 2 and 4 maps here, the normed last one pooling to forward_features."""
    torch.manual_seed(0)
    model = SwinMLP(num_classes=10, **SHIFTED).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        assert [m.shape for m in maps] == [(2, 24, 16, 16), (2, 48, 8, 8)]
        assert torch.allclose(final.mean((1, 2)), model.forward_features(x), atol=1e-6)
