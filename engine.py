"""The loops of a run: one training epoch, exact validation, and the throughput benchmark.

The hot loop keeps running sums on the device and reads them (one host sync) only every PRINT_FREQ
optimizer steps, so the GPU is never stalled by logging.
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from yacs.config import CfgNode

from data import to_device
from errors import TrainingError
from logger import format_accuracy, format_eta, format_throughput
from run_state import RunState, Runtime, TrainingObjects
from utils import Precision, all_reduce_sum, unwrap_model

if TYPE_CHECKING:
    from evaluation import ClassCounts


@dataclass
class EpochResult:
    stopped: bool    # a stop was requested: the epoch ended early (at an optimizer-step boundary)
    loss: float      # mean training loss over the micro-batches this call trained (this rank)


@dataclass
class TrainWindow:
    """What one training log line reports: the optimizer steps since the previous line, and the epoch so far."""
    loss: float              # mean loss over the window's micro-batches
    grad_norm: float         # mean gradient norm over the window's optimizer steps
    steps: int               # optimizer steps in the window
    seconds: float           # wall time of the window
    epoch_steps: int         # optimizer steps this call has made in the epoch
    epoch_seconds: float     # wall time of this call so far


class _TrainMeter:
    """Running sums kept on the device (no host sync per step), read once per log window."""

    def __init__(self, device):
        # [loss sum, micro-batches, grad-norm sum, optimizer steps]
        self.epoch_sums = torch.zeros(4, dtype=torch.float64, device=device)
        self.window_sums = torch.zeros(4, dtype=torch.float64, device=device)
        self.first_bad_step = torch.full((), -1, dtype=torch.long, device=device)
        self.step_loss = torch.zeros((), dtype=torch.float32, device=device)
        self.epoch_start = self.window_start = time.time()
        self.epoch_steps = 0

    def add_micro_batch(self, loss, accumulation):
        self.step_loss += loss / accumulation
        self.window_sums[0] += loss
        self.window_sums[1] += 1

    def add_step(self, grad_norm, global_step):
        """An optimizer step ended: record its gradient norm, and the step if its loss was not finite."""
        self.epoch_steps += 1
        self.first_bad_step = torch.where((self.first_bad_step < 0) & ~torch.isfinite(self.step_loss),
                                          torch.full_like(self.first_bad_step, global_step), self.first_bad_step)
        self.step_loss.zero_()
        self.window_sums[2] += grad_norm.detach().double()
        self.window_sums[3] += 1

    def read_window(self):
        """The window's numbers (one host sync); the next window starts now."""
        self.epoch_sums += self.window_sums
        loss_sum, micro_batches, norm_sum, steps = self.window_sums.tolist()
        self.window_sums.zero_()
        now = time.time()
        window = TrainWindow(loss_sum / max(micro_batches, 1), norm_sum / max(steps, 1), int(steps),
                             now - self.window_start, self.epoch_steps, now - self.epoch_start)
        self.window_start = now
        return window

    def epoch_loss(self):
        self.epoch_sums += self.window_sums
        self.window_sums.zero_()
        loss_sum, micro_batches = self.epoch_sums[0].item(), self.epoch_sums[1].item()
        return loss_sum / max(micro_batches, 1)


def grad_norm_and_clip(parameters, max_norm):
    """Total gradient norm (a device tensor); clips to max_norm when it is set (0/None: no clipping)."""
    parameters = [p for p in parameters if p.grad is not None]
    if max_norm:
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    if hasattr(torch.nn.utils, 'get_total_norm'):  # torch >= 2.6
        return torch.nn.utils.get_total_norm([p.grad for p in parameters])
    return torch.nn.utils.clip_grad_norm_(parameters, float('inf'))  # an infinite bound only measures


def memory_mb(device):
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return 0.0


def raise_if_nonfinite(first_bad_step, lr):
    """first_bad_step is a device tensor: -1 while every loss was finite, else the first bad optimizer step."""
    step = int(first_bad_step.item())
    if step >= 0:
        raise TrainingError(f"loss became NaN/inf at optimizer step {step} (lr {lr:.3g}); the last good "
                            f"checkpoint is kept. Lower TRAIN.BASE_LR, set TRAIN.CLIP_GRAD, or use "
                            f"AMP_DTYPE bfloat16 instead of float16")


