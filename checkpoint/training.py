"""The training checkpoint: what a run saves to resume from, read back (ours, official, bare weights), put back.

Format 2, a plain dict (tensors and built-in types only, so it loads with weights_only):
    model, optimizer, lr_scheduler, scaler (or None), model_ema (or None), the RunState fields (epoch,
    micro_batch, global_step, max_accuracy, pretrained_from; see RunState.to_dict), rng_states (one per rank),
    class_names, config (YAML text), format_version.
Format 1 named micro_batch ``step_in_epoch`` (it counted micro-batches); such files still resume.
"""
from __future__ import annotations

import logging
import random
from collections import OrderedDict
from typing import Any

import numpy as np
import torch
import yaml
from yacs.config import CfgNode

from errors import CheckpointError
from run_state import RunState, TrainingObjects
from utils import unwrap_model

from .files import first_line
from .weights import extract_state_dict, load_state_dict_strict, read_weights

FORMAT_VERSION = 2
REQUIRED_KEYS = ('model', 'optimizer', 'lr_scheduler', 'epoch', 'global_step', 'max_accuracy', 'config',
                 'format_version')
_MICRO_BATCH_KEY = {1: 'step_in_epoch', 2: 'micro_batch'}  # by format_version

# Config keys that change the weights' shapes or meaning: resuming across a change is an error (so are the
# keys of the model type's own node, e.g. MODEL.SWIN.*). FUSED_ATTN only picks an attention implementation.
_ARCH_KEYS = ('MODEL.TYPE', 'MODEL.TASK', 'DATA.IMG_SIZE', 'MODEL.NUM_CLASSES')
_ARCH_IGNORED = ('FUSED_ATTN',)
# Config keys whose change is allowed on resume but worth a warning (the schedule is no longer the saved one)
_WARN_KEYS = ('DATA.BATCH_SIZE', 'WORLD_SIZE', 'TRAIN.ACCUMULATION_STEPS', 'TRAIN.BASE_LR', 'TRAIN.WARMUP_LR',
              'TRAIN.MIN_LR', 'TRAIN.LINEAR_SCALE_LR', 'TRAIN.EPOCHS', 'TRAIN.WARMUP_EPOCHS', 'TRAIN.WEIGHT_DECAY',
              'TRAIN.OPTIMIZER.NAME', 'TRAIN.LR_SCHEDULER.NAME')


# -----------------------------------------------------------------------------
# Random number generators
# -----------------------------------------------------------------------------
def capture_rng_state() -> dict[str, Any]:
    """States of python random, numpy, torch CPU and this process's CUDA device, as tensors and built-ins."""
    version, internal, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        'python': {'version': version, 'state': torch.tensor(internal, dtype=torch.int64), 'gauss_next': gauss_next},
        'numpy': {'name': name, 'keys': torch.from_numpy(keys.astype(np.int64)), 'pos': int(pos),
                  'has_gauss': int(has_gauss), 'cached_gaussian': float(cached_gaussian)},
        'torch': torch.get_rng_state(),
        'cuda': None,
    }
    # Only the current device: each rank drives one GPU, and touching every device would create a CUDA
    # context on each of them from every rank. Before CUDA is initialized nothing has been drawn from it.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of capture_rng_state: the next random numbers are those that followed the capture."""
    py = state['python']
    random.setstate((py['version'], tuple(int(v) for v in py['state'].tolist()), py['gauss_next']))
    npy = state['numpy']
    np.random.set_state((npy['name'], npy['keys'].numpy().astype(np.uint32), npy['pos'], npy['has_gauss'],
                         npy['cached_gaussian']))
    torch.set_rng_state(state['torch'])
    if state.get('cuda') is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state['cuda'])


# -----------------------------------------------------------------------------
# Writing
# -----------------------------------------------------------------------------
def _check_plain(obj, where):
    """weights_only can read back only tensors and built-in containers/scalars: refuse anything else now."""
    if obj is None or isinstance(obj, torch.Tensor) or type(obj) in (bool, int, float, str):
        return
    if type(obj) in (dict, OrderedDict):
        for key, value in obj.items():
            _check_plain(key, where)
            _check_plain(value, f"{where}.{key}")
    elif type(obj) in (list, tuple):
        for i, value in enumerate(obj):
            _check_plain(value, f"{where}[{i}]")
    else:
        raise CheckpointError(f"cannot save {where}: a {type(obj).__module__}.{type(obj).__name__} would not load "
                              f"with weights_only=True (use tensors and built-in types)")


