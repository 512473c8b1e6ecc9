"""Swin V2 and Swin MLP trained by main.py as users run it: they learn the demo digits, and --eval agrees."""
import os
import re

import pytest
import torch

from helpers import read, run_main
from models import build_model

# tiny models on the demo digits (10 classes, 32 px): patch 4 gives 8x8 tokens, windows of 4, two stages
RECIPE = """DATA:
  DATASET: digits
  DATA_PATH: {data}
  IMG_SIZE: 32
  BATCH_SIZE: 32
  NUM_WORKERS: 0
MODEL:
  TYPE: {family}
  NAME: {family}_digits
  NUM_CLASSES: 10
  DROP_PATH_RATE: 0.0
  {node}:
    PATCH_SIZE: 4
    EMBED_DIM: 24
    DEPTHS: [ 2, 2 ]
    NUM_HEADS: [ 3, 6 ]
    WINDOW_SIZE: 4
TRAIN:
  EPOCHS: {epochs}
  WARMUP_EPOCHS: 0
  LINEAR_SCALE_LR: False
  BASE_LR: 5e-3
  MIN_LR: 5e-5
  LAYER_DECAY: 0.9
AUG:
  AUTO_AUGMENT: none
  COLOR_JITTER: 0.0
  REPROB: 0.0
  HFLIP: 0.0
  MIXUP: 0.0
  CUTMIX: 0.0
MODEL_EMA: True
MODEL_EMA_DECAY: 0.9
PRINT_FREQ: 100
SEED: 0
"""
ACCURACY = re.compile(r' \* Acc@1 ([0-9.]+) ')


# Epochs per family, each past the steep early climb where a few points of seed or torch-version noise decide
# the bar: V2 (cosine attention, post-norm) climbs slowly; with 3 epochs it ended mid-climb at 32-39% on
# torch 2.14 (seeds 0-2) and 38-50% on older ones. With 6 it plateaus at 68-73% on seeds 0, 1 and 2.
EPOCHS = {'swinv2': 6, 'swin_mlp': 3}
# the throughput step checks the mode runs and prints the official line, not the speed: a short protocol
SHORT_THROUGHPUT = ('--opts', 'THROUGHPUT.WARMUP_PASSES', '2', 'THROUGHPUT.TIMED_PASSES', '3')


@pytest.mark.slow
@pytest.mark.parametrize('family, node', [('swinv2', 'SWINV2'), ('swin_mlp', 'SWIN_MLP')])
def test_tiny_model_learns_digits_and_evaluates(tmp_path, family, node):
    """The recipe's epochs (EMA and layer decay on) reach well above chance (10%); --eval of best.pth gives its
    accuracy; --throughput runs; a rerun with one more epoch resumes and trains that epoch only."""
    epochs = EPOCHS[family]
    cfg = tmp_path / 'tiny.yaml'
    cfg.write_text(RECIPE.format(data=tmp_path / 'digits', family=family, node=node, epochs=epochs))
    result = run_main('--cfg', str(cfg), '--output', str(tmp_path / 'out'))
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / 'out' / f'{family}_digits' / 'default'
    log = read(os.path.join(run_dir, 'log_rank0.txt'))
    assert log.count(' * EMA Acc@1 ') == epochs  # the EMA's lines are labelled, so ACCURACY reads the model's only
    model_accuracy = [float(a) for a in ACCURACY.findall(log)]
    assert len(model_accuracy) == epochs and max(model_accuracy) > 40.0, model_accuracy

    result = run_main('--cfg', str(cfg), '--output', str(tmp_path / 'eval'), '--eval',
                      '--resume', str(run_dir / 'best.pth'))
    assert result.returncode == 0, result.stderr
    evaluated = float(ACCURACY.findall(read(tmp_path / 'eval' / f'{family}_digits' / 'default' / 'log_rank0.txt'))[0])
    assert evaluated == pytest.approx(max(model_accuracy), abs=1e-3)

    result = run_main('--cfg', str(cfg), '--output', str(tmp_path / 'speed'), '--throughput', *SHORT_THROUGHPUT)
    assert result.returncode == 0, result.stderr
    assert 'batch_size 32 throughput ' in result.stdout

    result = run_main('--cfg', str(cfg), '--output', str(tmp_path / 'out'), '--epochs', str(epochs + 1))
    assert result.returncode == 0, result.stderr
    assert 'auto-resume: ' in result.stdout and f'Train: [{epochs}/{epochs + 1}]' in result.stdout
    assert f'Train: [{epochs - 1}/{epochs + 1}]' not in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize('family', ['swinv2', 'swin_mlp'])
def test_torch_compile_gives_eager_outputs_and_gradients(tiny_config, family):
    """--compile wraps the model in torch.compile (inductor): V2's masks/bias MLP and MLP's padding trace."""
    node = {'swinv2': 'MODEL.SWINV2', 'swin_mlp': 'MODEL.SWIN_MLP'}[family]
    config = tiny_config('MODEL.TYPE', family, f'{node}.PATCH_SIZE', 2, f'{node}.WINDOW_SIZE', 4,
                         f'{node}.EMBED_DIM', 24, f'{node}.DEPTHS', [2, 2], f'{node}.NUM_HEADS', [3, 6],
                         'MODEL.DROP_PATH_RATE', 0.0)
    torch.manual_seed(0)
    model = build_model(config).train()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    compiled = torch.compile(model)
    x = torch.randn(2, 3, 32, 32)
    outputs, grads = [], []
    for run in (model, compiled):
        model.zero_grad()
        out = run(x)
        out.square().sum().backward()
        outputs.append(out.detach())
        grads.append([p.grad.clone() for p in model.parameters()])
    assert ((outputs[0] - outputs[1]).abs().max() / outputs[0].abs().max()) < 1e-4
    for (name, _), a, b in zip(model.named_parameters(), *grads, strict=True):
        assert ((a - b).abs().max() / a.abs().max().clamp_min(1e-12)) < 1e-3, name
