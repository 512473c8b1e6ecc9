"""Swin Transformer V2: equivalence with timm and the official code, attention paths, official configs and counts."""
import glob
import os
import warnings

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.swin_transformer_v2 import checkpoint_filter_fn

import models.swin_transformer_v2 as v2
from config import load_config
from errors import ConfigError
from helpers import ROOT, assert_same_outputs_and_grads, count_sdpa_calls, load_official_module, rel_diff, set_fused
from models import SwinTransformerV2, build_model

# small models covering the cases of the window logic (stage maps in the comments)
SHIFTED = dict(img_size=32, patch_size=2, window_size=4, embed_dim=24, depths=[2, 2], num_heads=[3, 6])  # 16, 8
PRETRAINED = dict(SHIFTED, pretrained_window_sizes=[3, 6])  # coordinates normalized by other windows
ODD = dict(img_size=84, patch_size=2, window_size=7, embed_dim=24, depths=[2, 2], num_heads=[3, 6])  # 42, 21
CLAMPED = dict(img_size=64, patch_size=4, window_size=8, embed_dim=24,  # 16, 8 (one window), 4 (window 4)
               depths=[2, 2, 2], num_heads=[3, 6, 12], pretrained_window_sizes=[6, 6, 3])
CASES = {'shifted': SHIFTED, 'pretrained': PRETRAINED, 'odd': ODD, 'clamped': CLAMPED}


pytestmark = pytest.mark.usefixtures('one_thread')  # tiny models: one thread is faster


@pytest.fixture(scope='module')
def official(tmp_path_factory):
    return load_official_module('models/swin_transformer_v2.py', tmp_path_factory.mktemp('official'), required=True)


def make(seed=0, **kwargs):
    """A model whose weights all differ from their init (post-norms start at zero: blocks would be identities)."""
    torch.manual_seed(seed)
    model = SwinTransformerV2(**kwargs)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith('logit_scale'):  # some heads above the clamp at log(100), some below
                p.copy_(torch.linspace(1.0, 6.0, p.numel()).view_as(p))
            else:
                p.add_(torch.randn_like(p) * 0.2)
    return model


@pytest.fixture
def force_sdpa(monkeypatch):
    return count_sdpa_calls(monkeypatch, v2)


def timm_copy(ours, cfg, num_classes):
    """timm's SwinV2 with our weights, moved through timm's own filter for official checkpoints."""
    kwargs = {k: cfg[k] for k in ('img_size', 'patch_size', 'window_size', 'embed_dim', 'depths', 'num_heads')}
    kwargs['pretrained_window_sizes'] = cfg.get('pretrained_window_sizes', [0] * len(cfg['depths']))
    theirs = timm.create_model('swinv2_tiny_window8_256', pretrained=False, num_classes=num_classes, **kwargs)
    state_dict = checkpoint_filter_fn({'model': ours.state_dict()}, theirs)
    # the filter saw the official layout (downsample at the end of a stage) and moved it to timm's
    assert 'layers.1.downsample.reduction.weight' in state_dict and 'head.fc.weight' in state_dict
    theirs.load_state_dict(state_dict, strict=True)
    return theirs.eval()


# ----------------------------------------------------------------------------- equivalence with timm
def test_swinv2_tiny_matches_timm():
    cfg = dict(img_size=256, window_size=8, embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24])
    ours = make(**cfg).eval()
    theirs = timm_copy(ours, dict(cfg, patch_size=4), 1000)
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        expected = theirs(x)
        for fused in (True, False):
            set_fused(ours, fused)
            assert rel_diff(ours(x), expected) < 1e-5, f'fused_attn={fused}'


@pytest.mark.parametrize('name', CASES)
def test_small_configs_match_timm(name):
    cfg = CASES[name]
    ours = make(num_classes=10, **cfg).eval()
    theirs = timm_copy(ours, cfg, 10)
    x = torch.randn(2, 3, cfg['img_size'], cfg['img_size'])
    with torch.no_grad():
        expected = theirs(x)
        for fused in (True, False):
            set_fused(ours, fused)
            assert rel_diff(ours(x), expected) < 1e-5, f'fused_attn={fused}'


@pytest.mark.parametrize('kwargs', [dict(), dict(indices=[0, -2], stop_early=True, norm=True)], ids=['all', 'early'])
def test_forward_intermediates_match_timm(kwargs):
    """v1's backbone API, inherited: V2's stage maps equal timm's swinv2 forward_intermediates."""
    cfg = dict(CLAMPED, depths=[2, 2, 2], num_heads=[3, 6, 12])
    ours = make(num_classes=10, **cfg).eval()
    theirs = timm_copy(ours, cfg, 10)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        (expected_final, expected), (final, got) = theirs.forward_intermediates(x, **kwargs), \
            ours.forward_intermediates(x, **kwargs)
    assert final.shape == expected_final.shape and rel_diff(final, expected_final) < 1e-5
    assert len(got) == len(expected) > 0
    for ours_map, timm_map in zip(got, expected, strict=True):
        assert ours_map.shape == timm_map.shape and rel_diff(ours_map, timm_map) < 1e-5


