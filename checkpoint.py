"""Checkpoints: crash-safe saving, resume, released weights (official and timm layouts), fine-tuning loads.

Everything is read through ``load_file`` (``torch.load(..., weights_only=True)``), so a checkpoint holds only
tensors and built-in types; ``training_state`` checks that before anything is written.

Training checkpoint (``format_version`` 1), a plain dict:
    model, optimizer, lr_scheduler, scaler (or None), model_ema (or None), epoch, step_in_epoch, global_step,
    max_accuracy, rng_states (one entry per rank), class_names, config (YAML text), format_version.
``step_in_epoch`` 0 marks an end-of-epoch state (training goes on at epoch + 1); k > 0 marks a mid-epoch
(preemption) state with k micro-batches of ``epoch`` done.

Weight layouts: ours is the official microsoft/Swin-Transformer one (PatchMerging at the END of stage i as
``layers.{i}.downsample``, classifier ``head``). timm >= 0.9 puts PatchMerging at the START of the next stage
(``layers.{i+1}.downsample``), names the classifier ``head.fc`` and keeps ``relative_position_index`` and
``attn_mask`` out of its state_dict (non-persistent buffers). Older timm used the official layout.
"""
import math
import os
import pickle
import pkgutil
import random
import re
import shutil
import zipfile
from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from errors import CheckpointError
from utils import replace_atomically, unwrap_model

FORMAT_VERSION = 1
REQUIRED_KEYS = ('model', 'optimizer', 'lr_scheduler', 'epoch', 'step_in_epoch', 'global_step',
                 'max_accuracy', 'config', 'format_version')

# Buffers computed from the config (window size, shift, resolution): never taken from a file
DERIVED_BUFFERS = ('relative_position_index', 'attn_mask', 'relative_coords_table')

# Config keys that change the weights' shapes or meaning: resuming across a change is an error.
# MODEL.SWIN.FUSED_ATTN only picks an attention implementation, so it may change.
_ARCH_KEYS = ('MODEL.TYPE', 'DATA.IMG_SIZE', 'MODEL.NUM_CLASSES')
_ARCH_IGNORED = ('MODEL.SWIN.FUSED_ATTN',)
# Config keys whose change is allowed on resume but worth a warning (the schedule is no longer the saved one)
_WARN_KEYS = ('DATA.BATCH_SIZE', 'WORLD_SIZE', 'TRAIN.ACCUMULATION_STEPS', 'TRAIN.BASE_LR', 'TRAIN.WARMUP_LR',
              'TRAIN.MIN_LR', 'TRAIN.LINEAR_SCALE_LR', 'TRAIN.EPOCHS', 'TRAIN.WARMUP_EPOCHS', 'TRAIN.WEIGHT_DECAY',
              'TRAIN.OPTIMIZER.NAME', 'TRAIN.LR_SCHEDULER.NAME')

_CKPT_NAME = re.compile(r'^ckpt_epoch_(\d+)(?:_step_(\d+))?\.pth$')
_TEMP_NAME = re.compile(r'^\..+\.pth\.\d+\.[0-9a-f]{8}\.tmp$')  # see utils._temp_path


