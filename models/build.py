"""Build the model named by MODEL.TYPE from the config."""
from errors import ConfigError

from .swin_transformer import SwinTransformer


def build_model(config):
    """The model described by ``config`` (a finalized CfgNode), with freshly initialized weights."""
    model_type = config.MODEL.TYPE
    if model_type != 'swin':  # config.finalize validates this too; a hand-built config may not have been
        raise ConfigError(f"MODEL.TYPE {model_type!r} is not supported (this project builds: swin)")
    swin = config.MODEL.SWIN
    return SwinTransformer(
        img_size=config.DATA.IMG_SIZE,
        patch_size=swin.PATCH_SIZE,
        in_chans=swin.IN_CHANS,
        num_classes=config.MODEL.NUM_CLASSES,
        embed_dim=swin.EMBED_DIM,
        depths=list(swin.DEPTHS),
        num_heads=list(swin.NUM_HEADS),
        window_size=swin.WINDOW_SIZE,
        mlp_ratio=swin.MLP_RATIO,
        qkv_bias=swin.QKV_BIAS,
        qk_scale=swin.QK_SCALE,
        drop_rate=config.MODEL.DROP_RATE,
        drop_path_rate=config.MODEL.DROP_PATH_RATE,
        ape=swin.APE,
        patch_norm=swin.PATCH_NORM,
        use_checkpoint=config.TRAIN.USE_CHECKPOINT,
        fused_window_process=config.FUSED_WINDOW_PROCESS,
        fused_attn=swin.FUSED_ATTN,
    )