def checkpoint_contents(config: CfgNode, objects: TrainingObjects, state: RunState, class_names: list[str] | None,
                   rng_states: list[dict] | None) -> dict[str, Any]:
    """The dict that save_checkpoint writes (see the module docstring); checked to load with weights_only."""
    scaler, model_ema = objects.scaler, objects.model_ema
    ckpt = {
        'model': unwrap_model(objects.model).state_dict(),
        'optimizer': objects.optimizer.state_dict(),
        'lr_scheduler': objects.lr_scheduler.state_dict(),
        'scaler': (scaler.state_dict() or None) if scaler is not None else None,  # a disabled scaler gives {}
        'model_ema': unwrap_model(model_ema).state_dict() if model_ema is not None else None,
        **state.to_dict(),
        'rng_states': list(rng_states) if rng_states is not None else None,
        'class_names': [str(name) for name in (class_names or [])],
        'config': config.dump(),
        'format_version': FORMAT_VERSION,
    }
    _check_plain(ckpt, 'checkpoint')
    return ckpt


# -----------------------------------------------------------------------------
# Reading
# -----------------------------------------------------------------------------
def invalid_reason(ckpt: Any) -> str | None:
    """Why a loaded file is not a usable training checkpoint of ours (format 1 or 2), or None."""
    if not isinstance(ckpt, dict):
        return f"holds a {type(ckpt).__name__}, not a dict"
    micro_batch_key = _MICRO_BATCH_KEY.get(ckpt.get('format_version'), 'micro_batch')
    missing = [key for key in REQUIRED_KEYS + (micro_batch_key,) if key not in ckpt]
    if missing:
        return f"not a training checkpoint (missing {', '.join(missing)})"
    if not isinstance(ckpt['model'], dict) or not ckpt['model']:
        return "its model weights are empty"
    if not isinstance(ckpt['epoch'], int) or not isinstance(ckpt[micro_batch_key], int):
        return f"its epoch / {micro_batch_key} are not integers"
    return None


def _config_value(data, key):
    node = data
    for part in key.split('.'):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return list(node) if isinstance(node, tuple) else node


_MISSING = object()


def _config_changes(saved, config, keys):
    """'KEY old→new' for each key whose value differs (keys absent from the saved config are not compared)."""
    changes = []
    for key in keys:
        old, new = _config_value(saved, key), _config_value(config, key)
        if old is not _MISSING and new is not _MISSING and old != new:
            changes.append(f"{key} {old}→{new}")
    return changes


def check_config_drift(saved_yaml: str, config: CfgNode, path: str, logger: logging.Logger) -> None:
    """Error on a changed model architecture, warning on changed batch size / learning rates / world size."""
    try:
        saved = yaml.safe_load(saved_yaml) or {}
    except yaml.YAMLError as e:
        raise CheckpointError(f"checkpoint {path}: its saved config is not valid YAML ({first_line(e)})") from None
    node = config.MODEL.TYPE.upper()  # the model type's own node: swin -> MODEL.SWIN, swinv2 -> MODEL.SWINV2
    arch_keys = list(_ARCH_KEYS) + [f'MODEL.{node}.{k}' for k in config.MODEL.get(node, {})
                                    if k not in _ARCH_IGNORED]
    changed = _config_changes(saved, config, arch_keys)
    if changed:
        raise CheckpointError(f"checkpoint {path} was saved for another model: {', '.join(changed)} "
                              f"(resume with the same config, or fine-tune from it with MODEL.PRETRAINED)")
    changed = _config_changes(saved, config, _WARN_KEYS)
    if changed:
        logger.warning(f"resuming {path} with a changed config: {', '.join(changed)} (the optimizer and LR-scheduler "
                       f"state, hyper-parameters included, come from the checkpoint)")


