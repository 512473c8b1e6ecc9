"""Swin Transformer V2 with the official constructor arguments and state_dict keys.

Follows microsoft/Swin-Transformer ``models/swin_transformer_v2.py`` (https://arxiv.org/abs/2111.09883):
residual post-norm (``x + norm(attn(x))``), scaled cosine attention with a learnable per-head logit scale clamped
at log(100), a continuous relative position bias (a 2-layer MLP on log-spaced relative coordinates, squashed to
16 * sigmoid), q/v biases without a k bias, PatchMerging as reduction then norm, and ``pretrained_window_sizes``
(the window each stage was pretrained with normalizes the coordinates, so a larger window extrapolates). Buffers
(``relative_coords_table``, ``relative_position_index``, ``attn_mask``) are persistent like the official ones,
so official checkpoints (``{'model': state_dict}``) load with ``strict=True``; they depend only on the
constructor arguments.

How attention is computed differs (same results), as in v1 (models/swin_transformer.py):

* One permute copy cuts the qkv map into windows and heads; q and k are normalized there and the clamped
  logit scale is folded into q's normalization, so the logits are one ``q @ k^T`` with scale 1.
* The position bias MLP runs once per block call on the (2Wh-1) x (2Ww-1) coordinate table (16 * sigmoid is
  taken on the table, before the gather), and the bias plus the shift mask form ONE additive mask shared by
  every image of the batch.
* ``fused_attn=True`` hands q, k, v and that mask to ``scaled_dot_product_attention`` (``scale=1.0``);
  ``fused_attn=False`` is the explicit softmax path. Both give the same outputs and gradients.

Any input size works as in v1 (its module docstring): at the config size nothing changes; at another size a block
zero-pads its map right/bottom to a multiple of its window, shifts with a cached per-size mask and crops back,
and PatchMerging pads an odd side. The continuous position bias is per window: the same at every size.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, to_2tuple

from . import swin_transformer as swin
from .cpu_linear import Linear, linear
from .swin_transformer import (
    Mlp,
    _sdpa_is_faster,
    aligned_rows,
    relative_position_index,
    takes_config_path,
)

# The logit scale is clamped at log(1 / 0.01): a temperature of at least 0.01 (official).
_MAX_LOG_SCALE = math.log(1. / 0.01)


def relative_coords_table(window_size, pretrained_window_size=(0, 0)):
    """(1, 2*Wh-1, 2*Ww-1, 2) relative coordinates, scaled to [-8, 8] by the pretrained window (or this one)
    and log-spaced: sign(x) * log2(1 + |x|) / 3. A side of 1 divides by 1, not 0 (the official code gives NaN).
    """
    wh, ww = window_size
    norm = pretrained_window_size if pretrained_window_size[0] > 0 else window_size
    h = torch.arange(-(wh - 1), wh, dtype=torch.float32) / max(norm[0] - 1, 1)
    w = torch.arange(-(ww - 1), ww, dtype=torch.float32) / max(norm[1] - 1, 1)
    table = torch.stack(torch.meshgrid(h, w, indexing='ij'), dim=-1) * 8  # 2Wh-1, 2Ww-1, 2
    return (torch.sign(table) * torch.log2(table.abs() + 1.0) / math.log2(8)).unsqueeze(0)


class WindowAttention(nn.Module):
    """Window based multi-head scaled cosine attention with a continuous relative position bias (V2).

    ``forward`` takes the (already shifted) (B, H, W, C) map and returns one, like v1's module.

    Args:
        dim: Input channels.
        window_size: (Wh, Ww) of a window.
        num_heads: Attention heads.
        qkv_bias: Learnable bias for query and value (the key has none).
        attn_drop: Dropout on the attention weights.
        proj_drop: Dropout on the output.
        pretrained_window_size: (Wh, Ww) of the window in pre-training ((0, 0): this window).
        fused_attn: Use ``scaled_dot_product_attention`` (False: the explicit softmax path).
    """

    def __init__(self, dim, window_size, num_heads, qkv_bias=True, attn_drop=0., proj_drop=0.,
                 pretrained_window_size=(0, 0), fused_attn=True):
        super().__init__()
        self.dim = dim
        self.window_size = to_2tuple(window_size)
        self.pretrained_window_size = to_2tuple(pretrained_window_size)
        self.num_heads = num_heads
        self.fused_attn = fused_attn

        self.logit_scale = nn.Parameter(torch.log(10 * torch.ones((num_heads, 1, 1))))
        # MLP to generate the continuous relative position bias
        self.cpb_mlp = nn.Sequential(nn.Linear(2, 512, bias=True), nn.ReLU(inplace=True),
                                     nn.Linear(512, num_heads, bias=False))
        self.register_buffer('relative_coords_table',
                             relative_coords_table(self.window_size, self.pretrained_window_size))
        self.register_buffer('relative_position_index', relative_position_index(self.window_size))

        self.qkv = Linear(dim, dim * 3, bias=False)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.q_bias = None
            self.v_bias = None
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def position_bias(self):
        """(heads, N, N) continuous relative position bias, 16 * sigmoid(cpb_mlp(coordinates))."""
        N = self.window_size[0] * self.window_size[1]
        table = 16 * torch.sigmoid(self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads))
        return table[self.relative_position_index.view(-1)].view(N, N, self.num_heads).permute(2, 0, 1)

    def attention_mask(self, mask=None, dtype=None):
        """Position bias plus the optional (nW, N, N) shift mask: (1, heads or nW * heads, N, N).

        Built once per forward and shared by every image of the batch, in v1's ``aligned_rows`` layout (what
        SDPA's memory-efficient kernel takes without a copy, for every window size).
        """
        bias = self.position_bias()
        if mask is not None:
            bias = (mask.unsqueeze(1) + bias).flatten(0, 1)  # nW * heads, N, N
        return aligned_rows(bias.unsqueeze(0).to(dtype or bias.dtype))

    def forward(self, x, mask=None):
        """x: (B, H, W, C) with H, W multiples of the window; mask: (nW, N, N) shift mask or None."""
        B, H, W, C = x.shape
        wh, ww = self.window_size
        nh, nw = H // wh, W // ww
        heads, head_dim = self.num_heads, C // self.num_heads
        bias = None
        if self.q_bias is not None:
            bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        # cut the qkv map into windows and heads in one copy: 3, B, nW, heads, N, head_dim
        qkv = linear(x, self.qkv.weight, bias).view(B, nh, wh, nw, ww, 3, heads, head_dim)
        q, k, v = qkv.permute(5, 0, 1, 3, 6, 2, 4, 7).reshape(3, B, nh * nw, heads, wh * ww, head_dim).unbind(0)
        # cosine similarity times the clamped per-head scale: normalize k, and q with the scale folded in
        scale = torch.clamp(self.logit_scale, max=_MAX_LOG_SCALE).exp()  # heads, 1, 1
        q = q * (scale / torch.linalg.vector_norm(q, dim=-1, keepdim=True).clamp_min(1e-12))
        k = k / torch.linalg.vector_norm(k, dim=-1, keepdim=True).clamp_min(1e-12)
        # as a batch of (B * nW, heads) without a shift mask, of (B, nW * heads) with one: the mask broadcasts
        q, k, v = (t.flatten(0, 1) if mask is None else t.flatten(1, 2) for t in (q, k, v))

        if self.fused_attn and _sdpa_is_faster(x, self.cpb_mlp[0].weight):
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=self.attention_mask(mask, q.dtype), scale=1.0,
                                               dropout_p=self.attn_drop.p if self.training else 0.)
        else:
            attn = q @ k.transpose(-2, -1) + self.attention_mask(mask)
            x = self.attn_drop(attn.softmax(dim=-1)) @ v

        # windows and heads back to the (B, H, W, C) map in one copy (proj is per token)
        x = x.reshape(B, nh, nw, heads, wh, ww, head_dim).permute(0, 1, 4, 2, 5, 3, 6).reshape(B, H, W, C)
        return self.proj_drop(self.proj(x))

    def extra_repr(self):
        return f'dim={self.dim}, window_size={self.window_size}, ' \
               f'pretrained_window_size={self.pretrained_window_size}, num_heads={self.num_heads}, ' \
               f'fused_attn={self.fused_attn}'

    def flops(self, N):
        """Multiply-accumulates for one window of N tokens (official count: the bias MLP is not counted)."""
        flops = N * self.dim * 3 * self.dim  # qkv
        flops += self.num_heads * N * (self.dim // self.num_heads) * N  # q @ k^T
        flops += self.num_heads * N * N * (self.dim // self.num_heads)  # attn @ v
        flops += N * self.dim * self.dim  # proj
        return flops


class SwinTransformerBlock(swin.SwinTransformerBlock):
    """Swin Transformer V2 block: (shifted) window attention and an MLP, each normalized AFTER the branch
    (``x + drop_path(norm(f(x)))``). A map not larger than the window is one unshifted window (official).

    The constructor is V2's (official signature); ``flops`` and ``extra_repr`` are v1's (same counts).
    """

    def __init__(self, dim, input_resolution, num_heads, window_size=7, shift_size=0, mlp_ratio=4., qkv_bias=True,
                 drop=0., attn_drop=0., drop_path=0., act_layer=nn.GELU, norm_layer=nn.LayerNorm,
                 pretrained_window_size=0, fused_attn=True):
        nn.Module.__init__(self)  # not v1's constructor: it would build v1's attention
        self.dim, self.input_resolution, self.num_heads, self.mlp_ratio = dim, input_resolution, num_heads, mlp_ratio
        self.init_windows(window_size, shift_size)

        self.norm1 = norm_layer(dim)
        self.attn = WindowAttention(dim, window_size=self.window_size, num_heads=num_heads, qkv_bias=qkv_bias,
                                    attn_drop=attn_drop, proj_drop=drop,
                                    pretrained_window_size=to_2tuple(pretrained_window_size), fused_attn=fused_attn)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=drop)

        self.register_shift_mask()

    def forward(self, x, size=None):
        """x: (B, H * W, C) -> (B, H * W, C); size: the map's (H, W), None for ``input_resolution``."""
        if not takes_config_path(size, self.input_resolution, self.window_size):
            return self.forward_any_size(x, size or self.input_resolution)
        H, W = self.input_resolution
        B, L, C = x.shape
        assert L == H * W, f'input has {L} tokens, expected {H}x{W}'

        shortcut = x
        x = x.view(B, H, W, C)
        if self.shift_size > 0:
            x = torch.roll(x, shifts=(-self.shift_size, -self.shift_size), dims=(1, 2))
        x = self.attn(x, mask=self.attn_mask)
        if self.shift_size > 0:
            x = torch.roll(x, shifts=(self.shift_size, self.shift_size), dims=(1, 2))
        x = shortcut + self.drop_path(self.norm1(x.view(B, L, C)))
        return x + self.drop_path(self.norm2(self.mlp(x)))

    def forward_any_size(self, x, size):
        """x: (B, H * W, C) of an (H, W) map of any size -> (B, H * W, C): v1's ``windowed_attention`` (pad,
        shift with the cached mask, crop) on the un-normed map, then V2's post-norm residuals."""
        H, W = size
        B, L, C = x.shape
        assert L == H * W, f'input has {L} tokens, expected {H}x{W}'
        x = x + self.drop_path(self.norm1(self.windowed_attention(x.view(B, H, W, C)).reshape(B, L, C)))
        return x + self.drop_path(self.norm2(self.mlp(x)))


