"""The loops of a run: one training epoch, exact validation, and the throughput benchmark.

The hot loop keeps running sums on the device and reads them (one host sync) only every PRINT_FREQ
optimizer steps, so the GPU is never stalled by logging.
"""
import contextlib
import time
from dataclasses import dataclass
from typing import Optional

import torch

from data import to_device
from errors import TrainingError
from logger import format_accuracy, format_eta, format_throughput
from utils import all_reduce_sum, unwrap_model


@dataclass
class EpochResult:
    global_step: int               # optimizer steps done since the start of training
    stopped_at: Optional[int]      # micro-batches of this epoch done when a stop was requested, else None
    loss: float                    # mean training loss over this epoch's micro-batches (this rank)


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
    """first_bad_step is a device tensor: -1 while every loss was finite, else the first bad step."""
    step = int(first_bad_step.item())
    if step >= 0:
        raise TrainingError(f"loss became NaN/inf at optimizer step {step} (lr {lr:.3g}); the last good "
                            f"checkpoint is kept. Lower TRAIN.BASE_LR, set TRAIN.CLIP_GRAD, or use "
                            f"AMP_DTYPE bfloat16 instead of float16")


def train_one_epoch(config, model, criterion, data_loader, optimizer, lr_scheduler, scaler, mixup_fn,
                    epoch, steps_per_epoch, start_step, global_step, device, precision, logger,
                    writer=None, model_ema=None, stop=None):
    """Train over this epoch's micro-batches from ``start_step`` on (mid-epoch resume).

    ``steps_per_epoch`` counts optimizer steps; each is ``TRAIN.ACCUMULATION_STEPS`` micro-batches, the
    last partial group of the loader is skipped so every step sees the same number of samples.
    """
    model.train()
    accum = config.TRAIN.ACCUMULATION_STEPS
    num_batches = steps_per_epoch * accum
    batch_size = config.DATA.BATCH_SIZE
    optimizer.zero_grad(set_to_none=True)

    # device-side running sums: [loss sum, micro-batches, grad-norm sum, optimizer steps]
    epoch_sums = torch.zeros(4, dtype=torch.float64, device=device)
    window_sums = torch.zeros(4, dtype=torch.float64, device=device)
    first_bad_step = torch.full((), -1, dtype=torch.long, device=device)
    step_loss = torch.zeros((), dtype=torch.float32, device=device)

    epoch_start = window_start = time.time()
    steps_done = 0
    stopped_at = None
    for idx, (samples, targets) in enumerate(data_loader, start=start_step):
        if idx >= num_batches:
            break
        samples, targets = to_device(samples, targets, device)
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)

        is_update = (idx + 1) % accum == 0
        # DDP all-reduces gradients on every backward unless told not to: only the last micro-step syncs
        no_sync = model.no_sync() if (not is_update and hasattr(model, 'no_sync')) else contextlib.nullcontext()
        with no_sync:
            with precision.autocast():
                outputs = model(samples)
                loss = criterion(outputs, targets)
            scaled_loss = loss / accum
            if scaler is not None:
                scaler.scale(scaled_loss).backward()
            else:
                scaled_loss.backward()
        loss = loss.detach().float()
        step_loss += loss / accum
        window_sums[0] += loss
        window_sums[1] += 1
        if not is_update:
            continue

        if scaler is not None:
            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        grad_norm = grad_norm_and_clip(model.parameters(), config.TRAIN.CLIP_GRAD)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        global_step += 1
        steps_done += 1
        lr_scheduler.step_update(global_step)
        if model_ema is not None:
            model_ema.update(unwrap_model(model), step=global_step)

        first_bad_step = torch.where((first_bad_step < 0) & ~torch.isfinite(step_loss),
                                     torch.full_like(first_bad_step, global_step), first_bad_step)
        step_loss.zero_()
        window_sums[2] += grad_norm.detach().double()
        window_sums[3] += 1

        step_in_epoch = (idx + 1) // accum
        if step_in_epoch % config.PRINT_FREQ == 0 or step_in_epoch == steps_per_epoch:
            epoch_sums += window_sums
            now = time.time()
            log_train_window(config, logger, writer, optimizer, window_sums, epoch, step_in_epoch,
                             steps_per_epoch, global_step, now - window_start, now - epoch_start, steps_done,
                             batch_size * accum * config.WORLD_SIZE, device, scaler)
            raise_if_nonfinite(first_bad_step, optimizer.param_groups[0]['lr'])
            window_sums.zero_()
            window_start = now

        if stop is not None and stop.should_stop():
            stopped_at = idx + 1
            break

    epoch_sums += window_sums
    raise_if_nonfinite(first_bad_step, optimizer.param_groups[0]['lr'])
    loss_sum, batches = epoch_sums[0].item(), epoch_sums[1].item()
    epoch_time = time.time() - epoch_start
    if stopped_at is None:
        logger.info(f"EPOCH {epoch} training takes {format_eta(epoch_time)}")
    return EpochResult(global_step, stopped_at, loss_sum / max(batches, 1))


