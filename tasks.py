"""What one training step computes, per MODEL.TASK: the "batch -> loss" of the one training loop (engine.py).

A task turns a loader batch into model inputs on the device (``prepare``, outside autocast) and the inputs into
the loss (``loss``, inside autocast), and says whether the run validates after each epoch. Everything else a
step does (AMP, accumulation, DDP, clipping, EMA, logging, checkpoints, resume, preemption) is the loop's.
"""
from __future__ import annotations

import torch
from timm.data import Mixup
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from yacs.config import CfgNode

from data import Batch, to_device
from distillation import Distillation


class ClassificationTask:
    """Images and class indices -> the recipe's criterion on the logits (after Mixup/CutMix when on)."""
    validates = True

    def __init__(self, criterion: torch.nn.Module, mixup_fn: Mixup | None = None,
                 distillation: Distillation | None = None):
        self.criterion, self.mixup_fn, self.distillation = criterion, mixup_fn, distillation

    def prepare(self, batch: Batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        images, targets = to_device(batch, device)
        if self.mixup_fn is not None:
            images, targets = self.mixup_fn(images, targets)
        return images, targets

    def loss(self, model: torch.nn.Module, inputs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        images, targets = inputs
        logits = model(images)
        loss = self.criterion(logits, targets)
        return loss if self.distillation is None else self.distillation(loss, logits, images)


class SimMIMTask:
    """Images and their patch masks -> the SimMIM model's reconstruction loss; labels unused, nothing to
    validate (the loss is the pre-training's only measure)."""
    validates = False

    def prepare(self, batch: Batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        images, _ = to_device(batch, device)
        return images, batch.masks.to(device, non_blocking=True)

    def loss(self, model: torch.nn.Module, inputs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        images, mask = inputs
        return model(images, mask)


def build_criterion(config: CfgNode, mixup_fn: Mixup | None) -> torch.nn.Module:
    """The training loss of TRAIN.LOSS, as timm's train.py builds it."""
    if config.TRAIN.LOSS == 'bce':
        threshold = config.TRAIN.BCE_TARGET_THRESHOLD if config.TRAIN.BCE_TARGET_THRESHOLD >= 0 else None
        # with Mixup the targets come mixed and smoothed (timm's BCE does not smooth dense targets again); without
        # it timm's BCE one-hot encodes and smooths. Unlike timm's train.py, bce without smoothing stays bce.
        smoothing = 0.0 if mixup_fn is not None else config.MODEL.LABEL_SMOOTHING
        return BinaryCrossEntropy(smoothing=smoothing, target_threshold=threshold)
    if mixup_fn is not None:
        return SoftTargetCrossEntropy()  # label smoothing is folded into the mixed targets
    if config.MODEL.LABEL_SMOOTHING > 0:
        return LabelSmoothingCrossEntropy(smoothing=config.MODEL.LABEL_SMOOTHING)
    return torch.nn.CrossEntropyLoss()


def build_task(config: CfgNode, mixup_fn: Mixup | None = None, teacher: torch.nn.Module | None = None
               ) -> ClassificationTask | SimMIMTask:
    """The task of MODEL.TASK (resolved by config.finalize: classification or simmim); ``teacher``: the
    DISTILL teacher (distillation.build_teacher) when DISTILL.TYPE is soft or hard."""
    if config.MODEL.TASK == 'simmim':
        return SimMIMTask()
    distillation = None
    if teacher is not None:
        distillation = Distillation(teacher, config.DISTILL.TYPE, config.DISTILL.ALPHA, config.DISTILL.TAU)
    return ClassificationTask(build_criterion(config, mixup_fn), mixup_fn, distillation)