# -----------------------------------------------------------------------------
# Files
# -----------------------------------------------------------------------------
def atomic_save(obj, path):
    """torch.save obj to path so that a crash at any moment leaves either the old file or the whole new one."""
    def write(temp):
        with open(temp, 'xb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())

    replace_atomically(write, path)
    return path


def _link_atomically(source, path):
    """path becomes the same file as source (a hard link, or a copy where links are not supported)."""
    def write(temp):
        try:
            os.link(source, temp)
        except OSError:
            shutil.copyfile(source, temp)

    replace_atomically(write, path)


def load_file(path, mmap=False):
    """torch.load(path, map_location='cpu', weights_only=True); any failure is a one-line CheckpointError.

    mmap=True maps the tensors instead of reading them (cheap when only the metadata is needed).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    if mmap and not zipfile.is_zipfile(path):
        mmap = False  # legacy (pre-zip) files cannot be mapped; truncated ones fail below either way
    try:
        return torch.load(path, map_location='cpu', weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        refused, detail = _weights_only_refusal(str(e))
        if refused:
            raise CheckpointError(f"checkpoint {path} holds pickled objects other than tensors and built-in types, "
                                  f"refused for safety (weights_only): {detail}") from None
        raise CheckpointError(f"checkpoint {path} is corrupt or not a checkpoint ({detail})") from None
    except Exception as e:  # noqa: BLE001 -- torch reports truncation as RuntimeError, empty files as EOFError, ...
        raise CheckpointError(f"checkpoint {path} is truncated, corrupt or not a checkpoint "
                              f"({type(e).__name__}: {_first_line(e)})") from None


def _weights_only_refusal(message):
    """(True, the refused class/function) when weights_only met a pickled object; (False, detail) for bytes that
    are not a pickle at all (an image, a text file, ...)."""
    detail = message.split('WeightsUnpickler error:', 1)[-1].split('Check the documentation')[0].strip()
    detail = detail.splitlines()[0] if detail else 'unreadable pickle data'
    if 'WeightsUnpickler error:' not in message or detail.startswith('Unsupported operand'):
        return False, detail[:200]
    return True, detail.split(' was not an allowed global')[0]


def _first_line(exc):
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else 'no details'


# -----------------------------------------------------------------------------
# Random number generators
# -----------------------------------------------------------------------------
def capture_rng_state():
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


def restore_rng_state(state):
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
# Training checkpoints
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


def training_state(config, model, optimizer, lr_scheduler, scaler, model_ema, epoch, step_in_epoch,
                   global_step, max_accuracy, class_names, rng_states):
    """The dict that save_checkpoint writes (see the module docstring); checked to load with weights_only."""
    state = {
        'model': unwrap_model(model).state_dict(),
        'optimizer': optimizer.state_dict(),
        'lr_scheduler': lr_scheduler.state_dict(),
        'scaler': (scaler.state_dict() or None) if scaler is not None else None,  # a disabled scaler gives {}
        'model_ema': unwrap_model(model_ema).state_dict() if model_ema is not None else None,
        'epoch': int(epoch),
        'step_in_epoch': int(step_in_epoch),
        'global_step': int(global_step),
        'max_accuracy': float(max_accuracy),
        'rng_states': list(rng_states) if rng_states is not None else None,
        'class_names': [str(name) for name in (class_names or [])],
        'config': config.dump(),
        'format_version': FORMAT_VERSION,
    }
    _check_plain(state, 'checkpoint')
    return state


def _checkpoint_name(epoch, step_in_epoch):
    return f'ckpt_epoch_{epoch}.pth' if step_in_epoch == 0 else f'ckpt_epoch_{epoch}_step_{step_in_epoch}.pth'


def _progress(epoch, step_in_epoch):
    """Where training goes on from a state: (epoch, micro-batch). Orders end-of-epoch and mid-epoch states."""
    return (epoch + 1, 0) if step_in_epoch == 0 else (epoch, step_in_epoch)


def save_checkpoint(config, state, logger, is_best=False):
    """Write state to OUTPUT_DIR (rank 0 only) as ckpt_epoch_{epoch}[_step_{k}].pth, last.pth, best.pth.

    The file is serialized once; last.pth / best.pth are hard links to it (copies where links fail), each put in
    place atomically. Afterwards only the newest KEEP_CHECKPOINTS end-of-epoch files are kept (0: all), and
    mid-epoch files older than this state are removed (they only guard against preemption).
    """
    folder = config.OUTPUT_DIR
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, _checkpoint_name(state['epoch'], state['step_in_epoch']))
    atomic_save(state, path)
    _link_atomically(path, os.path.join(folder, 'last.pth'))
    if is_best:
        _link_atomically(path, os.path.join(folder, 'best.pth'))
    logger.info(f"saved checkpoint {path}" + (" (best so far)" if is_best else ""))
    _prune_checkpoints(folder, _progress(state['epoch'], state['step_in_epoch']), config.KEEP_CHECKPOINTS, logger)
    return path


def _prune_checkpoints(folder, current, keep, logger):
    epoch_files, step_files, ahead = [], [], []
    for name in os.listdir(folder):
        match = _CKPT_NAME.match(name)
        if not match:
            continue
        progress = _progress(int(match.group(1)), int(match.group(2) or 0))
        if progress > current:
            ahead.append(name)  # left by an earlier run that got further: never deleted here
        elif match.group(2) is None:
            epoch_files.append((progress, name))
        elif progress < current:
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


def _invalid_reason(ckpt):
    """Why a loaded file is not a usable training checkpoint of ours, or None."""
    if not isinstance(ckpt, dict):
        return f"holds a {type(ckpt).__name__}, not a dict"
    missing = [key for key in REQUIRED_KEYS if key not in ckpt]
    if missing:
        return f"not a training checkpoint (missing {', '.join(missing)})"
    if not isinstance(ckpt['model'], dict) or not ckpt['model']:
        return "its model weights are empty"
    if not isinstance(ckpt['epoch'], int) or not isinstance(ckpt['step_in_epoch'], int):
        return "its epoch / step_in_epoch are not integers"
    return None


def find_resume_checkpoint(output_dir, logger):
    """Path of the newest usable checkpoint in output_dir, or None.

    Newest = largest (epoch, step_in_epoch) recorded inside the file (end-of-epoch ranks after every mid-epoch
    state of the same epoch), then the latest modification time. Files that fail to load or lack the required
    keys are skipped with a warning. Stray temp files of interrupted saves are removed (call this before
    training starts, not while another process may be saving into the folder).
    """
    if not output_dir or not os.path.isdir(output_dir):
        return None
    candidates = []
    for name in sorted(os.listdir(output_dir)):
        path = os.path.join(output_dir, name)
        if _TEMP_NAME.match(name):
            logger.warning(f"removing {path}: left by an interrupted checkpoint save")
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
        reason = _invalid_reason(ckpt)
        if reason:
            logger.warning(f"skipping {path}: {reason}")
            continue
        candidates.append((_progress(ckpt['epoch'], ckpt['step_in_epoch']), os.path.getmtime(path), path))
    if not candidates:
        return None
    progress, _, path = max(candidates)
    logger.info(f"auto-resume: {path} (continues at epoch {progress[0]}, micro-batch {progress[1]})")
    return path


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


def check_config_drift(saved_yaml, config, path, logger):
    """Error on a changed model architecture, warning on changed batch size / learning rates / world size."""
    try:
        saved = yaml.safe_load(saved_yaml) or {}
    except yaml.YAMLError as e:
        raise CheckpointError(f"checkpoint {path}: its saved config is not valid YAML ({_first_line(e)})") from None
    arch_keys = list(_ARCH_KEYS) + [f'MODEL.SWIN.{k}' for k in config.MODEL.SWIN
                                    if f'MODEL.SWIN.{k}' not in _ARCH_IGNORED]
    changed = _config_changes(saved, config, arch_keys)
    if changed:
        raise CheckpointError(f"checkpoint {path} was saved for another model: {', '.join(changed)} "
                              f"(resume with the same config, or fine-tune from it with MODEL.PRETRAINED)")
    changed = _config_changes(saved, config, _WARN_KEYS)
    if changed:
        logger.warning(f"resuming {path} with a changed config: {', '.join(changed)} (the optimizer and LR-scheduler "
                       f"state, hyper-parameters included, come from the checkpoint)")


def load_training_state(path, config, logger):
    """Load a checkpoint to resume from: ours (config drift checked), official Swin, or bare/timm weights.

    Foreign formats are normalized to ours; pieces they lack are None (restore_training_state starts those
    fresh with a warning).
    """
    ckpt = load_file(path)
    if isinstance(ckpt, dict) and 'format_version' in ckpt:
        reason = _invalid_reason(ckpt)
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
    state.update(model=extract_state_dict(ckpt, path), step_in_epoch=0, max_accuracy=0.0, class_names=[])
    if official:
        state.update(optimizer=ckpt.get('optimizer'), scaler=ckpt.get('scaler'), epoch=ckpt.get('epoch'),
                     max_accuracy=float(ckpt.get('max_accuracy', 0.0)))
        # its LR-scheduler state is not restored: the schedule is recomputed from the config and global step
        logger.warning(f"{path} is an official Swin checkpoint: no saved config to compare, no RNG state; the LR "
                       f"schedule is recomputed from this config")
    else:
        logger.warning(f"{path} holds model weights only: training starts at epoch 0 from them")
    return state


def restore_training_state(state, model, optimizer, lr_scheduler, scaler, model_ema, logger, rank=0,
                           steps_per_epoch=None):
    """Put a loaded state into the training objects.

    Returns (start_epoch, start_step_in_epoch, global_step, max_accuracy): for an end-of-epoch state
    (epoch + 1, 0, ...), for a mid-epoch state (epoch, step_in_epoch, ...). When the file does not record the
    global step (official checkpoints) it is start_epoch * steps_per_epoch (0 without steps_per_epoch).
    """
    _load_weights_strict(unwrap_model(model), state['model'], 'checkpoint')
    _restore_piece(optimizer, state.get('optimizer'), 'optimizer', logger)
    _restore_piece(lr_scheduler, state.get('lr_scheduler'), 'LR scheduler', logger)
    if scaler is not None:
        _restore_piece(scaler, state.get('scaler') or None, 'gradient scaler', logger)
    if model_ema is not None:
        if state.get('model_ema') is not None:
            _load_weights_strict(unwrap_model(model_ema), state['model_ema'], 'checkpoint (EMA weights)')
        else:
            logger.warning("the checkpoint has no EMA weights: the EMA starts from the loaded model weights")
            unwrap_model(model_ema).load_state_dict(unwrap_model(model).state_dict())
    _restore_rng(state.get('rng_states'), rank, logger)

    epoch, step = state.get('epoch'), state.get('step_in_epoch') or 0
    if epoch is None:
        start_epoch, start_step = 0, 0
    else:
        start_epoch, start_step = _progress(epoch, step)
    global_step = state.get('global_step')
    if global_step is None:
        global_step = start_epoch * steps_per_epoch if steps_per_epoch else 0
    return start_epoch, start_step, int(global_step), float(state.get('max_accuracy') or 0.0)


def _restore_piece(target, saved, what, logger):
    if saved is None:
        logger.warning(f"the checkpoint has no {what} state: the {what} starts fresh")
        return
    try:
        target.load_state_dict(saved)
    except (ValueError, KeyError, RuntimeError, TypeError) as e:
        raise CheckpointError(f"the checkpoint's {what} state does not fit this run's {what} ({_first_line(e)}); "
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


# -----------------------------------------------------------------------------
# Weight layouts
# -----------------------------------------------------------------------------
_DOWNSAMPLE = re.compile(r'^layers\.(\d+)\.downsample\.')


def _downsample_stages(sd):
    return {int(m.group(1)) for m in map(_DOWNSAMPLE.match, sd) if m}


def is_timm_state_dict(sd):
    """True for the timm >= 0.9 layout (head.fc, or PatchMerging at the start of stage i+1, none in stage 0)."""
    if any(key.startswith('head.fc.') for key in sd):
        return True
    stages = _downsample_stages(sd)
    return bool(stages) and 0 not in stages


def _shift_downsample(key, offset):
    return _DOWNSAMPLE.sub(lambda m: f'layers.{int(m.group(1)) + offset}.downsample.', key)


def timm_to_official(sd):
    """timm >= 0.9 key layout -> official; tensors are shared, not copied. Buffers timm omits stay absent."""
    if 0 in _downsample_stages(sd):
        raise CheckpointError("timm_to_official: layers.0.downsample is present, the weights are already in the "
                              "official layout")
    out = OrderedDict()
    for key, value in sd.items():
        key = _shift_downsample(key, -1)
        out['head.' + key[len('head.fc.'):] if key.startswith('head.fc.') else key] = value
    return out


def official_to_timm(sd):
    """Official key layout -> timm >= 0.9 (a state_dict timm's SwinTransformer loads strictly).

    relative_position_index / attn_mask are dropped (timm computes them, they are not in its state_dict), so
    official -> timm -> official gives back every parameter and drops only those derived buffers.
    """
    if any(key.startswith('head.fc.') for key in sd):
        raise CheckpointError("official_to_timm: head.fc.* is present, the weights are already in the timm layout")
    out = OrderedDict()
    for key, value in sd.items():
        if key.rsplit('.', 1)[-1] in DERIVED_BUFFERS:
            continue
        key = _shift_downsample(key, +1)
        out['head.fc.' + key[len('head.'):] if key.startswith('head.') else key] = value
    return out


def _strip_prefix(sd):
    """Remove the wrapper prefix every key shares (DistributedDataParallel 'module.', torch.compile '_orig_mod.')."""
    for prefix in ('module.', '_orig_mod.'):
        if sd and all(key.startswith(prefix) for key in sd):
            sd = OrderedDict((key[len(prefix):], value) for key, value in sd.items())
    return sd


def extract_state_dict(obj, source):
    """Model weights in the official layout from a loaded file: {'model': sd} (ours, official),
    {'state_dict': sd}, or a bare state_dict (official or timm layout)."""
    sd = obj
    for key in ('model', 'state_dict'):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{source}: no model weights found (expected a state_dict, or one under 'model' or "
                              f"'state_dict')")
    sd = _strip_prefix(OrderedDict(sd))
    return timm_to_official(sd) if is_timm_state_dict(sd) else sd


def _is_derived(key):
    return key.rsplit('.', 1)[-1] in DERIVED_BUFFERS


def _with_model_buffers(sd, model_sd):
    """sd with the derived buffers taken from the model (they depend only on its config)."""
    out = OrderedDict((k, v) for k, v in sd.items() if not _is_derived(k))
    out.update((k, v) for k, v in model_sd.items() if _is_derived(k))
    return out


def _check_fit(sd, model_sd, source):
    """CheckpointError naming the first tensor whose shape differs, else the first missing / unexpected key."""
    for key, value in sd.items():
        if key in model_sd and value.shape != model_sd[key].shape:
            raise CheckpointError(f"{source} does not fit the model built from the config: {key} has shape "
                                  f"{tuple(value.shape)} in the checkpoint, {tuple(model_sd[key].shape)} in the model")
    missing = [key for key in model_sd if key not in sd]
    unexpected = [key for key in sd if key not in model_sd]
    for keys, what in ((missing, 'is missing from the checkpoint'), (unexpected, 'is not in the model')):
        if keys:
            more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
            raise CheckpointError(f"{source} does not fit the model built from the config: {keys[0]} {what}{more}")


def _load_weights_strict(model, sd, source):
    model_sd = model.state_dict()
    sd = _with_model_buffers(sd, model_sd)
    _check_fit(sd, model_sd, source)
    model.load_state_dict(sd, strict=True)


def load_model_weights(model, path_or_state_dict, logger, name=None):
    """Weights for --eval / predict: ours, official, {'state_dict': sd}, bare or timm state_dicts; strict.

    Derived buffers (relative_position_index, attn_mask) always come from the model, present in the file or not.
    name: how error messages call an already loaded dict (a path is named by itself).
    """
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        source = f"checkpoint {os.fspath(path_or_state_dict)}"
        obj = load_file(path_or_state_dict)
    else:
        source, obj = f"checkpoint {name}" if name else "checkpoint", path_or_state_dict
    sd = extract_state_dict(obj, source)
    _load_weights_strict(unwrap_model(model), sd, source)
    logger.info(f"loaded model weights from {source} ({len(sd)} tensors)")


# -----------------------------------------------------------------------------
# Fine-tuning from pretrained weights
# -----------------------------------------------------------------------------
def _resize_bias_table(table, rows):
    """(2W-1)^2 x heads -> rows x heads by bicubic interpolation of each head's (2W-1) x (2W-1) grid."""
    old_side, new_side, heads = math.isqrt(table.shape[0]), math.isqrt(rows), table.shape[1]
    grid = table.float().t().reshape(1, heads, old_side, old_side)
    grid = F.interpolate(grid, size=(new_side, new_side), mode='bicubic', align_corners=False)
    return grid.reshape(heads, rows).t().contiguous().to(table.dtype)


def _resize_pos_embed(embed, tokens):
    """1 x (S*S) x C absolute position embedding -> 1 x tokens x C, bicubic on the S x S patch grid."""
    old_side, new_side, channels = math.isqrt(embed.shape[1]), math.isqrt(tokens), embed.shape[2]
    grid = embed.float().reshape(1, old_side, old_side, channels).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new_side, new_side), mode='bicubic', align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(1, tokens, channels).to(embed.dtype)


def imagenet22k_to_1k_indices():
    """Row of Swin's 21841-class ImageNet-22K head for each ImageNet-1K class, in 1K order (1000 indices).

    Swin's 22K class order matches timm's imagenet21k_goog_synsets.txt (sorted WordNet ids) for every 1K
    synset; 'teddy, teddy bear' (n04399382) is not among the 22K synsets, and the official map uses
    n03013580 ('... slip, teddy') for it. This reproduces microsoft/Swin-Transformer data/map22kto1k.txt exactly.
    (timm's imagenet22k_ms_synsets.txt is a different order: FocalNet's 21842 classes with 1K first.)
    """
    def synsets(name):
        return pkgutil.get_data('timm.data', f'_info/{name}').decode('utf-8').split()

    row = {synset: i for i, synset in enumerate(synsets('imagenet21k_goog_synsets.txt'))}
    substitute = {'n04399382': 'n03013580'}
    indices = [row[substitute.get(s, s)] for s in synsets('imagenet_synsets.txt')]
    if len(indices) != 1000 or len(set(indices)) != 1000 or max(indices) >= 21841:
        raise CheckpointError("the ImageNet-22K -> 1K class map derived from timm's synset lists is inconsistent")
    return indices


def _adapt_head(sd, model_sd, logger):
    """Keep, map (22K -> 1K) or drop the classifier; returns True when the model's head must be re-initialized."""
    if 'head.weight' not in model_sd:  # a headless model (NUM_CLASSES 0): a pretrained head has no place
        sd.pop('head.weight', None)
        sd.pop('head.bias', None)
        return False
    old, new = sd.get('head.weight'), model_sd['head.weight']
    if old is not None and old.shape == new.shape:
        return False
    if old is not None and old.shape[0] == 21841 and new.shape[0] == 1000 and old.shape[1] == new.shape[1]:
        rows = torch.tensor(imagenet22k_to_1k_indices())
        sd['head.weight'], sd['head.bias'] = old[rows], sd['head.bias'][rows]
        logger.info("classifier: ImageNet-22K head (21841 classes) mapped to the 1000 ImageNet-1K classes")
        return False
    what = f"{old.shape[0]} classes" if old is not None else "no classifier"
    logger.info(f"classifier: the pretrained weights have {what}, the model {new.shape[0]}: head re-initialized "
                f"to zero")
    sd.pop('head.weight', None)
    sd.pop('head.bias', None)
    return True


def load_pretrained(config, model, logger):
    """Fine-tune start from MODEL.PRETRAINED (official or timm weights); optimizer state and epoch are not used.

    Derived buffers come from the model; relative position bias tables and the absolute position embedding
    are resized (bicubic) to the new window / patch grid; the head is kept, mapped 22K -> 1K, or zeroed.
    """
    path = config.MODEL.PRETRAINED
    logger.info(f"fine-tuning from {path}")
    model = unwrap_model(model)
    model_sd = model.state_dict()
    sd = _with_model_buffers(extract_state_dict(load_file(path), f"pretrained weights {path}"), model_sd)
    resized = []
    for key, value in list(sd.items()):
        target = model_sd.get(key)
        if target is None or target.shape == value.shape:
            continue
        if key.endswith('relative_position_bias_table') and value.shape[1] == target.shape[1]:
            sd[key] = _resize_bias_table(value, target.shape[0])
            resized.append(f"{key} {tuple(value.shape)}→{tuple(target.shape)}")
        elif key == 'absolute_pos_embed' and value.shape[2] == target.shape[2]:
            sd[key] = _resize_pos_embed(value, target.shape[1])
            resized.append(f"{key} {tuple(value.shape)}→{tuple(target.shape)}")
    if resized:
        logger.info(f"resized by bicubic interpolation: {resized[0]}"
                    + (f" and {len(resized) - 1} more" if len(resized) > 1 else ""))
    if _adapt_head(sd, model_sd, logger):
        sd['head.weight'] = torch.zeros_like(model_sd['head.weight'])
        sd['head.bias'] = torch.zeros_like(model_sd['head.bias'])
    if 'absolute_pos_embed' in model_sd and 'absolute_pos_embed' not in sd:
        logger.warning("the pretrained weights have no absolute_pos_embed: it keeps its initialization")
        sd['absolute_pos_embed'] = model_sd['absolute_pos_embed']
    if 'absolute_pos_embed' in sd and 'absolute_pos_embed' not in model_sd:
        logger.warning("the pretrained weights have an absolute_pos_embed, the model (MODEL.SWIN.APE False) does not: "
                       "dropped")
        del sd['absolute_pos_embed']
    _check_fit(sd, model_sd, f"pretrained weights {path}")
    model.load_state_dict(sd, strict=True)
    logger.info(f"loaded pretrained weights {path} ({len(sd)} tensors)")