def _forward_backward(objects, inputs, accumulation, sync, precision):
    """One micro-batch: the task's loss (forward) and backward of loss / accumulation. Returns the (unscaled)
    loss, detached."""
    model, scaler = objects.model, objects.scaler
    # DDP all-reduces gradients on every backward unless told not to: only a step's last micro-batch syncs
    no_sync = model.no_sync() if (not sync and hasattr(model, 'no_sync')) else contextlib.nullcontext()
    with no_sync:
        with precision.autocast():
            loss = objects.task.loss(model, inputs)
        scaled_loss = loss / accumulation
        if scaler is not None:
            scaler.scale(scaled_loss).backward()
        else:
            scaled_loss.backward()
    return loss.detach().float()


def _optimizer_step(objects, clip_grad):
    """Unscale, measure (and clip) the gradients, step, zero them. Returns the gradient norm (device tensor)."""
    optimizer, scaler = objects.optimizer, objects.scaler
    if scaler is not None:
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
    grad_norm = grad_norm_and_clip(objects.model.parameters(), clip_grad)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def train_one_epoch(config: CfgNode, objects: TrainingObjects, data_loader: Iterable, state: RunState,
                    steps_per_epoch: int, runtime: Runtime) -> EpochResult:
    """Train epoch ``state.epoch`` from micro-batch ``state.micro_batch`` on (non-zero on a mid-epoch resume),
    advancing ``state.micro_batch`` and ``state.global_step`` as it goes.

    ``steps_per_epoch`` counts optimizer steps; each is ``TRAIN.ACCUMULATION_STEPS`` micro-batches, and the
    last partial group of the loader is skipped so every step sees the same number of samples. Stops early,
    at a step boundary, when ``runtime.stop`` says so (the caller then saves ``state``).
    """
    objects.model.train()
    accumulation = config.TRAIN.ACCUMULATION_STEPS
    micro_batches = steps_per_epoch * accumulation
    objects.optimizer.zero_grad(set_to_none=True)
    meter = _TrainMeter(runtime.device)
    stopped = False
    for batch in data_loader:
        if state.micro_batch >= micro_batches:
            break
        inputs = objects.task.prepare(batch, runtime.device)
        state.micro_batch += 1
        ends_step = state.micro_batch % accumulation == 0
        loss = _forward_backward(objects, inputs, accumulation, ends_step, runtime.precision)
        meter.add_micro_batch(loss, accumulation)
        if not ends_step:
            continue

        grad_norm = _optimizer_step(objects, config.TRAIN.CLIP_GRAD)
        state.global_step += 1
        objects.lr_scheduler.step_update(state.global_step)
        if objects.model_ema is not None:
            objects.model_ema.update(unwrap_model(objects.model), step=state.global_step)
        meter.add_step(grad_norm, state.global_step)

        step_in_epoch = state.steps_in_epoch(accumulation)
        if step_in_epoch % config.PRINT_FREQ == 0 or step_in_epoch == steps_per_epoch:
            log_train_window(config, objects, state, meter.read_window(), steps_per_epoch, runtime)
            raise_if_nonfinite(meter.first_bad_step, objects.optimizer.param_groups[0]['lr'])

        if runtime.stop is not None and runtime.stop.should_stop():
            stopped = True
            break

    loss = meter.epoch_loss()
    raise_if_nonfinite(meter.first_bad_step, objects.optimizer.param_groups[0]['lr'])
    if not stopped:
        runtime.logger.info(f"EPOCH {state.epoch} training takes {format_eta(time.time() - meter.epoch_start)}")
    return EpochResult(stopped, loss)


def log_train_window(config: CfgNode, objects: TrainingObjects, state: RunState, window: TrainWindow,
                     steps_per_epoch: int, runtime: Runtime) -> None:
    """One training log line (the official fields) and the matching TensorBoard scalars, at the optimizer step
    ``state.global_step`` (the line shows the step within the epoch)."""
    optimizer, scaler = objects.optimizer, objects.scaler
    step = state.steps_in_epoch(config.TRAIN.ACCUMULATION_STEPS)
    step_time = window.seconds / max(window.steps, 1)
    eta = (window.epoch_seconds / max(window.epoch_steps, 1)) * (steps_per_epoch - step)
    lr = optimizer.param_groups[0]['lr']
    wd = max(group['weight_decay'] for group in optimizer.param_groups)
    images_per_step = config.DATA.BATCH_SIZE * config.TRAIN.ACCUMULATION_STEPS * config.WORLD_SIZE
    images_per_sec = images_per_step / step_time if step_time > 0 else 0.0
    scale_text = f"\tloss_scale {scaler.get_scale():.1f}" if scaler is not None else ''
    runtime.logger.info(
        f"Train: [{state.epoch}/{config.TRAIN.EPOCHS}][{step}/{steps_per_epoch}]\t"
        f"eta {format_eta(eta)} lr {lr:.6f}\t wd {wd:.4f}\t"
        f"time {step_time:.4f}\tloss {window.loss:.4f}\tgrad_norm {window.grad_norm:.4f}{scale_text}\t"
        f"mem {memory_mb(runtime.device):.0f}MB\t{images_per_sec:.1f} img/s")
    if runtime.writer is not None:
        runtime.writer.add_scalars({'train/loss': window.loss, 'train/lr': lr, 'train/grad_norm': window.grad_norm,
                                    'train/images_per_sec': images_per_sec}, state.global_step)


