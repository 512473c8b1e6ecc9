"""Swin as a general-purpose backbone: stage maps for torchvision's detectors and a small segmentation head.

* ``SwinBackbone(model)``: any of our classifiers (swin, swinv2, swin_mlp) -> OrderedDict of NCHW stage maps
  (keys ``'0'``.. = stage numbers, strides patch * 2**i), each LayerNorm-ed as in the official Swin detection
  backbone (Swin-Transformer-Object-Detection adds one norm per output stage). The classifier head, the final
  norm and the stages after the last one taken are removed: unused parameters would stall DDP and waste memory.
* ``swin_fpn_backbone``: that + torchvision's FeaturePyramidNetwork, the ``out_channels`` int contract of
  ``BackboneWithFPN``, so ``FasterRCNN`` / ``MaskRCNN`` / ``RetinaNet`` take it; ``swin_detector`` builds those
  with anchors and RoI pooling that match its levels.
* ``SwinSegmenter``: FPN levels fused at the finest stride (UPerNet's fuse without its pyramid pooling),
  logits upsampled to the input size.
* ``build_backbone(config)``: build_model + MODEL.PRETRAINED through ``checkpoint.load_pretrained`` (official,
  timm or SimMIM weights: the same path as classification fine-tuning), then wrapped.
"""
import logging
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import Conv2dNormActivation, FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from .build import build_model
from .swin_transformer import stage_indices


class SwinBackbone(nn.Module):
    """Stage feature maps of a Swin-family classifier, as the OrderedDict torchvision's necks read.

    Args:
        model: SwinTransformer, SwinTransformerV2 or SwinMLP (owned from now on: its head, final norm and the
            stages after the last one in ``out_indices`` are removed).
        out_indices: stages to return (timm's ``indices``: None all, an int the last n, a sequence those listed).
        norm: LayerNorm each returned map (fresh, as the official detection backbone): the un-normed residual
            stream of a pre-norm transformer grows in scale from stage to stage.

    Attributes:
        out_indices: the stage numbers returned; ``featmap_names`` their keys (``str(stage)``).
        out_channels: channels of each returned map (embed_dim * 2**stage), in key order.
        strides: input pixels per map position of each returned map (patch size * 2**stage).
    """

    def __init__(self, model, out_indices=None, norm=True):
        super().__init__()
        self.out_indices = stage_indices(len(model.layers), out_indices)
        last = self.out_indices[-1]
        # what forward_intermediates(stop_early=True, intermediates_only=True) never runs
        model.head, model.norm = nn.Identity(), nn.Identity()
        del model.layers[last + 1:]
        model.layers[last].downsample = None
        self.model = model
        self.featmap_names = [str(i) for i in self.out_indices]
        self.out_channels = [int(model.embed_dim * 2 ** i) for i in self.out_indices]
        self.strides = [model.patch_embed.patch_size[0] * 2 ** i for i in self.out_indices]
        self.norms = nn.ModuleDict({name: nn.LayerNorm(channels) for name, channels in
                                    zip(self.featmap_names, self.out_channels)}) if norm else None

    def forward(self, images):
        """(B, C, H, W) images -> OrderedDict {str(stage): (B, channels, H / stride, W / stride)}."""
        maps = self.model.forward_intermediates(images, indices=self.out_indices, stop_early=True,
                                                intermediates_only=True)
        out = OrderedDict()
        for name, feature in zip(self.featmap_names, maps):
            if self.norms is not None:
                feature = self.norms[name](feature.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            out[name] = feature
        return out


class SwinFPN(nn.Module):
    """SwinBackbone + FeaturePyramidNetwork, torchvision's ``BackboneWithFPN`` contract (whose
    IntermediateLayerGetter cannot cut a Swin, whose stage maps are tokens inside its layers).

    Attributes:
        out_channels: the FPN's channels (an int: what torchvision's detection heads read).
        featmap_names: keys of the stage levels (the RoI poolers' ``featmap_names``; extra levels excluded).
        strides: stride of every output level, extra ones ('pool', or 'p6', 'p7') included.
    """

    def __init__(self, body, fpn_channels=256, extra_blocks=None):
        super().__init__()
        extra_blocks = LastLevelMaxPool() if extra_blocks is None else extra_blocks
        extra = {LastLevelMaxPool: 1, LastLevelP6P7: 2}.get(type(extra_blocks))
        if extra is None:
            raise TypeError(f"extra_blocks must be LastLevelMaxPool or LastLevelP6P7, got {type(extra_blocks)}")
        self.body = body
        self.fpn = FeaturePyramidNetwork(body.out_channels, fpn_channels, extra_blocks=extra_blocks)
        self.out_channels = fpn_channels
        self.featmap_names = list(body.featmap_names)
        self.strides = list(body.strides) + [body.strides[-1] * 2 ** (k + 1) for k in range(extra)]

    def forward(self, images):
        return self.fpn(self.body(images))


def swin_fpn_backbone(model, out_indices=None, fpn_channels=256, extra_blocks=None, norm=True):
    """A classifier (or a SwinBackbone: then out_indices and norm are its own) with an FPN on top, ready for
    torchvision's FasterRCNN / MaskRCNN (``swin_detector``) or RetinaNet.

    extra_blocks: None for LastLevelMaxPool (a stride-64 'pool' level, as torchvision's R-CNNs), or
    LastLevelP6P7 (RetinaNet)."""
    body = model if isinstance(model, SwinBackbone) else SwinBackbone(model, out_indices, norm=norm)
    return SwinFPN(body, fpn_channels, extra_blocks)


def swin_detector(backbone, num_classes, mask=False, anchor_sizes=None, box_head_size=1024,
                  mask_head_channels=256, **kwargs):
    """torchvision's FasterRCNN (or MaskRCNN with ``mask``) on a SwinFPN, with parts that fit its levels.

    Anchors: one size per FPN level, 8 x its stride unless ``anchor_sizes`` (one tuple per level) says
    otherwise (8 x stride is torchvision's 32..512 for strides 4..64), aspect ratios 0.5 / 1 / 2. RoI pooling
    reads the stage levels by their keys. ``box_head_size`` / ``mask_head_channels``: the widths of torchvision's
    heads (1024 / 256), smaller for small data. num_classes counts the background. ``kwargs`` go to the
    detector (min_size, max_size, image_mean, image_std, box_detections_per_img, ...).
    """
    sizes = tuple(anchor_sizes) if anchor_sizes is not None else tuple((8 * stride,) for stride in backbone.strides)
    if len(sizes) != len(backbone.strides):
        raise ValueError(f"anchor_sizes has {len(sizes)} entries for {len(backbone.strides)} FPN levels")
    channels, names = backbone.out_channels, backbone.featmap_names
    parts = dict(rpn_anchor_generator=AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes)),
                 box_roi_pool=MultiScaleRoIAlign(names, output_size=7, sampling_ratio=2),
                 box_head=TwoMLPHead(channels * 7 * 7, box_head_size),
                 box_predictor=FastRCNNPredictor(box_head_size, num_classes))
    if not mask:
        return FasterRCNN(backbone, num_classes=None, **parts, **kwargs)
    parts.update(mask_roi_pool=MultiScaleRoIAlign(names, output_size=14, sampling_ratio=2),
                 mask_head=MaskRCNNHeads(channels, [mask_head_channels] * 4, 1),
                 mask_predictor=MaskRCNNPredictor(mask_head_channels, mask_head_channels, num_classes))
    return MaskRCNN(backbone, num_classes=None, **parts, **kwargs)


