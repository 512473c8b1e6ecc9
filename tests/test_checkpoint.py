"""checkpoint.py and its scripts, on real files: atomic saves, resume, weight layouts, fine-tuning loads."""
import logging
import math
import os
import random
import signal
import subprocess
import sys
import time
import warnings
from collections import OrderedDict
from dataclasses import astuple

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import (
    resample_abs_pos_embed,
    resize_rel_pos_bias_table,
    resize_rel_pos_bias_table_levit,
    resize_rel_pos_bias_table_simple,
)
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3

import checkpoint
from config import load_config
from conftest import ROOT, make_tiny_config
from errors import CheckpointError
from helpers import rel_diff
from models import build_model
from run_state import RunState, TrainingObjects

LOG = logging.getLogger('test_checkpoint')
TIMM_TINY_KWARGS = {'img_size': 32, 'patch_size': 2, 'window_size': 4, 'embed_dim': 24, 'depths': (2, 2),
                    'num_heads': (3, 6), 'num_classes': 10}


@pytest.fixture(autouse=True)
def _capture_logs(caplog):
    caplog.set_level(logging.INFO, logger=LOG.name)


def tiny_model(config, seed=0):
    torch.manual_seed(seed)
    return build_model(config).eval()


class Run(TrainingObjects):
    """The training objects of a tiny run, one optimizer step in, as the engine holds them."""

    def __init__(self, config, seed=0, scaler=False, ema=False):
        self.config = config
        model = tiny_model(config, seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        super().__init__(model, torch.nn.CrossEntropyLoss(), optimizer,
                         CosineLRScheduler(optimizer, t_initial=100, warmup_t=5, t_in_epochs=False),
                         scaler=torch.amp.GradScaler('cpu') if scaler else None,
                         model_ema=ModelEmaV3(model, decay=0.9) if ema else None)

    def step(self):
        self.model.train()
        loss = self.model(torch.randn(2, 3, 32, 32)).logsumexp(-1).mean()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.lr_scheduler.step_update(1)
        if self.model_ema is not None:
            self.model_ema.update(self.model)
        self.model.eval()
        return self

    def state(self, epoch, micro_batch=0, max_accuracy=50.0):
        """The checkpoint after `epoch` (micro_batch 0), or `micro_batch` micro-batches into it."""
        state = RunState(epoch + 1 if micro_batch == 0 else epoch, micro_batch, 10 * epoch + micro_batch,
                         max_accuracy)
        return checkpoint.checkpoint_contents(self.config, self, state, [f'class{i}' for i in range(10)],
                                         [checkpoint.capture_rng_state()])

    def restore(self, state, **kwargs):
        """(epoch, micro_batch, global_step, max_accuracy) where training goes on."""
        return astuple(checkpoint.restore_from_checkpoint(state, self, LOG, **kwargs))[:4]


def assert_same_tensors(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def pth_files(folder):
    return sorted(name for name in os.listdir(folder) if name.endswith('.pth'))


# -----------------------------------------------------------------------------
# Saving and resuming
# -----------------------------------------------------------------------------
def partly_written_temp_files(folder):
    sizes = []
    for path in folder.iterdir():
        try:
            sizes += [path.stat().st_size] if path.name.endswith('.tmp') else []
        except FileNotFoundError:  # renamed onto the real name meanwhile
            pass
    return [size for size in sizes if size > 0]


@pytest.mark.slow
def test_atomic_save_survives_sigkill_mid_write(tmp_path):
    path = tmp_path / 'ckpt_epoch_0.pth'
    # a valid training checkpoint with a big tensor, rewritten under the same name until killed
    code = f"""
import sys, torch
sys.path.insert(0, {ROOT!r})
from checkpoint import atomic_save
weights = torch.zeros(8 * 1024 * 1024)
step = 0
while True:
    weights.fill_(step)
    atomic_save({{'model': {{'w': weights}}, 'optimizer': {{}}, 'lr_scheduler': {{}}, 'epoch': step,
                 'micro_batch': 0, 'global_step': step, 'max_accuracy': 0.0, 'config': '',
                 'format_version': 2}}, {str(path)!r})
    step += 1
"""
    proc = subprocess.Popen([sys.executable, '-c', code])
    try:
        deadline = time.time() + 60
        while not path.exists() or not partly_written_temp_files(tmp_path):
            assert time.time() < deadline and proc.poll() is None, "the saving process did not get going"
            time.sleep(0.0005)
        os.kill(proc.pid, signal.SIGKILL)  # a save is in flight: its temp file is partly written
    finally:
        proc.kill()
        proc.wait()
    state = checkpoint.load_file(path)
    assert torch.all(state['model']['w'] == state['epoch'])  # complete, and from one single save
    assert checkpoint.find_resume_checkpoint(str(tmp_path), LOG) == str(path)
    assert os.listdir(tmp_path) == [path.name]  # the stray temp file was cleaned up


def test_resume_skips_truncated_newest_checkpoint(tiny_config, caplog):
    config = tiny_config()
    run = Run(config)
    for epoch in (1, 2):
        checkpoint.save_checkpoint(config, run.state(epoch), LOG)
    newest = os.path.join(config.OUTPUT_DIR, 'ckpt_epoch_2.pth')
    with open(newest, 'r+b') as f:  # last.pth is the same file: it is truncated too
        f.truncate(os.path.getsize(newest) // 2)
    with open(os.path.join(config.OUTPUT_DIR, 'notes.pth'), 'w') as f:
        f.write('not a checkpoint')

    found = checkpoint.find_resume_checkpoint(config.OUTPUT_DIR, LOG)

    assert found == os.path.join(config.OUTPUT_DIR, 'ckpt_epoch_1.pth')
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(newest in w and 'truncated' in w for w in warnings)
    assert any('last.pth' in w for w in warnings) and any('notes.pth' in w for w in warnings)
    assert checkpoint.find_resume_checkpoint(os.path.join(config.OUTPUT_DIR, 'missing'), LOG) is None


def test_resume_orders_mid_epoch_states(tiny_config):
    config = tiny_config('KEEP_CHECKPOINTS', 0)
    run = Run(config)
    checkpoint.save_checkpoint(config, run.state(1), LOG)
    mid = checkpoint.save_checkpoint(config, run.state(2, micro_batch=7), LOG)
    assert mid.endswith('ckpt_epoch_2_step_7.pth')
    os.remove(os.path.join(config.OUTPUT_DIR, 'last.pth'))
    os.utime(mid, (0, 0))  # older on disk, but further in training: the recorded (epoch, step) decides
    assert checkpoint.find_resume_checkpoint(config.OUTPUT_DIR, LOG) == mid


def test_retention_keeps_newest_k_and_last_best(tiny_config):
    config = tiny_config('KEEP_CHECKPOINTS', 2)
    run = Run(config)
    checkpoint.save_checkpoint(config, run.state(0), LOG)
    checkpoint.save_checkpoint(config, run.state(1, max_accuracy=90.0), LOG, is_best=True)
    checkpoint.save_checkpoint(config, run.state(2, micro_batch=3), LOG)
    checkpoint.save_checkpoint(config, run.state(2), LOG)
    checkpoint.save_checkpoint(config, run.state(3), LOG)

    assert pth_files(config.OUTPUT_DIR) == ['best.pth', 'ckpt_epoch_2.pth', 'ckpt_epoch_3.pth', 'last.pth']
    assert checkpoint.load_file(os.path.join(config.OUTPUT_DIR, 'last.pth'))['epoch'] == 3
    best = checkpoint.load_file(os.path.join(config.OUTPUT_DIR, 'best.pth'))
    assert (best['epoch'], best['max_accuracy']) == (1, 90.0)


def test_everything_written_loads_with_weights_only(tiny_config, tmp_path):
    config = tiny_config('MODEL_EMA', True)
    run = Run(config, scaler=True, ema=True).step()
    path = checkpoint.save_checkpoint(config, run.state(0), LOG, is_best=True)
    for name in pth_files(config.OUTPUT_DIR):
        state = torch.load(os.path.join(config.OUTPUT_DIR, name), map_location='cpu', weights_only=True)
        assert state['format_version'] == checkpoint.FORMAT_VERSION
    assert checkpoint.load_file(path)['class_names'][3] == 'class3'

    # anything beyond tensors and built-in types is refused when building the state, not when resuming
    run.lr_scheduler.noise_pct = np.float64(0.5)
    with pytest.raises(CheckpointError, match=r'checkpoint\.lr_scheduler\.noise_pct.*numpy'):
        run.state(1)


class Payload:
    """Stands for arbitrary pickled code in a hostile file."""


def test_checkpoint_with_pickled_object_is_refused(tmp_path):
    path = tmp_path / 'evil.pth'
    torch.save({'model': {'w': torch.ones(2)}, 'payload': Payload()}, path)
    with pytest.raises(CheckpointError, match='evil.pth.*refused.*Payload'):
        checkpoint.load_file(path)
    with pytest.raises(CheckpointError, match='checkpoint not found: .*absent.pth'):
        checkpoint.load_file(tmp_path / 'absent.pth')
    (tmp_path / 'image.pth').write_bytes(b'\xff\xd8\xff\xe0' + bytes(100))  # a JPEG named .pth
    with pytest.raises(CheckpointError, match='image.pth is corrupt or not a checkpoint'):
        checkpoint.load_file(tmp_path / 'image.pth')


def test_rng_capture_restore_repeats_the_next_numbers(tmp_path):
    def draw():
        return (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.randn(),
                torch.rand(3).tolist())

    random.gauss(0, 1)  # leaves a cached gaussian in both generators
    np.random.randn()
    state = checkpoint.capture_rng_state()
    checkpoint.atomic_save(state, tmp_path / 'rng.pth')
    first = draw()
    checkpoint.restore_rng_state(state)
    assert draw() == first
    checkpoint.restore_rng_state(checkpoint.load_file(tmp_path / 'rng.pth'))
    assert draw() == first


def test_resume_restores_everything(tiny_config):
    config = tiny_config('MODEL_EMA', True)
    run = Run(config, scaler=True, ema=True).step()
    checkpoint.save_checkpoint(config, run.state(2), LOG)
    expected_rng = torch.rand(4)
    path = checkpoint.find_resume_checkpoint(config.OUTPUT_DIR, LOG)

    fresh = Run(config, seed=1, scaler=True, ema=True)
    state = checkpoint.read_checkpoint(path, config, LOG)
    assert fresh.restore(state) == (3, 0, 20, 50.0)
    assert torch.equal(torch.rand(4), expected_rng)
    assert_same_tensors(fresh.model.state_dict(), run.model.state_dict())
    assert_same_tensors(fresh.model_ema.module.state_dict(), run.model_ema.module.state_dict())
    assert fresh.optimizer.state_dict()['state'][0]['step'] == run.optimizer.state_dict()['state'][0]['step']
    assert fresh.scaler.state_dict() == run.scaler.state_dict()

    mid = run.state(4, micro_batch=5)
    assert fresh.restore(mid) == (4, 5, 45, 50.0)


def as_format_1(ckpt):
    """The checkpoint as the previous version wrote it: format_version 1, micro-batches under 'step_in_epoch'."""
    old = {key: value for key, value in ckpt.items() if key != 'micro_batch'}
    old.update(step_in_epoch=ckpt['micro_batch'], format_version=1)
    return old


def test_format_1_checkpoints_still_resume(tiny_config):
    config = tiny_config('KEEP_CHECKPOINTS', 0)
    run = Run(config).step()
    os.makedirs(config.OUTPUT_DIR)
    for ckpt in (as_format_1(run.state(1)), as_format_1(run.state(2, micro_batch=6))):
        checkpoint.atomic_save(ckpt, os.path.join(config.OUTPUT_DIR, checkpoint.checkpoint_name(ckpt, 1)))
    path = checkpoint.find_resume_checkpoint(config.OUTPUT_DIR, LOG)
    assert path.endswith('ckpt_epoch_2_step_6.pth')  # mid-epoch 2 is further than the end of epoch 1

    fresh = Run(config, seed=1)
    assert fresh.restore(checkpoint.read_checkpoint(path, config, LOG)) == (2, 6, 26, 50.0)
    assert_same_tensors(fresh.model.state_dict(), run.model.state_dict())
    assert fresh.restore(as_format_1(run.state(1))) == (2, 0, 10, 50.0)


def test_resume_from_official_checkpoint_and_bare_weights(tiny_config, tmp_path, caplog):
    config = tiny_config()
    run = Run(config).step()
    official = tmp_path / 'official.pth'
    torch.save({'model': run.model.state_dict(), 'optimizer': run.optimizer.state_dict(),
                'lr_scheduler': run.lr_scheduler.state_dict(), 'max_accuracy': 70.0, 'epoch': 4}, official)
    fresh = Run(config, seed=1)
    state = checkpoint.read_checkpoint(str(official), config, LOG)
    assert fresh.restore(state, steps_per_epoch=10) == (5, 0, 50, 70.0)
    assert_same_tensors(fresh.model.state_dict(), run.model.state_dict())

    bare = tmp_path / 'timm.pth'
    torch.save(checkpoint.official_to_timm(run.model.state_dict()), bare)
    state = checkpoint.read_checkpoint(str(bare), config, LOG)
    assert Run(config, seed=1).restore(state) == (0, 0, 0, 0.0)
    assert 'optimizer state: the optimizer starts fresh' in caplog.text


def test_config_drift(tiny_config, caplog):
    config = tiny_config()
    path = checkpoint.save_checkpoint(config, Run(config).state(0), LOG)

    changed = tiny_config('MODEL.SWIN.EMBED_DIM', 48, 'MODEL.SWIN.WINDOW_SIZE', 8, 'TRAIN.BASE_LR', 1e-3)
    with pytest.raises(CheckpointError) as error:
        checkpoint.read_checkpoint(path, changed, LOG)
    message = str(error.value)
    assert path in message and '\n' not in message
    assert 'MODEL.SWIN.EMBED_DIM 24→48' in message and 'MODEL.SWIN.WINDOW_SIZE 4→8' in message
    assert 'BASE_LR' not in message

    checkpoint.read_checkpoint(path, tiny_config('DATA.BATCH_SIZE', 16, 'TRAIN.BASE_LR', 1e-3), LOG)
    assert 'DATA.BATCH_SIZE 8→16' in caplog.text and 'TRAIN.BASE_LR 0.0005→0.001' in caplog.text


# -----------------------------------------------------------------------------
# Weight layouts (official <-> timm)
# -----------------------------------------------------------------------------
def timm_logits_match(our_model, timm_model, size):
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        return torch.allclose(our_model(x), timm_model(x), atol=1e-5, rtol=1e-4)


def make_timm_small():
    return timm.models.swin_transformer.SwinTransformer(**TIMM_TINY_KWARGS)


def make_timm_swin_tiny():
    return timm.create_model('swin_tiny_patch4_window7_224', pretrained=False)


@pytest.mark.parametrize('make_config, make_timm, size', [
    (make_tiny_config, make_timm_small, 32),
    pytest.param(lambda: load_config(None, [], environ={}), make_timm_swin_tiny, 224,  # swin_tiny_patch4_window7_224
                 marks=pytest.mark.slow),
], ids=['small', 'swin_tiny'])
def test_timm_layout_gives_timm_logits(make_config, make_timm, size):
    ours = tiny_model(make_config())
    torch.manual_seed(1)
    timm_model = make_timm().eval()

    # timm's own random weights -> our model
    assert checkpoint.is_timm_state_dict(timm_model.state_dict())
    checkpoint.load_model_weights(ours, timm_model.state_dict(), LOG)
    assert timm_logits_match(ours, timm_model, size)

    # our (changed) weights -> timm layout -> timm's model (strict)
    with torch.no_grad():
        for param in ours.parameters():
            param.add_(torch.randn_like(param), alpha=0.02)
    timm_model.load_state_dict(checkpoint.official_to_timm(ours.state_dict()), strict=True)
    assert timm_logits_match(ours, timm_model, size)


def test_layout_round_trips_are_exact():
    official = tiny_model(make_tiny_config()).state_dict()
    timm_sd = make_timm_small().state_dict()
    assert not checkpoint.is_timm_state_dict(official) and checkpoint.is_timm_state_dict(timm_sd)

    params = {k: v for k, v in official.items() if not k.endswith(('relative_position_index', 'attn_mask'))}
    assert_same_tensors(checkpoint.timm_to_official(checkpoint.official_to_timm(official)), params)
    assert_same_tensors(checkpoint.official_to_timm(checkpoint.timm_to_official(timm_sd)), timm_sd)
    assert 'layers.0.downsample.reduction.weight' in checkpoint.timm_to_official(timm_sd)
    headless = {k: v for k, v in timm_sd.items() if not k.startswith('head.')}
    assert checkpoint.is_timm_state_dict(headless)
    with pytest.raises(CheckpointError, match='already in the official layout'):
        checkpoint.timm_to_official(official)


def test_official_to_timm_is_timms_checkpoint_filter_without_its_resizing():
    """Where the shapes fit, timm's own filter (official -> timm, it needs the model) gives the same tensors; for
    another window it resizes the tables by its geometric rule, not the official bicubic one: ours moves keys only."""
    from timm.models.swin_transformer import checkpoint_filter_fn
    official = tiny_model(make_tiny_config()).state_dict()
    assert_same_tensors(checkpoint.official_to_timm(official), checkpoint_filter_fn(official, make_timm_small()))
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # torch deprecation warnings from inside timm
        resized = checkpoint_filter_fn(official, timm.models.swin_transformer.SwinTransformer(
            **dict(TIMM_TINY_KWARGS, window_size=8)))
    key = 'layers.0.blocks.0.attn.relative_position_bias_table'
    expected = official_bias_table(official[key], 225)
    assert (resized[key] - expected).abs().max() > 0.1 * expected.abs().max()  # measured: 0.92x


def test_wrong_checkpoint_names_tensor_and_shapes(tmp_path):
    path = tmp_path / 'tiny.pth'
    torch.save({'model': tiny_model(make_tiny_config()).state_dict()}, path)
    wider = tiny_model(make_tiny_config(None, 'MODEL.SWIN.EMBED_DIM', 48))
    with pytest.raises(CheckpointError, match=r'tiny\.pth.*patch_embed\.proj\.weight has shape \(24, 3, 2, 2\) in '
                                              r'the checkpoint, \(48, 3, 2, 2\) in the model'):
        checkpoint.load_model_weights(wider, str(path), LOG)
    deeper = tiny_model(make_tiny_config(None, 'MODEL.SWIN.DEPTHS', [2, 4]))
    with pytest.raises(CheckpointError, match=r'layers\.1\.blocks\.2\.norm1\.weight is missing .*and \d+ more'):
        checkpoint.load_model_weights(deeper, str(path), LOG)


class ReversedHead(checkpoint.WeightFamily):
    """A family whose other layout names the classifier 'fc' and whose bias tables need (toy) resizing."""

    def to_official(self, sd):
        return OrderedDict(('head.' + k[3:] if k.startswith('fc.') else k, v) for k, v in sd.items())

    def adapt_pretrained(self, sd, model_sd, logger):
        key = 'layers.0.blocks.0.attn.relative_position_bias_table'
        sd[key] = sd[key].flip(0)
        return [f'{key} flipped']


def test_a_family_plugs_in_its_conversion_and_pretrained_adaptation(monkeypatch, caplog):
    monkeypatch.setattr(checkpoint.weights, '_FAMILIES', dict(checkpoint.weights._FAMILIES))
    checkpoint.register_family('toy', ReversedHead())
    assert isinstance(checkpoint.weight_family('swin'), checkpoint.swin.SwinWeights)
    with pytest.raises(ValueError, match='already registered'):
        checkpoint.register_family('swin', ReversedHead())

    source = tiny_model(make_tiny_config()).state_dict()
    foreign = {('fc.' + k[5:] if k.startswith('head.') else k): v for k, v in source.items()}
    assert_same_tensors(checkpoint.extract_state_dict(foreign, 'toy weights', 'toy'), source)
    with pytest.raises(CheckpointError, match='head.weight is missing'):  # the swin family does not know 'fc.'
        checkpoint.load_model_weights(tiny_model(make_tiny_config()), foreign, LOG)

    key = 'layers.0.blocks.0.attn.relative_position_bias_table'
    adapted = checkpoint.pretrained.adapt_pretrained(source, source, 'toy', LOG)
    assert torch.equal(adapted[key], source[key].flip(0)) and f'{key} flipped' in caplog.text


# -----------------------------------------------------------------------------
# Fine-tuning from pretrained weights
# -----------------------------------------------------------------------------
def save_pretrained(tmp_path, model, **replace):
    sd = dict(model.state_dict(), **replace)
    path = tmp_path / 'pretrained.pth'
    torch.save({'model': sd}, path)
    return str(path)


def test_pretrained_window_change_resizes_bias_tables(tmp_path, caplog):
    source = tiny_model(make_tiny_config())
    key = 'layers.1.blocks.0.attn.relative_position_bias_table'
    heads = torch.arange(1.0, 7.0)  # a constant per head survives bicubic resizing: catches a transposed grid
    path = save_pretrained(tmp_path, source, **{key: heads.expand(49, 6).clone()})

    config = make_tiny_config(None, 'MODEL.SWIN.WINDOW_SIZE', 8, 'MODEL.NUM_CLASSES', 7, 'MODEL.PRETRAINED', path)
    model = tiny_model(config, seed=1)
    checkpoint.load_pretrained(config, model, LOG)

    table = model.state_dict()[key]
    assert table.shape == (225, 6)  # (2 * 8 - 1) ** 2 rows
    assert torch.allclose(table, heads.expand(225, 6), atol=1e-5)
    assert torch.equal(model.state_dict()['layers.0.blocks.1.attn.qkv.weight'],
                       source.state_dict()['layers.0.blocks.1.attn.qkv.weight'])
    assert not model.head.weight.any() and 'head re-initialized' in caplog.text
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 7)


def test_pretrained_absolute_pos_embed_is_resized(tmp_path):
    source = tiny_model(make_tiny_config(None, 'MODEL.SWIN.APE', True))
    channels = torch.arange(24.0)
    path = save_pretrained(tmp_path, source, absolute_pos_embed=channels.expand(1, 256, 24).clone())

    config = make_tiny_config(None, 'MODEL.SWIN.APE', True, 'DATA.IMG_SIZE', 64, 'MODEL.PRETRAINED', path)
    model = tiny_model(config, seed=1)
    checkpoint.load_pretrained(config, model, LOG)

    assert model.absolute_pos_embed.shape == (1, 1024, 24)  # 16x16 -> 32x32 patches
    assert torch.allclose(model.absolute_pos_embed, channels.expand(1, 1024, 24), atol=1e-5)
    assert torch.equal(model.head.weight, source.head.weight)  # same class count: the head is kept


def official_bias_table(table, rows):
    """The official load_pretrained rule for relative_position_bias_table: bicubic on each head's grid."""
    heads, old_side, new_side = table.shape[1], math.isqrt(table.shape[0]), math.isqrt(rows)
    grid = F.interpolate(table.permute(1, 0).view(1, heads, old_side, old_side), size=(new_side, new_side),
                         mode='bicubic')
    return grid.view(heads, rows).permute(1, 0)


def official_pos_embed(embed, tokens):
    """The official load_pretrained rule for absolute_pos_embed: bicubic on the patch grid."""
    channels, old_side, new_side = embed.shape[2], math.isqrt(embed.shape[1]), math.isqrt(tokens)
    grid = embed.reshape(-1, old_side, old_side, channels).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new_side, new_side), mode='bicubic')
    return grid.permute(0, 2, 3, 1).flatten(1, 2)