def log_train_window(config, logger, writer, optimizer, window_sums, epoch, step, steps_per_epoch,
                     global_step, window_time, epoch_time, steps_done, images_per_step, device, scaler):
    """One training log line (the official fields) and the matching TensorBoard scalars."""
    loss_sum, batches, norm_sum, steps = window_sums.tolist()
    loss, grad_norm = loss_sum / max(batches, 1), norm_sum / max(steps, 1)
    step_time = window_time / max(steps, 1)
    eta = (epoch_time / max(steps_done, 1)) * (steps_per_epoch - step)
    lr = optimizer.param_groups[0]['lr']
    wd = max(group['weight_decay'] for group in optimizer.param_groups)
    images_per_sec = images_per_step / step_time if step_time > 0 else 0.0
    scale_text = f"\tloss_scale {scaler.get_scale():.1f}" if scaler is not None else ''
    logger.info(
        f"Train: [{epoch}/{config.TRAIN.EPOCHS}][{step}/{steps_per_epoch}]\t"
        f"eta {format_eta(eta)} lr {lr:.6f}\t wd {wd:.4f}\t"
        f"time {step_time:.4f}\tloss {loss:.4f}\tgrad_norm {grad_norm:.4f}{scale_text}\t"
        f"mem {memory_mb(device):.0f}MB\t{images_per_sec:.1f} img/s")
    if writer is not None:
        writer.add_scalars({'train/loss': loss, 'train/lr': lr, 'train/grad_norm': grad_norm,
                            'train/images_per_sec': images_per_sec}, global_step)


def topk_correct(output, target, ks=(1, 5)):
    """Number of samples whose target is among the top-k predictions, for each k (device tensors)."""
    maxk = min(max(ks), output.shape[1])
    pred = output.topk(maxk, dim=1).indices
    hits = pred.eq(target.view(-1, 1))
    return [hits[:, :min(k, maxk)].any(dim=1).sum() for k in ks]


@torch.no_grad()
def validate(config, data_loader, model, device, precision, logger, header='Test'):
    """Exact top-1/top-5 and loss: counts are summed over ranks, each image counted once.

    Returns (acc1, acc5, loss) in percent / mean cross-entropy.
    """
    model.eval()
    criterion = torch.nn.CrossEntropyLoss(reduction='sum')
    # [correct@1, correct@5, loss sum, images]
    totals = torch.zeros(4, dtype=torch.float64, device=device)
    start = time.time()
    for idx, (images, target) in enumerate(data_loader):
        images, target = to_device(images, target, device)
        with precision.autocast():
            output = model(images)
        output = output.float()
        correct1, correct5 = topk_correct(output, target)
        totals += torch.stack([correct1.double(), correct5.double(),
                               criterion(output, target).double(),
                               torch.tensor(float(target.shape[0]), dtype=torch.float64, device=device)])
        if (idx + 1) % config.PRINT_FREQ == 0:
            c1, c5, loss_sum, seen = totals.tolist()
            logger.info(f"{header}: [{idx + 1}/{len(data_loader)}]\tloss {loss_sum / seen:.4f}\t"
                        f"Acc@1 {100 * c1 / seen:.3f}\tAcc@5 {100 * c5 / seen:.3f}\t"
                        f"mem {memory_mb(device):.0f}MB")
    all_reduce_sum(totals)
    c1, c5, loss_sum, seen = totals.tolist()
    if seen == 0:
        raise TrainingError("validation saw no images: the val split is empty on every rank")
    acc1, acc5, loss = 100.0 * c1 / seen, 100.0 * c5 / seen, loss_sum / seen
    logger.info(f"{header}: {int(seen)} images in {time.time() - start:.1f}s")
    logger.info(format_accuracy(acc1, acc5))
    return acc1, acc5, loss


@torch.no_grad()
def throughput(images, model, precision, logger, warmup=50, iterations=30):
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
