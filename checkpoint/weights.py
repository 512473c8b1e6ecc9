"""Model weights: finding them in a file, converting foreign layouts per model family, strict loading.

Our layout is the official microsoft/Swin-Transformer one. What differs between model families (other
libraries' layouts, tensors whose shape depends on the image or window size) is a ``WeightFamily``,
registered under its MODEL.TYPE; everything else here is shared. A family without an entry reads the
official layout only, and its pretrained weights must match the model's shapes.
"""
from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
import yaml

from config import load_config
from errors import CheckpointError, ConfigError
from utils import unwrap_model

from .files import is_safetensors, load_file, load_safetensors

StateDict = Mapping[str, torch.Tensor]

# Buffers computed from the config (window size, shift, resolution): never taken from a file
DERIVED_BUFFERS = ('relative_position_index', 'attn_mask', 'relative_coords_table')


class WeightFamily:
    """How the weights of one model family (one MODEL.TYPE) are read. Subclass it and ``register_family`` it.

    The base class reads the official layout as it is and adapts nothing.
    """

    def to_official(self, sd: OrderedDict[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
        """Weights in another layout (e.g. timm's) -> the official keys; official weights come back unchanged."""
        return sd

    def adapt_pretrained(self, sd: dict[str, torch.Tensor], model_sd: StateDict,
                         logger: logging.Logger) -> list[str]:
        """Fit pretrained tensors whose shape depends on image / window size to the model (in place, e.g. by
        interpolation). Returns one 'key old→new shape' text per changed tensor. The classifier and the
        derived buffers are handled by the caller."""
        return []


_FAMILIES: dict[str, WeightFamily] = {}
_OFFICIAL_ONLY = WeightFamily()


def register_family(model_type: str, family: WeightFamily) -> WeightFamily:
    """Make ``family`` read the checkpoints of models built with MODEL.TYPE ``model_type``."""
    if model_type in _FAMILIES:
        raise ValueError(f"a weight family is already registered for MODEL.TYPE {model_type!r}")
    _FAMILIES[model_type] = family
    return family


def weight_family(model_type: str) -> WeightFamily:
    """The registered family of MODEL.TYPE ``model_type`` (official layout only when none is)."""
    return _FAMILIES.get(model_type, _OFFICIAL_ONLY)


def is_derived(key: str) -> bool:
    return key.rsplit('.', 1)[-1] in DERIVED_BUFFERS


def _strip_prefix(sd):
    """Remove the wrapper prefix every key shares (DistributedDataParallel 'module.', torch.compile '_orig_mod.')."""
    for prefix in ('module.', '_orig_mod.'):
        if sd and all(key.startswith(prefix) for key in sd):
            sd = OrderedDict((key[len(prefix):], value) for key, value in sd.items())
    return sd


def extract_state_dict(obj: Any, source: str, model_type: str = 'swin') -> OrderedDict[str, torch.Tensor]:
    """Model weights in the official layout from a loaded file: {'model': sd} (ours, official),
    {'state_dict': sd}, or a bare state_dict (in a layout the family of ``model_type`` converts)."""
    sd = obj
    for key in ('model', 'state_dict'):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{source}: no model weights found (expected a state_dict, or one under 'model' or "
                              f"'state_dict')")
    return weight_family(model_type).to_official(_strip_prefix(OrderedDict(sd)))


def with_model_buffers(sd: StateDict, model_sd: StateDict) -> OrderedDict[str, torch.Tensor]:
    """sd with the derived buffers taken from the model (they depend only on its config)."""
    out = OrderedDict((k, v) for k, v in sd.items() if not is_derived(k))
    out.update((k, v) for k, v in model_sd.items() if is_derived(k))
    return out


def check_fit(sd: StateDict, model_sd: StateDict, source: str) -> None:
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


def load_state_dict_strict(model: torch.nn.Module, sd: StateDict, source: str) -> None:
    """model.load_state_dict(sd, strict=True) with derived buffers from the model and one-line errors."""
    model = unwrap_model(model)
    model_sd = model.state_dict()
    sd = with_model_buffers(sd, model_sd)
    check_fit(sd, model_sd, source)
    model.load_state_dict(sd, strict=True)


def read_weights(path: str | os.PathLike) -> Any:
    """The content of a weights file for every loader (eval, pretrained, resume, scripts): torch files through
    ``load_file``; a .safetensors file as {'model': its tensors, 'class_names': [...], 'config': YAML text or
    None} (from its metadata, as scripts/convert_checkpoint.py writes them)."""
    if not is_safetensors(path):
        return load_file(path)
    sd, metadata = load_safetensors(path)
    try:
        names = json.loads(metadata.get('class_names', '[]'))
    except ValueError:
        raise CheckpointError(f"checkpoint {os.fspath(path)}: its class_names metadata is not JSON") from None
    return {'model': sd, 'class_names': [str(name) for name in names], 'config': metadata.get('config')}


def load_model_weights(model: torch.nn.Module, path_or_state_dict: str | os.PathLike | dict, logger: logging.Logger,
                       name: str | None = None, model_type: str = 'swin') -> None:
    """Weights for --eval / predict: ours, official, {'state_dict': sd}, bare or (per family) foreign layouts,
    .pth or .safetensors; strict. Derived buffers (relative_position_index, attn_mask) always come from the model.

    name: how error messages call an already loaded dict (a path is named by itself).
    """
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        source = f"checkpoint {os.fspath(path_or_state_dict)}"
        obj = read_weights(path_or_state_dict)
    else:
        source, obj = f"checkpoint {name}" if name else "checkpoint", path_or_state_dict
    sd = extract_state_dict(obj, source, model_type)
    load_state_dict_strict(model, sd, source)
    logger.info(f"loaded model weights from {source} ({len(sd)} tensors)")
    trained, running = trained_image_size(obj), getattr(getattr(unwrap_model(model), 'patch_embed', None),
                                                        'img_size', None)
    if trained is not None and running is not None and tuple(trained) != tuple(running):
        logger.info(f"{source} was trained at {'x'.join(map(str, trained))} px (DATA.IMG_SIZE of its config); "
                    f"evaluating them at {'x'.join(map(str, running))} px (window attention is per window: the same "
                    f"weights run at any size)")


def trained_image_size(obj: Any) -> tuple[int, int] | None:
    """(H, W) of DATA.IMG_SIZE in the config a checkpoint carries (ours), None where it carries none."""
    text = obj.get('config') if isinstance(obj, dict) else None
    if not isinstance(text, str):
        return None
    try:
        size = (yaml.safe_load(text) or {}).get('DATA', {}).get('IMG_SIZE')
    except (yaml.YAMLError, AttributeError):
        return None
    if isinstance(size, int):
        return size, size
    return tuple(size) if isinstance(size, (list, tuple)) and len(size) == 2 else None


def config_for_weights(cfg_path: str | None, opts: list, weights: Any, source: str):
    """The config that rebuilds the model of ``weights`` for the tools (predict, export): ``cfg_path`` (+ opts)
    when given, else the config our checkpoints carry; a MODEL.NUM_CLASSES that neither sets (training took it
    from the class folders) comes from the weights' head."""
    saved = weights.get('config') if isinstance(weights, dict) else None
    if not cfg_path and not saved:
        raise ConfigError(f"{source} carries no config (an official or timm file?): give --cfg, the config of the "
                          f"model (a run's config.yaml or the official file)")
    config = load_config(cfg_path, opts, environ={}, saved=None if cfg_path else saved)
    head = extract_state_dict(weights, source).get('head.weight')
    if config.MODEL.NUM_CLASSES_FROM_DATA and head is not None and head.shape[0] != config.MODEL.NUM_CLASSES:
        config.defrost()
        config.MODEL.NUM_CLASSES = int(head.shape[0])
        config.freeze()
    return config