def window_of(rows):
    return (math.isqrt(rows) + 1) // 2


def timm_geometric_table(table, rows):
    """timm's resize_rel_pos_bias_table (BEiT's geometric spacing), what timm's own Swin checkpoint filter uses."""
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # torch deprecation warnings from inside timm
        return resize_rel_pos_bias_table(table, (window_of(rows),) * 2, (rows, table.shape[1]))


@pytest.mark.parametrize('old_window, new_window', [(7, 12), (12, 7), (4, 8), (12, 24)])
def test_resized_bias_table_is_the_official_bicubic_rule(old_window, new_window):
    """checkpoint.swin resizes through timm's resize_rel_pos_bias_table_levit (antialias off): equal to the last
    bit to the official rule in float32, and to the float32-then-cast rule of our earlier code in half precision.
    timm's other rules give other tables."""
    torch.manual_seed(old_window)
    table, rows = torch.randn((2 * old_window - 1) ** 2, 6), (2 * new_window - 1) ** 2
    ours = checkpoint.swin.resize_bias_table(table, rows)
    assert ours.shape == (rows, 6) and ours.is_contiguous()
    assert torch.equal(ours, official_bias_table(table, rows))
    assert torch.equal(checkpoint.swin.resize_bias_table(table.t().contiguous().t(), rows), ours)  # any strides
    half = table.half()
    resized = checkpoint.swin.resize_bias_table(half, rows)
    assert resized.dtype == torch.float16 and torch.equal(resized, official_bias_table(half.float(), rows).half())

    # timm's defaults differ from the official tables by far more than rounding
    assert (resize_rel_pos_bias_table_levit(table, (rows, 6)) - ours).abs().max() > 0.1  # antialias=True
    assert (timm_geometric_table(table, rows) - ours).abs().max() > 1.0
    simple = resize_rel_pos_bias_table_simple(half, (new_window, new_window), (rows, 6))  # interpolates in half
    assert torch.equal(resize_rel_pos_bias_table_simple(table, (new_window, new_window), (rows, 6)), ours)
    assert not torch.equal(simple, resized)


