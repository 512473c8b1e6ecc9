"""Per-step LR schedules against their closed-form formulas, lr_scale, resuming, config errors."""
import io
import math

import pytest
import torch
from timm.scheduler import MultiStepLRScheduler

from errors import ConfigError
from helpers import load_official_module
from lr_scheduler import build_scheduler, lr_at

STEPS = 5  # optimizer steps per epoch: 10 epochs = 50 steps, 2 warmup epochs = 10 steps
TOTAL, WARMUP = 50, 10


@pytest.fixture
def schedule_config(tiny_config):
    def factory(*opts):
        return tiny_config('TRAIN.EPOCHS', 10, 'TRAIN.WARMUP_EPOCHS', 2, *opts)
    return factory


def make_optimizer(config, lr_scales=(None,)):
    groups = []
    for scale in lr_scales:
        group = {'params': [torch.zeros(1, requires_grad=True)]}
        if scale is not None:
            group['lr_scale'] = scale
        groups.append(group)
    return torch.optim.AdamW(groups, lr=config.TRAIN.EFFECTIVE_LR)


def lrs_of(config, steps, lr_scales=(None,)):
    """The lr of group 0 after step_update(k) for each k, walking one scheduler through the steps."""
    optimizer = make_optimizer(config, lr_scales)
    scheduler = build_scheduler(config, optimizer, STEPS)
    result = []
    for k in steps:
        scheduler.step_update(k)
        result.append(optimizer.param_groups[0]['lr'])
    return result


def warmup_lr(config, k):
    lr, warmup = config.TRAIN.EFFECTIVE_LR, config.TRAIN.EFFECTIVE_WARMUP_LR
    return warmup + (lr - warmup) * k / WARMUP


def cosine_lr(config, t, T):
    lr, lr_min = config.TRAIN.EFFECTIVE_LR, config.TRAIN.EFFECTIVE_MIN_LR
    return lr_min + 0.5 * (lr - lr_min) * (1 + math.cos(math.pi * t / T))


def check(config, expected):
    steps = sorted(expected)
    assert lrs_of(config, steps) == pytest.approx([expected[k] for k in steps], rel=1e-9)
    # the pure helper gives the same numbers
    assert [lr_at(config, STEPS, k) for k in steps] == pytest.approx([expected[k] for k in steps], rel=1e-9)


def test_cosine_with_warmup_prefix(schedule_config):
    config = schedule_config()
    assert config.TRAIN.LR_SCHEDULER.NAME == 'cosine' and config.TRAIN.LR_SCHEDULER.WARMUP_PREFIX
    # the schedule runs on the LRs scaled by the global batch
    assert config.TRAIN.EFFECTIVE_LR != config.TRAIN.BASE_LR
    expected = {k: warmup_lr(config, k) for k in (0, 1, 5, 9)}
    expected.update({k: cosine_lr(config, k - WARMUP, TOTAL - WARMUP) for k in (10, 11, 30, 49, 50)})
    expected[60] = config.TRAIN.EFFECTIVE_MIN_LR  # past the end it stays at the minimum
    check(config, expected)
    assert expected[0] == config.TRAIN.EFFECTIVE_WARMUP_LR
    assert expected[10] == pytest.approx(config.TRAIN.EFFECTIVE_LR)
    assert expected[50] == pytest.approx(config.TRAIN.EFFECTIVE_MIN_LR)


def test_run_that_is_all_warmup(schedule_config, caplog):
    config = schedule_config('TRAIN.EPOCHS', 2)  # = WARMUP_EPOCHS: the cosine part never runs
    with caplog.at_level('WARNING'):
        check(config, {k: warmup_lr(config, k) for k in (0, 1, 5, 9)} | {10: config.TRAIN.EFFECTIVE_LR})
    assert not any('no effect' in record.getMessage() for record in caplog.records)  # timm's confusing warning


def test_cosine_without_warmup_prefix(schedule_config):
    config = schedule_config('TRAIN.LR_SCHEDULER.WARMUP_PREFIX', False)
    expected = {k: warmup_lr(config, k) for k in (0, 9)}
    expected.update({k: cosine_lr(config, k, TOTAL) for k in (10, 25, 49, 50)})
    check(config, expected)


