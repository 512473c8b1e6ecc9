"""Checkpoints, one module per job:

* ``files``      crash-safe files (temp name + fsync + rename), ``load_file`` (``weights_only=True``, one-line
                 errors) and the safetensors format: everything is written and read through these.
* ``training``   the training checkpoint: its dict (format 2; format 1 still read), RNG capture, config drift,
                 reading ours / official / bare weights to resume from, restoring the training objects.
* ``folder``     the run's folder: file names, save + retention, the auto-resume scan.
* ``writer``     saving without stalling training: a CPU snapshot, the file written on a background thread.
* ``saver``      a run's checkpoints: when (epoch ends, signals, SAVE_EVERY_MINUTES), RNG gathering, failures.
* ``weights``    reading a weights file (``read_weights``: .pth or .safetensors), finding the weights in it,
                 strict loading, and the per-family hook (``WeightFamily``, ``register_family``) that converts
                 foreign layouts and resizes pretrained tensors.
* ``swin``       the Swin v1 family: timm <-> official layout, bias-table / position-embedding resizing.
* ``pretrained`` fine-tuning starts: the family's adaptation plus the shared classifier rules (22K -> 1K).

The names below are the package's interface; import them from ``checkpoint``.
"""
from .files import (
                    atomic_save,
                    freeze_saves,
                    is_safetensors,
                    load_file,
                    load_safetensors,
                    replace_atomically,
                    save_safetensors,
                    write_text_atomically,
)
from .folder import checkpoint_name, find_resume_checkpoint, save_checkpoint
from .pretrained import imagenet22k_to_1k_indices, load_pretrained
from .saver import CheckpointSaver
from .swin import is_timm_state_dict, official_to_timm, timm_to_official  # and registers MODEL.TYPE swin
from .training import (
                    FORMAT_VERSION,
                    capture_rng_state,
                    check_config_drift,
                    checkpoint_contents,
                    read_checkpoint,
                    restore_from_checkpoint,
                    restore_rng_state,
)
from .weights import (
                    WeightFamily,
                    config_for_weights,
                    extract_state_dict,
                    load_model_weights,
                    read_weights,
                    register_family,
                    weight_family,
)
from .writer import CheckpointWriter

__all__ = [
    'atomic_save', 'capture_rng_state', 'config_for_weights', 'check_config_drift', 'checkpoint_name',
    'CheckpointSaver', 'CheckpointWriter', 'extract_state_dict', 'find_resume_checkpoint', 'freeze_saves',
    'FORMAT_VERSION',
    'imagenet22k_to_1k_indices', 'is_safetensors', 'is_timm_state_dict', 'load_file', 'load_model_weights',
    'load_pretrained', 'load_safetensors', 'read_checkpoint', 'official_to_timm', 'read_weights',
    'register_family', 'replace_atomically', 'restore_rng_state', 'restore_from_checkpoint', 'save_checkpoint',
    'save_safetensors', 'timm_to_official', 'checkpoint_contents', 'weight_family', 'WeightFamily',
    'write_text_atomically',
]
