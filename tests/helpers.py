"""Helpers for tests that run main.py as a real process: a tiny image dataset, a tiny config, log parsing."""
import os
import re
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ('circle', 'square', 'stripes')


def make_image_folder(root, train_per_class=16, val_per_class=7, size=32, seed=0):
    """A learnable 3-class ImageFolder tree of PNGs; 3 x 7 = 21 val images (odd, for exact-validation tests)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    for split, count in (('train', train_per_class), ('val', val_per_class)):
        for label, name in enumerate(CLASSES):
            folder = os.path.join(root, split, name)
            os.makedirs(folder, exist_ok=True)
            for i in range(count):
                cx, cy = rng.integers(8, size - 8, 2)
                if label == 0:
                    mask = (xx - cx) ** 2 + (yy - cy) ** 2 < 36
                elif label == 1:
                    mask = (abs(xx - cx) < 6) & (abs(yy - cy) < 6)
                else:
                    mask = (xx // 3) % 2 == 0
                pixels = rng.integers(0, 60, (size, size, 3))
                pixels[mask] = 200 + rng.integers(0, 55, 3)
                Image.fromarray(pixels.astype(np.uint8)).save(os.path.join(folder, f'{i:03d}.png'))
    return str(root)


def tiny_yaml(path, data_path, extra='', num_workers=0):
    """Write a tiny-Swin training config; ``extra`` adds YAML sections, e.g. 'TRAIN:\\n  EPOCHS: 3\\n'."""
    text = f"""DATA:
  DATASET: imagenet
  DATA_PATH: {data_path}
  IMG_SIZE: 32
  BATCH_SIZE: 4
  NUM_WORKERS: {num_workers}
MODEL:
  NAME: tiny
  NUM_CLASSES: 3
  DROP_PATH_RATE: 0.1
  SWIN:
    PATCH_SIZE: 2
    WINDOW_SIZE: 4
    EMBED_DIM: 24
    DEPTHS: [2, 2]
    NUM_HEADS: [3, 6]