def read_checkpoint(path: str, config: CfgNode, logger: logging.Logger) -> dict[str, Any]:
    """Load a checkpoint to resume from: ours (config drift checked), official Swin, or bare/timm weights.

    Foreign formats are normalized to ours; pieces they lack are None (restore_from_checkpoint starts those
    fresh with a warning).
    """
    ckpt = read_weights(path)
    if isinstance(ckpt, dict) and 'format_version' in ckpt:
        reason = invalid_reason(ckpt)
        if reason:
            raise CheckpointError(f"checkpoint {path} cannot be resumed: {reason}")
        if ckpt['format_version'] > FORMAT_VERSION:
            raise CheckpointError(f"checkpoint {path} has format_version {ckpt['format_version']}, newer than this "
                                  f"code reads ({FORMAT_VERSION})")
        check_config_drift(ckpt['config'], config, path, logger)
        return ckpt

    # Official Swin checkpoint ({'model', 'optimizer', 'lr_scheduler', 'epoch', ...}) or bare weights
    official = isinstance(ckpt, dict) and isinstance(ckpt.get('model'), dict)
    state = {key: None for key in REQUIRED_KEYS + ('scaler', 'model_ema', 'rng_states', 'class_names')}
    state.update(model=extract_state_dict(ckpt, path, config.MODEL.TYPE), max_accuracy=0.0, class_names=[])
    if official:
        state.update(optimizer=ckpt.get('optimizer'), scaler=ckpt.get('scaler'), epoch=ckpt.get('epoch'),
                     max_accuracy=float(ckpt.get('max_accuracy', 0.0)))
        # its LR-scheduler state is not restored: the schedule is recomputed from the config and global step
        logger.warning(f"{path} is an official Swin checkpoint: no saved config to compare, no RNG state; the LR "
                       f"schedule is recomputed from this config")
    else:
        logger.warning(f"{path} holds model weights only: training starts at epoch 0 from them")
    return state


# -----------------------------------------------------------------------------
# Restoring
# -----------------------------------------------------------------------------
def restore_from_checkpoint(ckpt: dict[str, Any], objects: TrainingObjects, logger: logging.Logger, rank: int = 0,
                           steps_per_epoch: int | None = None) -> RunState:
    """Put a loaded checkpoint into the training objects; returns where training goes on (RunState.from_dict:
    ``steps_per_epoch`` gives the global step of official checkpoints, which do not record it)."""
    model, model_ema = objects.model, objects.model_ema
    load_state_dict_strict(model, ckpt['model'], 'checkpoint')
    _restore_piece(objects.optimizer, ckpt.get('optimizer'), 'optimizer', logger)
    _restore_piece(objects.lr_scheduler, ckpt.get('lr_scheduler'), 'LR scheduler', logger)
    if objects.scaler is not None:
        _restore_piece(objects.scaler, ckpt.get('scaler') or None, 'gradient scaler', logger)
    if model_ema is not None:
        if ckpt.get('model_ema') is not None:
            load_state_dict_strict(model_ema, ckpt['model_ema'], 'checkpoint (EMA weights)')
        else:
            logger.warning("the checkpoint has no EMA weights: the EMA starts from the loaded model weights")
            unwrap_model(model_ema).load_state_dict(unwrap_model(model).state_dict())
    _restore_rng(ckpt.get('rng_states'), rank, logger)
    return RunState.from_dict(ckpt, steps_per_epoch)


def _restore_piece(target, saved, what, logger):
    if saved is None:
        logger.warning(f"the checkpoint has no {what} state: the {what} starts fresh")
        return
    try:
        target.load_state_dict(saved)
    except (ValueError, KeyError, RuntimeError, TypeError) as e:
        raise CheckpointError(f"the checkpoint's {what} state does not fit this run's {what} ({first_line(e)}); "
                              f"was the optimizer or its parameter groups changed?") from None


def _restore_rng(rng_states, rank, logger):
    world_size = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    if not rng_states:
        logger.warning("the checkpoint has no RNG state: random streams continue from this run's seed")
    elif len(rng_states) != world_size:
        logger.warning(f"the checkpoint's RNG state is from {len(rng_states)} processes, this run has {world_size}: "
                       f"random streams continue from this run's seed")
    else:
        restore_rng_state(rng_states[rank])
