"""Swin weights (MODEL.TYPE swin, and swinv2 / swin_mlp): the timm layout, and resizing pretrained tensors to a
new window / image.

Layouts: ours is the official microsoft/Swin-Transformer one (PatchMerging at the END of stage i as
``layers.{i}.downsample``, classifier ``head``). timm >= 0.9 puts PatchMerging at the START of the next stage
(``layers.{i+1}.downsample``), names the classifier ``head.fc`` and keeps ``relative_position_index`` and
``attn_mask`` out of its state_dict (non-persistent buffers). Older timm used the official layout.
"""
from __future__ import annotations

import logging
import math
import re
from collections import OrderedDict

import torch
import torch.nn.functional as F

from errors import CheckpointError

from .weights import StateDict, WeightFamily, is_derived, register_family

_DOWNSAMPLE = re.compile(r'^layers\.(\d+)\.downsample\.')


def _downsample_stages(sd):
    return {int(m.group(1)) for m in map(_DOWNSAMPLE.match, sd) if m}


def is_timm_state_dict(sd: StateDict) -> bool:
    """True for the timm >= 0.9 layout (head.fc, or PatchMerging at the start of stage i+1, none in stage 0)."""
    if any(key.startswith('head.fc.') for key in sd):
        return True
    stages = _downsample_stages(sd)
    return bool(stages) and 0 not in stages


def _shift_downsample(key, offset):
    return _DOWNSAMPLE.sub(lambda m: f'layers.{int(m.group(1)) + offset}.downsample.', key)


def timm_to_official(sd: StateDict) -> OrderedDict[str, torch.Tensor]:
    """timm >= 0.9 key layout -> official; tensors are shared, not copied. Buffers timm omits stay absent."""
    if 0 in _downsample_stages(sd):
        raise CheckpointError("timm_to_official: layers.0.downsample is present, the weights are already in the "
                              "official layout")
    out = OrderedDict()
    for key, value in sd.items():
        key = _shift_downsample(key, -1)
        out['head.' + key[len('head.fc.'):] if key.startswith('head.fc.') else key] = value
    return out


def official_to_timm(sd: StateDict) -> OrderedDict[str, torch.Tensor]:
    """Official key layout -> timm >= 0.9 (a state_dict timm's SwinTransformer loads strictly).

    relative_position_index / attn_mask are dropped (timm computes them, they are not in its state_dict), so
    official -> timm -> official gives back every parameter and drops only those derived buffers.
    """
    if any(key.startswith('head.fc.') for key in sd):
        raise CheckpointError("official_to_timm: head.fc.* is present, the weights are already in the timm layout")
    out = OrderedDict()
    for key, value in sd.items():
        if is_derived(key):
            continue
        key = _shift_downsample(key, +1)
        out['head.fc.' + key[len('head.'):] if key.startswith('head.') else key] = value
    return out


def resize_bias_table(table: torch.Tensor, rows: int) -> torch.Tensor:
    """(2W-1)^2 x heads -> rows x heads by bicubic interpolation of each head's (2W-1) x (2W-1) grid."""
    old_side, new_side, heads = math.isqrt(table.shape[0]), math.isqrt(rows), table.shape[1]
    grid = table.float().t().reshape(1, heads, old_side, old_side)
    grid = F.interpolate(grid, size=(new_side, new_side), mode='bicubic', align_corners=False)
    return grid.reshape(heads, rows).t().contiguous().to(table.dtype)


def resize_pos_embed(embed: torch.Tensor, tokens: int) -> torch.Tensor:
    """1 x (S*S) x C absolute position embedding -> 1 x tokens x C, bicubic on the S x S patch grid."""
    old_side, new_side, channels = math.isqrt(embed.shape[1]), math.isqrt(tokens), embed.shape[2]
    grid = embed.float().reshape(1, old_side, old_side, channels).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new_side, new_side), mode='bicubic', align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(1, tokens, channels).to(embed.dtype)


class SwinWeights(WeightFamily):
    """timm's layout is recognized and converted; bias tables and the absolute position embedding are resized."""

    def to_official(self, sd):
        return timm_to_official(sd) if is_timm_state_dict(sd) else sd

    def adapt_pretrained(self, sd: dict[str, torch.Tensor], model_sd: StateDict,
                         logger: logging.Logger) -> list[str]:
        resized = []
        for key, value in list(sd.items()):
            target = model_sd.get(key)
            if target is None or target.shape == value.shape:
                continue
            if key.endswith('relative_position_bias_table') and value.shape[1] == target.shape[1]:
                sd[key] = resize_bias_table(value, target.shape[0])
            elif key == 'absolute_pos_embed' and value.shape[2] == target.shape[2]:
                sd[key] = resize_pos_embed(value, target.shape[1])
            else:
                continue
            resized.append(f"{key} {tuple(value.shape)}→{tuple(target.shape)}")
        return resized


register_family('swin', SwinWeights())
# V2: timm's swinv2_* files move the same keys (and leave out relative_coords_table, a derived buffer rebuilt for
# the model's window like the index and the masks); the continuous position bias MLP fits any window size as it is.
register_family('swinv2', SwinWeights())
# Swin MLP: official layout only (timm has none); spatial_mlp is tied to the window size, so it must match.
register_family('swin_mlp', SwinWeights())