PRINT_FREQ: 1
SEED: 3
"""
    text += extra
    with open(path, 'w') as f:
        f.write(text)
    return str(path)


def child_env(**extra):
    env = dict(os.environ)
    # `python` in a child shell script (gpu_check.sh) is this interpreter, also when its venv is not activated
    env['PATH'] = os.path.dirname(sys.executable) + os.pathsep + env.get('PATH', '')
    env.update(OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    env.update({k: str(v) for k, v in extra.items()})
    return env


def main_command(*args):
    return [sys.executable, os.path.join(ROOT, 'main.py'), *args]


def run_main(*args, timeout=300, **env):
    return subprocess.run(main_command(*args), cwd=ROOT, env=child_env(**env), capture_output=True,
                          text=True, timeout=timeout)


def torchrun_command(nproc, *args):
    return [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', str(nproc),
            '--master_port', str(free_port()), os.path.join(ROOT, 'main.py'), *args]


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def read(path):
    with open(path) as f:
        return f.read()


def sigterm_after(config, output, line, name='tiny'):
    """Run main.py until its log shows ``line``, then SIGTERM it; returns (run folder, its output).
    ``name``: MODEL.NAME of the config (the run folder is output/name/default)."""
    run_dir = output / name / 'default'
    process = subprocess.Popen(main_command('--cfg', config, '--output', str(output)), cwd=ROOT,
                               env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log_path = run_dir / 'log_rank0.txt'
    wait_for(lambda: log_path.exists() and line in read(log_path), 240, line)
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, out
    return run_dir, out


TRAIN_LINE = re.compile(r"Train: \[(\d+)/\d+\]\[(\d+)/\d+\].*?\tloss ([0-9.]+|nan|inf)")


def logged_losses(log_text):
    """{(epoch, step): loss} from training log lines (a resumed run's repeated steps overwrite)."""
    return {(int(e), int(s)): loss for e, s, loss in TRAIN_LINE.findall(log_text)}


def load_weights(path, key='model'):
    return torch.load(path, map_location='cpu', weights_only=True)[key]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"tensors differ: {different[:5]}"


# a git repository (bare or not) of microsoft/Swin-Transformer, for equivalence tests against the official code
OFFICIAL_REPO = os.environ.get('SWIN_OFFICIAL_REPO', '/work/.mirror/microsoft+Swin-Transformer/repo')


def load_official_module(path_in_repo, folder, required=False):
    """Import one file of the official repository (written to ``folder``); None without the repository, or
    with ``required`` the calling test is skipped."""
    import importlib.util
    result = subprocess.run(['git', '-C', OFFICIAL_REPO, 'show', f'HEAD:{path_in_repo}'], capture_output=True,
                            text=True)
    if result.returncode != 0:
        if required:
            import pytest
            pytest.skip(f'the official repository is not available at {OFFICIAL_REPO} (set SWIN_OFFICIAL_REPO)')
        return None
    path = os.path.join(folder, 'official_' + os.path.basename(path_in_repo))
    with open(path, 'w') as f:
        f.write(result.stdout)
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # the official files import timm.models.layers (deprecated)
        spec.loader.exec_module(module)
    return module


def rel_diff(a, b):
    """Largest absolute difference relative to the largest magnitude of the reference b."""
    return ((a - b).abs().max() / b.abs().max()).item()


def assert_same_outputs_and_grads(model, reference, x, tol, grad_tol=None, seed=None):
    """model and reference (same weights) give the same outputs for x and the same parameter gradients of
    sum(out ** 2); with a seed, both draw the same dropout / drop-path randomness."""
    outs = []
    for m in (reference, model):
        if seed is not None:
            torch.manual_seed(seed)
        out = m(x)
        out.square().sum().backward()
        outs.append(out)
    assert rel_diff(outs[1], outs[0]) < tol
    for (name, a), b in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert rel_diff(a.grad, b.grad) < (grad_tol or tol), name


def set_fused(model, fused):
    """Switch every attention module that has a fused path (any family); the number switched."""
    modules = [m for m in model.modules() if hasattr(m, 'fused_attn')]
    for module in modules:
        module.fused_attn = fused
    return len(modules)


def count_sdpa_calls(monkeypatch, family_module):
    """Make fused_attn=True always call SDPA in ``family_module`` (on CPU it otherwise trains with the explicit
    path); returns the list that records the ``scale`` of each call."""
    import torch.nn.functional as F

    calls = []
    sdpa = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(kwargs.get('scale'))
        return sdpa(*args, **kwargs)
    monkeypatch.setattr(family_module, '_sdpa_is_faster', lambda x, table: True)
    monkeypatch.setattr(F, 'scaled_dot_product_attention', counting)
    return calls


def load_script(name):
    """A scripts/NAME.py file as a module (scripts are not a package)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, 'scripts', f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_git_module(repo, path_in_repo, folder, module_name, stubs=None, what='the repository'):
    """Import one file of a git repository (bare or not), written to ``folder``, as ``module_name`` (dotted, so
    that its relative imports resolve against that package), with ``stubs`` ({name: module}) in sys.modules for
    the imports it needs only while it loads; the calling test is skipped without the repository."""
    import importlib.util
    from unittest import mock

    import pytest
    result = subprocess.run(['git', '-C', repo, 'show', f'HEAD:{path_in_repo}'], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f'{what} is not available at {repo}')
    path = os.path.join(folder, module_name.replace('.', '_') + '.py')
    with open(path, 'w') as f:
        f.write(result.stdout)
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    with mock.patch.dict(sys.modules, stubs or {}), warnings.catch_warnings():
        warnings.simplefilter('ignore')  # old files import timm.models.layers (deprecated)
        spec.loader.exec_module(module)
    return module


def randomized(model, seed=0):
    """Every parameter random (normal, std 0.2), in eval mode: a zero bias or mask token, or a load that did not
    happen, cannot pass for a real one."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.2)
    return model.eval()
