"""Runtime helpers: processes and devices, seeding, mixed precision, preemption signals, small reductions."""
from __future__ import annotations

import contextlib
import os
import random
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from yacs.config import CfgNode

import process_group
from errors import ConfigError


# -----------------------------------------------------------------------------
# Processes and devices
# -----------------------------------------------------------------------------
def select_device(name: str = 'auto', local_rank: int = 0) -> torch.device:
    """The one place a device is chosen: auto (CUDA when available, else CPU) | cpu | cuda (the GPU of
    ``local_rank``) | cuda:N. Scripts call this too, so --device means the same everywhere."""
    choice = name
    if choice == 'auto':
        choice = 'cuda' if torch.cuda.is_available() else 'cpu'
    if choice.startswith('cuda'):
        if not torch.cuda.is_available():
            raise ConfigError(f"DEVICE {name!r}: CUDA was asked for but is not available (use --device cpu)")
        if choice == 'cuda':
            if local_rank >= torch.cuda.device_count():
                raise ConfigError(f"LOCAL_RANK {local_rank} has no GPU: only {torch.cuda.device_count()} visible")
            choice = f'cuda:{local_rank}'
    elif choice != 'cpu':
        raise ConfigError(f"DEVICE {name!r} is unknown (use auto, cpu, cuda or cuda:N)")
    return torch.device(choice)


def resolve_device(config: CfgNode) -> torch.device:
    """torch.device for this process from DEVICE and LOCAL_RANK."""
    return select_device(config.DEVICE, config.LOCAL_RANK)


def init_distributed(config: CfgNode) -> torch.device:
    """Join the torchrun process group (NCCL on CUDA, gloo on CPU) when WORLD_SIZE > 1; seed; return device."""
    device = resolve_device(config)
    if device.type == 'cuda':
        torch.cuda.set_device(device)
        # fixed input sizes: let cuDNN pick the fastest kernels, unless runs must repeat bit for bit (the
        # benchmark may pick different, each deterministic, algorithms in two processes)
        torch.backends.cudnn.benchmark = not torch.are_deterministic_algorithms_enabled()
    set_tf32(config.TF32)
    if config.WORLD_SIZE > 1 and not dist.is_initialized():
        backend = 'nccl' if device.type == 'cuda' else 'gloo'
        process_group.form_process_group(backend, config.RANK, config.WORLD_SIZE, config.DIST.TIMEOUT,
                                         config.DIST.PEER_TIMEOUT, device_id=device if device.type == 'cuda' else None)
    seed_everything(config.SEED + config.RANK)
    return device


def set_tf32(enabled: bool) -> None:
    """float32 matmuls and convolutions on TF32 tensor cores (Ampere and later) or in full float32. CUDA-only
    flags, so CPU math is untouched; the legacy flags, which torch 2.4 and later all read."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled

def cleanup_distributed(reason: str = 'finished') -> None:
    process_group.leave(reason)  # a goodbye first: the peers' watch must not take this exit for a vanished rank
    if dist.is_initialized():
        dist.destroy_process_group()


def synchronize(device: torch.device | str) -> None:
    """Wait until ``device`` has run the work queued on it (CUDA runs asynchronously; a CPU has nothing queued).
    Timers call it on both ends of what they time."""
    device = torch.device(device)
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks in place (no-op in a single process); returns it."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_objects(obj: Any) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...]; a one-item list in a single process."""
    if not is_distributed():
        return [obj]
    gathered = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """The object of rank src, on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The bare module under DistributedDataParallel / DataParallel / timm ModelEma (``.module``) and
    torch.compile (``._orig_mod``) wrappers, nested in any order."""
    while True:
        if isinstance(getattr(model, '_orig_mod', None), torch.nn.Module):
            model = model._orig_mod
        elif isinstance(getattr(model, 'module', None), torch.nn.Module):
            model = model.module
        else:
            return model


def weights_checksum(model: torch.nn.Module) -> float:
    """One number summarizing every parameter: equal across ranks when DDP keeps them in sync."""
    return float(sum(p.detach().double().sum() for p in model.parameters()))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


# -----------------------------------------------------------------------------
# Mixed precision
# -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Precision:
    """What autocast does on this run: off, bfloat16 (no scaler) or float16 (with GradScaler)."""
    device_type: str
    dtype: torch.dtype = torch.float32

    @property
    def enabled(self) -> bool:
        return self.dtype != torch.float32

    @property
    def needs_scaler(self) -> bool:
        return self.dtype == torch.float16

    def autocast(self) -> contextlib.AbstractContextManager:
        if not self.enabled:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def __str__(self):
        return str(self.dtype).replace('torch.', '') if self.enabled else 'float32 (AMP off)'


