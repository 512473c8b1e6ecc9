"""Runtime helpers: processes and devices, seeding, mixed precision, small reductions."""
from __future__ import annotations

import contextlib
import random
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
    flags, so CPU math is untouched; the legacy flags, which torch 2.4 and later all read (the matmul flag is what
    ``torch.get_float32_matmul_precision()`` reports: 'high' on, 'highest' off). Not
    ``torch.set_float32_matmul_precision``: since torch 2.9 its 'high' also lets oneDNN run CPU matmuls in TF32."""
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
