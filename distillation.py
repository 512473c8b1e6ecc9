"""Knowledge distillation (DeiT; Hinton et al.): a fixed teacher's logits on the student's own (mixed) images
join the task loss, ``(1 - DISTILL.ALPHA) * task + DISTILL.ALPHA * distillation``.

* soft: KL(teacher || student) of the softmaxes at temperature DISTILL.TAU, times TAU**2 (so the gradient scale
  does not change with the temperature), averaged over the batch;
* hard: cross-entropy of the student against the teacher's argmax (DeiT's hard distillation).

The teacher is any family this project builds (DISTILL.TEACHER_CFG, a config file, + DISTILL.TEACHER_WEIGHTS,
loaded strictly as --eval loads weights) or a timm model (DISTILL.TEACHER_TIMM, a model name, + the same local
weights file). It runs in eval mode, without gradients, under the run's autocast; it holds no state that a
checkpoint would need, so accumulation, DDP and exact resume are the loop's as for any task.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from yacs.config import CfgNode

from checkpoint.weights import load_model_weights
from config import load_config
from errors import ConfigError
from models import build_model


def build_teacher(config: CfgNode, device: torch.device, logger: logging.Logger) -> torch.nn.Module:
    """The teacher of DISTILL, weights loaded, in eval mode on ``device``, every parameter frozen."""
    distill = config.DISTILL
    if distill.TEACHER_TIMM:
        import timm
        try:
            teacher = timm.create_model(distill.TEACHER_TIMM, pretrained=False, num_classes=config.MODEL.NUM_CLASSES)
        except RuntimeError as e:  # timm's "Unknown model (...)"
            raise ConfigError(f"DISTILL.TEACHER_TIMM {distill.TEACHER_TIMM!r}: {e}") from None
        model_type = 'timm'
        what = f"timm {distill.TEACHER_TIMM}"
    else:
        teacher_config = load_config(distill.TEACHER_CFG, [], environ={})
        if teacher_config.MODEL.NUM_CLASSES != config.MODEL.NUM_CLASSES:
            raise ConfigError(f"DISTILL.TEACHER_CFG {distill.TEACHER_CFG} has MODEL.NUM_CLASSES "
                              f"{teacher_config.MODEL.NUM_CLASSES}, the student {config.MODEL.NUM_CLASSES}: "
                              f"the teacher must predict the same classes")
        teacher = build_model(teacher_config, pad_windows=True)  # it sees the student's DATA.IMG_SIZE
        model_type = teacher_config.MODEL.TYPE
        what = f"{teacher_config.MODEL.TYPE} {teacher_config.MODEL.NAME}"
    if model_type == 'timm':
        state = torch.load(distill.TEACHER_WEIGHTS, map_location='cpu', weights_only=True)
        state = state.get('model', state.get('state_dict', state)) if isinstance(state, dict) else state
        try:
            teacher.load_state_dict(state)
        except RuntimeError as e:
            raise ConfigError(f"DISTILL.TEACHER_WEIGHTS {distill.TEACHER_WEIGHTS} does not fit timm "
                              f"{distill.TEACHER_TIMM}: {str(e).splitlines()[0]}") from None
    else:
        load_model_weights(teacher, distill.TEACHER_WEIGHTS, logger, model_type=model_type)
    teacher.requires_grad_(False)
    teacher = teacher.to(device).eval()
    logger.info(f"distillation ({distill.TYPE}, DISTILL.ALPHA {distill.ALPHA:g}"
                f"{f', DISTILL.TAU {distill.TAU:g}' if distill.TYPE == 'soft' else ''}): teacher {what}, "
                f"{sum(p.numel() for p in teacher.parameters()) / 1e6:.2f}M params, from {distill.TEACHER_WEIGHTS}")
    return teacher


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str, tau: float
                      ) -> torch.Tensor:
    """The distillation term between the student's and the teacher's logits (float32 for the softmaxes)."""
    student_logits, teacher_logits = student_logits.float(), teacher_logits.float()
    if kind == 'hard':
        return F.cross_entropy(student_logits, teacher_logits.argmax(dim=1))
    return F.kl_div(F.log_softmax(student_logits / tau, dim=1), F.log_softmax(teacher_logits / tau, dim=1),
                    reduction='batchmean', log_target=True) * tau * tau


class Distillation:
    """``distillation(task_loss, logits, images)``: the task loss mixed with the teacher's term on ``images`` (the
    student's inputs, after Mixup/CutMix). The teacher is held here, not in the student: never in its
    state_dict, optimizer or DDP wrapper."""

    def __init__(self, teacher: torch.nn.Module, kind: str, alpha: float, tau: float):
        self.teacher, self.kind, self.alpha, self.tau = teacher, kind, alpha, tau

    def __call__(self, task_loss: torch.Tensor, logits: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            teacher_logits = self.teacher(images)
        distill = distillation_loss(logits, teacher_logits, self.kind, self.tau)
        return (1 - self.alpha) * task_loss + self.alpha * distill
