"""scripts/convert_checkpoint.py with safetensors: write, read back, timm loads it, errors are one line."""
import json

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import make_tiny_config
from helpers import load_script
from models import build_model

convert = load_script('convert_checkpoint')
TIMM_TINY = dict(img_size=32, patch_size=2, window_size=4, embed_dim=24, depths=(2, 2), num_heads=(3, 6),
                 num_classes=10)


@pytest.fixture
def trained(tmp_path):
    """A training-style checkpoint of the tiny model (model weights, EMA weights, class names)."""
    torch.manual_seed(0)
    model = build_model(make_tiny_config()).eval()
    ema = {key: value + 1 for key, value in model.state_dict().items()}
    names = [f'class {i}, with a comma' for i in range(10)]
    path = tmp_path / 'ckpt.pth'
    torch.save({'model': model.state_dict(), 'model_ema': ema, 'class_names': names, 'epoch': 3}, path)
    return str(path), model, names


def logits(model, x):
    with torch.no_grad():
        return model(x)


def test_safetensors_round_trip_keeps_weights_and_class_names(tmp_path, trained):
    path, model, names = trained
    st = str(tmp_path / 'w.safetensors')
    assert convert.main([path, st, '--to', 'official']) == 0
    with safe_open(st, framework='pt') as f:
        assert f.metadata()['layout'] == 'official' and json.loads(f.metadata()['class_names']) == names
    stored = load_file(st)
    assert stored.keys() == model.state_dict().keys()
    assert all(torch.equal(stored[key], value) for key, value in model.state_dict().items())

    # and back: a .safetensors IN converts to a .pth that loads into the model
    back = str(tmp_path / 'back.pth')
    assert convert.main([st, back, '--to', 'official']) == 0
    again = build_model(make_tiny_config())
    again.load_state_dict(torch.load(back, weights_only=True)['model'])
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(logits(again.eval(), x), logits(model, x))


def test_timm_layout_safetensors_loads_into_timm(tmp_path, trained):
    path, model, _ = trained
    st = str(tmp_path / 'timm.safetensors')
    assert convert.main([path, st, '--to', 'timm']) == 0
    theirs = timm.models.swin_transformer.SwinTransformer(**TIMM_TINY).eval()
    theirs.load_state_dict(load_file(st), strict=True)
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(logits(theirs, x), logits(model, x), atol=1e-5, rtol=1e-4)


def test_ema_weights_to_safetensors(tmp_path, trained):
    path, model, _ = trained
    st = str(tmp_path / 'ema.safetensors')
    assert convert.main([path, st, '--to', 'official', '--ema']) == 0
    assert torch.equal(load_file(st)['head.bias'], model.head.bias.detach() + 1)


def test_unreadable_safetensors_is_one_line(tmp_path, capsys):
    bad = tmp_path / 'bad.safetensors'
    bad.write_bytes(b'not a safetensors file at all')
    assert convert.main([str(bad), str(tmp_path / 'x.pth'), '--to', 'timm']) == 2
    err = capsys.readouterr().err
    assert err.startswith(f'error: checkpoint {bad} is not a readable safetensors file') and err.count('\n') == 1
