"""Swin MLP with the official constructor arguments and state_dict keys.

Follows microsoft/Swin-Transformer ``models/swin_mlp.py``: Swin v1's layout with window attention replaced by a
spatial MLP over the tokens of each window, one per head group of channels (``spatial_mlp``, a grouped 1x1
``Conv1d`` over window tokens, official keys). Shifted blocks zero-pad the map by ``window - shift`` on the
top/left and ``shift`` on the bottom/right instead of rolling it (no mask needed), so they see
(H/window + 1) x (W/window + 1) windows. Official checkpoints (``{'model': state_dict}``) load strictly.

Windows and head groups are cut in one permute copy of the (padded) map and put back in one, where the
official code partitions, transposes and reshapes in separate copies (same results).

Any input size, as v1 (models/swin_transformer.py): at the config size nothing changes; at another size a block
keeps its built window (the spatial MLP is tied to it) and its any-size shift (``block_windows``), zero-pads the
map right/bottom to a multiple of the window, and on top of that by the shift padding, then crops back.
"""
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_

from . import swin_transformer as swin
from .swin_transformer import Mlp, PatchMerging, block_windows, takes_config_path


class SwinMLPBlock(nn.Module):
    """Swin MLP block: a (shifted) per-window spatial MLP and a channel MLP, each with a pre-norm residual.

    Args:
        dim: Input channels.
        input_resolution: (H, W) of the input map.
        num_heads: Channel groups, each with its own spatial MLP.
        window_size: Window size.
        shift_size: Shift of the windows (by padding).
        mlp_ratio: Channel MLP hidden width / ``dim``.
        drop: Dropout in the channel MLP.
        drop_path: Stochastic depth rate.
        act_layer: Activation of the channel MLP.
        norm_layer: Normalization layer.
    """

    def __init__(self, dim, input_resolution, num_heads, window_size=7, shift_size=0, mlp_ratio=4., drop=0.,
                 drop_path=0., act_layer=nn.GELU, norm_layer=nn.LayerNorm):
        super().__init__()
        self.dim, self.input_resolution, self.num_heads, self.mlp_ratio = dim, input_resolution, num_heads, mlp_ratio
        self.window_size, self.shift_size, self.any_size_shift = block_windows(input_resolution, window_size,
                                                                               shift_size)
        # left, right, top, bottom
        self.padding = [self.window_size - self.shift_size, self.shift_size,
                        self.window_size - self.shift_size, self.shift_size]

        self.norm1 = norm_layer(dim)
        tokens = self.num_heads * self.window_size ** 2
        self.spatial_mlp = nn.Conv1d(tokens, tokens, kernel_size=1, groups=self.num_heads)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=drop)

    def spatial(self, x):
        """The spatial MLP over the windows of x: (B, H, W, C) -> (B, H, W, C), H and W multiples of the window."""
        B, H, W, C = x.shape
        ws, heads = self.window_size, self.num_heads
        nh, nw, d = H // ws, W // ws, C // heads
        # windows and head groups in one copy: (B * nW, heads * N, C / heads), token index = head * N + position
        x = x.view(B, nh, ws, nw, ws, heads, d).permute(0, 1, 3, 5, 2, 4, 6).reshape(-1, heads * ws * ws, d)
        x = self.spatial_mlp(x)
        return x.view(B, nh, nw, heads, ws, ws, d).permute(0, 1, 4, 2, 5, 3, 6).reshape(B, H, W, C)

    def forward(self, x, size=None):
        """x: (B, H * W, C) -> (B, H * W, C); size: the map's (H, W), None for ``input_resolution``."""
        if not takes_config_path(size, self.input_resolution, self.window_size):
            return self.forward_any_size(x, size or self.input_resolution)
        H, W = self.input_resolution
        B, L, C = x.shape
        assert L == H * W, f'input has {L} tokens, expected {H}x{W}'

        shortcut = x
        x = self.norm1(x).view(B, H, W, C)
        if self.shift_size > 0:
            left, right, top, bottom = self.padding
            x = self.spatial(F.pad(x, [0, 0, left, right, top, bottom]))[:, top:top + H, left:left + W]
        else:
            x = self.spatial(x)
        x = shortcut + self.drop_path(x.reshape(B, L, C))
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def forward_any_size(self, x, size):
        """x: (B, H * W, C) of an (H, W) map of any size -> (B, H * W, C): the map zero-padded right/bottom to a
        multiple of the window, plus the shift padding of ``any_size_shift`` (window - shift before, shift after)
        in one pad, the spatial MLP, the (H, W) map cut back out."""
        H, W = size
        B, L, C = x.shape
        assert L == H * W, f'input has {L} tokens, expected {H}x{W}'
        ws, shift = self.window_size, self.any_size_shift
        before = ws - shift if shift > 0 else 0
        after_h, after_w = (-H % ws, -W % ws) if shift == 0 else (shift + -H % ws, shift + -W % ws)

        shortcut = x
        x = self.norm1(x).view(B, H, W, C)
        if before or after_h or after_w:
            x = F.pad(x, [0, 0, before, after_w, before, after_h])
        x = self.spatial(x)[:, before:before + H, before:before + W]
        x = shortcut + self.drop_path(x.reshape(B, L, C))
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def extra_repr(self):
        return f'dim={self.dim}, input_resolution={self.input_resolution}, num_heads={self.num_heads}, ' \
               f'window_size={self.window_size}, shift_size={self.shift_size}, mlp_ratio={self.mlp_ratio}'

    def flops(self):
        H, W = self.input_resolution
        flops = self.dim * H * W  # norm1
        if self.shift_size > 0:  # the padded map holds one more window per side
            nW = (H / self.window_size + 1) * (W / self.window_size + 1)
        else:
            nW = H * W / self.window_size / self.window_size
        flops += nW * self.dim * (self.window_size * self.window_size) * (self.window_size * self.window_size)
        flops += 2 * H * W * self.dim * self.dim * self.mlp_ratio  # mlp
        flops += self.dim * H * W  # norm2
        return flops