class SwinSegmenter(nn.Module):
    """Semantic segmentation: FPN over the stage maps, every level upsampled to the finest one (stride 4 for
    patch 4), concatenated and fused by a 3x3 conv-BN-ReLU, a 1x1 classifier, bilinear upsampling to the input.
    That is UPerNet's fuse (the official Swin segmentation head) without its pyramid pooling module.

    ``forward(images)`` -> logits (B, num_classes, H, W) for (B, C, H, W) images.
    """

    def __init__(self, backbone, num_classes, channels=256):
        super().__init__()
        self.backbone = backbone if isinstance(backbone, SwinBackbone) else SwinBackbone(backbone)
        self.fpn = FeaturePyramidNetwork(self.backbone.out_channels, channels)
        self.fuse = Conv2dNormActivation(len(self.backbone.out_channels) * channels, channels, kernel_size=3)
        self.classifier = nn.Conv2d(channels, num_classes, kernel_size=1)

    def forward(self, images):
        levels = list(self.fpn(self.backbone(images)).values())
        size = levels[0].shape[-2:]
        levels = [levels[0]] + [F.interpolate(level, size=size, mode='bilinear', align_corners=False)
                                for level in levels[1:]]
        logits = self.classifier(self.fuse(torch.cat(levels, dim=1)))
        return F.interpolate(logits, size=images.shape[-2:], mode='bilinear', align_corners=False)


def build_backbone(config, logger=None, out_indices=None, norm=True):
    """SwinBackbone of MODEL.TYPE built from ``config``, started from MODEL.PRETRAINED when set.

    The classifier is built headless (MODEL.NUM_CLASSES 0: a pretrained head, ImageNet-22K's 21841 classes
    included, is dropped rather than loaded and thrown away) and loaded by ``checkpoint.load_pretrained``, so
    official, timm and SimMIM pre-training weights load, and are resized to the config's image and window
    sizes, exactly as for classification fine-tuning.
    """
    from checkpoint import load_pretrained  # here: checkpoint imports models (a cycle at import time)

    config = config.clone()
    config.defrost()
    config.MODEL.NUM_CLASSES = 0
    config.freeze()
    model = build_model(config)
    if config.MODEL.PRETRAINED:
        load_pretrained(config, model, logger or logging.getLogger('swin.backbone'))
    return SwinBackbone(model, out_indices, norm=norm)
