"""Swin Transformer: equivalence with timm, official keys and counts, attention paths, checkpointing, errors."""
import logging
import os
import sys
import types

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.swin_transformer import checkpoint_filter_fn

import models.swin_transformer as swin
import models.swin_transformer_v2 as swin_v2
from checkpoint import load_model_weights
from errors import ConfigError
from helpers import count_sdpa_calls, set_fused
from models import SwinTransformer, build_model

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures')

# small models covering the cases of the window logic (stage maps in the comments)
SHIFTED = dict(img_size=32, patch_size=2, window_size=4, embed_dim=24, depths=[2, 2], num_heads=[3, 6])  # 16, 8
ODD = dict(img_size=84, patch_size=2, window_size=7, embed_dim=24, depths=[2, 2], num_heads=[3, 6])  # 42, 21
CLAMPED = dict(img_size=64, patch_size=4, window_size=8, embed_dim=24,  # 16, 8 (one window), 4 (window 4)
               depths=[2, 2, 2], num_heads=[3, 6, 12])
SMALL = dict(img_size=64, patch_size=2, window_size=4, embed_dim=48, depths=[2, 2, 2], num_heads=[3, 6, 12])


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    # these models are tiny: with two threads on a busy machine OpenMP waits dominate (tens of times slower)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rel_diff(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def make(seed=0, **kwargs):
    torch.manual_seed(seed)
    return SwinTransformer(**kwargs)


@pytest.fixture
def force_sdpa(monkeypatch):
    return count_sdpa_calls(monkeypatch, swin)


def timm_copy(ours, **kwargs):
    """timm's Swin with our weights, moved through timm's own filter for official checkpoints."""
    theirs = timm.create_model('swin_tiny_patch4_window7_224', pretrained=False, weight_init='skip', **kwargs).eval()
    state_dict = checkpoint_filter_fn({'model': ours.state_dict()}, theirs)
    # the filter saw the official layout (downsample at the end of a stage) and moved it to timm's
    assert 'layers.1.downsample.reduction.weight' in state_dict and 'head.fc.weight' in state_dict
    theirs.load_state_dict(state_dict, strict=True)
    return theirs


def timm_kwargs(cfg, num_classes):
    return dict(img_size=cfg['img_size'], patch_size=cfg['patch_size'], window_size=cfg['window_size'],
                embed_dim=cfg['embed_dim'], depths=cfg['depths'], num_heads=cfg['num_heads'],
                num_classes=num_classes)


# ----------------------------------------------------------------------------- equivalence with timm
def test_swin_tiny_matches_timm():
    ours = make().eval()
    theirs = timm_copy(ours)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        expected = theirs(x)
        for fused in (True, False):
            set_fused(ours, fused)
            assert rel_diff(ours(x), expected) < 1e-5, f'fused_attn={fused}'


@pytest.mark.parametrize('cfg', [SMALL, ODD, CLAMPED], ids=['small', 'odd', 'clamped'])
def test_small_configs_match_timm(cfg):
    ours = make(num_classes=10, **cfg).eval()
    theirs = timm_copy(ours, **timm_kwargs(cfg, 10))
    x = torch.randn(2, 3, cfg['img_size'], cfg['img_size'])
    with torch.no_grad():
        expected = theirs(x)
        for fused in (True, False):
            set_fused(ours, fused)
            assert rel_diff(ours(x), expected) < 1e-5, f'fused_attn={fused}'


def test_absolute_position_embedding_matches_timm_plus_embedding():
    # timm has no APE: add ours to timm's patch embedding output, which is where the official code adds it
    ours = make(num_classes=10, ape=True, **SHIFTED).eval()
    with torch.no_grad():
        ours.absolute_pos_embed.normal_()  # large enough that a missing or misplaced add shows
    theirs = timm.create_model('swin_tiny_patch4_window7_224', pretrained=False, **timm_kwargs(SHIFTED, 10)).eval()
    state_dict = {k: v for k, v in ours.state_dict().items() if k != 'absolute_pos_embed'}
    theirs.load_state_dict(checkpoint_filter_fn(state_dict, theirs), strict=True)
    grid = ours.patches_resolution
    theirs.patch_embed.register_forward_hook(
        lambda module, args, out: out + ours.absolute_pos_embed.view(1, grid[0], grid[1], -1))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert rel_diff(ours(x), theirs(x)) < 1e-5


