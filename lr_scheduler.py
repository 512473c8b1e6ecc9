"""Learning-rate schedules, updated at every optimizer step (timm schedulers with ``t_in_epochs=False``).

Every schedule starts with a linear warmup from ``TRAIN.EFFECTIVE_WARMUP_LR`` to ``TRAIN.EFFECTIVE_LR`` over
``WARMUP_EPOCHS * steps_per_epoch`` steps. Usage::

    scheduler = build_scheduler(config, optimizer, steps_per_epoch)   # sets the lr of step 0
    ...
    optimizer.step()
    scheduler.step_update(completed_optimizer_steps)                 # lr of the next step

The schedules keep no running state: ``step_update(k)`` gives the lr of step k whatever was called before, so a
resumed run only has to call it with the step it resumes at. A group's lr is multiplied by its ``lr_scale``
(layer-wise LR decay, see optimizer.py) when it has one.
"""
from __future__ import annotations

from typing import Any

import torch
from timm.scheduler import CosineLRScheduler, MultiStepLRScheduler, StepLRScheduler
from timm.scheduler.scheduler import Scheduler
from yacs.config import CfgNode

from errors import ConfigError

SCHEDULERS = ('cosine', 'linear', 'step', 'multistep')


def build_scheduler(config: CfgNode, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> Scheduler:
    """The schedule named by TRAIN.LR_SCHEDULER.NAME, counted in optimizer steps.

    As in the official Swin code, WARMUP_PREFIX only shapes the cosine: when set, the cosine spans the steps after
    the warmup; otherwise it spans the whole run and the warmup replaces its beginning. 'linear' decays from the
    end of the warmup to EFFECTIVE_MIN_LR at the last step. 'step' and 'multistep' count DECAY_EPOCHS and
    MULTISTEPS epochs from the start of training.
    """
    train, sched = config.TRAIN, config.TRAIN.LR_SCHEDULER
    name = sched.NAME.lower()
    if name not in SCHEDULERS:
        raise ConfigError(f"TRAIN.LR_SCHEDULER.NAME {sched.NAME!r} is unknown (choose one of: {', '.join(SCHEDULERS)})")
    total_steps = int(train.EPOCHS * steps_per_epoch)
    warmup = dict(warmup_t=int(train.WARMUP_EPOCHS * steps_per_epoch), warmup_lr_init=train.EFFECTIVE_WARMUP_LR,
                  t_in_epochs=False)

    if name == 'cosine':
        t_initial = total_steps - warmup['warmup_t'] if sched.WARMUP_PREFIX else total_steps
        # t_initial <= 1 only when warmup fills (almost) the whole run: the run then never reaches a cosine
        # step past its first, so 2 gives the same rates and spares timm's "will have no effect" warning
        scheduler = CosineLRScheduler(optimizer, t_initial=max(2, t_initial), lr_min=train.EFFECTIVE_MIN_LR,
                                      cycle_limit=1, warmup_prefix=sched.WARMUP_PREFIX, **warmup)
    elif name == 'linear':
        scheduler = LinearLRScheduler(optimizer, t_initial=total_steps, lr_min=train.EFFECTIVE_MIN_LR, **warmup)
    elif name == 'step':
        if sched.DECAY_EPOCHS <= 0:
            raise ConfigError(f"TRAIN.LR_SCHEDULER.DECAY_EPOCHS must be positive for the step schedule, "
                              f"got {sched.DECAY_EPOCHS}")
        scheduler = StepLRScheduler(optimizer, decay_t=max(1, int(sched.DECAY_EPOCHS * steps_per_epoch)),
                                    decay_rate=sched.DECAY_RATE, warmup_prefix=False, **warmup)
    else:
        milestones = sorted(int(epoch * steps_per_epoch) for epoch in sched.MULTISTEPS)
        scheduler = _MultiStepLRScheduler(optimizer, decay_t=milestones, decay_rate=sched.GAMMA,
                                          warmup_prefix=False, **warmup)
    scheduler.step_update(0)
    return scheduler


def lr_at(config: CfgNode, steps_per_epoch: int, step: int) -> float:
    """The scheduled lr (``lr_scale`` 1) at optimizer step ``step``: to plot or check a schedule."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=config.TRAIN.EFFECTIVE_LR)
    scheduler = build_scheduler(config, optimizer, steps_per_epoch)
    scheduler.step_update(step)
    return optimizer.param_groups[0]['lr']


class LinearLRScheduler(Scheduler):
    """Linear warmup to the base lr, then a straight line down to ``lr_min`` at step ``t_initial``.

    The official 'linear' ends at 0.01 x the base lr; here it ends at MIN_LR (the same with the default LRs).
    """

    def __init__(self, optimizer, t_initial, lr_min=0., warmup_t=0, warmup_lr_init=0., t_in_epochs=True,
                 initialize=True):
        super().__init__(optimizer, param_group_field='lr', t_in_epochs=t_in_epochs, initialize=initialize)
        self.t_initial = t_initial
        self.lr_min = lr_min
        self.warmup_t = warmup_t
        self.warmup_lr_init = warmup_lr_init
        self.update_groups(self._get_lr(0))

    def _get_lr(self, t):
        if t < self.warmup_t:
            return [self.warmup_lr_init + (v - self.warmup_lr_init) * t / self.warmup_t for v in self.base_values]
        progress = min(1.0, (t - self.warmup_t) / max(1, self.t_initial - self.warmup_t))
        return [v - (v - self.lr_min) * progress for v in self.base_values]


class _MultiStepLRScheduler(MultiStepLRScheduler):
    """timm's multistep with the official (and torch MultiStepLR) milestone rule: the decay applies from step m.

    timm applies milestone m one step early (at t == m - 1, kept so for compatibility), so timm's public class is
    given the milestones m + 1: the same rates, exactly. The subclass only keeps the checkpoint format: its
    state_dict holds the milestone steps themselves (``decay_t`` m, as checkpoints always did); with m + 1 saved, a
    checkpoint written before would resume with its decays one step early.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, decay_t: list[int], **kwargs):
        super().__init__(optimizer, decay_t=_timm_milestones(decay_t), **kwargs)

    def state_dict(self) -> dict[str, Any]:
        return dict(super().state_dict(), decay_t=[m - 1 for m in self.decay_t])

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if 'decay_t' in state_dict:
            state_dict = dict(state_dict, decay_t=_timm_milestones(state_dict['decay_t']))
        super().load_state_dict(state_dict)


