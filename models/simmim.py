"""SimMIM (https://arxiv.org/abs/2111.09886): masked image modelling to pre-train Swin encoders without labels.

Same modules, state_dict keys and call as the official ``models/simmim.py``, so official SimMIM checkpoints load
strictly: ``encoder.*`` (a Swin without head, plus ``encoder.mask_token``), ``decoder.0.*`` (a 1x1 conv whose
``stride**2 * 3`` outputs a pixel shuffle turns into an image at input resolution). ``model(images, mask)`` returns
the loss: L1 between the reconstruction and the image (or its locally normalized version, NORM_TARGET) over the
masked pixels, divided by the masked pixel count and the channels.

``mask`` holds one 0/1 entry per patch token, (B, H / patch, W / patch); 1 replaces the token by ``mask_token``.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_

from errors import ConfigError

from .swin_transformer import SwinTransformer
from .swin_transformer_v2 import SwinTransformerV2


def local_mean_std(images, window):
    """Per-pixel mean and unbiased std over the ``window`` x ``window`` neighbourhood of each channel (cut at the
    border: only pixels inside the image count), as the official ``norm_targets`` computes them."""
    pad = window // 2
    mean = F.avg_pool2d(images, window, stride=1, padding=pad, count_include_pad=False)
    mean_sq = F.avg_pool2d(images ** 2, window, stride=1, padding=pad, count_include_pad=False)
    ones = torch.ones_like(images[:1, :1])
    count = F.avg_pool2d(ones, window, stride=1, padding=pad, divisor_override=1)  # pixels in each window
    var = ((mean_sq - mean ** 2) * (count / (count - 1))).clamp(min=0.)
    return mean, (var + 1e-6) ** 0.5


def norm_targets(images, window):
    """The NORM_TARGET reconstruction target: each pixel normalized by the statistics of its neighbourhood."""
    mean, std = local_mean_std(images, window)
    return (images - mean) / std


class MaskedImageEncoder:
    """Mixin for a Swin-family encoder (``patch_embed``, ``absolute_pos_embed``, ``layers``, ``norm``):
    ``forward(images, mask)`` swaps the masked patch tokens for a learned ``mask_token`` and returns the last
    stage's normalized feature map (B, num_features, H / stride, W / stride)."""

    def init_mask_token(self):
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
        trunc_normal_(self.mask_token, mean=0., std=.02)

    @property
    def stride(self):
        """Input pixels per output position: patch size x 2 per patch merging (32 for the official models)."""
        return self.patch_embed.patch_size[0] * 2 ** (self.num_layers - 1)

    def forward(self, x, mask):
        x = self.patch_embed(x)
        B, L, _ = x.shape
        if mask.shape[0] != B or mask[0].numel() != L:
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not give one entry per token of "
                             f"{B} images x {L} tokens")
        w = mask.flatten(1).unsqueeze(-1).type_as(x)
        x = x * (1. - w) + self.mask_token.expand(B, L, -1) * w
        if self.ape:
            x = x + self.absolute_pos_embed
        x = self.pos_drop(x)
        for layer in self.layers:
            x = layer(x)
        x = self.norm(x)
        h, w = (side // 2 ** (self.num_layers - 1) for side in self.patches_resolution)
        return x.transpose(1, 2).reshape(B, -1, h, w)

    @torch.jit.ignore
    def no_weight_decay(self):
        return set(super().no_weight_decay()) | {'mask_token'}


class SwinTransformerForSimMIM(MaskedImageEncoder, SwinTransformer):
    """Swin v1 encoder for SimMIM: no head (``num_classes`` 0), a mask token, ``forward(images, mask)``."""

    def __init__(self, **kwargs):
        super().__init__(**{**kwargs, 'num_classes': 0})
        self.init_mask_token()


class SwinTransformerV2ForSimMIM(MaskedImageEncoder, SwinTransformerV2):
    """SwinV2 encoder for SimMIM: no head (``num_classes`` 0), a mask token, ``forward(images, mask)``."""

    def __init__(self, **kwargs):
        super().__init__(**{**kwargs, 'num_classes': 0})
        self.init_mask_token()


# MODEL.TYPE -> the SimMIM encoder of that family
SIMMIM_ENCODERS = {'swin': SwinTransformerForSimMIM, 'swinv2': SwinTransformerV2ForSimMIM}


class SimMIM(nn.Module):
    """Encoder + 1x1 conv / pixel-shuffle decoder; ``forward(images, mask)`` is the reconstruction loss.

    Args:
        encoder: a MaskedImageEncoder.
        encoder_stride: input pixels per encoder output position (the decoder upsamples by it).
        in_chans: image channels (the loss is divided by them).
        patch_size: the encoder's patch size (one mask entry covers patch_size x patch_size pixels).
        norm_target_window: odd window of the NORM_TARGET normalization; 0 or None: raw pixels are the target.
    """

    def __init__(self, encoder, encoder_stride, in_chans, patch_size, norm_target_window=None):
        super().__init__()
        self.encoder = encoder
        self.encoder_stride = encoder_stride
        self.decoder = nn.Sequential(
            nn.Conv2d(encoder.num_features, encoder_stride ** 2 * in_chans, kernel_size=1),
            nn.PixelShuffle(encoder_stride),
        )
        self.in_chans = in_chans
        self.patch_size = patch_size
        if norm_target_window and (norm_target_window < 3 or norm_target_window % 2 == 0):
            raise ConfigError(f"MODEL.SIMMIM.NORM_TARGET.PATCH_SIZE must be odd and at least 3, got "
                              f"{norm_target_window}")
        self.norm_target_window = norm_target_window or 0

    def pixel_mask(self, mask):
        """(B, h, w) token mask -> (B, 1, H, W) pixel mask."""
        p = self.patch_size
        return mask.repeat_interleave(p, 1).repeat_interleave(p, 2).unsqueeze(1).contiguous()

    def reconstruct(self, x, mask):
        """The decoder's image (B, in_chans, H, W): pixels, or normalized pixels with NORM_TARGET."""
        return self.decoder(self.encoder(x, mask))

    def target(self, x):
        return norm_targets(x, self.norm_target_window) if self.norm_target_window else x

    def forward(self, x, mask):
        x_rec = self.reconstruct(x, mask)
        pixel_mask = self.pixel_mask(mask)
        loss_recon = F.l1_loss(self.target(x), x_rec, reduction='none')
        return (loss_recon * pixel_mask).sum() / (pixel_mask.sum() + 1e-5) / self.in_chans

    @torch.jit.ignore
    def no_weight_decay(self):
        return {'encoder.' + name for name in self.encoder.no_weight_decay()}

    @torch.jit.ignore
    def no_weight_decay_keywords(self):
        return {'encoder.' + name for name in self.encoder.no_weight_decay_keywords()}

    def flops(self):
        """Multiply-accumulates per image: the encoder's (official count) plus the 1x1 decoder conv."""
        h, w = (side // 2 ** (self.encoder.num_layers - 1) for side in self.encoder.patches_resolution)
        return self.encoder.flops() + h * w * self.decoder[0].in_channels * self.decoder[0].out_channels


def build_simmim(config, encoder_class, encoder_kwargs):
    """SimMIM around ``encoder_class(**encoder_kwargs)`` (a MaskedImageEncoder; its head is dropped)."""
    encoder = encoder_class(**encoder_kwargs)
    simmim = config.MODEL.SIMMIM.NORM_TARGET
    return SimMIM(encoder, encoder.stride, encoder_kwargs.get('in_chans', 3), encoder.patch_embed.patch_size[0],
                  norm_target_window=simmim.PATCH_SIZE if simmim.ENABLE else None)


def is_simmim_state_dict(state_dict):
    """True for the weights of a SimMIM model (ours or official): every key under ``encoder.`` or ``decoder.``."""
    return bool(state_dict) and all(key.startswith(('encoder.', 'decoder.')) for key in state_dict) \
        and any(key.startswith('encoder.') for key in state_dict)


def encoder_state_dict(state_dict):
    """The classification network's weights inside a SimMIM state_dict: ``encoder.`` stripped, the mask token
    and the decoder left out. Returns (weights, names of the left-out tensors)."""
    weights, dropped = {}, []
    for key, value in state_dict.items():
        if key.startswith('encoder.') and key != 'encoder.mask_token':
            weights[key[len('encoder.'):]] = value
        else:
            dropped.append(key)
    return weights, dropped
