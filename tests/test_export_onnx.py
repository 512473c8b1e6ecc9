"""scripts/export_onnx.py: every model family the project builds exports with a dynamic batch dimension and
onnxruntime reproduces PyTorch at other batch sizes."""
import sys

import onnxruntime
import pytest
import torch

import checkpoint
from conftest import TINY_OPTS, make_tiny_config
from errors import ConfigError
from helpers import load_script
from models import build_model

export_onnx = load_script('export_onnx')

# config node of each family; the tiny shape (img 32, patch 2, window 4, embed 24, depths 2-2) in each
FAMILY_NODES = {'swin': 'SWIN', 'swinv2': 'SWINV2', 'swin_mlp': 'SWIN_MLP'}
TINY_SHAPE = {'PATCH_SIZE': 2, 'WINDOW_SIZE': 4, 'EMBED_DIM': 24, 'DEPTHS': [2, 2], 'NUM_HEADS': [3, 6]}

pytestmark = pytest.mark.usefixtures('one_thread')  # tiny models: see conftest.one_thread


def family_opts(family):
    opts = ['MODEL.TYPE', family]
    for key, value in TINY_SHAPE.items():
        opts += [f'MODEL.{FAMILY_NODES[family]}.{key}', value]
    return opts


def built_families():
    """The families of FAMILY_NODES that the config accepts (V2 / MLP once models/ builds them)."""
    families = []
    for family in FAMILY_NODES:
        try:
            make_tiny_config(None, *family_opts(family))
        except ConfigError:
            continue
        families.append(family)
    return families


def tiny_checkpoint(tmp_path, family, seed=0):
    """(checkpoint path, config file, --opts list, model) for a tiny model of the family with random weights."""
    opts = family_opts(family)
    torch.manual_seed(seed)
    model = build_model(make_tiny_config(None, *opts)).eval()
    path = tmp_path / f'{family}.pth'
    torch.save({'model': model.state_dict()}, path)
    cfg = tmp_path / 'tiny.yaml'
    cfg.write_text('')
    return str(path), str(cfg), ['--opts'] + [str(v) for v in list(TINY_OPTS) + opts], model


def onnx_logits(path, images):
    session = onnxruntime.InferenceSession(path, providers=['CPUExecutionProvider'])
    return torch.from_numpy(session.run(None, {'images': images.numpy()})[0])


def assert_round_trip(path, model, batch_sizes):
    for batch in batch_sizes:
        images = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            expected = model(images)
        got = onnx_logits(path, images)
        assert got.shape == (batch, 10)
        assert ((got - expected).abs().max() / expected.abs().max()).item() < 1e-4


def test_swin_v1_is_built():
    assert 'swin' in built_families()


@pytest.mark.slow  # the dynamo exporter takes ~15 s per model on 2 cores
@pytest.mark.parametrize('family', built_families())
def test_onnx_round_trip_at_two_batch_sizes(tmp_path, family, capsys):
    ckpt, cfg, opts, model = tiny_checkpoint(tmp_path, family)
    out = str(tmp_path / 'model.onnx')
    assert export_onnx.main([ckpt, '--cfg', cfg, '--output', out] + opts) == 0
    printed = capsys.readouterr().out
    assert 'opset 18' in printed and 'rel max diff' in printed
    assert float(printed.split('rel max diff ')[1].split()[0]) < 1e-4
    assert_round_trip(out, model, (1, 5))  # neither is the export's batch size


def test_older_opset_uses_the_torchscript_exporter(tmp_path, capsys):
    ckpt, cfg, opts, model = tiny_checkpoint(tmp_path, 'swin')
    weights = str(tmp_path / 'weights.safetensors')  # safetensors are read as well
    checkpoint.save_safetensors(model.state_dict(), weights)
    out = str(tmp_path / 'model.onnx')
    assert export_onnx.main([weights, '--cfg', cfg, '--output', out, '--opset', '17'] + opts) == 0
    assert 'opset 17' in capsys.readouterr().out
    assert_round_trip(out, model, (1, 4))


def test_missing_packages_name_the_install_command(tmp_path, monkeypatch, capsys):
    ckpt, cfg, opts, _ = tiny_checkpoint(tmp_path, 'swin')
    monkeypatch.setitem(sys.modules, 'onnxscript', None)  # what an environment without it looks like to import
    assert export_onnx.main([ckpt, '--cfg', cfg, '--output', str(tmp_path / 'm.onnx')] + opts) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ONNX export needs onnxscript: pip install onnx onnxruntime onnxscript')
    assert not (tmp_path / 'm.onnx').exists()
