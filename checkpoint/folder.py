"""The run's checkpoint folder (OUTPUT_DIR): file names, saving, retention, and the auto-resume scan.

Names: ``ckpt_epoch_{E}.pth`` after epoch E; ``ckpt_epoch_{E}_step_{K}.pth`` when a run stopped K optimizer
steps into epoch E (preemption); ``last.pth`` and ``best.pth`` are hard links to one of them.
"""
from __future__ import annotations

import logging
import os
import re
from typing import Any

from yacs.config import CfgNode

from errors import CheckpointError
from run_state import RunState

from .files import atomic_save, is_temp_name, link_atomically, load_file
from .training import invalid_reason

_CKPT_NAME = re.compile(r'^ckpt_epoch_(\d+)(?:_step_(\d+))?\.pth$')


def checkpoint_name(ckpt: dict[str, Any], accumulation: int) -> str:
    """The file name of a training checkpoint: its epoch, and for a mid-epoch state its optimizer steps."""
    state = RunState.from_dict(ckpt)
    step = f'_step_{state.steps_in_epoch(accumulation)}' if state.micro_batch else ''
    return f'ckpt_epoch_{ckpt["epoch"]}{step}.pth'


def _position_of_name(match):
    """(epoch, optimizer step) where training goes on from the file of a checkpoint name."""
    epoch, step = int(match.group(1)), match.group(2)
    return (epoch + 1, 0) if step is None else (epoch, int(step))


def save_checkpoint(config: CfgNode, ckpt: dict[str, Any], logger: logging.Logger, is_best: bool = False) -> str:
    """Write a training checkpoint to OUTPUT_DIR (call on rank 0) as ckpt_epoch_E[_step_K].pth, last.pth, best.pth.

    The file is serialized once; last.pth / best.pth are hard links to it (copies where links fail), each put in
    place atomically. Afterwards only the newest KEEP_CHECKPOINTS end-of-epoch files are kept (0: all), and
    mid-epoch files older than this state are removed (they only guard against preemption).
    """
    folder = config.OUTPUT_DIR
    os.makedirs(folder, exist_ok=True)
    accumulation = config.TRAIN.ACCUMULATION_STEPS
    name = checkpoint_name(ckpt, accumulation)
    path = os.path.join(folder, name)
    atomic_save(ckpt, path)
    link_atomically(path, os.path.join(folder, 'last.pth'))
    if is_best:
        link_atomically(path, os.path.join(folder, 'best.pth'))
    logger.info(f"saved checkpoint {path}" + (" (best so far)" if is_best else ""))
    _prune_checkpoints(folder, _position_of_name(_CKPT_NAME.match(name)), config.KEEP_CHECKPOINTS, logger)
    return path


def _prune_checkpoints(folder, current, keep, logger):
    epoch_files, step_files, ahead = [], [], []
    for name in os.listdir(folder):
        match = _CKPT_NAME.match(name)
        if not match:
            continue
        position = _position_of_name(match)
        if position > current:
            ahead.append(name)  # left by an earlier run that got further: never deleted here
        elif match.group(2) is None:
            epoch_files.append((position, name))
        elif position < current:
            step_files.append(name)
    if ahead:
        logger.warning(f"{folder} holds checkpoints ahead of this run ({', '.join(sorted(ahead))}); they are kept, "
                       f"and auto-resume would pick them over this run's")
    doomed = step_files
    if keep > 0:
        doomed += [name for _, name in sorted(epoch_files, reverse=True)[keep:]]
    for name in doomed:
        try:
            os.remove(os.path.join(folder, name))
        except FileNotFoundError:
            pass
    if doomed:
        logger.info(f"removed old checkpoints: {', '.join(sorted(doomed))}")


def find_resume_checkpoint(output_dir: str, logger: logging.Logger) -> str | None:
    """Path of the newest usable checkpoint in output_dir, or None.

    Newest = furthest (epoch, micro-batch) recorded inside the file (end-of-epoch ranks after every mid-epoch
    state of the same epoch), then the latest modification time. Files that fail to load or lack the required
    keys are skipped with a warning. Stray temp files of interrupted saves are removed (call this before
    training starts, not while another process may be saving into the folder).
    """
    if not output_dir or not os.path.isdir(output_dir):
        return None
    candidates = []
    for name in sorted(os.listdir(output_dir)):
        path = os.path.join(output_dir, name)
        if is_temp_name(name):
            logger.warning(f"removing {path}: left by an interrupted save")
            try:
                os.remove(path)
            except OSError:
                pass
            continue
        if not name.endswith('.pth') or not os.path.isfile(path):
            continue
        try:
            ckpt = load_file(path, mmap=True)  # maps the tensors: only the small pickled metadata is read
        except CheckpointError as e:
            logger.warning(f"skipping {path}: {e}")
            continue
        reason = invalid_reason(ckpt)
        if reason:
            logger.warning(f"skipping {path}: {reason}")
            continue
        candidates.append((RunState.from_dict(ckpt).position, os.path.getmtime(path), path))
    if not candidates:
        return None
    position, _, path = max(candidates)
    logger.info(f"auto-resume: {path} (continues at epoch {position[0]}, micro-batch {position[1]})")
    return path