def topk_correct(output: torch.Tensor, target: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[torch.Tensor]:
    """Number of samples whose target is among the top-k predictions, for each k (device tensors)."""
    maxk = min(max(ks), output.shape[1])
    pred = output.topk(maxk, dim=1).indices
    hits = pred.eq(target.view(-1, 1))
    return [hits[:, :min(k, maxk)].any(dim=1).sum() for k in ks]


@torch.no_grad()
def validate(config: CfgNode, data_loader: Iterable, model: torch.nn.Module, device: torch.device,
             precision: Precision, logger: logging.Logger, header: str = 'Test',
             class_counts: ClassCounts | None = None) -> tuple[float, float, float]:
    """Exact top-1/top-5 and loss: counts are summed over ranks, each image counted once.

    Returns (acc1, acc5, loss) in percent / mean cross-entropy. ``class_counts`` (evaluation.ClassCounts), when
    given, also gets every batch and is summed over ranks: per-class accuracy and the confusion matrix.
    """
    model.eval()
    criterion = torch.nn.CrossEntropyLoss(reduction='sum')
    # [correct@1, correct@5, loss sum, images]
    totals = torch.zeros(4, dtype=torch.float64, device=device)
    start = time.time()
    for idx, batch in enumerate(data_loader):
        images, target = to_device(batch, device)
        with precision.autocast():
            output = model(images)
        output = output.float()
        correct1, correct5 = topk_correct(output, target)
        if class_counts is not None:
            class_counts.update(output, target)
        totals += torch.stack([correct1.double(), correct5.double(),
                               criterion(output, target).double(),
                               torch.tensor(float(target.shape[0]), dtype=torch.float64, device=device)])
        if (idx + 1) % config.PRINT_FREQ == 0:
            c1, c5, loss_sum, seen = totals.tolist()
            logger.info(f"{header}: [{idx + 1}/{len(data_loader)}]\tloss {loss_sum / seen:.4f}\t"
                        f"Acc@1 {100 * c1 / seen:.3f}\tAcc@5 {100 * c5 / seen:.3f}\t"
                        f"mem {memory_mb(device):.0f}MB")
    all_reduce_sum(totals)
    if class_counts is not None:
        class_counts.all_reduce()
    c1, c5, loss_sum, seen = totals.tolist()
    if seen == 0:
        raise TrainingError("validation saw no images: the val split is empty on every rank")
    acc1, acc5, loss = 100.0 * c1 / seen, 100.0 * c5 / seen, loss_sum / seen
    logger.info(f"{header}: {int(seen)} images in {time.time() - start:.1f}s")
    logger.info(format_accuracy(acc1, acc5))
    return acc1, acc5, loss


@torch.no_grad()
def throughput(images: torch.Tensor, model: torch.nn.Module, precision: Precision, logger: logging.Logger,
               warmup: int = 50, iterations: int = 30) -> float:
    """The official protocol: ``warmup`` forward passes, then ``iterations`` timed ones on one batch."""
    model.eval()
    batch_size = images.shape[0]

    def synchronize():
        if images.device.type == 'cuda':
            torch.cuda.synchronize(images.device)

    with precision.autocast():
        for _ in range(warmup):
            model(images)
        synchronize()
        logger.info(f"throughput averaged with {iterations} times ({precision}, {images.device})")
        tic = time.perf_counter()
        for _ in range(iterations):
            model(images)
        synchronize()
    elapsed = time.perf_counter() - tic
    value = iterations * batch_size / elapsed
    logger.info(format_throughput(batch_size, value))
    return value