@pytest.mark.parametrize('old_side, new_side', [(16, 32), (56, 96), (32, 16)])
def test_resized_pos_embed_is_the_official_bicubic_rule(old_side, new_side):
    """timm's resample_abs_pos_embed (no prefix token, antialias off) is the official rule, in every dtype;
    its default antialias=True is not."""
    torch.manual_seed(old_side)
    embed, tokens = torch.randn(1, old_side ** 2, 24), new_side ** 2
    ours = checkpoint.swin.resize_pos_embed(embed, tokens)
    assert ours.shape == (1, tokens, 24) and torch.equal(ours, official_pos_embed(embed, tokens))
    half = embed.half()
    resized = checkpoint.swin.resize_pos_embed(half, tokens)
    assert resized.dtype == torch.float16 and torch.equal(resized, official_pos_embed(half.float(), tokens).half())
    assert (resample_abs_pos_embed(embed, [new_side] * 2, num_prefix_tokens=0) - ours).abs().max() > 0.1


def test_fine_tuned_logits_are_the_official_ones_and_timm_defaults_are_not(tmp_path):
    """--pretrained at window 4 / 32 px (APE) into window 8 / 64 px gives bit for bit the weights and logits of
    the official resizing rule; timm's default rules would change the logits by 0.3-2.4% (measured: geometric
    table 2.4e-2, antialiased table 2.8e-3, antialiased embedding 6.0e-3 of the largest logit)."""
    torch.manual_seed(0)
    source = build_model(make_tiny_config(None, 'MODEL.SWIN.APE', True)).eval()
    with torch.no_grad():
        for name, param in source.named_parameters():  # trained-like magnitudes, tables of a few units
            scale = 1.0 if 'relative_position_bias_table' in name else 0.5 if 'absolute' in name else 0.2
            param.add_(torch.randn_like(param) * scale)
    path = save_pretrained(tmp_path, source)
    config = make_tiny_config(None, 'MODEL.SWIN.APE', True, 'MODEL.SWIN.WINDOW_SIZE', 8, 'DATA.IMG_SIZE', 64,
                              'MODEL.PRETRAINED', path)
    model = tiny_model(config, seed=1)
    checkpoint.load_pretrained(config, model, LOG)
    model_sd = model.state_dict()

    def loaded_with(table_rule, embed_rule):
        reference = tiny_model(config, seed=2)
        sd = {k: v for k, v in source.state_dict().items() if not checkpoint.weights.is_derived(k)}
        for key in sd:
            if key.endswith('relative_position_bias_table'):
                sd[key] = table_rule(sd[key], model_sd[key].shape[0])
            elif key == 'absolute_pos_embed':
                sd[key] = embed_rule(sd[key], model_sd[key].shape[1])
        missing, unexpected = reference.load_state_dict(sd, strict=False)
        assert not unexpected and all(checkpoint.weights.is_derived(k) for k in missing)
        return reference

    x = torch.randn(2, 3, 64, 64)
    official = loaded_with(official_bias_table, official_pos_embed)
    assert_same_tensors(official.state_dict(), model_sd)
    with torch.no_grad():
        logits = model(x)
        assert torch.equal(official(x), logits)
        for table_rule, embed_rule in [
                (timm_geometric_table, official_pos_embed),
                (lambda t, rows: resize_rel_pos_bias_table_levit(t, (rows, t.shape[1])), official_pos_embed),
                (official_bias_table,
                 lambda e, n: resample_abs_pos_embed(e, [math.isqrt(n)] * 2, num_prefix_tokens=0))]:
            assert rel_diff(loaded_with(table_rule, embed_rule)(x), logits) > 1e-3