def test_cosine_without_warmup(schedule_config):
    config = schedule_config('TRAIN.WARMUP_EPOCHS', 0)
    check(config, {k: cosine_lr(config, k, TOTAL) for k in (0, 1, 25, 50)})


def test_linear(schedule_config):
    config = schedule_config('TRAIN.LR_SCHEDULER.NAME', 'linear')
    lr, lr_min = config.TRAIN.EFFECTIVE_LR, config.TRAIN.EFFECTIVE_MIN_LR
    expected = {k: warmup_lr(config, k) for k in (0, 3, 9)}
    expected.update({k: lr - (lr - lr_min) * (k - WARMUP) / (TOTAL - WARMUP) for k in (10, 20, 49, 50)})
    expected[55] = lr_min
    check(config, expected)


def test_step(schedule_config):
    # decay by 0.5 every 3 epochs = 15 steps, counted from the start of training
    config = schedule_config('TRAIN.LR_SCHEDULER.NAME', 'step', 'TRAIN.LR_SCHEDULER.DECAY_EPOCHS', 3,
                             'TRAIN.LR_SCHEDULER.DECAY_RATE', 0.5)
    lr = config.TRAIN.EFFECTIVE_LR
    expected = {0: warmup_lr(config, 0), 9: warmup_lr(config, 9)}
    expected.update({10: lr, 14: lr, 15: lr * 0.5, 29: lr * 0.5, 30: lr * 0.25, 49: lr * 0.125})
    check(config, expected)


def test_multistep(schedule_config):
    # milestones at epochs 4 and 7 = steps 20 and 35: the decay applies from the milestone step on
    config = schedule_config('TRAIN.LR_SCHEDULER.NAME', 'multistep', 'TRAIN.LR_SCHEDULER.MULTISTEPS', [4, 7],
                             'TRAIN.LR_SCHEDULER.GAMMA', 0.1)
    lr = config.TRAIN.EFFECTIVE_LR
    expected = {0: warmup_lr(config, 0), 5: warmup_lr(config, 5)}
    expected.update({10: lr, 19: lr, 20: lr * 0.1, 34: lr * 0.1, 35: lr * 0.01, 50: lr * 0.01})
    check(config, expected)


def multistep_config(schedule_config, *opts):
    return schedule_config('TRAIN.LR_SCHEDULER.NAME', 'multistep', 'TRAIN.LR_SCHEDULER.MULTISTEPS', [4, 7, 7],
                           'TRAIN.LR_SCHEDULER.GAMMA', 0.1, *opts)


def test_multistep_matches_torch_multisteplr_at_every_step(schedule_config):
    """The official rule (and torch's MultiStepLR): milestone m decays the lr from step m on; a repeated
    milestone decays twice. timm's own rule (milestone m at step m - 1) fails this comparison at steps 19, 34."""
    config = multistep_config(schedule_config, 'TRAIN.WARMUP_EPOCHS', 0)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=config.TRAIN.EFFECTIVE_LR)
    reference = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[20, 35, 35], gamma=0.1)
    expected = []
    for _ in range(TOTAL + 5):
        expected.append(optimizer.param_groups[0]['lr'])
        optimizer.step()
        reference.step()
    steps = range(TOTAL + 5)
    assert lrs_of(config, steps) == pytest.approx(expected, rel=1e-12)
    assert [lr_at(config, STEPS, k) for k in steps] == pytest.approx(expected, rel=1e-12)

    # the comparison catches a milestone applied one step early: timm's class given the milestones unshifted
    optimizer = make_optimizer(config)
    timm_rule = MultiStepLRScheduler(optimizer, decay_t=[20, 35, 35], decay_rate=0.1, warmup_prefix=False,
                                     t_in_epochs=False)
    early = []
    for k in steps:
        timm_rule.step_update(k)
        early.append(optimizer.param_groups[0]['lr'])
    assert [k for k in steps if early[k] != pytest.approx(expected[k], rel=1e-12)] == [19, 34]