class BasicLayer(swin.BasicLayer):
    """One stage: ``depth`` Swin MLP blocks alternating unshifted / shifted windows, then an optional downsample.

    The constructor is Swin MLP's; ``forward`` (with gradient checkpointing), ``flops`` and ``extra_repr`` are v1's.
    """

    def __init__(self, dim, input_resolution, depth, num_heads, window_size, mlp_ratio=4., drop=0., drop_path=0.,
                 norm_layer=nn.LayerNorm, downsample=None, use_checkpoint=False):
        nn.Module.__init__(self)  # not v1's constructor: it would build v1 blocks
        self.dim = dim
        self.input_resolution = input_resolution
        self.depth = depth
        self.use_checkpoint = use_checkpoint
        self.blocks = nn.ModuleList([
            SwinMLPBlock(
                dim=dim, input_resolution=input_resolution, num_heads=num_heads, window_size=window_size,
                shift_size=0 if (i % 2 == 0) else window_size // 2, mlp_ratio=mlp_ratio, drop=drop,
                drop_path=drop_path[i] if isinstance(drop_path, list) else drop_path, norm_layer=norm_layer)
            for i in range(depth)])
        self.downsample = downsample(input_resolution, dim=dim, norm_layer=norm_layer) if downsample else None


class SwinMLP(swin.SwinTransformer):
    """Swin MLP: Swin Transformer v1 with each window attention replaced by grouped spatial MLPs.

    The constructor is Swin MLP's (official signature and init); the stage layout is v1's, so ``forward``,
    ``forward_features``, ``flops`` and the weight-decay lists are v1's methods.

    Args:
        img_size: Input image size (int or (H, W)).
        patch_size: Patch size.
        in_chans: Input channels.
        num_classes: Classifier outputs (0: no head).
        embed_dim: Channels of the first stage (doubled at each stage).
        depths: Blocks per stage.
        num_heads: Channel groups of the spatial MLP per stage ("C24" = 24 channels per group in stage 0).
        window_size: Window size.
        mlp_ratio: Channel MLP hidden width / embedding width.
        drop_rate: Dropout after the embedding and in the channel MLP.
        drop_path_rate: Stochastic depth rate, increasing linearly over the blocks.
        norm_layer: Normalization layer.
        ape: Add an absolute position embedding to the patch embedding.
        patch_norm: LayerNorm after the patch embedding.
        use_checkpoint: Activation recomputation per block (torch.utils.checkpoint; saves memory).
        pad_windows: Accept stage maps that are not multiples of the window and pad them (evaluation at another
            resolution); False raises ConfigError.
    """

    def __init__(self, img_size=224, patch_size=4, in_chans=3, num_classes=1000, embed_dim=96, depths=(2, 2, 6, 2),
                 num_heads=(3, 6, 12, 24), window_size=7, mlp_ratio=4., drop_rate=0., drop_path_rate=0.1,
                 norm_layer=nn.LayerNorm, ape=False, patch_norm=True, use_checkpoint=False, pad_windows=False,
                 **kwargs):
        nn.Module.__init__(self)  # not v1's constructor: it would build v1 stages
        self._init_sizes(num_classes, depths, embed_dim, ape, patch_norm, mlp_ratio)
        self._init_embedding(img_size, patch_size, in_chans, norm_layer, drop_rate, window_size, node='MODEL.SWIN_MLP',
                             pad_windows=pad_windows)
        self.layers = nn.ModuleList(
            BasicLayer(**stage, num_heads=num_heads[i], window_size=window_size, mlp_ratio=self.mlp_ratio,
                       drop=drop_rate, norm_layer=norm_layer, use_checkpoint=use_checkpoint)
            for i, stage in enumerate(self._stages(depths, drop_path_rate, PatchMerging)))

        self._init_head(norm_layer)

        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        """v1's init, and the spatial MLPs (Conv1d) like the linear layers."""
        if isinstance(m, (nn.Linear, nn.Conv1d)):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)
