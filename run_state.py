"""What a training run is made of: where it stands (RunState), what it trains with (TrainingObjects), and
where and how it computes and reports (Runtime).

Words used everywhere (code, logs, TensorBoard, checkpoint file names): a **micro-batch** is one loader
batch (one forward/backward); an **optimizer step** ("step") is one update, made of
TRAIN.ACCUMULATION_STEPS micro-batches.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from coordinator import StepCoordinator

if TYPE_CHECKING:
    from timm.scheduler.scheduler import Scheduler
    from timm.utils import ModelEmaV3

    from logger import MetricWriter
    from tasks import ClassificationTask, SimMIMTask
    from utils import Precision


@dataclass
class RunState:
    """Where training stands: the next micro-batch to train is ``micro_batch`` of ``epoch``."""
    epoch: int = 0               # the epoch being trained (the next one, between epochs)
    micro_batch: int = 0         # micro-batches of `epoch` already done (0: the epoch has not started)
    global_step: int = 0         # optimizer steps since training began: the LR schedule's and TensorBoard's x
    max_accuracy: float = 0.0    # best validation Acc@1 so far, in percent
    pretrained_from: str = ''    # real path of the MODEL.PRETRAINED file the run started from ('' : none)

    def steps_in_epoch(self, accumulation: int) -> int:
        """Optimizer steps of ``epoch`` already done."""
        return self.micro_batch // accumulation

    def finish_epoch(self, acc1: float | None = None) -> bool:
        """Move to the start of the next epoch with this epoch's accuracy (None: the run does not validate);
        True when it is the best so far."""
        is_best = acc1 is not None and acc1 > self.max_accuracy
        if acc1 is not None:
            self.max_accuracy = max(self.max_accuracy, acc1)
        self.epoch, self.micro_batch = self.epoch + 1, 0
        return is_best

    def to_dict(self) -> dict[str, Any]:
        """The checkpoint form. ``epoch`` there is the epoch last worked on, as in official checkpoints:
        ``micro_batch`` 0 marks a finished epoch (training goes on at epoch + 1), k > 0 a mid-epoch state."""
        finished = self.micro_batch == 0
        return {'epoch': self.epoch - 1 if finished else self.epoch, 'micro_batch': self.micro_batch,
                'global_step': self.global_step, 'max_accuracy': self.max_accuracy,
                'pretrained_from': self.pretrained_from}

    @classmethod
    def from_dict(cls, ckpt: dict[str, Any], steps_per_epoch: int | None = None) -> RunState:
        """Inverse of to_dict; also reads format-1 files (``step_in_epoch``: their name for micro_batch) and
        official ones (no micro_batch, no global_step: then epochs x ``steps_per_epoch``, 0 without it).
        Without an ``epoch`` (bare weights) training starts at the beginning. Files without
        ``pretrained_from`` (older ones, official ones) count as not started from pretrained weights."""
        pretrained_from = str(ckpt.get('pretrained_from') or '')
        if ckpt.get('epoch') is None:
            return cls(max_accuracy=float(ckpt.get('max_accuracy') or 0.0), pretrained_from=pretrained_from)
        micro_batch = int(ckpt.get('micro_batch', ckpt.get('step_in_epoch')) or 0)
        epoch = int(ckpt['epoch']) if micro_batch else int(ckpt['epoch']) + 1
        global_step = ckpt.get('global_step')
        if global_step is None:
            global_step = epoch * steps_per_epoch if steps_per_epoch else 0
        return cls(epoch, micro_batch, int(global_step), float(ckpt.get('max_accuracy') or 0.0), pretrained_from)

    @property
    def position(self) -> tuple[int, int]:
        """(epoch, micro_batch): orders states by how far training got."""
        return self.epoch, self.micro_batch


@dataclass
class TrainingObjects:
    """Everything one optimizer step touches."""
    model: torch.nn.Module               # what the loop calls (maybe compiled / DDP-wrapped; checkpoints unwrap it)
    task: ClassificationTask | SimMIMTask  # batch -> model inputs -> loss (tasks.py)
    optimizer: torch.optim.Optimizer
    lr_scheduler: Scheduler              # timm scheduler, stepped per optimizer step: .step_update(global_step)
    scaler: torch.amp.GradScaler | None = None   # float16 AMP only
    model_ema: ModelEmaV3 | None = None


@dataclass
class Runtime:
    """Where this process computes and how it reports."""
    device: torch.device
    precision: Precision
    logger: logging.Logger
    writer: MetricWriter | None = None   # TensorBoard (rank 0); None: no scalars
    # answers after every optimizer step: continue, save, stop (the default never saves nor stops early)
    coordinator: StepCoordinator = field(default_factory=StepCoordinator)