def test_pretrained_22k_head_maps_to_1k_rows(tmp_path, caplog):
    source = tiny_model(make_tiny_config())
    rows = torch.arange(21841.0)
    path = save_pretrained(tmp_path, source, **{'head.weight': rows[:, None].expand(21841, 48).clone(),
                                                'head.bias': rows.clone()})
    config = make_tiny_config(None, 'MODEL.NUM_CLASSES', 1000, 'MODEL.PRETRAINED', path)
    model = tiny_model(config, seed=1)
    checkpoint.load_pretrained(config, model, LOG)

    picked = model.head.bias.detach().double()
    # values of microsoft/Swin-Transformer data/map22kto1k.txt
    assert picked[:10].tolist() == [359, 368, 460, 475, 486, 492, 496, 514, 516, 525]
    assert picked[850] == 5564 and picked[999] == 21817  # 850: teddy bear, absent from 22K
    assert picked.sum() == 6373512 and (picked * torch.arange(1000.0).double()).sum() == 4376652357
    assert torch.equal(model.head.weight[:, 0], model.head.bias)
    assert 'ImageNet-22K head' in caplog.text


# -----------------------------------------------------------------------------
# Safetensors
# -----------------------------------------------------------------------------
def test_safetensors_weights_load_everywhere(tmp_path, caplog):
    """A .safetensors file (official or timm layout) is read by eval / predict loading, --pretrained and
    --resume alike; class names come from its metadata."""
    source = tiny_model(make_tiny_config())
    official = checkpoint.save_safetensors(source.state_dict(), str(tmp_path / 'w.safetensors'),
                                           {'class_names': '["a", "b"]'})
    timm_layout = checkpoint.save_safetensors(checkpoint.official_to_timm(source.state_dict()),
                                              str(tmp_path / 'timm.safetensors'))
    assert checkpoint.read_weights(official)['class_names'] == ['a', 'b']
    for path in (official, timm_layout):
        model = tiny_model(make_tiny_config(), seed=1)
        checkpoint.load_model_weights(model, path, LOG)
        assert_same_tensors(model.state_dict(), source.state_dict())

        config = make_tiny_config(None, 'MODEL.NUM_CLASSES', 7, 'MODEL.PRETRAINED', path)
        model = tiny_model(config, seed=1)
        checkpoint.load_pretrained(config, model, LOG)
        assert torch.equal(model.patch_embed.proj.weight, source.patch_embed.proj.weight)

        config = make_tiny_config()
        fresh = Run(config, seed=1)
        assert fresh.restore(checkpoint.read_checkpoint(path, config, LOG)) == (0, 0, 0, 0.0)
        assert_same_tensors(fresh.model.state_dict(), source.state_dict())

    broken = tmp_path / 'broken.safetensors'
    broken.write_bytes(open(official, 'rb').read()[:300])  # truncated
    with pytest.raises(CheckpointError, match=r'^checkpoint .*broken.safetensors is not a readable safetensors file'):
        checkpoint.load_model_weights(tiny_model(make_tiny_config()), str(broken), LOG)


# -----------------------------------------------------------------------------
# Scripts
# -----------------------------------------------------------------------------
def load_script(name):
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, 'scripts', f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_convert_checkpoint_script(tiny_config, tmp_path, capsys):
    config = tiny_config()
    run = Run(config)
    path = checkpoint.save_checkpoint(config, run.state(0), LOG)
    convert = load_script('convert_checkpoint')

    assert convert.main([path, str(tmp_path / 'timm.pth'), '--to', 'timm']) == 0
    timm_model = make_timm_small().eval()
    timm_model.load_state_dict(torch.load(tmp_path / 'timm.pth', weights_only=True), strict=True)
    assert timm_logits_match(run.model, timm_model, 32)

    assert convert.main([str(tmp_path / 'timm.pth'), str(tmp_path / 'official.pth'), '--to', 'official']) == 0
    model = tiny_model(config, seed=1)
    checkpoint.load_model_weights(model, str(tmp_path / 'official.pth'), LOG)
    assert_same_tensors(model.state_dict(), run.model.state_dict())

    assert convert.main([str(tmp_path / 'absent.pth'), str(tmp_path / 'x.pth'), '--to', 'timm']) == 2
    assert 'error: checkpoint not found' in capsys.readouterr().err