# ----------------------------------------------------------------------------- equivalence with the official code
@pytest.mark.parametrize('name', ['pretrained', 'odd', 'clamped'])
def test_official_weights_load_strict_and_match(official, name):
    """The official model's state_dict loads strictly into ours (and back); outputs and gradients agree."""
    cfg = dict(CASES[name], num_classes=10, drop_path_rate=0.0)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # the official file imports timm.models.layers (deprecated)
        theirs = official.SwinTransformerV2(**cfg).train()
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    ours = SwinTransformerV2(**cfg).train()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for key, value in theirs.state_dict().items():  # the buffers are computed alike, too
        assert torch.allclose(ours.state_dict()[key], value), key
    theirs.load_state_dict(ours.state_dict(), strict=True)
    assert_same_outputs_and_grads(ours, theirs, torch.randn(2, 3, cfg['img_size'], cfg['img_size']), 1e-5, 1e-4)
    assert ours.flops() == theirs.flops()


def test_fresh_init_matches_official_init(official):
    """Same seed, same draws: the official init (post-norms zeroed, logit scale log 10) is reproduced."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        theirs = official.SwinTransformerV2(num_classes=10, **SHIFTED)
    torch.manual_seed(0)
    ours = SwinTransformerV2(num_classes=10, **SHIFTED)
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    assert torch.count_nonzero(ours.layers[0].blocks[0].norm1.weight) == 0


# ----------------------------------------------------------------------------- attention paths
@pytest.mark.parametrize('name', CASES)
def test_fused_and_manual_attention_agree(name, force_sdpa):
    cfg = CASES[name]
    fused = make(num_classes=10, drop_path_rate=0.0, **cfg).train()
    manual = make(num_classes=10, drop_path_rate=0.0, fused_attn=False, **cfg).train()
    manual.load_state_dict(fused.state_dict())
    assert_same_outputs_and_grads(fused, manual, torch.randn(2, 3, cfg['img_size'], cfg['img_size']), 1e-5)
    assert force_sdpa == [1.0] * sum(cfg['depths'])  # SDPA in every fused block (scale folded into q), none manual


def test_position_bias_mlp_runs_once_per_block_call():
    model = make(num_classes=10, **SHIFTED).eval()
    calls = []
    for module in model.modules():
        if isinstance(module, v2.WindowAttention):
            module.cpb_mlp.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        model(torch.randn(4, 3, 32, 32))  # 4 images x 16 windows in stage 0: still one call per block
    assert len(calls) == 4


def test_logit_scale_is_clamped_at_log_100():
    model = make(num_classes=10, **SHIFTED).eval()
    x = torch.randn(1, 3, 32, 32)
    attn = model.layers[0].blocks[0].attn
    with torch.no_grad():
        attn.logit_scale.fill_(torch.log(torch.tensor(100.)).item())
        at_clamp = model(x)
        attn.logit_scale.fill_(9.0)
        assert torch.equal(model(x), at_clamp)
        attn.logit_scale.fill_(4.0)
        assert not torch.equal(model(x), at_clamp)


def test_backward_reaches_every_parameter():
    model = make(num_classes=10, ape=True, drop_path_rate=0.0, **SHIFTED).train()
    F.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([1, 2])).backward()
    for name, p in model.named_parameters():
        if name.endswith('logit_scale'):  # heads clamped at log(100) get no gradient, the others do
            assert (p.grad != 0).any(), name
            continue
        assert p.grad is not None and p.grad.abs().sum() > 0 and torch.isfinite(p.grad).all(), name


def test_gradient_checkpointing_same_outputs_and_grads():
    plain = make(num_classes=10, drop_path_rate=0.2, **SHIFTED).train()
    ckpt = make(num_classes=10, drop_path_rate=0.2, use_checkpoint=True, **SHIFTED).train()
    ckpt.load_state_dict(plain.state_dict())
    calls = []
    for blk in ckpt.layers[0].blocks:
        blk.register_forward_pre_hook(lambda *args: calls.append(1))
    assert_same_outputs_and_grads(ckpt, plain, torch.randn(2, 3, 32, 32), 1e-6, seed=1)  # same drop-path draws
    assert len(calls) == 4  # two blocks, each run again in backward


def test_window_of_one_token_is_finite():
    # a 1x1 last stage: the official code divides 0 by 0 in the coordinate table (NaN); timm and we do not
    model = make(num_classes=10, img_size=16, patch_size=2, window_size=4, embed_dim=24, depths=[2, 2, 2, 2],
                 num_heads=[3, 6, 12, 24]).eval()
    assert model.layers[3].blocks[0].window_size == 1
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(1, 3, 16, 16))).all()


# ----------------------------------------------------------------------------- official configs, sizes, counts
# the official README: params (M), GFLOPs (multiply-accumulates) of each released config
README = {
    'swinv2_tiny_patch4_window8_256': (28, 5.9),
    'swinv2_small_patch4_window8_256': (50, 11.5),
    'swinv2_base_patch4_window8_256': (88, 20.3),
    'swinv2_tiny_patch4_window16_256': (28, 6.6),
    'swinv2_small_patch4_window16_256': (50, 12.6),
    'swinv2_base_patch4_window16_256': (88, 21.8),
    'swinv2_base_patch4_window12to16_192to256_22kto1k_ft': (88, 21.8),
    'swinv2_base_patch4_window12to24_192to384_22kto1k_ft': (88, 54.7),
    'swinv2_large_patch4_window12to16_192to256_22kto1k_ft': (197, 47.5),
    'swinv2_large_patch4_window12to24_192to384_22kto1k_ft': (197, 115.4),
}
CONFIGS = sorted(glob.glob(os.path.join(ROOT, 'configs', 'swinv2', '*.yaml')))


def test_every_official_config_is_here():
    names = {os.path.basename(path)[:-5] for path in CONFIGS}
    assert names == set(README) | {'swinv2_base_patch4_window12_192_22k', 'swinv2_large_patch4_window12_192_22k'}


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: os.path.basename(p)[:-5])
def test_official_config_builds_with_readme_params_and_flops(path):
    config = load_config(path, environ={})
    with torch.device('meta'):  # flops() is analytic: no weights or forward needed
        model = build_model(config)
    assert isinstance(model, SwinTransformerV2)
    name = os.path.basename(path)[:-5]
    if name not in README:  # the 192 px 22K pre-training configs: the README gives no numbers
        return
    params_m, gflops = README[name]
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(params_m, abs=0.5)
    assert model.flops() / 1e9 == pytest.approx(gflops, abs=0.05)


def test_build_model_maps_config_keys(tiny_config):
    config = tiny_config('MODEL.TYPE', 'swinv2', 'MODEL.SWINV2.PATCH_SIZE', 2, 'MODEL.SWINV2.WINDOW_SIZE', 4,
                         'MODEL.SWINV2.EMBED_DIM', 24, 'MODEL.SWINV2.DEPTHS', [2, 2], 'MODEL.SWINV2.NUM_HEADS', [3, 6],
                         'MODEL.SWINV2.PRETRAINED_WINDOW_SIZES', [3, 2], 'MODEL.SWINV2.FUSED_ATTN', False,
                         'MODEL.SWINV2.QKV_BIAS', False, 'MODEL.SWINV2.APE', True, 'MODEL.SWINV2.MLP_RATIO', 2.0,
                         'TRAIN.USE_CHECKPOINT', True, 'MODEL.DROP_PATH_RATE', 0.2)
    model = build_model(config)
    attns = [m for m in model.modules() if isinstance(m, v2.WindowAttention)]
    assert [a.pretrained_window_size for a in attns] == [(3, 3)] * 2 + [(2, 2)] * 2
    assert not any(a.fused_attn for a in attns) and all(a.q_bias is None for a in attns)
    assert all(layer.use_checkpoint for layer in model.layers) and model.ape
    assert model.layers[0].blocks[0].mlp.fc1.out_features == 48 and model.head.out_features == 10
    assert model.layers[-1].blocks[-1].drop_path.drop_prob == pytest.approx(0.2)


def test_config_errors_name_the_v2_keys(tiny_config):
    with pytest.raises(ConfigError, match=r'MODEL\.SWINV2\.WINDOW_SIZE 5'):
        build_model(tiny_config('MODEL.TYPE', 'swinv2', 'MODEL.SWINV2.PATCH_SIZE', 2, 'MODEL.SWINV2.WINDOW_SIZE', 5,
                                'MODEL.SWINV2.DEPTHS', [2, 2], 'MODEL.SWINV2.NUM_HEADS', [3, 6]))
    with pytest.raises(ConfigError, match=r'MODEL\.SWINV2\.PRETRAINED_WINDOW_SIZES \[0\] needs an entry'):
        tiny_config('MODEL.TYPE', 'swinv2', 'MODEL.SWINV2.DEPTHS', [2, 2], 'MODEL.SWINV2.NUM_HEADS', [3, 6],
                    'MODEL.SWINV2.PRETRAINED_WINDOW_SIZES', [0])
    with pytest.raises(ConfigError, match=r'MODEL\.SWINV2\.EMBED_DIM 96 gives 96 channels in stage 0'):
        tiny_config('MODEL.TYPE', 'swinv2', 'MODEL.SWINV2.NUM_HEADS', [5, 6, 12, 24])


def test_no_weight_decay_names():
    model = make(**SHIFTED)
    assert model.no_weight_decay_keywords() == {'cpb_mlp', 'logit_scale', 'relative_position_bias_table'}
    names = [n for n, _ in model.named_parameters()]
    assert sum('cpb_mlp' in n for n in names) == 4 * 3 and sum('logit_scale' in n for n in names) == 4
