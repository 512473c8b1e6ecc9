"""Models: Swin Transformer v1 with the official keys, built from the config."""
from .build import build_model
from .swin_transformer import SwinTransformer

__all__ = ['SwinTransformer', 'build_model']