def _timm_milestones(milestones):
    return [m + 1 for m in milestones]


def schedule_warnings(config: CfgNode) -> list[str]:
    """One line per learning-rate setting that would leave a run barely training: warmup that fills the run,
    or linear scaling that shrinks the LR more than 10x (a small global batch); each names the keys to change."""
    train, warnings = config.TRAIN, []
    if train.EPOCHS > 0 and train.WARMUP_EPOCHS >= train.EPOCHS:
        warnings.append(f"TRAIN.WARMUP_EPOCHS {train.WARMUP_EPOCHS} >= TRAIN.EPOCHS {train.EPOCHS}: the LR never "
                        f"reaches its peak {train.EFFECTIVE_LR:.3g}; lower TRAIN.WARMUP_EPOCHS (e.g. "
                        f"{train.EPOCHS // 10}) or raise TRAIN.EPOCHS")
    if train.LINEAR_SCALE_LR and train.GLOBAL_BATCH_SIZE * 10 < 512:
        warnings.append(f"linear LR scaling at global batch {train.GLOBAL_BATCH_SIZE}: lr {train.BASE_LR:.3g} per "
                        f"512 images becomes {train.EFFECTIVE_LR:.3g} ({512 / train.GLOBAL_BATCH_SIZE:.0f}x smaller); "
                        f"set TRAIN.LINEAR_SCALE_LR False and TRAIN.BASE_LR to the LR you want (e.g. 1e-4 to "
                        f"fine-tune, 1e-3 from scratch), or raise the batch")
    return warnings
