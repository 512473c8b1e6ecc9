"""Models: Swin Transformer v1, V2 and Swin MLP with the official keys, built from the config."""
from .backbone import SwinBackbone, SwinFPN, SwinSegmenter, build_backbone, swin_detector, swin_fpn_backbone
from .build import MODEL_TYPES, build_model
from .swin_mlp import SwinMLP
from .swin_transformer import SwinTransformer
from .swin_transformer_v2 import SwinTransformerV2

__all__ = ['MODEL_TYPES', 'SwinBackbone', 'SwinFPN', 'SwinMLP', 'SwinSegmenter', 'SwinTransformer', 'SwinTransformerV2',
           'build_backbone', 'build_model', 'swin_detector', 'swin_fpn_backbone']
