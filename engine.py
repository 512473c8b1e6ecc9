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

from coordinator import Action
from data import to_device
from errors import TrainingError
from logger import format_accuracy, format_eta, format_meter, format_throughput
from run_state import RunState, Runtime, TrainingObjects
from utils import Precision, all_reduce_sum, synchronize, unwrap_model

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
    epoch_loss: float        # mean loss over this call's micro-batches so far
    epoch_grad_norm: float   # mean gradient norm over this call's optimizer steps so far
    skipped: int = 0         # steps of the window the fp16 GradScaler skipped (not in grad_norm)


class _TrainMeter:
    """Running sums kept on the device (no host sync per step), read once per log window."""

    def __init__(self, device):
        # [loss sum, micro-batches, grad-norm sum, optimizer steps, steps the fp16 GradScaler skipped]
        self.epoch_sums = torch.zeros(5, dtype=torch.float64, device=device)
        self.window_sums = torch.zeros(5, dtype=torch.float64, device=device)
        self.first_bad_step = torch.full((), -1, dtype=torch.long, device=device)
        self.step_loss = torch.zeros((), dtype=torch.float32, device=device)
        self.epoch_start = self.window_start = time.time()
        self.epoch_steps = 0

    def add_micro_batch(self, loss, accumulation):
        self.step_loss += loss / accumulation
        self.window_sums[0] += loss
        self.window_sums[1] += 1

    def add_step(self, grad_norm, global_step, scaled=False):
        """An optimizer step ended: record its gradient norm, and the step if its loss was not finite. With a
        GradScaler (``scaled``) a non-finite norm means the step was skipped: counted, not averaged."""
        self.epoch_steps += 1
        self.first_bad_step = torch.where((self.first_bad_step < 0) & ~torch.isfinite(self.step_loss),
                                          torch.full_like(self.first_bad_step, global_step), self.first_bad_step)
        self.step_loss.zero_()
        grad_norm = grad_norm.detach().double()
        if scaled:
            skipped = ~torch.isfinite(grad_norm)
            grad_norm = torch.where(skipped, torch.zeros_like(grad_norm), grad_norm)
            self.window_sums[4] += skipped
        self.window_sums[2] += grad_norm
        self.window_sums[3] += 1

    def read_window(self):
        """The window's and the epoch's numbers (one host sync); the next window starts now."""
        self.epoch_sums += self.window_sums
        (loss_sum, micro_batches, norm_sum, steps, skipped,
         epoch_loss_sum, epoch_micro_batches, epoch_norm_sum, epoch_steps, epoch_skipped) = torch.cat(
            [self.window_sums, self.epoch_sums]).tolist()
        self.window_sums.zero_()
        now = time.time()
        # gradient norms are averaged over the steps taken (a step the fp16 scaler skipped has an inf/nan norm)
        grad_norm = norm_sum / (steps - skipped) if steps > skipped else float('nan')
        epoch_grad_norm = (epoch_norm_sum / (epoch_steps - epoch_skipped) if epoch_steps > epoch_skipped
                           else float('nan'))
        window = TrainWindow(loss_sum / max(micro_batches, 1), grad_norm, int(steps), now - self.window_start,
                             self.epoch_steps, now - self.epoch_start, epoch_loss_sum / max(epoch_micro_batches, 1),
                             epoch_grad_norm, int(skipped))
        self.window_start = now
        return window

    def bad_step(self):
        """The first optimizer step with a non-finite loss, -1 if none (a host sync: call it when logging)."""
        return int(self.first_bad_step.item())

    def epoch_loss(self):
        self.epoch_sums += self.window_sums
        self.window_sums.zero_()
        loss_sum, micro_batches = self.epoch_sums[0].item(), self.epoch_sums[1].item()
        return loss_sum / max(micro_batches, 1)


class _ScaleMeter:
    """The float16 loss scale at each logged step: reading it syncs the host, so it is read only when logging."""

    def __init__(self):
        self.total, self.count = 0.0, 0

    def read(self, scaler):
        value = scaler.get_scale()
        self.total, self.count = self.total + value, self.count + 1
        return value, self.total / self.count


