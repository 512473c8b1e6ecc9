"""The optimizer of a run over decay / no-decay parameter groups, optional layer-wise LR decay: AdamW (fused or
foreach) and SGD (Nesterov) as officially, and every other optimizer timm's registry knows (lamb, lion, adopt,
...; ``timm.optim.list_optimizers()``) on the same groups through ``timm.optim.create_optimizer_v2``.

The learning rate set here is ``TRAIN.EFFECTIVE_LR``; the scheduler (lr_scheduler.py) overwrites every group's
lr at each step, multiplied by the group's ``lr_scale`` when layer decay is on.
"""
from __future__ import annotations

import importlib.util
import logging
from collections.abc import Collection, Sequence

import torch
from timm.optim import create_optimizer_v2, get_optimizer_info, list_optimizers
from yacs.config import CfgNode

from errors import ConfigError
from utils import unwrap_model

OWN_OPTIMIZERS = ('adamw', 'sgd')  # built here, as the official code builds them
# the official --optim fused_lamb is apex's FusedLAMB: timm's 'fusedlamb' when apex is there, else timm's Lamb
ALIASES = {'fused_lamb': 'fusedlamb'}


def optimizer_name(value: str) -> str:
    """TRAIN.OPTIMIZER.NAME as the name this module builds (lower-cased, aliases resolved); ConfigError (one line)
    for a name neither this module nor timm's registry knows."""
    name = ALIASES.get(value.lower(), value.lower())
    if name in OWN_OPTIMIZERS or name in list_optimizers():
        return name
    close = [known for known in list_optimizers() if known.startswith(name[:3])][:8]
    hint = f"; close: {', '.join(close)}" if close else ""
    raise ConfigError(f"TRAIN.OPTIMIZER.NAME {value!r} is unknown: choose adamw, sgd or a name of "
                      f"timm.optim.list_optimizers() (lamb, lion, adopt, ...){hint}")


def build_optimizer(config: CfgNode, model: torch.nn.Module,
                    logger: logging.Logger | None = None) -> torch.optim.Optimizer:
    """The TRAIN.OPTIMIZER.NAME optimizer for ``model`` (AdamW by default); a DDP or torch.compile wrapper around
    it is fine."""
    name = optimizer_name(config.TRAIN.OPTIMIZER.NAME)
    if name == 'fusedlamb' and importlib.util.find_spec('apex') is None:
        name = 'lamb'
        if logger is not None:
            logger.warning("TRAIN.OPTIMIZER.NAME fused_lamb: apex is not importable, so timm's Lamb is used "
                           "(the same update, not fused)")

    # Names must be the official ones ("absolute_pos_embed", not "module._orig_mod.absolute_pos_embed")
    # for the skip lists and the layer ids to match.
    model = unwrap_model(model)
    skip = set(model.no_weight_decay()) if hasattr(model, 'no_weight_decay') else set()
    skip_keywords = set(model.no_weight_decay_keywords()) if hasattr(model, 'no_weight_decay_keywords') else set()
    groups, names = param_groups(model, config.TRAIN.WEIGHT_DECAY, skip, skip_keywords,
                                 config.TRAIN.LAYER_DECAY, stage_depths(model))
    if logger is not None:
        _log_groups(logger, groups, names)

    lr = config.TRAIN.EFFECTIVE_LR
    if name == 'sgd':
        return torch.optim.SGD(groups, lr=lr, momentum=config.TRAIN.OPTIMIZER.MOMENTUM, nesterov=True,
                               weight_decay=config.TRAIN.WEIGHT_DECAY)
    if name == 'adamw':
        kernel = adamw_kernel({p.device.type for group in groups for p in group['params']})
        return torch.optim.AdamW(groups, lr=lr, eps=config.TRAIN.OPTIMIZER.EPS,
                                 betas=tuple(config.TRAIN.OPTIMIZER.BETAS), weight_decay=config.TRAIN.WEIGHT_DECAY,
                                 **kernel)
    return timm_optimizer(name, groups, lr, config)


def timm_optimizer(name: str, groups: list[dict], lr: float, config: CfgNode) -> torch.optim.Optimizer:
    """timm's optimizer ``name`` over our groups (their weight decay and lr_scale as they are), given
    TRAIN.OPTIMIZER.EPS / BETAS / MOMENTUM where it takes them; a failure to build is one ConfigError line."""
    info = get_optimizer_info(name)
    options = {}
    if info.has_eps:
        options['eps'] = config.TRAIN.OPTIMIZER.EPS
    if info.has_betas:
        options['betas'] = tuple(config.TRAIN.OPTIMIZER.BETAS)[:info.num_betas or 2]
    try:
        return create_optimizer_v2(groups, opt=name, lr=lr, weight_decay=config.TRAIN.WEIGHT_DECAY,
                                   momentum=config.TRAIN.OPTIMIZER.MOMENTUM, **options)
    except (ImportError, ValueError, TypeError, AssertionError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"TRAIN.OPTIMIZER.NAME {config.TRAIN.OPTIMIZER.NAME!r}: timm could not build it "
                          f"({reason})") from None


def adamw_kernel(device_types: Collection[str]) -> dict[str, bool]:
    """AdamW's implementation for parameters on these device types (``torch.optim.AdamW`` keyword arguments):
    the fused kernel when they are all on CUDA, the fastest there; elsewhere the multi-tensor (foreach) path."""
    return {'fused': True} if set(device_types) == {'cuda'} else {'foreach': True}