def test_multistep_with_warmup_matches_the_official_scheduler(schedule_config, tmp_path):
    """Against the official lr_scheduler.MultiStepLRScheduler, warmup included (skipped without the repository)."""
    official = load_official_module('lr_scheduler.py', tmp_path, required=True)
    config = multistep_config(schedule_config)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=config.TRAIN.EFFECTIVE_LR)
    reference = official.MultiStepLRScheduler(optimizer, milestones=[20, 35, 35], gamma=0.1, warmup_t=WARMUP,
                                              warmup_lr_init=config.TRAIN.EFFECTIVE_WARMUP_LR, t_in_epochs=False)
    expected = []
    for k in range(TOTAL + 5):
        reference.step_update(k)
        expected.append(optimizer.param_groups[0]['lr'])
    assert lrs_of(config, range(TOTAL + 5)) == expected  # the same formula: equal to the last bit


def test_multistep_checkpoint_state_is_unchanged(schedule_config):
    """The saved state holds the milestone steps (decay_t) as checkpoints always did: one written before (the
    state of timm's class with the milestone steps) resumes with the decays on time, and a new one equals it."""
    config = multistep_config(schedule_config)
    optimizer = make_optimizer(config)
    before = MultiStepLRScheduler(optimizer, decay_t=[20, 35, 35], decay_rate=0.1, warmup_t=WARMUP,
                                  warmup_lr_init=config.TRAIN.EFFECTIVE_WARMUP_LR, warmup_prefix=False,
                                  t_in_epochs=False).state_dict()
    saved = build_scheduler(config, make_optimizer(config), STEPS).state_dict()
    assert saved == before and saved['decay_t'] == [20, 35, 35]

    walked = lrs_of(config, range(TOTAL))
    optimizer = make_optimizer(config)
    resumed = build_scheduler(config, optimizer, STEPS)
    resumed.load_state_dict(before)
    for k in range(15, TOTAL):
        resumed.step_update(k)
        assert optimizer.param_groups[0]['lr'] == walked[k], k
    assert walked[19] == config.TRAIN.EFFECTIVE_LR and walked[20] == pytest.approx(0.1 * walked[19], rel=1e-12)
    assert resumed.state_dict() == before


@pytest.mark.parametrize('name', ['cosine', 'linear', 'step', 'multistep'])
def test_lr_scale_honoured(schedule_config, name):
    config = schedule_config('TRAIN.LR_SCHEDULER.NAME', name, 'TRAIN.LR_SCHEDULER.MULTISTEPS', [4])
    optimizer = make_optimizer(config, lr_scales=(None, 0.25))
    scheduler = build_scheduler(config, optimizer, STEPS)
    for k in (0, 5, 10, 30, 50):
        scheduler.step_update(k)
        full, scaled = (group['lr'] for group in optimizer.param_groups)
        assert full == pytest.approx(lr_at(config, STEPS, k), rel=1e-12)
        assert scaled == pytest.approx(0.25 * full, rel=1e-12)


def is_plain(value):
    """Only built-in types: what torch.load(weights_only=True) accepts without extra globals."""
    if isinstance(value, dict):
        return all(isinstance(k, str) and is_plain(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(is_plain(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


@pytest.mark.parametrize('name', ['cosine', 'linear', 'step', 'multistep'])
def test_resume(schedule_config, name):
    """A run stopped after step 22 and resumed there follows the same lrs as an uninterrupted one."""
    config = schedule_config('TRAIN.LR_SCHEDULER.NAME', name, 'TRAIN.LR_SCHEDULER.MULTISTEPS', [4, 7])
    optimizer = make_optimizer(config)
    scheduler = build_scheduler(config, optimizer, STEPS)
    walked = []
    for k in range(TOTAL):
        scheduler.step_update(k)
        walked.append(optimizer.param_groups[0]['lr'])
        if k == 22:
            state = scheduler.state_dict()
    assert is_plain(state)
    buffer = io.BytesIO()
    torch.save({'lr_scheduler': state}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)['lr_scheduler']

    for load_state in (True, False):  # with the saved state, and a fresh scheduler alone
        optimizer = make_optimizer(config)
        resumed = build_scheduler(config, optimizer, STEPS)
        if load_state:
            resumed.load_state_dict(state)
        for k in range(22, TOTAL):
            resumed.step_update(k)
            assert optimizer.param_groups[0]['lr'] == walked[k]


def test_unknown_scheduler(schedule_config):
    """Caught when the config is built, before any dataset is read."""
    with pytest.raises(ConfigError, match=r"'plateau'.*cosine, linear, step, multistep"):
        schedule_config('TRAIN.LR_SCHEDULER.NAME', 'plateau')