# ----------------------------------------------------------------------------- sizes and counts
@pytest.mark.parametrize('kwargs, params_m, gmacs', [
    (dict(), 28.3, 4.49),
    (dict(depths=[2, 2, 18, 2]), 49.6, 8.75),
    (dict(embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32]), 87.8, 15.44),
], ids=['T', 'S', 'B'])
def test_parameter_count_and_macs(kwargs, params_m, gmacs):
    with torch.device('meta'):  # flops() is analytic: no weights or forward needed
        model = SwinTransformer(**kwargs)
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(params_m, rel=0.01)
    assert model.flops() / 1e9 == pytest.approx(gmacs, rel=0.01)


def test_flops_count_the_official_way():
    # hand count for SHIFTED (official formulas): 16x16x24 then 8x8x48, window 4 (N = 16), 10 classes
    def block(res, dim, heads):
        windows, n = res * res / 16, 16
        attn = n * dim * 3 * dim + 2 * heads * n * (dim // heads) * n + n * dim * dim
        return 2 * dim * res * res + windows * attn + 2 * res * res * dim * dim * 4
    expected = 16 * 16 * 24 * 3 * 4 + 16 * 16 * 24  # patch embedding + its norm
    expected += 2 * block(16, 24, 3) + 16 * 16 * 24 + 8 * 8 * 4 * 24 * 2 * 24  # stage 0 + patch merging
    expected += 2 * block(8, 48, 6)
    expected += 48 * 16 * 16 // 4 + 48 * 10  # final norm (official count) + head
    assert make(num_classes=10, **SHIFTED).flops() == pytest.approx(expected, rel=1e-12)


def test_tiny_config_shapes(tiny_config):
    model = build_model(tiny_config())
    x = torch.randn(2, 3, 32, 32)
    assert model.forward_features(x).shape == (2, 48)
    assert model(x).shape == (2, 10)
    assert [blk.shift_size for layer in model.layers for blk in layer.blocks] == [0, 2, 0, 2]


def test_small_map_is_one_unshifted_window():
    model = make(**CLAMPED)
    last = model.layers[2].blocks[1]
    assert (last.window_size, last.shift_size, last.attn_mask) == (4, 0, None)
    assert last.attn.relative_position_bias_table.shape == ((2 * 4 - 1) ** 2, 12)


def test_build_model_maps_config_keys(tiny_config):
    config = tiny_config('MODEL.SWIN.FUSED_ATTN', False, 'TRAIN.USE_CHECKPOINT', True, 'MODEL.SWIN.APE', True,
                         'MODEL.DROP_PATH_RATE', 0.2, 'MODEL.DROP_RATE', 0.3, 'MODEL.SWIN.QK_SCALE', 0.5,
                         'MODEL.SWIN.MLP_RATIO', 2.0, 'MODEL.SWIN.QKV_BIAS', False, 'MODEL.SWIN.PATCH_NORM', False)
    model = build_model(config)
    attns = [m for m in model.modules() if isinstance(m, swin.WindowAttention)]
    assert not any(a.fused_attn for a in attns) and all(a.scale == 0.5 and a.qkv.bias is None for a in attns)
    assert all(layer.use_checkpoint for layer in model.layers)
    assert model.ape and model.patch_embed.norm is None and model.pos_drop.p == 0.3
    assert model.layers[-1].blocks[-1].drop_path.drop_prob == pytest.approx(0.2)
    assert model.layers[0].blocks[0].mlp.fc1.out_features == 48
    assert model.head.out_features == 10 and model.patch_embed.proj.stride == (2, 2)


def test_build_model_rejects_unknown_type(tiny_config):
    config = tiny_config().clone()
    config.defrost()
    config.MODEL.TYPE = 'swin_moe'
    with pytest.raises(ConfigError, match="MODEL.TYPE 'swin_moe' is not supported"):
        build_model(config)
    config.MODEL.TYPE = 'swin_mlp'  # SimMIM pre-trains swin and swinv2 encoders only (as officially)
    with pytest.raises(ConfigError, match='SimMIM pre-training'):
        build_model(config, is_pretrain=True)


# ----------------------------------------------------------------------------- training behaviour
def test_backward_reaches_every_parameter():
    model = make(num_classes=10, ape=True, drop_path_rate=0.0, **SHIFTED).train()
    F.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([1, 2])).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0 and torch.isfinite(p.grad).all(), name


