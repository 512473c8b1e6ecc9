"""Partial fine-tuning (TRAIN.FREEZE): what is frozen gets no gradient, no optimizer state and no weight decay, and
stays bit-identical through a real training run; bad values end with one line."""
import logging

import pytest
import torch

from config import load_config
from conftest import make_tiny_config
from errors import ConfigError
from helpers import load_weights, make_image_folder, run_main, tiny_yaml
from models import build_model
from optimizer import build_optimizer, freeze_parameters

LOG = logging.getLogger('test_finetune')


@pytest.mark.parametrize('opts, trains', [
    (('TRAIN.FREEZE.STAGES', 2), ['layers.2', 'layers.3', 'norm', 'head']),
    (('TRAIN.FREEZE.PATCH_EMBED', True), ['layers.0', 'layers.1', 'layers.2', 'layers.3', 'norm', 'head']),
    (('TRAIN.FREEZE.ALL_BUT_HEAD', True), ['head']),
])
def test_frozen_parameters_get_no_gradient_state_or_decay(opts, trains, caplog):
    config = make_tiny_config(None, 'MODEL.SWIN.DEPTHS', [1, 1, 1, 1], 'MODEL.SWIN.NUM_HEADS', [1, 2, 3, 4],
                              'MODEL.SWIN.WINDOW_SIZE', 2, *opts)
    model = build_model(config)
    with caplog.at_level(logging.INFO, logger=LOG.name):
        frozen = freeze_parameters(config, model, LOG)
    optimizer = build_optimizer(config, model)
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group['params']}
    params = dict(model.named_parameters())
    assert frozen and all(not params[name].requires_grad and id(params[name]) not in in_optimizer for name in frozen)
    trained = [name for name in params if name not in frozen]
    assert all(id(params[name]) in in_optimizer for name in trained)
    assert sorted({name.split('.')[0] if not name.startswith('layers') else '.'.join(name.split('.')[:2])
                   for name in trained}) == sorted(trains)
    (line,) = [m for m in caplog.messages if m.startswith('partial fine-tuning')]
    assert f"training {', '.join(trains)} (" in line

    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    assert all(params[name].grad is None for name in frozen)
    assert len(optimizer.state) == len(trained)  # AdamW moments only for what trains


def test_nothing_frozen_by_default_and_no_log_line(caplog):
    config = make_tiny_config(None)
    model = build_model(config)
    with caplog.at_level(logging.INFO, logger=LOG.name):
        assert freeze_parameters(config, model, LOG) == []
    assert all(p.requires_grad for p in model.parameters()) and not caplog.messages


@pytest.mark.parametrize('opts, message', [
    (['TRAIN.FREEZE.STAGES', 5], 'TRAIN.FREEZE.STAGES 5 is more than the 4 stages of MODEL.SWIN.DEPTHS'),
    (['TRAIN.FREEZE.STAGES', -1], 'TRAIN.FREEZE.STAGES must be at least 0, got -1'),
    (['TRAIN.FREEZE.ALL_BUT_HEAD', True, 'MODEL.NAME', 'simmim_pretrain_x'], 'TRAIN.FREEZE applies to fine-tuning'),
    (['TRAIN.FREEZE.ALL_BUT_HEAD', 'maybe'], 'TRAIN.FREEZE.ALL_BUT_HEAD'),
])
def test_bad_freeze_values_are_one_line(opts, message):
    with pytest.raises(ConfigError) as error:
        load_config(None, opts, environ={})
    assert '\n' not in str(error.value) and message in str(error.value)


def test_linear_probe_run_keeps_the_pretrained_backbone_bit_identical(tmp_path):
    """A real run from --pretrained with everything but the head frozen: every backbone tensor in last.pth is the
    pretrained one, the head trained, and the checkpoint's optimizer state covers the head only."""
    dataset = make_image_folder(tmp_path / 'images', train_per_class=8, val_per_class=2)
    config = tiny_yaml(tmp_path / 'tiny.yaml', dataset, extra="TRAIN:\n  EPOCHS: 1\n  WARMUP_EPOCHS: 0\n")
    pretrained_config = load_config(config, [], environ={})
    torch.manual_seed(7)
    pretrained = build_model(pretrained_config).state_dict()
    torch.save({'model': pretrained}, tmp_path / 'pretrained.pth')
    result = run_main('--cfg', config, '--output', str(tmp_path / 'out'), '--pretrained',
                      str(tmp_path / 'pretrained.pth'), '--opts', 'TRAIN.FREEZE.ALL_BUT_HEAD', 'True')
    assert result.returncode == 0, result.stderr[-2000:]
    assert 'partial fine-tuning (TRAIN.FREEZE): training head (' in result.stdout
    ckpt = torch.load(tmp_path / 'out' / 'tiny' / 'default' / 'last.pth', map_location='cpu', weights_only=True)
    weights = ckpt['model']
    changed = [key for key in weights if not torch.equal(weights[key], pretrained[key])]
    assert changed and all(key.startswith('head.') for key in changed), changed
    assert len(ckpt['optimizer']['state']) == 2  # head.weight and head.bias
    assert load_weights(tmp_path / 'out' / 'tiny' / 'default' / 'last.pth').keys() == pretrained.keys()
