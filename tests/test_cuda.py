"""The CUDA paths: AMP train steps, fused attention kernels, device normalization, real runs of main.py.

Marked ``cuda`` and skipped without a GPU. ``SWIN_CUDA_TESTS_ON_CPU=1`` runs them on the CPU instead (the dry
mode of scripts/gpu_check.sh), which proves the tests themselves before a GPU is there; CUDA-only checks (the
memory-efficient SDPA kernel, fp16 autocast) are then reduced to what the CPU has.
"""
import copy
import io
import json
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import make_tiny_config
from data import collate, split_mode, to_device
from data.datasets import Sample, seeded
from data.transforms import open_image
from helpers import (
    ROOT,
    assert_same_weights,
    child_env,
    load_weights,
    logged_losses,
    make_image_folder,
    read,
    set_fused,
    tiny_yaml,
    wait_for,
)
from models import build_model
from utils import Precision

sys.path.insert(0, os.path.join(ROOT, 'scripts'))
from benchmark import buildable_families  # noqa: E402

ON_CPU = os.environ.get('SWIN_CUDA_TESTS_ON_CPU') == '1'
FAMILIES = buildable_families()  # every MODEL.TYPE models.build_model builds: new families join by themselves
DEVICE = 'cuda' if torch.cuda.is_available() else 'cpu'
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(DEVICE == 'cpu' and not ON_CPU, reason='needs CUDA (SWIN_CUDA_TESTS_ON_CPU=1: CPU)')]
# a 56 px model with window 7: masks of N = 49 (padded rows) in a shifted 4x4-window stage and a 2x2 one
WINDOW7 = ('DATA.IMG_SIZE', 56, 'MODEL.SWIN.WINDOW_SIZE', 7, 'MODEL.SWIN.EMBED_DIM', 32,
           'MODEL.SWIN.NUM_HEADS', [2, 4], 'MODEL.DROP_PATH_RATE', 0.0)


def family_config(family, *opts):
    """The tiny test config (window 7 variant) for MODEL.TYPE ``family``: its node gets the sizes."""
    node = f'MODEL.{family.upper()}.'
    sized = [node + key[len('MODEL.SWIN.'):] if str(key).startswith('MODEL.SWIN.') else key
             for key in WINDOW7 + ('MODEL.SWIN.PATCH_SIZE', 2, 'MODEL.SWIN.DEPTHS', [2, 2])]
    return make_tiny_config(None, 'MODEL.TYPE', family, *sized, *opts)


def flat_grads(model):
    return torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# ----------------------------------------------------------------------------- AMP train steps
# relative error of the whole gradient vector: bf16 keeps 8 significant bits, fp16 11
@pytest.mark.parametrize('dtype, tolerance', [(torch.bfloat16, 0.08), (torch.float16, 0.01)], ids=['bf16', 'fp16'])
def test_amp_train_step_close_to_fp32(dtype, tolerance):
    if DEVICE == 'cpu' and dtype == torch.float16:  # CPU dry run: the same code path in bf16 (scaler below)
        dtype, tolerance = torch.bfloat16, 0.08
    config = family_config('swin')
    torch.manual_seed(0)
    model = build_model(config).to(DEVICE).train()
    reference = copy.deepcopy(model)
    x = torch.randn(8, 3, 56, 56, device=DEVICE)
    y = torch.randint(0, 10, (8,), device=DEVICE)

    F.cross_entropy(reference(x), y).backward()
    precision = Precision(DEVICE, dtype)
    assert precision.needs_scaler == (dtype == torch.float16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler(DEVICE, enabled=True)  # the engine's scaler, active whatever the dtype here
    with precision.autocast():
        out = model(x)
        loss = F.cross_entropy(out, y)
    assert out.dtype == dtype and torch.isfinite(loss)
    scaler.scale(loss).backward()
    scale = scaler.get_scale()
    assert scale == 2.0 ** 16  # GradScaler active: the gradients are scaled by its initial scale
    assert rel_err(flat_grads(model) / scale, flat_grads(reference)) < tolerance
    scaler.unscale_(optimizer)
    assert rel_err(flat_grads(model), flat_grads(reference)) < tolerance
    before = model.head.weight.detach().clone()
    scaler.step(optimizer)
    scaler.update()
    assert scaler.get_scale() == scale  # no inf/nan found: the step was taken, the scale kept
    assert not torch.equal(model.head.weight, before)
    if DEVICE == 'cuda':  # the run's own choice of dtype and scaler agrees
        amp_dtype = 'float16' if dtype == torch.float16 else 'bfloat16'
        from utils import resolve_precision
        assert resolve_precision(make_tiny_config(None, 'AMP_DTYPE', amp_dtype), torch.device('cuda')) == precision


# ----------------------------------------------------------------------------- fused vs explicit attention
@pytest.mark.parametrize('family', FAMILIES)
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16], ids=['fp32', 'bf16'])
def test_fused_attention_matches_explicit(family, dtype):
    torch.manual_seed(0)
    fused = build_model(family_config(family)).to(DEVICE).train()
    explicit = copy.deepcopy(fused)
    if set_fused(explicit, False) == 0:
        pytest.skip(f'{family} has no fused attention path')
    x = torch.randn(4, 3, 56, 56, device=DEVICE)
    outs = []
    for model in (fused, explicit):
        with torch.autocast(DEVICE, dtype=dtype, enabled=dtype != torch.float32):
            out = model(x)
        out.float().square().mean().backward()
        outs.append(out.float())
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    assert rel_err(outs[0], outs[1]) < tolerance
    assert rel_err(flat_grads(fused), flat_grads(explicit)) < tolerance * 3


