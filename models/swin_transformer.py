"""Swin Transformer v1 with the official constructor arguments and state_dict keys.

Layout and numerics follow microsoft/Swin-Transformer (``models/swin_transformer.py``): PatchMerging sits at the
end of a stage, ``relative_position_index`` and ``attn_mask`` are persistent buffers, ``flops()`` counts
multiply-accumulates the same way. Official checkpoints (``{'model': state_dict}``) load with ``strict=True``.

What differs is how window attention is computed (same results):

* The qkv projection runs on the (B, H, W, C) map and ONE permute copy cuts its output into windows and heads,
  laid out (B, nW, heads, N, head_dim). The same memory is a 4-D batch of (B * nW, heads) for unshifted blocks
  and (B, nW * heads) for shifted ones, so the per-window shift mask broadcasts over the batch with no copy.
* The relative position bias and the shift mask are added into ONE additive mask per forward, shared by all
  images of the batch; it stays differentiable for ``relative_position_bias_table``.
* ``fused_attn=True`` hands q, k, v and that mask to ``scaled_dot_product_attention``; ``fused_attn=False`` is
  the explicit softmax path. Both give the same outputs and gradients.
* Attention output goes back to the (B, H, W, C) map in one permute copy before ``proj`` (a per-token linear).

Any input size (a backbone for detection / segmentation), as the official detection backbone
(SwinTransformer/Swin-Transformer-Object-Detection ``mmdet/models/backbones/swin_transformer.py``) computes it:

* At the config size (DATA.IMG_SIZE) nothing changes: every block runs the code above with its ``attn_mask``
  buffer, and a map not larger than the window is one unshifted window (the classification rule, ``fit_window``).
* At any other size the image is zero-padded right/bottom to a multiple of the patch, the absolute position
  embedding is resized bicubically to the token map, and the model passes each stage's (H, W) down
  (``layer(x, size)``, ``block(x, size)``, ``downsample(x, size)``). A block whose map is not its config map
  zero-pads it right/bottom (after norm1) to a multiple of its built window, rolls by its any-size shift (the
  shift the layer asked for; window // 2 of the built window where the window was shrunk), attends with a shift
  mask built once per (padded size, device) and cached, rolls back and crops. PatchMerging zero-pads an odd side
  by one: the next map is ceil(H / 2) x ceil(W / 2). Where every config map is larger than the window (Swin-T
  stages 0-2), the results are the detection backbone's at every size.
"""
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.layers import DropPath, to_2tuple, trunc_normal_

from errors import ConfigError

from .cpu_linear import Linear, linear, packable

# Logits between tokens from different regions of a shifted window get -100 like the official code: exp(-100)
# is negligible next to the unmasked terms, and unlike -inf it stays finite in fp16 and in sums with the bias.
_MASK_VALUE = -100.0
# Alignment of the attention mask's strides, in elements: CUDA's memory-efficient SDPA kernel needs a mask whose
# last dim is contiguous and whose other strides are multiples of 8; otherwise SDPA warns and pads a copy of the
# mask on every call (N = 49 rows; or, for N = 144, a permuted view). The strides are tested on CPU; the kernel's
# acceptance only on CUDA (tests/test_cuda.py).
_MASK_ALIGN = 8
# Shift masks a block keeps for sizes other than its config size (the least recently used is dropped first): a
# detection run cycles through a few padded sizes; beyond this many, masks are rebuilt (the official code builds
# its mask on every call).
_MASK_CACHE_SIZE = 8