def grad_norm_and_clip(parameters, max_norm):
    """Total gradient norm (a device tensor); clips to max_norm when it is set (0/None: no clipping)."""
    parameters = [p for p in parameters if p.grad is not None]
    if max_norm:
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    if hasattr(torch.nn.utils, 'get_total_norm'):  # torch >= 2.6
        return torch.nn.utils.get_total_norm([p.grad for p in parameters])
    return torch.nn.utils.clip_grad_norm_(parameters, float('inf'))  # an infinite bound only measures


def memory_field(device, name='mem'):
    """The official ``\tmem NMB`` field (peak CUDA memory); empty on other devices, which do not measure it."""
    if device.type != 'cuda':
        return ''
    return f"\t{name} {torch.cuda.max_memory_allocated(device) / 2 ** 20:.0f}MB"


def forward_backward(objects: TrainingObjects, inputs, accumulation: int, sync: bool, precision: Precision
                     ) -> torch.Tensor:
    """One micro-batch of an optimizer step: the task's loss (forward, under autocast) and backward of
    loss / accumulation; ``sync``: the step's last micro-batch, whose backward all-reduces DDP's gradients.
    Returns the (unscaled) loss, detached."""
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


def optimizer_step(objects: TrainingObjects, clip_grad: float | None) -> torch.Tensor:
    """The end of an optimizer step: unscale, measure (and clip) the gradients, step, zero them. Returns the
    gradient norm (a device tensor). scripts/benchmark.py times these two functions, so it times this loop's step."""
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
    last partial group of the loader is skipped so every step sees the same number of samples. After each step
    ``runtime.coordinator`` answers for all ranks: continue, save a periodic checkpoint, or stop early at this
    step boundary (the caller then saves ``state``); a non-finite loss raises TrainingError.
    """
    objects.model.train()
    accumulation = config.TRAIN.ACCUMULATION_STEPS
    micro_batches = steps_per_epoch * accumulation
    objects.optimizer.zero_grad(set_to_none=True)
    meter, scale_meter = _TrainMeter(runtime.device), _ScaleMeter()
    stopped = False
    for batch in data_loader:
        if state.micro_batch >= micro_batches:
            break
        inputs = objects.task.prepare(batch, runtime.device)
        state.micro_batch += 1
        ends_step = state.micro_batch % accumulation == 0
        loss = forward_backward(objects, inputs, accumulation, ends_step, runtime.precision)
        meter.add_micro_batch(loss, accumulation)
        if not ends_step:
            continue

        grad_norm = optimizer_step(objects, config.TRAIN.CLIP_GRAD)
        state.global_step += 1
        objects.lr_scheduler.step_update(state.global_step)
        if objects.model_ema is not None:
            objects.model_ema.update(unwrap_model(objects.model), step=state.global_step)
        meter.add_step(grad_norm, state.global_step, scaled=objects.scaler is not None)

        step_in_epoch = state.steps_in_epoch(accumulation)
        logged = step_in_epoch % config.PRINT_FREQ == 0 or step_in_epoch == steps_per_epoch
        if logged:
            log_train_window(config, objects, state, meter.read_window(), steps_per_epoch, runtime, scale_meter)
        action = runtime.coordinator.after_step(meter.bad_step, logged, objects.optimizer.param_groups[0]['lr'])
        if action is Action.STOP:
            stopped = True
            break
        if action is Action.SAVE:
            runtime.coordinator.save(state)

    loss = meter.epoch_loss()  # every step's loss has been read: the epoch's last step is always logged
    if not stopped:
        runtime.logger.info(f"EPOCH {state.epoch} training takes {format_eta(time.time() - meter.epoch_start)}")
    return EpochResult(stopped, loss)


def log_train_window(config: CfgNode, objects: TrainingObjects, state: RunState, window: TrainWindow,
                     steps_per_epoch: int, runtime: Runtime, scale_meter: _ScaleMeter | None = None) -> None:
    """One training log line in the official format and the matching TensorBoard scalars, at the optimizer step
    ``state.global_step`` (the line shows the step within the epoch). Each ``v (avg)`` pair is the mean over the
    steps since the previous line and over the epoch so far; ``loss_scale`` only appears with a GradScaler."""
    optimizer, scaler = objects.optimizer, objects.scaler
    step = state.steps_in_epoch(config.TRAIN.ACCUMULATION_STEPS)
    step_time = window.seconds / max(window.steps, 1)
    epoch_step_time = window.epoch_seconds / max(window.epoch_steps, 1)
    eta = epoch_step_time * (steps_per_epoch - step)
    # the whole run at this epoch's pace (validation not included)
    eta_run = eta + epoch_step_time * steps_per_epoch * (config.TRAIN.EPOCHS - state.epoch - 1)
    lr = optimizer.param_groups[0]['lr']
    wd = max(group['weight_decay'] for group in optimizer.param_groups)
    images_per_step = config.DATA.BATCH_SIZE * config.TRAIN.ACCUMULATION_STEPS * config.WORLD_SIZE
    images_per_sec = images_per_step / step_time if step_time > 0 else 0.0
    scale_text = ''
    if scaler is not None:
        scale, scale_avg = (scale_meter or _ScaleMeter()).read(scaler)
        scale_text = f"\tloss_scale {format_meter(scale, scale_avg)}"
    skipped_text = f"\tskipped {window.skipped}" if scaler is not None else ''
    runtime.logger.info(
        f"Train: [{state.epoch}/{config.TRAIN.EPOCHS}][{step}/{steps_per_epoch}]\t"
        f"eta {format_eta(eta)} lr {lr:.6f}\t wd {wd:.4f}\t"
        f"time {format_meter(step_time, epoch_step_time)}\tloss {format_meter(window.loss, window.epoch_loss)}\t"
        f"grad_norm {format_meter(window.grad_norm, window.epoch_grad_norm)}{scale_text}"
        f"{memory_field(runtime.device)}\t{images_per_sec:.1f} img/s\teta_run {format_eta(eta_run)}{skipped_text}")
    if runtime.writer is not None:
        scalars = {'train/loss': window.loss, 'train/lr': lr, 'train/grad_norm': window.grad_norm,
                   'train/images_per_sec': images_per_sec}
        if scaler is not None:
            scalars['train/skipped_steps'] = window.skipped
        runtime.writer.add_scalars(scalars, state.global_step)


def topk_correct(output: torch.Tensor, target: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[torch.Tensor]:
    """Number of samples whose target is among the top-k predictions, for each k (device tensors)."""
    maxk = min(max(ks), output.shape[1])
    pred = output.topk(maxk, dim=1).indices
    hits = pred.eq(target.view(-1, 1))
    return [hits[:, :min(k, maxk)].any(dim=1).sum() for k in ks]


@torch.no_grad()
def validate(config: CfgNode, data_loader: Iterable, model: torch.nn.Module, device: torch.device,
             precision: Precision, logger: logging.Logger, label: str = '',
             class_counts: ClassCounts | None = None) -> tuple[float, float, float]:
    """Exact top-1/top-5 and loss: counts are summed over ranks, each image counted once.

    Logs the official ``Test: [i/N]`` lines every PRINT_FREQ batches (``v (avg)``: the batches since the previous
    line and all so far, on this rank) and `` * Acc@1 x Acc@5 y`` over all ranks; ``label`` (e.g. 'EMA') marks
    the lines of another model: ``Test (EMA): [i/N]``, `` * EMA Acc@1``. Returns (acc1, acc5, loss) in percent /
    mean cross-entropy. ``class_counts`` (evaluation.ClassCounts), when given, also gets every batch and is
    summed over ranks: per-class accuracy and the confusion matrix.
    """
    model.eval()
    criterion = torch.nn.CrossEntropyLoss(reduction='sum')
    header = f"Test ({label})" if label else 'Test'
    # [correct@1, correct@5, loss sum, images]
    totals = torch.zeros(4, dtype=torch.float64, device=device)
    logged, logged_batches = [0.0] * 4, 0
    start = logged_time = time.time()
    for idx, batch in enumerate(data_loader):
        images, target = to_device(batch, device)
        with precision.autocast():
            output = model(images)
        output = output.float()
        correct1, correct5 = topk_correct(output, target)
        if class_counts is not None:
            class_counts.update(output, target)
        totals[:3] += torch.stack([correct1.double(), correct5.double(), criterion(output, target).double()])
        totals[3] += target.shape[0]  # a scalar kernel argument: no host-to-device copy, no sync
        if (idx + 1) % config.PRINT_FREQ == 0:
            now, current = time.time(), totals.tolist()
            window = [a - b for a, b in zip(current, logged, strict=True)]
            batch_time = (now - logged_time) / (idx + 1 - logged_batches)
            logger.info(f"{header}: [{idx + 1}/{len(data_loader)}]\t"
                        f"Time {format_meter(batch_time, (now - start) / (idx + 1), 3)}\t"
                        f"Loss {format_meter(window[2] / window[3], current[2] / current[3])}\t"
                        f"Acc@1 {format_meter(100 * window[0] / window[3], 100 * current[0] / current[3], 3)}\t"
                        f"Acc@5 {format_meter(100 * window[1] / window[3], 100 * current[1] / current[3], 3)}"
                        f"{memory_field(device, 'Mem')}")
            logged, logged_batches, logged_time = current, idx + 1, now
    all_reduce_sum(totals)
    if class_counts is not None:
        class_counts.all_reduce()
    c1, c5, loss_sum, seen = totals.tolist()
    if seen == 0:
        raise TrainingError("validation saw no images: the val split is empty on every rank")
    acc1, acc5, loss = 100.0 * c1 / seen, 100.0 * c5 / seen, loss_sum / seen
    logger.info(f"{header}: {int(seen)} images in {time.time() - start:.1f}s")
    logger.info(format_accuracy(acc1, acc5, label))
    return acc1, acc5, loss


@torch.no_grad()
def throughput(images: torch.Tensor, model: torch.nn.Module, precision: Precision, logger: logging.Logger,
               warmup: int = 50, iterations: int = 30) -> float:
    """The official protocol: ``warmup`` (at least 1) forward passes, then ``iterations`` timed ones on one batch.
    The first line says how long that will take (from the first warm-up pass); progress with an ETA is logged
    every ``_PROGRESS_SECONDS``; the result ends in the official line."""
    model.eval()
    batch_size = images.shape[0]
    with precision.autocast():
        progress = _PassProgress(warmup + iterations, logger)
        model(images)  # warm-up pass 1 sets the pace for the estimate
        synchronize(images.device)
        first = time.perf_counter() - progress.start
        logger.info(f"throughput: {warmup} warm-up + {iterations} timed forward passes of batch {batch_size} "
                    f"({precision}, {images.device}); the first pass took {first:.2f}s, so about "
                    f"{format_eta(first * (warmup + iterations))} in all"
                    f"{_SHORTEN if first * (warmup + iterations) > _LONG_SECONDS else ''}")
        for i in range(1, warmup):
            model(images)
            progress.tick(i + 1, 'warm-up', images.device)
        synchronize(images.device)
        logger.info(f"throughput averaged with {iterations} times\tprecision {precision} on {images.device}")
        tic = time.perf_counter()
        for i in range(iterations):
            model(images)
            progress.tick(warmup + i + 1, 'timed', images.device)
        synchronize(images.device)
    elapsed = time.perf_counter() - tic
    value = iterations * batch_size / elapsed
    logger.info(format_throughput(batch_size, value))
    if precision.enabled:
        logger.info(f"measured with {precision} autocast; the official figures are float32: add --disable_amp "
                    f"to compare")
    logger.info(f"throughput: {value:.2f} images/s (batch {batch_size}, {precision}, {images.device}; "
                f"{iterations} passes in {elapsed:.1f}s)")
    return value


_LONG_SECONDS = 120.0  # past this the first line says how to shorten the protocol
_SHORTEN = (" (a shorter run: --opts THROUGHPUT.WARMUP_PASSES 5 THROUGHPUT.TIMED_PASSES 10; the official protocol "
            "is 50 + 30)")
_PROGRESS_SECONDS = 10.0


class _PassProgress:
    """Logs 'pass i/N ... ETA' at most every _PROGRESS_SECONDS."""

    def __init__(self, total, logger):
        self.total, self.logger = total, logger
        self.start = self.last = time.perf_counter()

    def tick(self, passes, phase, device):
        if time.perf_counter() - self.last < _PROGRESS_SECONDS:
            return
        synchronize(device)  # (CUDA) the passes counted have run, so the pace is real
        self.last = time.perf_counter()
        per_pass = (self.last - self.start) / passes
        self.logger.info(f"throughput: {phase} pass {passes}/{self.total}, {per_pass:.2f}s per pass, "
                         f"eta {format_eta(per_pass * (self.total - passes))}")