SDPA_WARNINGS = r"""
import contextlib, json, sys, warnings
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
sys.path.insert(0, sys.argv[1])
from conftest import make_tiny_config
from models import build_model
device = sys.argv[2]
found, ran = [], []
warnings.simplefilter('always')
for family in json.loads(sys.argv[3]):
    for img, window in ((56, 7), (96, 12)):  # N = 49 (padded rows) and N = 144 (a permuted bias before)
        node = 'MODEL.' + family.upper() + '.'
        config = make_tiny_config(None, 'MODEL.TYPE', family, 'DATA.IMG_SIZE', img, node + 'WINDOW_SIZE', window,
                                  node + 'PATCH_SIZE', 2 if window == 7 else 4, node + 'EMBED_DIM', 64,
                                  node + 'NUM_HEADS', [2, 4], node + 'DEPTHS', [2, 2])
        model = build_model(config).to(device).train()
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            if device == 'cpu' and dtype == torch.float16:
                continue
            # only the memory-efficient kernel on CUDA: a mask it cannot take raises instead of falling back
            kernels = sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION) if device == 'cuda' else contextlib.nullcontext()
            with warnings.catch_warnings(record=True) as caught, kernels:
                with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
                    model(torch.randn(2, 3, img, img, device=device)).float().sum().backward()
            found += [str(w.message) for w in caught]
            ran.append(f'{family} window {window} {dtype}')
print(json.dumps({'warnings': found, 'ran': ran}))
"""


