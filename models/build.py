"""Build the model named by MODEL.TYPE from the config (one family per model file, as the official code)."""
import logging

from torch import nn

from errors import ConfigError

from .simmim import SIMMIM_ENCODERS, build_simmim
from .swin_mlp import SwinMLP
from .swin_transformer import SwinTransformer
from .swin_transformer_v2 import SwinTransformerV2

MODEL_TYPES = ('swin', 'swinv2', 'swin_mlp')

_logger = logging.getLogger('swin.models')


def layer_norm_class(fused: bool) -> type[nn.Module]:
    """nn.LayerNorm, or apex's FusedLayerNorm (same parameters, same state_dict keys) when FUSED_LAYERNORM
    (--fused_layernorm) asks for it and apex is importable; says which it uses."""
    if not fused:
        return nn.LayerNorm
    try:
        from apex.normalization import FusedLayerNorm
    except ImportError:
        _logger.warning("FUSED_LAYERNORM: apex is not importable, so torch's nn.LayerNorm is used "
                        "(install NVIDIA apex for its fused kernel)")
        return nn.LayerNorm
    _logger.info("FUSED_LAYERNORM: using apex.normalization.FusedLayerNorm")
    return FusedLayerNorm


def build_model(config, is_pretrain=False, pad_windows=False):
    """The model described by ``config`` (a finalized CfgNode), with freshly initialized weights.

    is_pretrain: the SimMIM pre-training model (models/simmim.py) around a headless encoder of MODEL.TYPE
    (swin or swinv2), as the official ``build_model(config, is_pretrain=True)``.
    pad_windows: a DATA.IMG_SIZE whose stage maps are not multiples of the window is accepted (for evaluation
    and prediction at another resolution): those maps are padded, and a log line says which. Without it such a
    size is a ConfigError, as in training (the official code asserts).
    """
    model_type = config.MODEL.TYPE
    if model_type not in MODEL_TYPES:  # config.finalize validates this too; a hand-built config may not have been
        raise ConfigError(f"MODEL.TYPE {model_type!r} is not supported (this project builds: "
                          f"{', '.join(MODEL_TYPES)})")
    model_class, kwargs = _family(config)
    if not is_pretrain:
        model = model_class(**kwargs, pad_windows=pad_windows)
        for note in model.window_padding:
            _logger.info(note)
        return model
    if model_type not in SIMMIM_ENCODERS:
        raise ConfigError(f"SimMIM pre-training (MODEL.TASK simmim) needs MODEL.TYPE "
                          f"{' or '.join(SIMMIM_ENCODERS)}, got {model_type!r}")
    return build_simmim(config, SIMMIM_ENCODERS[model_type], kwargs)


def _family(config):
    """(class, constructor arguments) of MODEL.TYPE's network."""
    common = dict(img_size=config.DATA.IMG_SIZE, num_classes=config.MODEL.NUM_CLASSES,
                  drop_rate=config.MODEL.DROP_RATE, drop_path_rate=config.MODEL.DROP_PATH_RATE,
                  use_checkpoint=config.TRAIN.USE_CHECKPOINT)
    if config.MODEL.TYPE == 'swin':
        swin = config.MODEL.SWIN
        return SwinTransformer, dict(**_stage_args(swin), **common, qkv_bias=swin.QKV_BIAS, qk_scale=swin.QK_SCALE,
                                     norm_layer=layer_norm_class(config.FUSED_LAYERNORM),
                                     fused_window_process=config.FUSED_WINDOW_PROCESS, fused_attn=swin.FUSED_ATTN)
    if config.MODEL.TYPE == 'swinv2':
        swinv2 = config.MODEL.SWINV2
        return SwinTransformerV2, dict(**_stage_args(swinv2), **common, qkv_bias=swinv2.QKV_BIAS,
                                       pretrained_window_sizes=list(swinv2.PRETRAINED_WINDOW_SIZES),
                                       fused_attn=swinv2.FUSED_ATTN)
    return SwinMLP, dict(**_stage_args(config.MODEL.SWIN_MLP), **common)


def _stage_args(node):
    """Constructor arguments every family reads from its config node under the same key names."""
    return dict(patch_size=node.PATCH_SIZE, in_chans=node.IN_CHANS, embed_dim=node.EMBED_DIM,
                depths=list(node.DEPTHS), num_heads=list(node.NUM_HEADS), window_size=node.WINDOW_SIZE,
                mlp_ratio=node.MLP_RATIO, ape=node.APE, patch_norm=node.PATCH_NORM)