class PatchMerging(swin.PatchMerging):
    """Merge each 2x2 patch group: (B, H*W, C) -> (B, H/2*W/2, 2C); V2 reduces first, then normalizes 2C."""

    def __init__(self, input_resolution, dim, norm_layer=nn.LayerNorm):
        super().__init__(input_resolution, dim, norm_layer)
        self.norm = norm_layer(2 * dim)  # same key (norm.*), V2's size

    def forward(self, x, size=None):
        return self.norm(self.reduction(self.merge(x, size)))

    def flops(self):
        H, W = self.input_resolution
        flops = (H // 2) * (W // 2) * 4 * self.dim * 2 * self.dim
        flops += H * W * self.dim // 2  # the norm, counted as officially
        return flops


class BasicLayer(swin.BasicLayer):
    """One stage: ``depth`` V2 blocks alternating unshifted / shifted windows, then an optional downsample.

    The constructor is V2's; ``forward`` (with gradient checkpointing), ``flops`` and ``extra_repr`` are v1's.
    """

    def __init__(self, dim, input_resolution, depth, num_heads, window_size, mlp_ratio=4., qkv_bias=True, drop=0.,
                 attn_drop=0., drop_path=0., norm_layer=nn.LayerNorm, downsample=None, use_checkpoint=False,
                 pretrained_window_size=0, fused_attn=True):
        nn.Module.__init__(self)  # not v1's constructor: it would build v1 blocks
        self.dim = dim
        self.input_resolution = input_resolution
        self.depth = depth
        self.use_checkpoint = use_checkpoint
        self.blocks = nn.ModuleList([
            SwinTransformerBlock(
                dim=dim, input_resolution=input_resolution, num_heads=num_heads, window_size=window_size,
                shift_size=0 if (i % 2 == 0) else window_size // 2, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                drop=drop, attn_drop=attn_drop, drop_path=drop_path[i] if isinstance(drop_path, list) else drop_path,
                norm_layer=norm_layer, pretrained_window_size=pretrained_window_size, fused_attn=fused_attn)
            for i in range(depth)])
        self.downsample = downsample(input_resolution, dim=dim, norm_layer=norm_layer) if downsample else None

    def _init_respostnorm(self):
        """Post-norms start at zero (official init): every residual branch starts as zero."""
        for blk in self.blocks:
            for norm in (blk.norm1, blk.norm2):
                nn.init.constant_(norm.bias, 0)
                nn.init.constant_(norm.weight, 0)


class SwinTransformerV2(swin.SwinTransformer):
    """Swin Transformer V2 (https://arxiv.org/abs/2111.09883), official arguments and state_dict keys.

    The constructor is V2's (official signature and init); the stage layout is v1's, so ``forward``,
    ``forward_features``, ``flops`` and ``no_weight_decay`` are v1's methods.

    Args:
        img_size: Input image size (int or (H, W)).
        patch_size: Patch size.
        in_chans: Input channels.
        num_classes: Classifier outputs (0: no head).
        embed_dim: Channels of the first stage (doubled at each stage).
        depths: Blocks per stage.
        num_heads: Attention heads per stage.
        window_size: Window size.
        mlp_ratio: MLP hidden width / embedding width.
        qkv_bias: Learnable bias for query and value.
        drop_rate: Dropout after the embedding, the attention projection and in the MLP (official use).
        attn_drop_rate: Dropout on the attention weights.
        drop_path_rate: Stochastic depth rate, increasing linearly over the blocks.
        norm_layer: Normalization layer.
        ape: Add an absolute position embedding to the patch embedding.
        patch_norm: LayerNorm after the patch embedding.
        use_checkpoint: Activation recomputation per block (torch.utils.checkpoint; saves memory).
        pretrained_window_sizes: Window size of each stage in pre-training (0: this model's window).
        fused_attn: Window attention through ``scaled_dot_product_attention`` (False: explicit softmax).
        pad_windows: Accept stage maps that are not multiples of the window and pad them (evaluation at another
            resolution); False raises ConfigError as the official code asserts.
    """

    def __init__(self, img_size=224, patch_size=4, in_chans=3, num_classes=1000, embed_dim=96, depths=(2, 2, 6, 2),
                 num_heads=(3, 6, 12, 24), window_size=7, mlp_ratio=4., qkv_bias=True, drop_rate=0.,
                 attn_drop_rate=0., drop_path_rate=0.1, norm_layer=nn.LayerNorm, ape=False, patch_norm=True,
                 use_checkpoint=False, pretrained_window_sizes=(0, 0, 0, 0), fused_attn=True, pad_windows=False,
                 **kwargs):
        nn.Module.__init__(self)  # not v1's constructor: it would build v1 stages
        self._init_sizes(num_classes, depths, embed_dim, ape, patch_norm, mlp_ratio)
        self._init_embedding(img_size, patch_size, in_chans, norm_layer, drop_rate, window_size, node='MODEL.SWINV2',
                             pad_windows=pad_windows)
        self.layers = nn.ModuleList(
            BasicLayer(**stage, num_heads=num_heads[i], window_size=window_size, mlp_ratio=self.mlp_ratio,
                       qkv_bias=qkv_bias, drop=drop_rate, attn_drop=attn_drop_rate, norm_layer=norm_layer,
                       use_checkpoint=use_checkpoint, pretrained_window_size=pretrained_window_sizes[i],
                       fused_attn=fused_attn)
            for i, stage in enumerate(self._stages(depths, drop_path_rate, PatchMerging)))

        self._init_head(norm_layer)

        self.apply(self._init_weights)
        for layer in self.layers:
            layer._init_respostnorm()

    @torch.jit.ignore
    def no_weight_decay_keywords(self):
        return {'cpb_mlp', 'logit_scale', 'relative_position_bias_table'}