def test_sdpa_takes_the_masks_without_padding_warnings():
    """In a fresh process (PyTorch warns once per process): every family, windows 7 and 12, fp32/bf16/fp16,
    forward and backward through the memory-efficient kernel only, and no alignment warning."""
    families = list(FAMILIES)
    result = subprocess.run([sys.executable, '-c', SDPA_WARNINGS, os.path.join(ROOT, 'tests'), DEVICE,
                             json.dumps(families)], cwd=ROOT, env=child_env(), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(report['ran']) == len(families) * 2 * (3 if DEVICE == 'cuda' else 2)
    bad = [w for w in report['warnings'] if 'aligned' in w or 'emory efficient' in w or 'emory Efficient' in w]
    assert not bad, bad


# ----------------------------------------------------------------------------- device normalization
def jpeg_bytes(seed, size=(300, 260)):
    rng = np.random.default_rng(seed)
    field = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
    pixels = np.asarray(Image.fromarray(field).resize(size, Image.BICUBIC), dtype=np.int16)
    pixels = np.clip(pixels + rng.normal(0, 12, pixels.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format='JPEG', quality=90)
    return buffer.getvalue()


@pytest.mark.parametrize('is_train', [True, False], ids=['train', 'val'])
def test_device_normalization_equals_the_cpu_transform(is_train):
    # the full train recipe (RandAugment, flip, erasing with zeros so both paths fill alike)
    config = make_tiny_config(None, 'DATA.IMG_SIZE', 64, 'AUG.REPROB', 1.0, 'AUG.REMODE', 'const')
    samples = [jpeg_bytes(seed) for seed in range(4)]
    batches = []
    for uint8 in (False, True):
        mode = split_mode(is_train, config, normalize_on_device=uint8)
        transform = mode.transform(is_train, config)
        items = []
        for i, data in enumerate(samples):  # seeded per sample, as a train dataset does
            with seeded(i):
                items.append(Sample(transform(open_image(data)), i))
        device = DEVICE if uint8 else 'cpu'
        batches.append(to_device(collate(items, mode), torch.device(device))[0].cpu())
    host, device = batches
    assert device.dtype == torch.float32 and device.shape == host.shape == (4, 3, 64, 64)
    assert (device - host).abs().max().item() < 1e-5
    if is_train:
        assert (host == 0).all(dim=1).any()  # erasing happened (zeros in every channel somewhere)


# ----------------------------------------------------------------------------- main.py on the device
EPOCHS = 1 if ON_CPU else 8  # the demo's 40 reach 96% (CPU); 8 are enough to show AMP learns


def run_main_on_device(*args, deterministic=False, timeout=600):
    """main.py in a real process on DEVICE; with ``deterministic``, under torch.use_deterministic_algorithms."""
    prefix = [sys.executable, os.path.join(ROOT, 'main.py')]
    env = child_env()
    if deterministic:
        env['CUBLAS_WORKSPACE_CONFIG'] = ':4096:8'
        prefix = [sys.executable, '-c', 'import runpy, sys, torch; torch.use_deterministic_algorithms(True); '
                  'sys.argv = ["main.py"] + sys.argv[1:]; runpy.run_path("main.py", run_name="__main__")']
    return subprocess.Popen(prefix + list(args) + ['--device', DEVICE], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def finished(process, timeout=600):
    out, _ = process.communicate(timeout=timeout)
    return process.returncode, out


def max_accuracy(log):
    return max(float(line.rsplit(' ', 1)[1].rstrip('%')) for line in log.splitlines() if 'Max accuracy: ' in line)


@pytest.mark.parametrize('amp_dtype', ['bfloat16', 'float16'])
def test_demo_run_with_amp(tmp_path, amp_dtype):
    if DEVICE == 'cpu' and amp_dtype == 'float16':
        pytest.skip('fp16 autocast with a GradScaler is a CUDA path')
    code, out = finished(run_main_on_device('--cfg', 'configs/demo.yaml', '--data-path', str(tmp_path / 'digits'),
                                            '--output', str(tmp_path), '--epochs', str(EPOCHS),
                                            '--opts', 'AMP_DTYPE', amp_dtype))
    assert code == 0, out[-3000:]
    assert f'precision {amp_dtype}' in out
    log = read(tmp_path / 'swin_demo_digits' / 'default' / 'log_rank0.txt')
    losses = logged_losses(log)
    assert losses and all(loss not in ('nan', 'inf') for loss in losses.values())
    if amp_dtype == 'float16':
        assert 'loss_scale' in log
    assert max_accuracy(log) >= (70.0 if not ON_CPU else 0.0)


RECIPE = 'TRAIN:\n  EPOCHS: 2\n  WARMUP_EPOCHS: 1\n  BASE_LR: 2e-3\nMODEL_EMA: True\nMODEL_EMA_DECAY: 0.9\n'


def test_save_and_resume_exact_under_deterministic_algorithms(tmp_path):
    """SIGTERM mid-epoch, rerun: the final weights equal an uninterrupted run's, bit for bit."""
    per_class = 16 if ON_CPU else 64  # 48 steps an epoch on a GPU: time to stop it in the first epoch
    dataset = make_image_folder(tmp_path / 'images', train_per_class=per_class)
    steps = 3 * per_class // 4
    cfg = tiny_yaml(tmp_path / 'tiny.yaml', dataset, extra=RECIPE, num_workers=2)
    code, out = finished(run_main_on_device('--cfg', cfg, '--output', str(tmp_path / 'ref'), deterministic=True))
    assert code == 0, out[-3000:]

    output = tmp_path / 'resumed'
    log_path = output / 'tiny' / 'default' / 'log_rank0.txt'
    process = run_main_on_device('--cfg', cfg, '--output', str(output), deterministic=True)
    try:
        wait_for(lambda: log_path.exists() and f'Train: [0/2][3/{steps}]' in read(log_path), 300, 'training step 3')
    finally:
        process.send_signal(signal.SIGTERM)
    code, out = finished(process)
    assert code == 128 + signal.SIGTERM, out[-3000:]
    code, out = finished(run_main_on_device('--cfg', cfg, '--output', str(output), deterministic=True))
    assert code == 0, out[-3000:]
    assert 'resumed from' in read(log_path)
    reference = tmp_path / 'ref' / 'tiny' / 'default'
    for key in ('model', 'model_ema'):
        assert_same_weights(load_weights(output / 'tiny' / 'default' / 'last.pth', key),
                            load_weights(reference / 'last.pth', key))
    assert logged_losses(read(log_path)) == logged_losses(read(reference / 'log_rank0.txt'))


def test_throughput(tmp_path):
    cfg = tiny_yaml(tmp_path / 'tiny.yaml', '')
    code, out = finished(run_main_on_device('--cfg', cfg, '--throughput', '--output', str(tmp_path)))
    assert code == 0, out[-3000:]
    assert re.search(rf'throughput averaged with \d+ times\tprecision .* on {DEVICE}(:\d)?$', out, re.M), out[-2000:]
    line = [line for line in out.splitlines() if 'batch_size 4 throughput ' in line]
    assert line and float(line[0].rsplit(' ', 1)[1]) > 0


def test_demo_run_compiled(tmp_path):  # last in the file: the slowest (compilation)
    short = ['--epochs', '1', '--batch-size', '256'] if ON_CPU else ['--epochs', '2']  # CPU: compile dominates
    code, out = finished(run_main_on_device('--cfg', 'configs/demo.yaml', '--data-path', str(tmp_path / 'digits'),
                                            '--output', str(tmp_path), '--compile', *short), timeout=1800)
    assert code == 0, out[-3000:]
    assert 'compiling the model with torch.compile' in out
    run_dir = tmp_path / 'swin_demo_digits' / 'default'
    assert max_accuracy(read(run_dir / 'log_rank0.txt')) > (10.0 if not ON_CPU else 0.0)  # above chance
    assert not any(key.startswith(('_orig_mod', 'module.')) for key in load_weights(run_dir / 'last.pth'))
