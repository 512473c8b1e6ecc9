"""Parameter groups of the optimizer (which Swin weights decay), optimizer choice, layer-wise LR decay."""
import copy
import logging

import pytest
import torch
from timm.optim import Adopt, Lamb, Lion
from torch import nn

from errors import ConfigError
from lr_scheduler import build_scheduler
from models import build_model
from optimizer import adamw_kernel, build_optimizer, swin_layer_id


def group_names(optimizer, model):
    """Parameter names of each optimizer group."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names[id(p)] for p in group['params']] for group in optimizer.param_groups]


def split_by_decay(optimizer, model):
    decay, no_decay = set(), set()
    for group, names in zip(optimizer.param_groups, group_names(optimizer, model), strict=True):
        (decay if group['weight_decay'] > 0 else no_decay).update(names)
    return decay, no_decay


def test_swin_decay_split(tiny_config):
    config = tiny_config('MODEL.SWIN.APE', True)
    model = build_model(config)
    optimizer = build_optimizer(config, model)
    decay, no_decay = split_by_decay(optimizer, model)
    all_names = [n for n, _ in model.named_parameters()]

    # every parameter exactly once
    listed = [n for names in group_names(optimizer, model) for n in names]
    assert sorted(listed) == sorted(all_names)
    assert not decay & no_decay

    assert 'absolute_pos_embed' in no_decay
    tables = [n for n in all_names if n.endswith('relative_position_bias_table')]
    assert tables and set(tables) <= no_decay
    assert not any(n.endswith('.bias') for n in decay)
    modules = dict(model.named_modules())
    for name in all_names:
        module_name, _, param_name = name.rpartition('.')
        module = modules[module_name]
        if isinstance(module, nn.LayerNorm):
            assert name in no_decay
        if isinstance(module, (nn.Linear, nn.Conv2d)) and param_name == 'weight':
            assert name in decay
    assert {'patch_embed.proj.weight', 'head.weight', 'layers.0.downsample.reduction.weight'} <= decay
    assert {'norm.weight', 'norm.bias', 'patch_embed.proj.bias'} <= no_decay
    assert [g['weight_decay'] for g in optimizer.param_groups] == [config.TRAIN.WEIGHT_DECAY, 0.0]


def step_ops(optimizer):
    """Names of the operators one optimizer.step() runs."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        optimizer.step()
    return {event.key for event in prof.key_averages()}


def test_adamw_settings(tiny_config):
    config = tiny_config('TRAIN.BASE_LR', 3.2)  # 0.05 at batch 8: steps that show every term of the update
    model = build_model(config)
    reference_model = copy.deepcopy(model)
    optimizer = build_optimizer(config, model)
    assert isinstance(optimizer, torch.optim.AdamW)
    # the LR scaled by the global batch, not the configured one
    assert config.TRAIN.EFFECTIVE_LR != config.TRAIN.BASE_LR
    for group in optimizer.param_groups:
        assert group['lr'] == config.TRAIN.EFFECTIVE_LR
        assert group['eps'] == config.TRAIN.OPTIMIZER.EPS
        assert group['betas'] == tuple(config.TRAIN.OPTIMIZER.BETAS)
        assert 'lr_scale' not in group

    # each step is torch's reference (single-tensor) AdamW with the configured hyperparameters, decay on the
    # decay group only
    params = dict(reference_model.named_parameters())
    reference = torch.optim.AdamW(
        [{'params': [params[name] for name in names],
          'weight_decay': config.TRAIN.WEIGHT_DECAY if group['weight_decay'] else 0.0}
         for group, names in zip(optimizer.param_groups, group_names(optimizer, model), strict=True)],
        lr=config.TRAIN.EFFECTIVE_LR, betas=tuple(config.TRAIN.OPTIMIZER.BETAS), eps=config.TRAIN.OPTIMIZER.EPS,
        foreach=False)
    start = {name: p.detach().clone() for name, p in model.named_parameters()}
    generator = torch.Generator().manual_seed(0)
    for scale in (1.0, 0.5, 1e-3):  # a gradient that falls: AMSGrad's running maximum would differ
        for p, q in zip(model.parameters(), reference_model.parameters(), strict=True):
            p.grad = torch.randn(p.shape, generator=generator) * scale
            q.grad = p.grad.clone()
        ops = step_ops(optimizer)
        reference.step()
        # CPU parameters: the multi-tensor (foreach) kernels, not the fused one
        assert any(op.startswith('aten::_foreach_') for op in ops) and not any('fused_adam' in op for op in ops)
    for (name, p), q in zip(model.named_parameters(), reference_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, msg=name)
        assert not torch.equal(p, start[name]), name


def test_adamw_kernel_is_fused_on_cuda_and_foreach_elsewhere():
    assert adamw_kernel({'cuda'}) == {'fused': True}
    assert adamw_kernel({'cpu'}) == adamw_kernel({'cpu', 'cuda'}) == adamw_kernel({'mps'}) == {'foreach': True}
    for kernel in (adamw_kernel({'cuda'}), adamw_kernel({'cpu'})):  # keywords torch.optim.AdamW takes
        torch.optim.AdamW([torch.zeros(2, requires_grad=True)], **kernel)


