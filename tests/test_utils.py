"""utils.py choices that only a GPU would exercise, checked through what the CPU can read back."""
import pytest
import torch
import torch.distributed as dist

import process_group
from errors import ConfigError
from helpers import free_port
from utils import cleanup_distributed, init_distributed, resolve_precision

CUDA = torch.device('cuda')


def pre_ampere_gpu(including_emulation=True):
    """torch.cuda.is_bf16_supported on a V100 / T4: bf16 only through (slow) emulation."""
    return including_emulation


def test_auto_amp_on_a_pre_ampere_gpu_is_float16_with_a_scaler(tiny_config, monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', pre_ampere_gpu)
    precision = resolve_precision(tiny_config('AMP_DTYPE', 'auto'), CUDA)
    assert precision.dtype == torch.float16 and precision.needs_scaler
    with pytest.raises(ConfigError, match='AMP_DTYPE bfloat16 is not supported'):
        resolve_precision(tiny_config('AMP_DTYPE', 'bfloat16'), CUDA)


def test_auto_amp_on_ampere_is_bfloat16(tiny_config, monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda including_emulation=True: True)
    precision = resolve_precision(tiny_config('AMP_DTYPE', 'auto'), CUDA)
    assert precision.dtype == torch.bfloat16 and not precision.needs_scaler


def cpu_matmul_precision():
    """oneDNN's internal precision for CPU float32 matmuls (torch 2.9+; None before: nothing could change it)."""
    return getattr(getattr(torch.backends.mkldnn, 'matmul', None), 'fp32_precision', None)


@pytest.mark.parametrize('tf32', [True, False])
def test_tf32_key_sets_the_cuda_float32_precision_and_leaves_cpu_matmuls_alone(tiny_config, tf32):
    # start from the opposite values, restored by assignment afterwards: the flags are properties of torch's
    # backend modules, which monkeypatch's undo may try to delete
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not tf32
    cpu_before = cpu_matmul_precision()
    try:
        init_distributed(tiny_config('DEVICE', 'cpu', 'TF32', tf32))
        # torch's public reading of the CUDA float32 matmul precision: 'high' is TF32, 'highest' full float32
        assert torch.get_float32_matmul_precision() == ('high' if tf32 else 'highest')
        assert torch.backends.cudnn.allow_tf32 is tf32  # convolutions: cuDNN's own switch
        # CPU math untouched (torch.set_float32_matmul_precision('high') would let oneDNN use TF32 on a CPU)
        assert cpu_matmul_precision() == cpu_before and cpu_matmul_precision() in (None, 'none', 'ieee')
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_process_group_timeout_comes_from_dist_timeout(tiny_config, monkeypatch):
    # torchrun's environment for a one-process group; init_distributed forms groups for WORLD_SIZE > 1 only, so
    # the test lets process_group see one process where the config says two
    for key, value in dict(MASTER_ADDR='127.0.0.1', MASTER_PORT=free_port(), RANK=0, WORLD_SIZE=1).items():
        monkeypatch.setenv(key, str(value))
    form = process_group.form_process_group
    monkeypatch.setattr(process_group, 'form_process_group',
                        lambda backend, rank, world_size, *args, **kwargs: form(backend, rank, 1, *args, **kwargs))
    config = tiny_config('DEVICE', 'cpu', 'DIST.TIMEOUT', 123)
    config.defrost()
    config.WORLD_SIZE = 2
    init_distributed(config)
    try:
        backend = dist.group.WORLD._get_backend(torch.device('cpu'))
        assert backend.options._timeout.total_seconds() == 123
    finally:
        cleanup_distributed()