def resolve_precision(config: CfgNode, device: torch.device) -> Precision:
    """AMP_ENABLE + AMP_DTYPE on CUDA; on CPU only an explicit AMP_DTYPE bfloat16 turns AMP on."""
    if not config.AMP_ENABLE:
        return Precision(device.type)
    if device.type == 'cuda':
        if config.AMP_DTYPE == 'float16':
            return Precision('cuda', torch.float16)
        # native bf16 only (Ampere+): V100/T4 emulate it slowly, so they get float16 + GradScaler
        bf16_supported = torch.cuda.is_bf16_supported(including_emulation=False)
        if config.AMP_DTYPE == 'bfloat16' and not bf16_supported:
            raise ConfigError("AMP_DTYPE bfloat16 is not supported by this GPU (use float16)")
        return Precision('cuda', torch.bfloat16 if bf16_supported else torch.float16)
    if config.AMP_DTYPE == 'bfloat16':
        return Precision(device.type, torch.bfloat16)
    return Precision(device.type)


# -----------------------------------------------------------------------------
# Preemption
# -----------------------------------------------------------------------------
_NO_STEP = torch.iinfo(torch.int64).min  # "no non-finite loss": loses every MAX


class StopRequest:
    """Turns SIGTERM/SIGINT (what clusters send before preemption) into a flag the loop polls.

    ``should_stop()`` must be called at the same steps on every rank: it takes the max over a CPU (gloo)
    group, so all ranks agree without a host sync on the GPU stream, and no rank is left waiting. It carries
    the ranks' non-finite loss reports too (``nonfinite_step``).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, checkpoint_due: Callable[[], bool] | None = None):
        self.signum = 0  # what all ranks agreed on; written only by should_stop()
        self.nonfinite_step = -1  # likewise: the earliest optimizer step with a non-finite loss on any rank
        # the same all-reduce agrees on periodic checkpoints: checkpoint_due() is this rank's clock, and
        # checkpoint_due (the attribute) is True on every rank once any rank's clock says so
        self._checkpoint_clock = checkpoint_due
        self.checkpoint_due = False
        # this process's own signal, written only by the handler: a signal whose handler runs while
        # should_stop() is inside the all-reduce must not be overwritten by the (older) reduced value
        self._received = 0
        self._previous = {}
        self._group = None
        if is_distributed():
            self._group = dist.new_group(backend='gloo') if dist.get_backend() != 'gloo' else dist.group.WORLD

    def install(self) -> StopRequest:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame):
        if self._received and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C means "now"
        if not self._received and get_rank() == 0:
            # at once, before the step ends; os.write: a signal handler must not re-enter a buffered stream
            again = ' (Ctrl-C again: exit now, keeping the last complete checkpoint)' if signum == signal.SIGINT else ''
            os.write(2, f"{signal.Signals(signum).name} received: finishing the current step, saving a checkpoint, "
                        f"then exit{again}\n".encode())
        self._received = signum

    def should_stop(self, nonfinite_step: int = -1) -> bool:
        """True on every rank once any rank got a signal; then ``signal_name``/``exit_code`` say which.

        The same all-reduce agrees on two more things. Non-finite losses: ``nonfinite_step`` is this rank's first
        optimizer step with a NaN/inf loss (-1: none, or not read at this step); afterwards
        ``self.nonfinite_step`` is the earliest such step over all ranks (-1: none), so every rank can stop at
        once with the same message. Periodic checkpoints: ``checkpoint_due`` says whether every rank saves one
        at this step.
        """
        due = self._checkpoint_clock is not None and self._checkpoint_clock()
        # one MAX over [signal, -(first non-finite step), checkpoint due]: negated, the max is the earliest step
        flags = torch.tensor([self._received, -nonfinite_step if nonfinite_step >= 0 else _NO_STEP, int(due)],
                             dtype=torch.int64)
        if self._group is not None:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self._group)
        received, negated_step, due = flags.tolist()
        self.signum = max(self.signum, received)
        self.nonfinite_step = -negated_step if negated_step != _NO_STEP else -1
        self.checkpoint_due = bool(due) and self.signum == 0
        return self.signum != 0

    @property
    def signal_name(self) -> str | None:
        return signal.Signals(self.signum).name if self.signum else None

    @property
    def exit_code(self) -> int:
        return 128 + self.signum if self.signum else 0  # the shell's convention for "ended by a signal"