def skip_weight_decay(name: str, param: torch.Tensor, skip: Collection[str] = (),
                      skip_keywords: Collection[str] = ()) -> bool:
    """True for parameters trained without weight decay: norms, biases, position tables (official rule)."""
    return (param.ndim <= 1 or name.endswith('.bias') or name in skip
            or any(keyword in name for keyword in skip_keywords))


def stage_depths(model: torch.nn.Module) -> list[int]:
    """Blocks per stage of a Swin model of any family (v1, V2, MLP), read from the model itself."""
    return [len(layer.blocks) for layer in getattr(model, 'layers', ())]


def swin_layer_id(name: str, depths: Sequence[int]) -> int:
    """Layer id of a Swin parameter for layer-wise LR decay: 0 (patch embedding) .. sum(depths) + 1 (last).

    The names are those of every family (v1, V2, MLP): patch_embed, layers.i.blocks.j, layers.i.downsample, head.
    The ids are those of the official SimMIM fine-tuning (``get_swin_layer`` in the official optimizer.py, the
    only official user of TRAIN.LAYER_DECAY): ``absolute_pos_embed`` falls in the LAST group with the final
    norm and the head (the full learning rate), ``mask_token`` in the first.
    """
    num_layers = sum(depths)
    if name.startswith(('patch_embed', 'mask_token')):
        return 0
    if name.startswith('layers.'):
        parts = name.split('.')
        stage = int(parts[1])
        if parts[2] == 'blocks':
            return sum(depths[:stage]) + int(parts[3]) + 1
        return sum(depths[:stage + 1])  # the downsample closing a stage goes with its last block
    return num_layers + 1  # absolute_pos_embed, final norm, head


def param_groups(model: torch.nn.Module, weight_decay: float, skip: Collection[str] = (),
                 skip_keywords: Collection[str] = (), layer_decay: float = 1.0,
                 depths: Sequence[int] = ()) -> tuple[list[dict], list[list[str]]]:
    """Parameter groups for the optimizer, and the parameter names of each group (for logging).

    Without layer decay: [decay, no-decay]. With it: one decay and one no-decay group per layer id, each with
    ``lr_scale = layer_decay ** (num_layers + 1 - layer_id)``. Frozen parameters are left out; empty groups too.
    """
    use_layer_decay = layer_decay != 1.0
    num_layers = sum(depths)
    groups = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = skip_weight_decay(name, param, skip, skip_keywords)
        layer_id = swin_layer_id(name, depths) if use_layer_decay else None
        key = (layer_id, no_decay)
        if key not in groups:
            group = {'params': [], 'weight_decay': 0. if no_decay else weight_decay}
            if use_layer_decay:
                group['lr_scale'] = layer_decay ** (num_layers + 1 - layer_id)
            groups[key] = (group, [])
        groups[key][0]['params'].append(param)
        groups[key][1].append(name)
    # by layer, and decay before no-decay inside a layer (the official order)
    ordered = [groups[key] for key in sorted(groups, key=lambda k: (k[0] or 0, k[1]))]
    return [group for group, _ in ordered], [names for _, names in ordered]


def _log_groups(logger, groups, names):
    for group, group_names in zip(groups, names, strict=True):
        scale = f", lr_scale {group['lr_scale']:.4g}" if 'lr_scale' in group else ''
        count = sum(p.numel() for p in group['params'])
        logger.info(f"param group (weight_decay {group['weight_decay']}{scale}): "
                    f"{len(group_names)} tensors, {count} parameters")
        logger.debug(f"  {', '.join(group_names)}")


def freeze_parameters(config: CfgNode, model: torch.nn.Module, logger: logging.Logger | None = None) -> list[str]:
    """Partial fine-tuning (TRAIN.FREEZE, checked by config_checks): turn off ``requires_grad`` of what the config
    freezes (frozen stages imply the patch embedding before them, as detection backbones' ``frozen_stages``),
    before the optimizer is built, so frozen parameters get no gradient, no optimizer state and no weight
    decay (param_groups leaves them out); Swin has no BatchNorm, so nothing else needs freezing. Logs one line
    listing what trains. Returns the names of the frozen parameters."""
    freeze = config.TRAIN.FREEZE
    frozen_stages = tuple(f'layers.{i}.' for i in range(freeze.STAGES))
    frozen, trained = [], []
    for name, param in unwrap_model(model).named_parameters():
        if ((freeze.ALL_BUT_HEAD and not name.startswith('head.'))
                or ((freeze.PATCH_EMBED or freeze.STAGES) and name.startswith(('patch_embed.', 'absolute_pos_embed')))
                or name.startswith(frozen_stages)):
            param.requires_grad_(False)
            frozen.append(name)
        elif param.requires_grad:
            trained.append((name, param.numel()))
    if frozen and logger is not None:
        count = sum(numel for _, numel in trained)
        logger.info(f"partial fine-tuning (TRAIN.FREEZE): training {', '.join(_modules(n for n, _ in trained))} "
                    f"({count} parameters); {len(frozen)} tensors frozen")
    return frozen


def _modules(names):
    """The modules that parameter names belong to, in order: 'layers.2', 'norm', 'head' (stages by number)."""
    seen = {}
    for name in names:
        parts = name.split('.')
        seen.setdefault('.'.join(parts[:2]) if parts[0] == 'layers' else parts[0], None)
    return list(seen)