def test_gradient_checkpointing_same_outputs_and_grads():
    plain = make(num_classes=10, drop_path_rate=0.2, **SHIFTED).train()
    ckpt = make(num_classes=10, drop_path_rate=0.2, use_checkpoint=True, **SHIFTED).train()
    ckpt.load_state_dict(plain.state_dict())
    calls = []
    for blk in ckpt.layers[0].blocks:
        blk.register_forward_pre_hook(lambda *args: calls.append(1))
    x = torch.randn(2, 3, 32, 32)
    outs = []
    for model in (plain, ckpt):
        torch.manual_seed(1)  # same drop-path draws; checkpoint replays the RNG state when recomputing
        out = model(x)
        out.square().sum().backward()
        outs.append(out)
    assert len(calls) == 4  # two blocks, each run again in backward: checkpointing is on
    assert rel_diff(outs[1], outs[0]) < 1e-6
    for (name, a), b in zip(ckpt.named_parameters(), plain.parameters(), strict=True):
        assert rel_diff(a.grad, b.grad) < 1e-6, name


@pytest.mark.parametrize('cfg', [SHIFTED, ODD, CLAMPED], ids=['shifted', 'odd', 'clamped'])
def test_fused_and_manual_attention_agree(cfg, force_sdpa):
    fused = make(num_classes=10, drop_path_rate=0.0, qk_scale=0.3, **cfg).train()
    manual = make(num_classes=10, drop_path_rate=0.0, qk_scale=0.3, fused_attn=False, **cfg).train()
    manual.load_state_dict(fused.state_dict())
    x = torch.randn(2, 3, cfg['img_size'], cfg['img_size'])
    out_fused, out_manual = fused(x), manual(x)
    assert len(force_sdpa) == sum(cfg['depths'])  # the fused model ran SDPA in every block, the manual none
    assert rel_diff(out_fused, out_manual) < 1e-5
    out_fused.square().sum().backward()
    out_manual.square().sum().backward()
    for (name, a), b in zip(fused.named_parameters(), manual.parameters(), strict=True):
        assert rel_diff(a.grad, b.grad) < 1e-5, name


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float16], ids=['fp32', 'bf16', 'fp16'])
@pytest.mark.parametrize('window', [7, 8, 12, 16, 24])
@pytest.mark.parametrize('version', ['v1', 'v2'])
def test_attention_mask_layout_is_aligned(version, window, dtype):
    # CUDA's memory-efficient SDPA kernel pads a copy of any mask whose last dim is not contiguous or whose
    # other strides are not multiples of 8 elements; the mask must come out in its layout for every window
    n = window * window
    if version == 'v1':
        attn = swin.WindowAttention(dim=24, window_size=window, num_heads=3)
        table = attn.relative_position_bias_table
        expected_bias = table[attn.relative_position_index.view(-1)].view(n, n, 3).permute(2, 0, 1)
    else:
        attn = swin_v2.WindowAttention(dim=24, window_size=window, num_heads=3)
        expected_bias = attn.position_bias()
    shift = swin.shifted_window_mask((2 * window, 2 * window), window, window // 2)  # 4 windows
    for mask, expected in ((None, expected_bias), (shift, (shift[:, None] + expected_bias).flatten(0, 1))):
        out = attn.attention_mask(mask, dtype)
        assert out.dtype == dtype and out.shape == (1, expected.shape[0], n, n)
        assert out.stride(-1) == 1, out.stride()
        assert all(s % 8 == 0 for s in out.stride()[:-1]), out.stride()
        assert torch.equal(out, expected.unsqueeze(0).to(dtype))  # same values as before the layout change
        assert out.requires_grad  # the bias table keeps its gradient


def test_fused_attention_uses_sdpa_except_cpu_training(monkeypatch):
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, 'scaled_dot_product_attention', lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    model = make(**SHIFTED)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        model(x)
    assert len(calls) == 4
    model(x)  # on CPU a trainable bias table takes the explicit path (SDPA would run its slow math path)
    assert len(calls) == 4


def test_fused_attention_dropout_only_in_training(force_sdpa):
    model = make(attn_drop_rate=0.5, drop_path_rate=0.0, **SHIFTED)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        reference = model.eval()(x)
        assert torch.equal(model(x), reference)
        assert rel_diff(model.train()(x), reference) > 1e-3


# ----------------------------------------------------------------------------- official layout
def official_keys(depths, ape=False):
    """The state_dict keys of the official SwinTransformer (v1) for the given depths."""
    keys = ['patch_embed.proj.weight', 'patch_embed.proj.bias', 'patch_embed.norm.weight', 'patch_embed.norm.bias',
            'norm.weight', 'norm.bias', 'head.weight', 'head.bias'] + (['absolute_pos_embed'] if ape else [])
    for i, depth in enumerate(depths):
        for j in range(depth):
            p = f'layers.{i}.blocks.{j}.'
            keys += [p + k for k in ('norm1.weight', 'norm1.bias', 'attn.relative_position_bias_table',
                                     'attn.relative_position_index', 'attn.qkv.weight', 'attn.qkv.bias',
                                     'attn.proj.weight', 'attn.proj.bias', 'norm2.weight', 'norm2.bias',
                                     'mlp.fc1.weight', 'mlp.fc1.bias', 'mlp.fc2.weight', 'mlp.fc2.bias')]
        if i < len(depths) - 1:
            keys += [f'layers.{i}.downsample.reduction.weight', f'layers.{i}.downsample.norm.weight',
                     f'layers.{i}.downsample.norm.bias']
    return keys


def test_state_dict_has_the_official_keys():
    model = make(ape=True, **CLAMPED)
    keys = set(model.state_dict())
    # attn_mask is saved by shifted blocks only (a None buffer is not saved), like the official model
    masks = {k for k in keys if k.endswith('attn_mask')}
    assert masks == {'layers.0.blocks.1.attn_mask'}  # stages 1 and 2 are a single window: no shift
    assert keys - masks == set(official_keys(CLAMPED['depths'], ape=True))


def official_tiny_state_dict(seed=0):
    """An official-layout state_dict built from the official code's key list (not from our model): random
    parameters of the official shapes; buffers zero (every loader recomputes them from the config)."""
    generator = torch.Generator().manual_seed(seed)
    sd = {}
    for line in open(os.path.join(FIXTURES, 'official_swin_tiny_keys.txt')):
        if line.startswith('#'):
            continue
        key, shape, dtype = line.split()
        shape, dtype = [int(n) for n in shape.split('x')], getattr(torch, dtype)
        sd[key] = (torch.randn(shape, generator=generator) * 0.1 if dtype.is_floating_point and
                   not key.endswith('attn_mask') else torch.zeros(shape, dtype=dtype))
    return sd


def test_official_checkpoint_loads_strict(tiny_config, tmp_path):
    official = official_tiny_state_dict()
    ours = build_model(tiny_config()).eval()
    # the same entries, in the same order, with the same shapes and types as the official model's state_dict
    assert [(k, v.shape, v.dtype) for k, v in ours.state_dict().items()] == \
        [(k, v.shape, v.dtype) for k, v in official.items()]

    path = tmp_path / 'official.pth'
    torch.save({'model': official, 'optimizer': {}, 'lr_scheduler': {}, 'max_accuracy': 80.0, 'epoch': 299}, path)
    load_model_weights(ours, str(path), logging.getLogger('test_models'))
    for name, param in ours.named_parameters():
        assert torch.equal(param, official[name]), name
    # and the weights mean what they mean to timm's reader of official checkpoints
    theirs = timm.models.swin_transformer.SwinTransformer(img_size=32, patch_size=2, window_size=4, embed_dim=24,
                                                          depths=(2, 2), num_heads=(3, 6), num_classes=10).eval()
    theirs.load_state_dict(checkpoint_filter_fn({'model': official}, theirs), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-5)


def test_no_weight_decay_names():
    model = make(ape=True, **SHIFTED)
    names = [n for n, _ in model.named_parameters()]
    assert model.no_weight_decay() == {'absolute_pos_embed'} and 'absolute_pos_embed' in names
    assert model.no_weight_decay_keywords() == {'relative_position_bias_table'}
    assert sum('relative_position_bias_table' in n for n in names) == 4


def test_window_partition_round_trip():
    x = torch.randn(2, 8, 12, 5)
    windows = swin.window_partition(x, 4)
    assert windows.shape == (12, 4, 4, 5)
    assert torch.equal(windows[1], x[0, :4, 4:8])  # row-major windows
    assert torch.equal(swin.window_reverse(windows, 4, 8, 12), x)


# ----------------------------------------------------------------------------- config errors
def test_window_not_dividing_a_stage_is_a_config_error(tiny_config):
    config = tiny_config('DATA.IMG_SIZE', 48, 'MODEL.SWIN.DEPTHS', [2, 2, 2], 'MODEL.SWIN.NUM_HEADS', [3, 6, 12])
    with pytest.raises(ConfigError) as info:  # maps 24, 12, 6: 6 is larger than the window 4, not a multiple
        build_model(config)
    message = str(info.value)
    assert '\n' not in message
    for part in ('DATA.IMG_SIZE 48', 'MODEL.SWIN.WINDOW_SIZE 4', 'stage 2', '6x6'):
        assert part in message


def test_odd_map_before_patch_merging_is_a_config_error(tiny_config):
    config = tiny_config('DATA.IMG_SIZE', 36, 'MODEL.SWIN.WINDOW_SIZE', 3, 'MODEL.SWIN.DEPTHS', [2, 2, 2],
                         'MODEL.SWIN.NUM_HEADS', [3, 6, 12])
    with pytest.raises(ConfigError, match=r'9x9 feature map in stage 1.*patch merging'):  # maps 18, 9
        build_model(config)


# ----------------------------------------------------------------------------- backbone API
@pytest.mark.parametrize('kwargs', [
    dict(),
    dict(indices=2, norm=True),
    dict(indices=[0, -2], stop_early=True),
    dict(indices=[1], intermediates_only=True),
], ids=['all', 'last2-norm', 'stop-early', 'only'])
def test_forward_intermediates_equal_timm(kwargs):
    cfg = dict(SMALL, img_size=64, depths=[2, 2, 2, 2], num_heads=[3, 6, 12, 24], window_size=2)  # maps 32..4
    ours = make(num_classes=10, **cfg).eval()
    theirs = timm_copy(ours, **timm_kwargs(cfg, 10))  # timm's checkpoint_filter_fn on our official layout
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected, got = theirs.forward_intermediates(x, **kwargs), ours.forward_intermediates(x, **kwargs)
    if not kwargs.get('intermediates_only'):
        (expected_final, expected), (final, got) = expected, got
        assert final.shape == expected_final.shape and rel_diff(final, expected_final) < 1e-5
    assert len(got) == len(expected) > 0
    for ours_map, timm_map in zip(got, expected, strict=True):
        assert ours_map.shape == timm_map.shape and rel_diff(ours_map, timm_map) < 1e-5


def test_forward_intermediates_are_the_stride_4_to_32_maps():
    model = make(num_classes=0).eval()  # swin_tiny: patch 4, 4 stages
    with torch.no_grad():
        maps = model.forward_intermediates(torch.randn(1, 3, 224, 224), intermediates_only=True)
        final, _ = model.forward_intermediates(torch.randn(1, 3, 224, 224), indices=1)
    strides = (4, 8, 16, 32)
    assert [tuple(m.shape) for m in maps] == [(1, 96 * 2 ** i, 224 // s, 224 // s) for i, s in enumerate(strides)]
    assert final.shape == (1, 7, 7, 768)
    with pytest.raises(ValueError, match='NCHW'):
        model.forward_intermediates(torch.randn(1, 3, 224, 224), output_fmt='NHWC')
    with pytest.raises(ValueError, match='0..3'):
        model.forward_intermediates(torch.randn(1, 3, 224, 224), indices=[4])


def test_fused_layernorm_uses_apex_when_importable_and_says_so_when_not(tiny_config, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger='swin.models')
    config = tiny_config('FUSED_LAYERNORM', True)
    monkeypatch.setitem(sys.modules, 'apex', None)          # apex absent (None makes the import fail)
    monkeypatch.setitem(sys.modules, 'apex.normalization', None)
    model = build_model(config)
    assert {type(m) for m in model.modules() if isinstance(m, torch.nn.LayerNorm)} == {torch.nn.LayerNorm}
    assert 'FUSED_LAYERNORM: apex is not importable' in caplog.text

    class FusedLayerNorm(torch.nn.LayerNorm):                # apex's class is a LayerNorm with a CUDA kernel
        pass
    apex = types.ModuleType('apex')
    apex.normalization = types.ModuleType('apex.normalization')
    apex.normalization.FusedLayerNorm = FusedLayerNorm
    monkeypatch.setitem(sys.modules, 'apex', apex)
    monkeypatch.setitem(sys.modules, 'apex.normalization', apex.normalization)
    fused = build_model(config)
    norms = [m for m in fused.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and all(type(m) is FusedLayerNorm for m in norms)
    assert fused.state_dict().keys() == model.state_dict().keys()
    assert 'using apex.normalization.FusedLayerNorm' in caplog.text
    assert all(type(m) is torch.nn.LayerNorm for m in build_model(tiny_config()).modules()
               if isinstance(m, torch.nn.LayerNorm))
