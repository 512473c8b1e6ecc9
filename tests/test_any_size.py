"""Any input size (issue #25): the config size runs the unchanged code, other sizes the detection backbone's.

The reference at other sizes is the official detection backbone (SwinTransformer/Swin-Transformer-Object-Detection
``mmdet/models/backbones/swin_transformer.py``), loaded from its mirror with its mmcv / mmdet imports stubbed.
"""
import os
import types
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import models.swin_mlp as swin_mlp
import models.swin_transformer as swin
from checkpoint.weights import load_state_dict_strict
from errors import ConfigError
from helpers import load_git_module, rel_diff
from models import SwinMLP, SwinTransformer, SwinTransformerV2

pytestmark = pytest.mark.usefixtures('one_thread')  # tiny models: one thread is faster

DETECTION_REPO = os.environ.get('SWIN_DETECTION_REPO',
                                '/work/.mirror/SwinTransformer+Swin-Transformer-Object-Detection/repo')

# stage maps 16, 8: both larger than the window, so the config-size rule (fit_window) changes nothing
TINY = dict(img_size=32, patch_size=2, window_size=4, embed_dim=24, depths=[2, 2], num_heads=[3, 6])
# stage maps 28, 14 with an odd window: shift 3, and Swin MLP's shift padding 4 before, 3 after
WINDOW7 = dict(img_size=56, patch_size=2, window_size=7, embed_dim=24, depths=[2, 2], num_heads=[3, 6])
# stage maps 32, 16, 8, 4: the same window (4) in every stage, so the bias tables are the detection backbone's
# shape; at the config size stage 3 (map = window) is one unshifted window, at other sizes it shifts by 2
DETECTION = dict(img_size=64, patch_size=2, window_size=4, embed_dim=24, depths=[2, 2, 2, 2],
                 num_heads=[3, 6, 12, 24])
# stage maps 16, 8 (one window of 8), 4 (the window shrinks to 4)
CLAMPED = dict(img_size=64, patch_size=4, window_size=8, embed_dim=24, depths=[2, 2, 2], num_heads=[3, 6, 12])

FAMILIES = {'v1': SwinTransformer, 'v2': SwinTransformerV2, 'mlp': SwinMLP}
BLOCKS = (swin.SwinTransformerBlock, swin_mlp.SwinMLPBlock)  # V2's block subclasses v1's


def make(family, seed=0, **kwargs):
    """A model whose weights all differ from their init (V2's post-norms start at zero: blocks would be identities)."""
    torch.manual_seed(seed)
    model = FAMILIES[family](**{'num_classes': 10, 'drop_path_rate': 0.0, **kwargs})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith('logit_scale'):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def blocks(model):
    return [m for m in model.modules() if isinstance(m, BLOCKS)]


def force_any_size(model):
    """Every block runs its any-size code whatever the map (at the config size too)."""
    for blk in blocks(model):
        blk.forward = blk.forward_any_size
    return model


