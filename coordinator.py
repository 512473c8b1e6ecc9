"""The control plane of a training run: after every optimizer step, one answer that every rank shares --
continue, save a periodic checkpoint, or stop.

Three things decide it, and one all-reduce agrees on all three, so no rank is ever left waiting for another:

* a stop signal (SIGTERM/SIGINT, what clusters send before preemption) received by any rank;
* a non-finite loss on any rank: every rank raises the same TrainingError, naming the earliest such step;
* the checkpoint saver's clock (SAVE_EVERY_MINUTES) on any rank: every rank saves at the same step.

The all-reduce runs over a CPU (gloo) group, so agreeing needs no host sync on the GPU stream; losses are read
(a host sync) only on logged steps and before a save or a stop, which must not keep the weights of an unread
non-finite step. A run without a checkpoint saver (tests, benchmarks) never saves; one whose signal handlers are not
installed never stops early; in one process the agreement is local.
"""
from __future__ import annotations

import enum
import os
import signal
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from errors import TrainingError
from utils import get_rank, is_distributed

if TYPE_CHECKING:
    from checkpoint import CheckpointSaver
    from run_state import RunState

_NO_STEP = torch.iinfo(torch.int64).min  # "no non-finite loss": loses every MAX


class Action(enum.Enum):
    CONTINUE = 'continue'
    SAVE = 'save'  # a periodic checkpoint at this step boundary (every rank takes part), then continue
    STOP = 'stop'  # a stop signal: end the epoch here; the caller saves and exits


class StepCoordinator:
    """Answers ``after_step`` at every optimizer step, the same on every rank (call it at the same steps on all).

    ``saver``: what periodic saves go to (``due()``: this rank's clock; ``save_periodic(state)``); None
    never saves. ``install()`` turns SIGTERM/SIGINT into a stop at the next step boundary.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, saver: CheckpointSaver | None = None):
        self.saver = saver
        self.signum = 0  # what all ranks agreed on; written only by after_step()
        # this process's own signal, written only by the handler: a signal whose handler runs while after_step()
        # is inside the all-reduce must not be overwritten by the (older) reduced value
        self._received = 0
        self._previous = {}
        self._group = None  # made at the first agreement, when every rank is there to make it

    def install(self) -> StepCoordinator:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame):
        if self._received and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C means "now"
        if not self._received and get_rank() == 0:
            # at once, before the step ends; os.write: a signal handler must not re-enter a buffered stream
            again = ' (Ctrl-C again: exit now, keeping the last complete checkpoint)' if signum == signal.SIGINT else ''
            os.write(2, f"{signal.Signals(signum).name} received: finishing the current step, saving a checkpoint, "
                        f"then exit{again}\n".encode())
        self._received = signum

    def after_step(self, first_bad_step: Callable[[], int], logged: bool, lr: float) -> Action:
        """What every rank does after this optimizer step. ``first_bad_step()`` reads (a host sync) this rank's
        first optimizer step with a NaN/inf loss, -1 for none; it is called when ``logged`` (the loop reads its
        meters anyway) and before a save or a stop. Raises TrainingError on every rank when any rank's loss was
        non-finite."""
        stop, save, bad_step = self._agree(first_bad_step() if logged else -1)
        if (stop or save) and not logged:
            stop, save, bad_step = self._agree(first_bad_step())
        if bad_step >= 0:
            raise TrainingError(f"loss became NaN/inf at optimizer step {bad_step} (lr {lr:.3g}); the last good "
                                f"checkpoint is kept. Lower TRAIN.BASE_LR, set TRAIN.CLIP_GRAD, or use "
                                f"AMP_DTYPE bfloat16 instead of float16")
        if stop:
            return Action.STOP
        return Action.SAVE if save else Action.CONTINUE

    def save(self, state: RunState) -> None:
        """The periodic checkpoint an Action.SAVE asked for (every rank calls it)."""
        self.saver.save_periodic(state)

    def _agree(self, bad_step):
        """One MAX over [signal, -(first non-finite step), checkpoint due]: negated, the max is the earliest step.
        Returns (stop, save, earliest non-finite step or -1) as every rank sees them."""
        due = self.saver is not None and self.saver.due()
        flags = torch.tensor([self._received, -bad_step if bad_step >= 0 else _NO_STEP, int(due)], dtype=torch.int64)
        if is_distributed():
            if self._group is None:
                self._group = dist.new_group(backend='gloo') if dist.get_backend() != 'gloo' else dist.group.WORLD
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self._group)
        received, negated_step, due = flags.tolist()
        self.signum = max(self.signum, received)
        return self.signum != 0, bool(due) and self.signum == 0, -negated_step if negated_step != _NO_STEP else -1

    @property
    def signal_name(self) -> str | None:
        return signal.Signals(self.signum).name if self.signum else None

    @property
    def exit_code(self) -> int:
        return 128 + self.signum if self.signum else 0  # the shell's convention for "ended by a signal"