def test_sgd_by_name(tiny_config):
    config = tiny_config('TRAIN.OPTIMIZER.NAME', 'sgd', 'TRAIN.OPTIMIZER.MOMENTUM', 0.8)
    optimizer = build_optimizer(config, build_model(config))
    assert isinstance(optimizer, torch.optim.SGD)
    for group in optimizer.param_groups:
        assert group['nesterov'] and group['momentum'] == 0.8
        assert group['lr'] == config.TRAIN.EFFECTIVE_LR


def test_unknown_optimizer(tiny_config):
    """Caught when the config is built, before any dataset is read, in one line with the names close to it."""
    with pytest.raises(ConfigError, match=r"'lamda' is unknown: choose adamw, sgd or a name of "
                                          r"timm.optim.list_optimizers\(\).*close: lamb") as info:
        tiny_config('TRAIN.OPTIMIZER.NAME', 'lamda')
    assert '\n' not in str(info.value)


@pytest.mark.parametrize('name, cls', [('lamb', Lamb), ('LION', Lion), ('adopt', Adopt)])
def test_timm_optimizers_keep_our_groups_and_layer_decay(tiny_config, name, cls):
    """timm's registry optimizers on our groups: the no-decay set, the lr_scale of layer decay (the scheduler
    multiplies it in), EPS / BETAS where the optimizer takes them; a step moves the weights."""
    config = tiny_config('TRAIN.OPTIMIZER.NAME', name, 'TRAIN.LAYER_DECAY', 0.5, 'TRAIN.OPTIMIZER.BETAS', [0.8, 0.95],
                         'TRAIN.OPTIMIZER.EPS', 1e-6)
    model = build_model(config)
    optimizer = build_optimizer(config, model)
    assert type(optimizer) is cls
    twin = copy.deepcopy(model)
    reference = build_optimizer(tiny_config('TRAIN.LAYER_DECAY', 0.5), twin)  # AdamW
    assert group_names(optimizer, model) == group_names(reference, twin)
    assert [g['weight_decay'] for g in optimizer.param_groups] == [g['weight_decay'] for g in reference.param_groups]
    assert [g['lr_scale'] for g in optimizer.param_groups] == [g['lr_scale'] for g in reference.param_groups]
    assert all(tuple(g['betas']) == (0.8, 0.95) for g in optimizer.param_groups)
    assert all(g.get('eps', 1e-6) == 1e-6 for g in optimizer.param_groups)  # lion has no eps
    build_scheduler(config, optimizer, steps_per_epoch=10)
    assert [g['lr'] for g in optimizer.param_groups] == pytest.approx(
        [config.TRAIN.EFFECTIVE_WARMUP_LR * g['lr_scale'] for g in optimizer.param_groups])
    for group in optimizer.param_groups:  # a step large enough to move every weight in float32
        group['lr'] = 1e-2 * group['lr_scale']
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(2):  # ADOPT's first step only measures the gradient
        optimizer.zero_grad()
        model(torch.randn(2, 3, 32, 32)).logsumexp(1).sum().backward()
        optimizer.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))


def test_fused_lamb_without_apex_is_timms_lamb_and_says_so(tiny_config, caplog):
    config = tiny_config('TRAIN.OPTIMIZER.NAME', 'fused_lamb')
    with caplog.at_level(logging.WARNING):
        optimizer = build_optimizer(config, build_model(config), logging.getLogger('test'))
    assert type(optimizer) is Lamb
    assert "fused_lamb: apex is not importable, so timm's Lamb is used" in caplog.text


def test_an_optimizer_timm_cannot_build_is_one_line(tiny_config):
    config = tiny_config('TRAIN.OPTIMIZER.NAME', 'bnbadamw8bit')  # needs bitsandbytes, not installed here
    with pytest.raises(ConfigError, match=r"^TRAIN.OPTIMIZER.NAME 'bnbadamw8bit': timm could not build it \(") as info:
        build_optimizer(config, build_model(config))
    assert '\n' not in str(info.value)


def test_wrapped_model_same_groups(tiny_config):
    """DataParallel (like DDP: .module) around torch.compile (._orig_mod): the same, official, names."""
    config = tiny_config('MODEL.SWIN.APE', True)
    model = build_model(config)
    wrapped = nn.DataParallel(torch.compile(model))
    plain = build_optimizer(config, model)
    optimizer = build_optimizer(config, wrapped)
    assert group_names(optimizer, model) == group_names(plain, model)
    assert 'absolute_pos_embed' in split_by_decay(optimizer, model)[1]


def test_model_without_skip_lists(tiny_config):
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    model[2].weight.requires_grad_(False)  # frozen weights are not optimized
    optimizer = build_optimizer(tiny_config(), model)
    decay, no_decay = split_by_decay(optimizer, model)
    assert decay == {'0.weight'}
    assert no_decay == {'0.bias', '1.weight', '1.bias', '2.bias'}


