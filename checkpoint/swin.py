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
from timm.layers import resample_abs_pos_embed, resize_rel_pos_bias_table_levit

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

    timm's swin_transformer.checkpoint_filter_fn moves the same keys but needs a timm model and resizes the bias
    tables by its own (non-official) rule; this needs no model and changes no tensor.

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


# The official load_pretrained resizes both tables with plain bicubic interpolation (align_corners False, no
# antialiasing). timm gives exactly that (float32 math, the tensor's dtype back) with antialias=False: its default
# antialias=True uses another bicubic kernel, and resize_rel_pos_bias_table (BEiT's geometric spacing, what timm's
# own Swin checkpoint filter calls) gives another table; resize_rel_pos_bias_table_simple matches only in float32
# (it interpolates in the table's dtype). tests/test_checkpoint.py measures these differences.
def resize_bias_table(table: torch.Tensor, rows: int) -> torch.Tensor:
    """(2W-1)^2 x heads -> rows x heads by bicubic interpolation of each head's (2W-1) x (2W-1) grid."""
    return resize_rel_pos_bias_table_levit(table.contiguous(), (rows, table.shape[1]), antialias=False).contiguous()


def resize_pos_embed(embed: torch.Tensor, tokens: int) -> torch.Tensor:
    """1 x (S*S) x C absolute position embedding -> 1 x tokens x C, bicubic on the S x S patch grid."""
    side = math.isqrt(tokens)
    return resample_abs_pos_embed(embed, [side, side], num_prefix_tokens=0, antialias=False)


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
# Swin MLP: the v1 family as it is. timm has no Swin MLP, so real files are in the official layout and pass
# to_official unchanged (one in timm's v1 key layout would still be converted; scripts/convert_checkpoint.py
# refuses --to timm); adapt_pretrained resizes absolute_pos_embed (MODEL.SWIN_MLP.APE) to a new image size.
# spatial_mlp is tied to the window size: a pretrained window must match the model's (check_fit names it).
register_family('swin_mlp', SwinWeights())