class Mlp(nn.Module):
    """Two linear layers with GELU in between (the transformer feed-forward)."""

    def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=nn.GELU, drop=0.):
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = Linear(in_features, hidden_features)
        self.act = act_layer()
        self.fc2 = Linear(hidden_features, out_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        if type(self.act) is nn.GELU and self.act.approximate == 'none' and packable(x, self.fc1.weight):
            x = linear(x, self.fc1.weight, self.fc1.bias, gelu=True)  # GELU inside the product (CPU inference)
        else:
            x = self.act(self.fc1(x))
        return self.drop(self.fc2(self.drop(x)))


def window_partition(x, window_size):
    """(B, H, W, C) -> (B * num_windows, window_size, window_size, C), windows in row-major order."""
    B, H, W, C = x.shape
    x = x.view(B, H // window_size, window_size, W // window_size, window_size, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size, window_size, C)


def window_reverse(windows, window_size, H, W):
    """Inverse of ``window_partition``: (B * num_windows, window_size, window_size, C) -> (B, H, W, C)."""
    C = windows.shape[-1]
    x = windows.view(-1, H // window_size, W // window_size, window_size, window_size, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, H, W, C)


def relative_position_index(window_size):
    """(N, N) index into the (2*Wh-1)*(2*Ww-1) bias table for every pair of tokens of a window."""
    wh, ww = window_size
    coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing='ij')).flatten(1)  # 2, N
    rel = coords[:, :, None] - coords[:, None, :]  # 2, N, N: (dy, dx) from token j to token i
    return (rel[0] + wh - 1) * (2 * ww - 1) + (rel[1] + ww - 1)


def shifted_window_mask(input_resolution, window_size, shift_size, device=None):
    """(nW, N, N) additive mask: -100 between tokens that the cyclic shift brought together from apart."""
    H, W = input_resolution
    region = torch.zeros(1, H, W, 1, device=device)
    slices = (slice(0, -window_size), slice(-window_size, -shift_size), slice(-shift_size, None))
    for i, (h, w) in enumerate((h, w) for h in slices for w in slices):
        region[:, h, w, :] = i
    region = window_partition(region, window_size).reshape(-1, window_size * window_size)
    same = region.unsqueeze(1) == region.unsqueeze(2)
    return torch.zeros(same.shape, device=device).masked_fill_(~same, _MASK_VALUE)


def merged_size(size):
    """(H, W) of a map -> (H, W) after PatchMerging, which pads an odd side by one: ceil(H / 2) x ceil(W / 2)."""
    return (size[0] + 1) // 2, (size[1] + 1) // 2


class ShiftMasks:
    """The shift masks of one block at sizes other than its config size: one per (padded size, device), built
    on first use (``shifted_window_mask``) and kept, at most ``capacity`` (least recently used dropped).
    Not a buffer: the state_dict stays the official one."""

    def __init__(self, window_size, shift_size, capacity=_MASK_CACHE_SIZE):
        self.window_size, self.shift_size, self.capacity = window_size, shift_size, capacity
        self.masks = OrderedDict()

    def get(self, padded_size, device):
        key = (tuple(padded_size), torch.device(device))
        mask = self.masks.get(key)
        if mask is None:
            with torch.inference_mode(False):  # a normal tensor even if first built under inference_mode
                mask = shifted_window_mask(key[0], self.window_size, self.shift_size, device=key[1])
            self.masks[key] = mask
            while len(self.masks) > self.capacity:
                self.masks.popitem(last=False)
        else:
            self.masks.move_to_end(key)
        return mask

    def __len__(self):
        return len(self.masks)

    def __repr__(self):
        return f'ShiftMasks(window_size={self.window_size}, shift_size={self.shift_size}, sizes={list(self.masks)})'


def aligned_rows(x):
    """``x`` copied so that its last dim is contiguous and every other stride is a multiple of ``_MASK_ALIGN``
    elements (rows padded in memory, sliced back): the layout SDPA's memory-efficient kernel reads without
    padding a copy of its own on every call. A permuted view (last-dim stride = heads) would not do either."""
    n = x.shape[-1]
    padded = F.pad(x, (0, -n % _MASK_ALIGN)) if n % _MASK_ALIGN else x.contiguous()
    return padded[..., :n]


def _sdpa_is_faster(x, bias_table):
    """Whether ``scaled_dot_product_attention`` beats the explicit path for this call.

    SDPA's CPU flash kernel gives the mask no gradient, so while the bias table is being trained SDPA runs its
    math fallback on CPU, slower than the explicit path (same math; docs/PERFORMANCE.md). CUDA's
    memory-efficient kernel does compute the mask gradient.
    """
    return not (x.device.type == 'cpu' and torch.is_grad_enabled() and bias_table.requires_grad)


class WindowAttention(nn.Module):
    """Window based multi-head self attention (W-MSA / SW-MSA) with relative position bias.

    Unlike the official module (which takes windows), ``forward`` takes the (already shifted) (B, H, W, C) map
    and returns one: cutting windows after the qkv projection saves a copy and lets the shift mask broadcast.

    Args:
        dim: Input channels.
        window_size: (Wh, Ww) of a window.
        num_heads: Attention heads.
        qkv_bias: Learnable bias for query, key and value.
        qk_scale: Override of the default scale head_dim ** -0.5.
        attn_drop: Dropout on the attention weights.
        proj_drop: Dropout on the output.
        fused_attn: Use ``scaled_dot_product_attention`` (False: the explicit softmax path).
    """

    def __init__(self, dim, window_size, num_heads, qkv_bias=True, qk_scale=None, attn_drop=0., proj_drop=0.,
                 fused_attn=True):
        super().__init__()
        self.dim = dim
        self.window_size = to_2tuple(window_size)
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = qk_scale or head_dim ** -0.5
        self.fused_attn = fused_attn

        wh, ww = self.window_size
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * wh - 1) * (2 * ww - 1), num_heads))
        self.register_buffer('relative_position_index', relative_position_index(self.window_size))

        self.qkv = Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        trunc_normal_(self.relative_position_bias_table, std=.02)

    def attention_mask(self, mask=None, dtype=None):
        """Relative position bias plus the optional (nW, N, N) shift mask: (1, heads or nW * heads, N, N).

        Built once per forward and shared by every image of the batch (4-D: SDPA's CPU flash kernel rejects
        a 3-D mask). Always a fresh tensor in ``aligned_rows`` layout, whatever the window size.
        """
        N = self.window_size[0] * self.window_size[1]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(N, N, self.num_heads).permute(2, 0, 1)  # heads, N, N
        if mask is not None:
            bias = (mask.unsqueeze(1) + bias).flatten(0, 1)  # nW * heads, N, N
        bias = bias.unsqueeze(0).to(dtype or bias.dtype)  # cast before padding: a later cast drops the padding
        return aligned_rows(bias)

    def forward(self, x, mask=None):
        """x: (B, H, W, C) with H, W multiples of the window; mask: (nW, N, N) shift mask or None."""
        B, H, W, C = x.shape
        wh, ww = self.window_size
        nh, nw = H // wh, W // ww
        heads, head_dim = self.num_heads, C // self.num_heads
        # cut the qkv map into windows and heads in one copy: 3, B, nW, heads, N, head_dim
        qkv = self.qkv(x).view(B, nh, wh, nw, ww, 3, heads, head_dim)
        qkv = qkv.permute(5, 0, 1, 3, 6, 2, 4, 7).reshape(3, B, nh * nw, heads, wh * ww, head_dim)
        # as a batch of (B * nW, heads) without a shift mask, of (B, nW * heads) with one: the mask broadcasts
        q, k, v = (qkv.flatten(1, 2) if mask is None else qkv.flatten(2, 3)).unbind(0)

        if self.fused_attn and _sdpa_is_faster(x, self.relative_position_bias_table):
            attn_mask = self.attention_mask(mask, q.dtype)  # SDPA wants the mask in the query's dtype
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=self.scale,
                                               dropout_p=self.attn_drop.p if self.training else 0.)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1) + self.attention_mask(mask)
            attn = self.attn_drop(attn.softmax(dim=-1))
            x = attn @ v

        # windows and heads back to the (B, H, W, C) map in one copy (proj is per token); reshape, not view:
        # SDPA may return a transposed layout, and splitting dims stays a view on it
        x = x.reshape(B, nh, nw, heads, wh, ww, head_dim).permute(0, 1, 4, 2, 5, 3, 6).reshape(B, H, W, C)
        return self.proj_drop(self.proj(x))

    def extra_repr(self):
        return f'dim={self.dim}, window_size={self.window_size}, num_heads={self.num_heads}, ' \
               f'fused_attn={self.fused_attn}'

    def flops(self, N):
        """Multiply-accumulates for one window of N tokens (official count)."""
        flops = N * self.dim * 3 * self.dim  # qkv
        flops += self.num_heads * N * (self.dim // self.num_heads) * N  # q @ k^T
        flops += self.num_heads * N * N * (self.dim // self.num_heads)  # attn @ v
        flops += N * self.dim * self.dim  # proj
        return flops


def fit_window(input_resolution, window_size, shift_size):
    """(window, shift) of a block: a map not larger than the window is one unshifted window (official rule)."""
    if min(input_resolution) <= window_size:
        window_size, shift_size = min(input_resolution), 0
    assert 0 <= shift_size < window_size, 'shift_size must be in [0, window_size)'
    return window_size, shift_size


def block_windows(input_resolution, window_size, shift_size):
    """(window, shift, any-size shift) of a block. Window and shift at the config map are ``fit_window``'s; at
    any other map the block keeps that (built) window, the size of its position bias, and shifts by what the
    layer asked for (window // 2 of the built window where the config map shrank the window), as the detection
    backbone shifts every odd block whatever the map."""
    built, shift = fit_window(input_resolution, window_size, shift_size)
    if built == window_size:
        any_size_shift = shift_size
    else:
        any_size_shift = built // 2 if shift_size > 0 else 0
    return built, shift, any_size_shift


def is_config_size(size, input_resolution):
    """Whether a map of ``size`` (None: the config map) takes a module's config-size code path."""
    return size is None or tuple(size) == tuple(input_resolution)


def fits_windows(input_resolution, window_size):
    """Whether a block's config map is cut into whole windows (otherwise it is padded, as at any other size)."""
    return input_resolution[0] % window_size == 0 and input_resolution[1] % window_size == 0


def takes_config_path(size, input_resolution, window_size):
    """Whether a block runs its config-size code (the official one) on a map of ``size`` (None: the config map):
    the config map, cut into whole windows. Every other map runs the any-size code (pad, shift, crop)."""
    return is_config_size(size, input_resolution) and fits_windows(input_resolution, window_size)


def pad_map(x, window_size):
    """(B, H, W, C) zero-padded right/bottom to multiples of the window (as the detection backbone pads)."""
    H, W = x.shape[1:3]
    pad_b, pad_r = -H % window_size, -W % window_size
    return F.pad(x, (0, 0, 0, pad_r, 0, pad_b)) if pad_b or pad_r else x


class SwinTransformerBlock(nn.Module):
    """Swin Transformer block: (shifted) window attention and an MLP, each with a residual.

    When the map is not larger than the window (``min(input_resolution) <= window_size``) the window covers
    the whole map and is not shifted, as in the official code. ``forward(x, size)`` takes maps of any size:
    at ``input_resolution`` (or size None) the code above, at any other size ``forward_any_size``.
    """

    def __init__(self, dim, input_resolution, num_heads, window_size=7, shift_size=0, mlp_ratio=4.,
                 qkv_bias=True, qk_scale=None, drop=0., attn_drop=0., drop_path=0., act_layer=nn.GELU,
                 norm_layer=nn.LayerNorm, fused_window_process=False, fused_attn=True):
        super().__init__()
        self.dim, self.input_resolution, self.num_heads, self.mlp_ratio = dim, input_resolution, num_heads, mlp_ratio
        self.init_windows(window_size, shift_size)
        # accepted for the official signature; the official CUDA kernel computes what forward() computes
        self.fused_window_process = fused_window_process

        self.norm1 = norm_layer(dim)
        self.attn = WindowAttention(dim, window_size=self.window_size, num_heads=num_heads, qkv_bias=qkv_bias,
                                    qk_scale=qk_scale, attn_drop=attn_drop, proj_drop=drop, fused_attn=fused_attn)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=drop)

        self.register_shift_mask()

    def init_windows(self, window_size, shift_size):
        """``window_size`` / ``shift_size`` at the config map, ``any_size_shift`` at others (``block_windows``),
        and the cache of the shift masks of other sizes."""
        self.window_size, self.shift_size, self.any_size_shift = block_windows(self.input_resolution, window_size,
                                                                               shift_size)
        self.shift_masks = ShiftMasks(self.window_size, self.any_size_shift)

    def register_shift_mask(self):
        mask = None
        if self.shift_size > 0 and fits_windows(self.input_resolution, self.window_size):
            mask = shifted_window_mask(self.input_resolution, self.window_size, self.shift_size)
        self.register_buffer('attn_mask', mask)  # persistent (even when None) like the official block

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
            x = torch.roll(x, shifts=(-self.shift_size, -self.shift_size), dims=(1, 2))
        x = self.attn(x, mask=self.attn_mask)
        if self.shift_size > 0:
            x = torch.roll(x, shifts=(self.shift_size, self.shift_size), dims=(1, 2))
        x = shortcut + self.drop_path(x.view(B, L, C))
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def forward_any_size(self, x, size):
        """x: (B, H * W, C) of an (H, W) map of any size -> (B, H * W, C), as the detection backbone's block."""
        H, W = size
        B, L, C = x.shape
        assert L == H * W, f'input has {L} tokens, expected {H}x{W}'
        shortcut = x
        x = self.windowed_attention(self.norm1(x).view(B, H, W, C))
        x = shortcut + self.drop_path(x.reshape(B, L, C))
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def windowed_attention(self, x):
        """(B, H, W, C) -> (B, H, W, C) at any size: zero-pad right/bottom to multiples of the window, roll by
        ``any_size_shift`` with that padded size's (cached) mask, attend, roll back, crop."""
        H, W = x.shape[1:3]
        x = pad_map(x, self.window_size)
        shift, mask = self.any_size_shift, None
        if shift > 0:
            x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
            mask = self.shift_masks.get(x.shape[1:3], x.device)
        x = self.attn(x, mask=mask)
        if shift > 0:
            x = torch.roll(x, shifts=(shift, shift), dims=(1, 2))
        return x[:, :H, :W]

    def extra_repr(self):
        return f'dim={self.dim}, input_resolution={self.input_resolution}, num_heads={self.num_heads}, ' \
               f'window_size={self.window_size}, shift_size={self.shift_size}, mlp_ratio={self.mlp_ratio}'

    def flops(self):
        H, W = self.input_resolution
        flops = self.dim * H * W  # norm1
        nW = H * W / self.window_size / self.window_size
        flops += nW * self.attn.flops(self.window_size * self.window_size)
        flops += 2 * H * W * self.dim * self.dim * self.mlp_ratio  # mlp
        flops += self.dim * H * W  # norm2
        return flops


class PatchMerging(nn.Module):
    """Merge each 2x2 patch group: (B, H*W, C) -> (B, H/2*W/2, 2C), channel order x0, x1, x2, x3 as official."""

    def __init__(self, input_resolution, dim, norm_layer=nn.LayerNorm):
        super().__init__()
        self.input_resolution = input_resolution
        self.dim = dim
        self.reduction = Linear(4 * dim, 2 * dim, bias=False)
        self.norm = norm_layer(4 * dim)

    def merge(self, x, size=None):
        """(B, H*W, C) -> (B, ceil(H/2)*ceil(W/2), 4C): each 2x2 group's tokens side by side; size: the map's
        (H, W), None for ``input_resolution``. An odd side is zero-padded by one (detection backbone)."""
        H, W = self.input_resolution if size is None else size
        B, L, C = x.shape
        assert L == H * W, f'input has {L} tokens, expected {H}x{W}'
        if H % 2 or W % 2:
            x = F.pad(x.view(B, H, W, C), (0, 0, 0, W % 2, 0, H % 2))
            H, W = H + H % 2, W + W % 2
        # official concat [x(0,0), x(1,0), x(0,1), x(1,1)] over (row, col) offsets = column offset outer
        return x.view(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5).reshape(B, -1, 4 * C)

    def forward(self, x, size=None):
        return self.reduction(self.norm(self.merge(x, size)))

    def extra_repr(self):
        return f'input_resolution={self.input_resolution}, dim={self.dim}'

    def flops(self):
        H, W = self.input_resolution
        flops = H * W * self.dim
        flops += (H // 2) * (W // 2) * 4 * self.dim * 2 * self.dim
        return flops


class BasicLayer(nn.Module):
    """One stage: ``depth`` blocks alternating unshifted / shifted windows, then an optional downsample."""

    def __init__(self, dim, input_resolution, depth, num_heads, window_size, mlp_ratio=4., qkv_bias=True,
                 qk_scale=None, drop=0., attn_drop=0., drop_path=0., norm_layer=nn.LayerNorm, downsample=None,
                 use_checkpoint=False, fused_window_process=False, fused_attn=True):
        super().__init__()
        self.dim = dim
        self.input_resolution = input_resolution
        self.depth = depth
        self.use_checkpoint = use_checkpoint
        self.blocks = nn.ModuleList([
            SwinTransformerBlock(
                dim=dim, input_resolution=input_resolution, num_heads=num_heads, window_size=window_size,
                shift_size=0 if (i % 2 == 0) else window_size // 2, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                qk_scale=qk_scale, drop=drop, attn_drop=attn_drop,
                drop_path=drop_path[i] if isinstance(drop_path, list) else drop_path, norm_layer=norm_layer,
                fused_window_process=fused_window_process, fused_attn=fused_attn)
            for i in range(depth)])
        self.downsample = downsample(input_resolution, dim=dim, norm_layer=norm_layer) if downsample else None

    def forward(self, x, size=None):
        """x: (B, H * W, C); size: the map's (H, W), None for ``input_resolution``. The downsampled tokens (their
        map is ``merged_size(size)``), or the blocks' output in the last stage."""
        x = self.forward_blocks(x, size)
        if self.downsample is not None:
            x = self.downsample(x, size)
        return x

    def forward_blocks(self, x, size=None):
        """The blocks without the downsample: this stage's feature map as (B, H * W, C) tokens."""
        for blk in self.blocks:
            if self.use_checkpoint and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(blk, x, size, use_reentrant=False)
            else:
                x = blk(x, size)
        return x

    def output_size(self, size=None):
        """(H, W) of ``forward``'s output for an input map of ``size`` (None: ``input_resolution``)."""
        size = tuple(self.input_resolution) if size is None else tuple(size)
        return merged_size(size) if self.downsample is not None else size

    def extra_repr(self):
        return f'dim={self.dim}, input_resolution={self.input_resolution}, depth={self.depth}'

    def flops(self):
        flops = sum(blk.flops() for blk in self.blocks)
        if self.downsample is not None:
            flops += self.downsample.flops()
        return flops


class PatchEmbed(nn.Module):
    """Image to patch tokens: (B, C, H, W) -> (B, H/p * W/p, embed_dim), a strided conv then optional norm."""

    def __init__(self, img_size=224, patch_size=4, in_chans=3, embed_dim=96, norm_layer=None):
        super().__init__()
        img_size = to_2tuple(img_size)
        patch_size = to_2tuple(patch_size)
        self.img_size = img_size
        self.patch_size = patch_size
        self.patches_resolution = [img_size[0] // patch_size[0], img_size[1] // patch_size[1]]
        self.num_patches = self.patches_resolution[0] * self.patches_resolution[1]
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = norm_layer(embed_dim) if norm_layer is not None else None

    def grid_size(self, image_size):
        """(H, W) of the token map for an (H, W) image: ``patches_resolution`` at ``img_size``, otherwise
        ceil(H / patch) x ceil(W / patch) (the image is zero-padded right/bottom to a multiple of the patch)."""
        H, W = image_size
        if (H, W) == tuple(self.img_size):
            return tuple(self.patches_resolution)
        return -(-H // self.patch_size[0]), -(-W // self.patch_size[1])

    def forward(self, x):
        """(B, C, H, W) of any size -> (B, Gh * Gw, embed_dim) tokens, (Gh, Gw) = ``grid_size((H, W))``."""
        H, W = x.shape[2:]
        pad_r, pad_b = -W % self.patch_size[1], -H % self.patch_size[0]
        if (pad_r or pad_b) and (H, W) != tuple(self.img_size):  # the config size runs as it always did
            x = F.pad(x, (0, pad_r, 0, pad_b))
        x = self.proj(x).flatten(2).transpose(1, 2)  # B, Ph*Pw, C
        if self.norm is not None:
            x = self.norm(x)
        return x

    def flops(self):
        Ho, Wo = self.patches_resolution
        flops = Ho * Wo * self.embed_dim * self.in_chans * (self.patch_size[0] * self.patch_size[1])
        if self.norm is not None:
            flops += Ho * Wo * self.embed_dim
        return flops


def check_stage_resolutions(patches_resolution, num_layers, window_size, img_size, patch_size, node='MODEL.SWIN',
                            pad_windows=False):
    """Raise ConfigError, in one line naming the config keys (of the family's ``node``), where the stages cannot
    run at the config size. A stage map that is not a multiple of the window is an error too, unless
    ``pad_windows``; then it is padded as the detection backbone pads, and the returned notes (one line each)
    say which stages pad."""
    notes = []
    for i in range(num_layers):
        res = (patches_resolution[0] // 2 ** i, patches_resolution[1] // 2 ** i)
        where = (f"DATA.IMG_SIZE {img_size} with {node}.PATCH_SIZE {patch_size} gives a {res[0]}x{res[1]} "
                 f"feature map in stage {i}")
        if min(res) < 1:
            raise ConfigError(f"{where}: too small for {num_layers} stages")
        if i < num_layers - 1 and (res[0] % 2 or res[1] % 2):
            raise ConfigError(f"{where}, which patch merging cannot halve (needs even sides); choose "
                              f"DATA.IMG_SIZE = {node}.PATCH_SIZE x a multiple of {2 ** (num_layers - 1)}")
        window = min(min(res), window_size)  # a map not larger than the window is one window
        if fits_windows(res, window):
            continue
        if not pad_windows:
            raise ConfigError(f"{where}, not divisible by {node}.WINDOW_SIZE {window_size}; choose "
                              f"DATA.IMG_SIZE and {node}.WINDOW_SIZE so that every stage map is a "
                              f"multiple of the window (or not larger than it); evaluation and prediction "
                              f"accept it and pad")
        padded = (res[0] + -res[0] % window, res[1] + -res[1] % window)
        notes.append(f"{where}, not a multiple of {node}.WINDOW_SIZE {window_size}: padded to "
                     f"{padded[0]}x{padded[1]} for its windows (as the official detection backbone pads)")
    return notes


def stage_indices(num_stages, indices):
    """timm's ``indices`` argument as sorted absolute stage numbers: None all, an int n the last n, a sequence
    those listed (negative from the end)."""
    if indices is None:
        indices = num_stages
    if isinstance(indices, int):
        if not 0 < indices <= num_stages:
            raise ValueError(f"indices {indices}: the last n stages needs 1 <= n <= {num_stages}")
        return list(range(num_stages - indices, num_stages))
    taken = sorted({i + num_stages if i < 0 else i for i in indices})
    if not taken or taken[0] < 0 or taken[-1] >= num_stages:
        raise ValueError(f"indices {list(indices)}: stages are numbered 0..{num_stages - 1} (or -{num_stages}..-1)")
    return taken


class SwinTransformer(nn.Module):
    """Swin Transformer v1 (https://arxiv.org/abs/2103.14030), official arguments and state_dict keys.

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
        qkv_bias: Learnable bias for query, key, value.
        qk_scale: Override of the attention scale head_dim ** -0.5.
        drop_rate: Dropout after the embedding, the attention projection and in the MLP (official use).
        attn_drop_rate: Dropout on the attention weights.
        drop_path_rate: Stochastic depth rate, increasing linearly over the blocks.
        norm_layer: Normalization layer.
        ape: Add an absolute position embedding to the patch embedding.
        patch_norm: LayerNorm after the patch embedding.
        use_checkpoint: Activation recomputation per block (torch.utils.checkpoint; saves memory).
        fused_window_process: Official CUDA-kernel switch; accepted, same results without it.
        fused_attn: Window attention through ``scaled_dot_product_attention`` (False: explicit softmax).
        pad_windows: Accept stage maps that are not multiples of the window and pad them (evaluation at another
            resolution); False raises ConfigError as the official code asserts.
    """

    # the official signature, list defaults included (never mutated here)
    def __init__(self, img_size=224, patch_size=4, in_chans=3, num_classes=1000, embed_dim=96,
                 depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24],  # noqa: B006
                 window_size=7, mlp_ratio=4., qkv_bias=True, qk_scale=None, drop_rate=0.,
                 attn_drop_rate=0., drop_path_rate=0.1, norm_layer=nn.LayerNorm, ape=False, patch_norm=True,
                 use_checkpoint=False, fused_window_process=False, fused_attn=True, pad_windows=False, **kwargs):
        super().__init__()
        self._init_sizes(num_classes, depths, embed_dim, ape, patch_norm, mlp_ratio)
        self._init_embedding(img_size, patch_size, in_chans, norm_layer, drop_rate, window_size,
                             pad_windows=pad_windows)
        self.layers = nn.ModuleList(
            BasicLayer(**stage, num_heads=num_heads[i], window_size=window_size, mlp_ratio=self.mlp_ratio,
                       qkv_bias=qkv_bias, qk_scale=qk_scale, drop=drop_rate, attn_drop=attn_drop_rate,
                       norm_layer=norm_layer, use_checkpoint=use_checkpoint,
                       fused_window_process=fused_window_process, fused_attn=fused_attn)
            for i, stage in enumerate(self._stages(depths, drop_path_rate, PatchMerging)))

        self._init_head(norm_layer)
        self.apply(self._init_weights)

    # the parts every family's constructor shares (official attribute names, module order and initialisation)
    def _init_sizes(self, num_classes, depths, embed_dim, ape, patch_norm, mlp_ratio):
        self.num_classes = num_classes
        self.num_layers = len(depths)
        self.embed_dim = embed_dim
        self.ape = ape
        self.patch_norm = patch_norm
        self.num_features = int(embed_dim * 2 ** (self.num_layers - 1))
        self.mlp_ratio = mlp_ratio

    def _init_embedding(self, img_size, patch_size, in_chans, norm_layer, drop_rate, window_size,
                        node='MODEL.SWIN', pad_windows=False):
        """Patch embedding (its map checked against the window at every stage: ``window_padding`` lists the
        stages that pad, where ``pad_windows`` lets them), the optional absolute position embedding, and the
        dropout after them."""
        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                                      embed_dim=self.embed_dim, norm_layer=norm_layer if self.patch_norm else None)
        self.patches_resolution = self.patch_embed.patches_resolution
        self.window_padding = check_stage_resolutions(self.patches_resolution, self.num_layers, window_size,
                                                      img_size, patch_size, node=node, pad_windows=pad_windows)
        if self.ape:
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches, self.embed_dim))
            trunc_normal_(self.absolute_pos_embed, std=.02)
        self.pos_drop = nn.Dropout(p=drop_rate)

    def _stages(self, depths, drop_path_rate, downsample):
        """Per stage, the arguments of the official layout: width doubling and map halving per stage, the
        stochastic depth rates rising linearly over all blocks, a downsample after every stage but the last."""
        rates = [x.item() for x in torch.linspace(0, drop_path_rate, sum(depths), device='cpu')]
        height, width = self.patches_resolution
        for i in range(self.num_layers):
            yield dict(dim=int(self.embed_dim * 2 ** i), input_resolution=(height // 2 ** i, width // 2 ** i),
                       depth=depths[i], drop_path=rates[sum(depths[:i]):sum(depths[:i + 1])],
                       downsample=downsample if i < self.num_layers - 1 else None)

    def _init_head(self, norm_layer):
        self.norm = norm_layer(self.num_features)
        self.avgpool = nn.AdaptiveAvgPool1d(1)
        self.head = Linear(self.num_features, self.num_classes) if self.num_classes > 0 else nn.Identity()

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    @torch.jit.ignore
    def no_weight_decay(self):
        return {'absolute_pos_embed'}

    @torch.jit.ignore
    def no_weight_decay_keywords(self):
        return {'relative_position_bias_table'}

    def embed(self, x):
        """(B, in_chans, H, W) -> patch tokens (B, H/p * W/p, embed_dim) entering the first stage."""
        return self.embed_with_size(x)[0]

    def embed_with_size(self, x):
        """(B, in_chans, H, W) of any size -> (patch tokens (B, Gh * Gw, embed_dim), their map (Gh, Gw))."""
        size = self.patch_embed.grid_size(x.shape[2:])
        x = self.patch_embed(x)
        if self.ape:
            x = x + self.position_embedding(size)
        return self.pos_drop(x), size

    def position_embedding(self, size):
        """The absolute position embedding for a (Gh, Gw) token map, (1, Gh * Gw, embed_dim): as trained at the
        config map, otherwise resized bicubically (as the detection backbone resizes it)."""
        if tuple(size) == tuple(self.patches_resolution):
            return self.absolute_pos_embed
        grid = self.absolute_pos_embed.view(1, *self.patches_resolution, -1).permute(0, 3, 1, 2).contiguous()
        grid = F.interpolate(grid, size=tuple(size), mode='bicubic', align_corners=False)
        return grid.flatten(2).transpose(1, 2)

    def forward_features(self, x):
        """(B, in_chans, H, W) of any size -> pooled features (B, num_features) (the mean over all tokens)."""
        x, size = self.embed_with_size(x)
        for layer in self.layers:
            x, size = layer(x, size), layer.output_size(size)
        x = self.norm(x)  # B, L, C
        x = self.avgpool(x.transpose(1, 2))  # B, C, 1
        return torch.flatten(x, 1)

    def forward(self, x):
        return self.head(self.forward_features(x))

    def forward_intermediates(self, x, indices=None, norm=False, stop_early=False, output_fmt='NCHW',
                              intermediates_only=False):
        """Stage feature maps for detection / segmentation necks: timm's backbone API with timm's meaning.

        Stage i's map is taken after its blocks and before its PatchMerging (which timm counts as the start of
        stage i + 1): (B, embed_dim * 2**i, H / (p * 2**i), W / (p * 2**i)), strides 4/8/16/32 for patch 4.
        Any input size: H / p and W / p round up (the image is padded to the patch), and so does every halving
        (PatchMerging pads an odd side); the maps are un-padded.

        Args:
            x: Input images (B, in_chans, H, W).
            indices: The last n stages if an int, the stages listed if a sequence (negative counts from the
                end), all stages if None.
            norm: Apply the final norm to the last stage's map (the only one it is sized for).
            stop_early: Do not run the stages after the last one asked for.
            output_fmt: 'NCHW' (the only format, as in timm's Swin).
            intermediates_only: Return only the maps.

        Returns:
            The list of maps, or (final features, maps) where final features are the normed last stage as
            (B, H, W, C) like timm's ``forward_features`` (un-normed output of the last stage run with stop_early).
        """
        if output_fmt != 'NCHW':
            raise ValueError(f"output_fmt {output_fmt!r} is not supported (Swin returns 'NCHW' maps)")
        take_indices = stage_indices(len(self.layers), indices)
        max_index = max(take_indices)
        last = len(self.layers) - 1
        stages = range(max_index + 1) if stop_early else range(len(self.layers))
        intermediates = []
        x, size = self.embed_with_size(x)
        for i in stages:
            if i > 0:  # downsample where timm's stage i starts, so an early stop ends on a stage's map as timm does
                x, size = self.layers[i - 1].downsample(x, size), merged_size(size)
            x = self.layers[i].forward_blocks(x, size)
            if i in take_indices:
                feature = self.norm(x) if norm and i == last else x
                intermediates.append(feature.view(x.shape[0], *size, -1).permute(0, 3, 1, 2).contiguous())
        if intermediates_only:
            return intermediates
        if i == last:
            x = self.norm(x)
        return x.view(x.shape[0], *size, -1), intermediates

    def flops(self):
        """Multiply-accumulates of one forward pass for one image, counted like the official code."""
        flops = self.patch_embed.flops()
        flops += sum(layer.flops() for layer in self.layers)
        flops += self.num_features * self.patches_resolution[0] * self.patches_resolution[1] // (2 ** self.num_layers)
        flops += self.num_features * self.num_classes
        return flops