def test_layer_decay_ids():
    depths = [2, 2]
    assert swin_layer_id('patch_embed.proj.weight', depths) == 0
    assert swin_layer_id('absolute_pos_embed', depths) == 5  # the official SimMIM fine-tune's id, not 0
    assert swin_layer_id('layers.0.blocks.0.attn.qkv.weight', depths) == 1
    assert swin_layer_id('layers.0.blocks.1.norm1.weight', depths) == 2
    assert swin_layer_id('layers.0.downsample.reduction.weight', depths) == 2
    assert swin_layer_id('layers.1.blocks.0.attn.relative_position_bias_table', depths) == 3
    assert swin_layer_id('layers.1.blocks.1.mlp.fc2.bias', depths) == 4
    assert swin_layer_id('norm.weight', depths) == 5
    assert swin_layer_id('head.weight', depths) == 5


def lr_scales(optimizer, model):
    """{parameter name: lr_scale of its group}."""
    return {name: group['lr_scale']
            for group, names in zip(optimizer.param_groups, group_names(optimizer, model), strict=True)
            for name in names}


def test_layer_decay_scales(tiny_config):
    config = tiny_config('TRAIN.LAYER_DECAY', 0.5, 'MODEL.SWIN.APE', True)
    model = build_model(config)
    optimizer = build_optimizer(config, model)
    scale = lr_scales(optimizer, model)
    assert len(scale) == len(list(model.parameters()))
    assert scale['patch_embed.proj.weight'] == 0.5 ** 5 == min(scale.values())
    assert scale['absolute_pos_embed'] == 1.0
    assert scale['layers.0.blocks.0.attn.qkv.weight'] == 0.5 ** 4
    assert scale['layers.0.downsample.reduction.weight'] == scale['layers.0.blocks.1.mlp.fc1.weight'] == 0.5 ** 3
    assert scale['layers.1.blocks.1.mlp.fc1.weight'] == 0.5
    assert scale['head.weight'] == scale['norm.weight'] == 1.0
    # weight decay is still split inside each layer
    decay, no_decay = split_by_decay(optimizer, model)
    assert 'head.weight' in decay and 'head.bias' in no_decay

    # the scheduler multiplies each group's lr by its scale
    build_scheduler(config, optimizer, steps_per_epoch=10)
    for group in optimizer.param_groups:
        assert group['lr'] == pytest.approx(config.TRAIN.EFFECTIVE_WARMUP_LR * group['lr_scale'])


def test_logs_group_sizes(tiny_config, caplog):
    config = tiny_config()
    model = build_model(config)
    logger = logging.getLogger('test_optimizer')
    with caplog.at_level(logging.INFO, logger='test_optimizer'):
        optimizer = build_optimizer(config, model, logger)
    lines = [r.getMessage() for r in caplog.records if r.name == 'test_optimizer']
    assert len(lines) == len(optimizer.param_groups) == 2
    for line, group in zip(lines, optimizer.param_groups, strict=True):
        assert f"{len(group['params'])} tensors, {sum(p.numel() for p in group['params'])} parameters" in line


@pytest.mark.parametrize('family', ['swinv2', 'swin_mlp'])
def test_layer_decay_for_other_families(tiny_config, family):
    """V2 / MLP names get the same layer ids; the depths come from the model (not MODEL.SWIN.DEPTHS)."""
    node = {'swinv2': 'MODEL.SWINV2', 'swin_mlp': 'MODEL.SWIN_MLP'}[family]
    config = tiny_config('MODEL.TYPE', family, 'TRAIN.LAYER_DECAY', 0.5, f'{node}.PATCH_SIZE', 2,
                         f'{node}.WINDOW_SIZE', 4, f'{node}.EMBED_DIM', 24, f'{node}.DEPTHS', [1, 3],
                         f'{node}.NUM_HEADS', [3, 6], 'MODEL.SWIN.DEPTHS', [2, 2, 6, 2])
    model = build_model(config)
    optimizer = build_optimizer(config, model)
    scale = lr_scales(optimizer, model)
    assert len(scale) == len(list(model.parameters()))
    assert scale['patch_embed.proj.weight'] == 0.5 ** 5
    assert scale['layers.0.downsample.reduction.weight'] == scale['layers.0.blocks.0.mlp.fc1.weight'] == 0.5 ** 4
    assert scale['layers.1.blocks.2.mlp.fc1.weight'] == 0.5 and scale['head.weight'] == 1.0
    if family == 'swinv2':  # the position bias MLP and logit scale: their block's rate, no weight decay
        names = {'layers.1.blocks.0.attn.cpb_mlp.0.weight', 'layers.1.blocks.0.attn.logit_scale'}
        assert {scale[name] for name in names} == {0.5 ** 3}
        assert names <= split_by_decay(optimizer, model)[1]