def grid_sizes(model, image_size):
    """The stage maps of an image: ceil(/ patch), then ceil(/ 2) per stage."""
    size = (-(-image_size[0] // model.patch_embed.patch_size[0]), -(-image_size[1] // model.patch_embed.patch_size[1]))
    sizes = [size]
    for _ in model.layers[1:]:
        sizes.append(swin.merged_size(sizes[-1]))
    return sizes


# ----------------------------------------------------------------------------- the config size
@pytest.mark.parametrize('family', FAMILIES)
def test_config_size_takes_the_unchanged_path(family, monkeypatch):
    model = make(family, ape=True, **TINY).eval()

    def refuse(self, x, size):
        raise AssertionError(f'any-size path taken at the config size {size}')
    for cls in BLOCKS:
        monkeypatch.setattr(cls, 'forward_any_size', refuse)
    monkeypatch.setattr(F, 'interpolate', lambda *a, **k: refuse(None, None, 'interpolate'))  # APE as trained
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model(x)
        maps = model.forward_intermediates(x, intermediates_only=True)
    assert [m.shape[-2:] for m in maps] == [(16, 16), (8, 8)]
    assert all(len(blk.shift_masks) == 0 for blk in blocks(model) if hasattr(blk, 'shift_masks'))


@pytest.mark.parametrize('cfg', [TINY, WINDOW7], ids=['window4', 'window7'])
@pytest.mark.parametrize('family', FAMILIES)
def test_any_size_code_at_the_config_size_gives_the_same_outputs(family, cfg):
    """Where every config map is larger than the window the two rules agree: the general code (padding
    nothing, rolling, its own cached mask) run on the config size gives the fast path's logits and maps."""
    model = make(family, ape=True, **cfg).eval()
    x = torch.randn(2, 3, cfg['img_size'], cfg['img_size'])
    with torch.no_grad():
        logits = model(x)
        final, maps = model.forward_intermediates(x)
        force_any_size(model)
        assert rel_diff(model(x), logits) < 1e-5
        general_final, general_maps = model.forward_intermediates(x)
    assert rel_diff(general_final, final) < 1e-5
    for general, fast in zip(general_maps, maps, strict=True):
        assert general.shape == fast.shape and rel_diff(general, fast) < 1e-5
    if family != 'mlp':  # the general code ran: it cached the mask the buffers hold
        shifted = [blk for blk in blocks(model) if blk.shift_size > 0]
        assert shifted and all(len(blk.shift_masks) == 1 for blk in shifted)
        for blk in shifted:
            assert torch.equal(blk.shift_masks.get(blk.input_resolution, 'cpu'), blk.attn_mask)


# ----------------------------------------------------------------------------- the official detection backbone
@pytest.fixture(scope='module')
def detection(tmp_path_factory):
    """The official detection backbone's module; its mmcv / mmdet imports are stubbed (unused here)."""
    def package(name, **attrs):
        module = types.ModuleType(name)
        module.__path__ = []
        module.__dict__.update(attrs)
        return module
    registry = types.SimpleNamespace(register_module=lambda *args, **kwargs: (lambda cls: cls))
    stubs = {'mmcv_custom': package('mmcv_custom', load_checkpoint=None),
             'mmdet': package('mmdet'),
             'mmdet.utils': package('mmdet.utils', get_root_logger=None),
             'mmdet.models': package('mmdet.models'),
             'mmdet.models.builder': package('mmdet.models.builder', BACKBONES=registry),
             'mmdet.models.backbones': package('mmdet.models.backbones')}
    return load_git_module(DETECTION_REPO, 'mmdet/models/backbones/swin_transformer.py',
                           tmp_path_factory.mktemp('detection'), 'mmdet.models.backbones.swin_transformer', stubs,
                           what='the official detection repository (set SWIN_DETECTION_REPO)')


def detection_copy(detection, ours, cfg):
    """The detection backbone with our weights, its per-stage output norms left out (ours returns raw maps), in
    our model's train / eval mode (its ``train()`` returns None: not chainable)."""
    stages = len(cfg['depths'])
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # its torch.meshgrid call without indexing=
        theirs = detection.SwinTransformer(pretrain_img_size=cfg['img_size'], patch_size=cfg['patch_size'],
                                           embed_dim=cfg['embed_dim'], depths=cfg['depths'],
                                           num_heads=cfg['num_heads'], window_size=cfg['window_size'],
                                           drop_path_rate=0.0, ape=ours.ape,
                                           out_indices=tuple(range(stages)))
    theirs.train(ours.training)
    for i in range(stages):
        setattr(theirs, f'norm{i}', nn.Identity())
    state_dict = ours.state_dict()
    if ours.ape:  # ours (1, L, C), theirs (1, C, Gh, Gw)
        grid = ours.patches_resolution
        state_dict['absolute_pos_embed'] = state_dict['absolute_pos_embed'].view(1, *grid, -1).permute(0, 3, 1, 2)
    expected = theirs.state_dict()
    # no head, no final norm, no attn_mask buffers (they build masks per call); the same window everywhere
    assert set(expected) <= set(state_dict)
    theirs.load_state_dict({k: state_dict[k] for k in expected}, strict=True)
    return theirs


def assert_maps_match(ours, theirs, x, stages=None):
    """Ours (forward_intermediates) and the detection backbone's stage maps: the same shapes and values."""
    got = ours.forward_intermediates(x, intermediates_only=True)
    expected = theirs(x)
    stages = range(len(expected)) if stages is None else stages
    for i in stages:
        assert got[i].shape == expected[i].shape, i
        assert rel_diff(got[i], expected[i]) < 1e-5, f'stage {i}: {rel_diff(got[i], expected[i])}'
    return got, expected


@pytest.mark.parametrize('size, ape', [((40, 56), False), ((52, 36), True), ((64, 96), False), ((33, 47), False)],
                         ids=['40x56', '52x36-ape', '64x96', '33x47'])
def test_stage_maps_equal_the_detection_backbone(detection, size, ape):
    """All four stages: non-square sizes, maps that are not multiples of the window (padded), odd maps before
    patch merging (padded), an image that is not a multiple of the patch (padded), the APE resized."""
    ours = make('v1', ape=ape, **DETECTION).eval()
    theirs = detection_copy(detection, ours, DETECTION)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        got, _ = assert_maps_match(ours, theirs, x)
    assert [tuple(m.shape[-2:]) for m in got] == grid_sizes(ours, size)
    assert any(s[0] % 4 or s[1] % 4 for s in grid_sizes(ours, size))  # some stage needs window padding


def test_explicit_attention_and_gradients_equal_the_detection_backbone(detection):
    """The explicit softmax path and training: same maps, and the same parameter gradients of their squares
    (through the padding, the rolls, the crops and the resized APE)."""
    ours = make('v1', ape=True, fused_attn=False, **DETECTION).train()
    theirs = detection_copy(detection, ours, DETECTION)
    x = torch.randn(2, 3, 52, 36)
    got, expected = assert_maps_match(ours, theirs, x)
    sum(m.square().sum() for m in got).backward()
    sum(m.square().sum() for m in expected).backward()
    theirs_params = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        if name.startswith(('head.', 'norm.')):
            assert p.grad is None, name  # not on the way to the stage maps
            continue
        reference = theirs_params[name].grad
        grad = p.grad.view(1, *ours.patches_resolution, -1).permute(0, 3, 1, 2) if name == 'absolute_pos_embed' \
            else p.grad
        assert rel_diff(grad, reference) < 1e-4, name


def test_at_the_config_size_only_the_map_as_small_as_the_window_differs(detection):
    """At the config size ours keeps the classification rule: stage 3's 4x4 map (= window) is one unshifted
    window, where the detection backbone shifts it; stages 0-2 agree."""
    ours = make('v1', **DETECTION).eval()
    theirs = detection_copy(detection, ours, DETECTION)
    assert [blk.shift_size for blk in ours.layers[3].blocks] == [0, 0]
    assert [blk.any_size_shift for blk in ours.layers[3].blocks] == [0, 2]
    with torch.no_grad():
        got, expected = assert_maps_match(ours, theirs, torch.randn(2, 3, 64, 64), stages=range(3))
    assert rel_diff(got[3], expected[3]) > 1e-3


# ----------------------------------------------------------------------------- every family at any size
@pytest.mark.parametrize('size', [(48, 40), (37, 53)], ids=['48x40', '37x53'])
@pytest.mark.parametrize('family', FAMILIES)
def test_any_size_forward_and_backward(family, size):
    model = make(family, ape=True, **TINY).train()
    final, maps = model.forward_intermediates(torch.randn(2, 3, *size))
    sizes = grid_sizes(model, size)
    assert [tuple(m.shape) for m in maps] == [(2, 24 * 2 ** i, *s) for i, s in enumerate(sizes)]
    assert final.shape == (2, *sizes[-1], 48)
    logits = model(torch.randn(2, 3, *size))
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    F.cross_entropy(logits, torch.tensor([1, 2])).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize('family', FAMILIES)
def test_classification_at_another_resolution(family):
    model = make(family, **TINY).eval()
    x = torch.randn(1, 3, 48, 40)
    with torch.no_grad():
        logits = model(x)
        final, _ = model.forward_intermediates(x)  # the normed last map: the logits pool all its tokens
        assert final.shape == (1, 12, 10, 48)
        assert logits.shape == (1, 10)
        assert torch.allclose(logits, model.head(final.mean((1, 2))), atol=1e-5)


@pytest.mark.parametrize('family', FAMILIES)
def test_a_config_size_the_windows_do_not_divide_pads_as_any_other_size(family):
    """Evaluation at another DATA.IMG_SIZE: built at 40 px (stage 1's 10x10 map, window 4) with pad_windows, the
    model loads the 32 px model's weights as they are and gives what the 32 px model gives at 40 px."""
    trained = make(family, **TINY).eval()
    with pytest.raises(ConfigError, match=r'10x10 feature map in stage 1, not divisible by .*WINDOW_SIZE 4'):
        FAMILIES[family](**{**TINY, 'img_size': 40})
    at_40 = FAMILIES[family](**{**TINY, 'img_size': 40, 'num_classes': 10, 'pad_windows': True}).eval()
    assert len(at_40.window_padding) == 1 and 'padded to 12x12' in at_40.window_padding[0]
    assert 'attn_mask' not in dict(at_40.layers[1].blocks[1].named_buffers())  # no mask of a map it never runs
    load_state_dict_strict(at_40, trained.state_dict(), 'the 32 px model')
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        expected, got = trained(x), at_40(x)
    assert rel_diff(got, expected) < 1e-6


@pytest.mark.parametrize('family', FAMILIES)
def test_image_not_a_multiple_of_the_patch_is_zero_padded(family):
    model = make(family, **TINY).eval()
    x = torch.randn(2, 3, 33, 47)
    with torch.no_grad():
        maps = model.forward_intermediates(x, intermediates_only=True)
        padded = model.forward_intermediates(F.pad(x, (0, 1, 0, 1)), intermediates_only=True)
    for a, b in zip(maps, padded, strict=True):
        assert torch.equal(a, b)


def test_mlp_padding_does_not_leak_into_the_map():
    """A shifted Swin MLP block at a map that is not a multiple of the window: each token's output depends on its
    shifted window only (the padding added zeros, no other tokens); the token at (0, 0) sees (0..1, 0..1)."""
    model = make('mlp', **TINY).eval()
    block = model.layers[0].blocks[1]
    assert (block.window_size, block.any_size_shift) == (4, 2)
    H, W = 10, 7  # padded to 12 x 8, then by the shift padding
    x = torch.zeros(1, H * W, 24)
    with torch.no_grad():
        base = block(x, (H, W))
        for (i, j), window in (((0, 0), (slice(0, 2), slice(0, 2))), ((9, 6), (slice(6, 10), slice(6, 7)))):
            poked = x.clone()
            poked.view(1, H, W, 24)[0, i, j] = torch.randn(24)
            reached = (block(poked, (H, W)) - base).abs().sum(-1).view(H, W) > 0
            expected = torch.zeros(H, W, dtype=torch.bool)
            expected[window] = True
            assert torch.equal(reached, expected), (i, j)


def test_shrunk_window_keeps_its_size_and_shifts_by_half_of_it():
    model = make('v1', **CLAMPED).eval()
    assert [(b.window_size, b.shift_size, b.any_size_shift) for layer in model.layers for b in layer.blocks] == \
        [(8, 0, 0), (8, 4, 4), (8, 0, 0), (8, 0, 4), (4, 0, 0), (4, 0, 2)]
    with torch.no_grad():
        maps = model.forward_intermediates(torch.randn(1, 3, 80, 72), intermediates_only=True)  # 20x18, 10x9, 5x5
    assert [tuple(m.shape[-2:]) for m in maps] == [(20, 18), (10, 9), (5, 5)]
    last = model.layers[2].blocks[1]
    assert list(last.shift_masks.masks) == [((8, 8), torch.device('cpu'))]  # 5x5 padded to the window 4
    assert torch.equal(last.shift_masks.get((8, 8), 'cpu'), swin.shifted_window_mask((8, 8), 4, 2))


@pytest.mark.parametrize('family', FAMILIES)
def test_gradient_checkpointing_at_any_size(family):
    plain = make(family, **TINY).train()
    ckpt = make(family, use_checkpoint=True, **TINY).train()
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 44, 38)
    outs = []
    for model in (plain, ckpt):
        out = model(x)
        out.square().sum().backward()
        outs.append(out)
    assert rel_diff(outs[1], outs[0]) < 1e-6
    for (name, a), b in zip(ckpt.named_parameters(), plain.parameters(), strict=True):
        assert rel_diff(a.grad, b.grad) < 1e-5, name


# ----------------------------------------------------------------------------- the mask cache
@pytest.mark.parametrize('family', ['v1', 'v2'])
def test_one_mask_per_padded_size_and_device_reused(family):
    model = make(family, **TINY).eval()
    shifted = [blk for blk in blocks(model) if blk.any_size_shift > 0]
    assert len(shifted) == 2 and all(len(blk.shift_masks) == 0 for blk in blocks(model))
    cpu = torch.device('cpu')
    with torch.no_grad():
        model(torch.randn(1, 3, 40, 56))  # maps 20x28 (padded 20x28) and 10x14 (padded 12x16)
        first = [dict(blk.shift_masks.masks) for blk in shifted]
        assert [list(masks) for masks in first] == [[((20, 28), cpu)], [((12, 16), cpu)]]
        for masks in first:
            ((padded, _), mask), = masks.items()
            assert torch.equal(mask, swin.shifted_window_mask(padded, 4, 2))
        model(torch.randn(2, 3, 40, 56))  # the same sizes: the same tensors, nothing new
        assert all(blk.shift_masks.masks == masks for blk, masks in zip(shifted, first, strict=True))
        assert all(next(iter(blk.shift_masks.masks.values())) is next(iter(masks.values()))
                   for blk, masks in zip(shifted, first, strict=True))
        model(torch.randn(1, 3, 44, 56))  # maps 22x28 (padded 24x28: new) and 11x14 (padded 12x16: reused)
    assert [list(blk.shift_masks.masks) for blk in shifted] == [[((20, 28), cpu), ((24, 28), cpu)],
                                                                 [((12, 16), cpu)]]
    assert all(len(blk.shift_masks) == 0 for blk in blocks(model) if blk.any_size_shift == 0)


def test_mask_cache_keeps_the_most_recently_used():
    masks = swin.ShiftMasks(4, 2, capacity=2)
    a = masks.get((8, 8), 'cpu')
    masks.get((8, 12), 'cpu')
    assert masks.get((8, 8), 'cpu') is a  # a hit, now the most recent
    masks.get((12, 12), 'cpu')  # evicts (8, 12), the least recently used
    assert [size for size, _ in masks.masks] == [(8, 8), (12, 12)]
    assert masks.get((8, 8), 'cpu') is a


def test_block_and_layer_calls_keep_the_official_signatures():
    model = make('v1', **TINY).eval()
    layer, block = model.layers[0], model.layers[0].blocks[1]
    x = torch.randn(2, 16 * 16, 24)
    with torch.no_grad():
        assert torch.equal(block(x), block(x, (16, 16)))
        assert torch.equal(layer(x), layer(x, (16, 16)))
        assert layer(x).shape == (2, 8 * 8, 48) and layer.output_size() == (8, 8)
        assert layer(torch.randn(2, 15 * 9, 24), (15, 9)).shape == (2, 8 * 5, 48) and \
            layer.output_size((15, 9)) == (8, 5)
        assert model.layers[1].output_size((8, 5)) == (8, 5)  # the last stage does not downsample
    with pytest.raises(AssertionError, match='expected 15x9'):
        block(x, (15, 9))

