"""Saving a run's checkpoints: when (epoch ends, signals, every SAVE_EVERY_MINUTES) and without stalling it.

Every rank's RNG state is gathered (all ranks call ``save`` at the same step); rank 0 takes a CPU snapshot of
the training state and a background thread writes the file (``writer.CheckpointWriter``), so training waits
only for the copy. A failed write (disk full, read-only, permission) is one line: SAVE_FAILURE stop raises it
(at the next step's poll, or at ``finish``), continue logs it and goes on; the earlier files stay intact.
"""
from __future__ import annotations

import logging
import os
import time

from yacs.config import CfgNode

import utils
from run_state import RunState, TrainingObjects

from .folder import checkpoint_name, save_checkpoint
from .training import capture_rng_state, checkpoint_contents
from .writer import CheckpointWriter


class CheckpointSaver:
    """The checkpoints of one training run (create it on every rank)."""

    def __init__(self, config: CfgNode, objects: TrainingObjects, class_names: list[str], logger: logging.Logger):
        self.config, self.objects, self.class_names, self.logger = config, objects, class_names, logger
        self.every = config.SAVE_EVERY_MINUTES * 60.0
        self.writer = CheckpointWriter() if utils.is_main_process() else None
        self._last_save = time.monotonic()

    def due(self) -> bool:
        """This rank's clock says a periodic checkpoint is due (polled every optimizer step, so rank 0 also
        reports a failed background write here)."""
        self.check()
        return self.every > 0 and time.monotonic() - self._last_save >= self.every

    def save(self, state: RunState, is_best: bool = False) -> str | None:
        """Checkpoint ``state`` (call on every rank); returns the file rank 0 is writing (None elsewhere)."""
        rng_states = utils.all_gather_objects(capture_rng_state())
        self._last_save = time.monotonic()
        if self.writer is None:
            return None
        self.check()
        ckpt = checkpoint_contents(self.config, self.objects, state, self.class_names, rng_states)
        path = os.path.join(self.config.OUTPUT_DIR, checkpoint_name(ckpt, self.config.TRAIN.ACCUMULATION_STEPS))
        self.writer.submit(lambda snapshot: save_checkpoint(self.config, snapshot, self.logger, is_best), ckpt, path)
        return path

    def save_periodic(self, state: RunState) -> None:
        path = self.save(state)
        if path is not None:
            self.logger.info(f"periodic checkpoint (SAVE_EVERY_MINUTES {self.config.SAVE_EVERY_MINUTES:g}): "
                             f"{os.path.basename(path)}, training waited {self.writer.last_stall * 1000:.0f} ms")

    def check(self) -> None:
        """Report a background write that failed (rank 0): raise in SAVE_FAILURE stop, else log one line."""
        failure = self.writer.failure() if self.writer is not None else None
        if failure is None:
            return
        if self.config.SAVE_FAILURE == 'stop':
            raise failure
        self.logger.error(f"{failure}; training goes on (SAVE_FAILURE continue)")

    def finish(self) -> None:
        """Wait until the file in flight is on disk (before exiting), then report its failure if any."""
        if self.writer is not None:
            self.writer.wait()
            self.check()

