"""Weights of Swin V2 and Swin MLP: official and timm files, conversion, fine-tuning across window sizes."""
import json
import logging
import subprocess
import warnings

import pytest
import timm
import torch

import checkpoint
from config import load_config
from errors import CheckpointError
from helpers import OFFICIAL_REPO, load_official_module, load_script, rel_diff
from models import SwinMLP, SwinTransformerV2, build_model
from scripts.convert_checkpoint import convert

LOGGER = logging.getLogger('test_weights_families')
# a tiny analog of the official 22kto1k fine-tuning: window 12 at 48 px (maps 24, 12) -> window 16 at 64 px
# (maps 32, 16), PRETRAINED_WINDOW_SIZES [12, 12], 21841 classes -> 1000
PRETRAIN = dict(img_size=48, patch_size=2, window_size=12, embed_dim=24, depths=[2, 2], num_heads=[3, 6])
FINETUNE = dict(PRETRAIN, img_size=64, window_size=16, pretrained_window_sizes=[12, 12])
TIMM_ARGS = ('img_size', 'patch_size', 'window_size', 'embed_dim', 'depths', 'num_heads')


pytestmark = pytest.mark.usefixtures('one_thread')  # tiny models: one thread is faster


def trained_v2(num_classes=10, seed=0, **cfg):
    """A V2 model whose weights all differ from their init (post-norms start at zero)."""
    torch.manual_seed(seed)
    model = SwinTransformerV2(num_classes=num_classes, **cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model.eval()


def v2_config(tiny_config, cfg, *opts):
    return tiny_config('MODEL.TYPE', 'swinv2', 'DATA.IMG_SIZE', cfg['img_size'],
                       'MODEL.SWINV2.PATCH_SIZE', cfg['patch_size'], 'MODEL.SWINV2.WINDOW_SIZE', cfg['window_size'],
                       'MODEL.SWINV2.EMBED_DIM', cfg['embed_dim'], 'MODEL.SWINV2.DEPTHS', cfg['depths'],
                       'MODEL.SWINV2.NUM_HEADS', cfg['num_heads'],
                       'MODEL.SWINV2.PRETRAINED_WINDOW_SIZES', cfg.get('pretrained_window_sizes', [0, 0]), *opts)


# ----------------------------------------------------------------------------- fine-tuning across window sizes
def test_pretrained_window_12_to_16_with_22k_head_matches_official_fine_tuning(tmp_path, tiny_config):
    """--pretrained from a 22K model at window 12 into a 1K model at window 16 gives the weights the official
    load_pretrained gives: coordinate tables, index and masks rebuilt for the new window, 22K head mapped."""
    pretrained = trained_v2(num_classes=21841, **PRETRAIN)
    path = tmp_path / 'swinv2_22k.pth'
    torch.save({'model': pretrained.state_dict()}, path)
    config = v2_config(tiny_config, FINETUNE, 'MODEL.NUM_CLASSES', 1000, 'MODEL.PRETRAINED', str(path))
    model = build_model(config).eval()
    checkpoint.load_pretrained(config, model, LOGGER)

    # the official procedure (utils.load_pretrained), on the official model class when the repository is here
    official = load_official_module('models/swin_transformer_v2.py', tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # the official file calls torch.meshgrid without indexing=
        reference = (official.SwinTransformerV2 if official else SwinTransformerV2)(num_classes=1000, **FINETUNE)
    state_dict = {k: v for k, v in pretrained.state_dict().items()
                  if not k.endswith(('relative_position_index', 'relative_coords_table', 'attn_mask'))}
    map22kto1k = _official_map22kto1k() or checkpoint.imagenet22k_to_1k_indices()
    state_dict['head.weight'] = state_dict['head.weight'][map22kto1k]
    state_dict['head.bias'] = state_dict['head.bias'][map22kto1k]
    missing, unexpected = reference.load_state_dict(state_dict, strict=False)
    assert not unexpected and all(k.endswith(('relative_position_index', 'relative_coords_table', 'attn_mask'))
                                  for k in missing)

    reference.eval()
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    table = model.layers[0].blocks[0].attn.relative_coords_table
    assert table.shape == (1, 31, 31, 2) and table.abs().max() > 1.0  # window 16 read on the window-12 scale
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert rel_diff(model(x), reference(x)) < 1e-5


def _official_map22kto1k():
    result = subprocess.run(['git', '-C', OFFICIAL_REPO, 'show', 'HEAD:data/map22kto1k.txt'], capture_output=True,
                            text=True)
    return [int(line) for line in result.stdout.split()] if result.returncode == 0 else None


def test_pretrained_architecture_mismatch_is_one_line(tmp_path, tiny_config):
    path = tmp_path / 'other.pth'
    torch.save({'model': trained_v2(**dict(PRETRAIN, embed_dim=48)).state_dict()}, path)
    config = v2_config(tiny_config, FINETUNE, 'MODEL.PRETRAINED', str(path))
    with pytest.raises(CheckpointError) as info:
        checkpoint.load_pretrained(config, build_model(config), LOGGER)
    message = str(info.value)
    assert '\n' not in message and 'patch_embed.proj.weight' in message and str(path) in message


# ----------------------------------------------------------------------------- timm's swinv2 weights
def timm_swinv2(cfg, num_classes=10):
    kwargs = {k: cfg[k] for k in TIMM_ARGS}
    kwargs['pretrained_window_sizes'] = cfg.get('pretrained_window_sizes', [0, 0])
    torch.manual_seed(0)
    model = timm.create_model('swinv2_tiny_window8_256', pretrained=False, num_classes=num_classes, **kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model.eval()


def test_timm_swinv2_file_loads_for_eval_and_fine_tuning(tmp_path, tiny_config):
    """A bare timm state_dict (downsample at the start of a stage, head.fc, no buffers) loads through the same
    conversion as timm's v1 files, for --eval (strict) and for --pretrained."""
    theirs = timm_swinv2(PRETRAIN)
    path = tmp_path / 'timm_swinv2.pth'
    torch.save(theirs.state_dict(), path)
    assert 'layers.1.downsample.reduction.weight' in theirs.state_dict() and 'head.fc.weight' in theirs.state_dict()
    x = torch.randn(2, 3, 48, 48)
    config = v2_config(tiny_config, PRETRAIN, 'MODEL.PRETRAINED', str(path))
    for load in (lambda model: checkpoint.load_model_weights(model, str(path), LOGGER, model_type='swinv2'),
                 lambda model: checkpoint.load_pretrained(config, model, LOGGER)):
        ours = build_model(config).eval()
        load(ours)
        with torch.no_grad():
            assert rel_diff(ours(x), theirs(x)) < 1e-5


def test_predict_script_with_a_timm_swinv2_file(tmp_path):
    """scripts/predict.py reads the weights through the family of MODEL.TYPE: a timm file predicts like timm."""
    from PIL import Image

    from data import build_val_transform
    predict = load_script('predict')
    theirs = timm_swinv2(PRETRAIN, num_classes=3)
    path = tmp_path / 'timm_swinv2.pth'
    torch.save(theirs.state_dict(), path)
    image = tmp_path / 'red.png'
    Image.new('RGB', (40, 40), 'red').save(image)
    cfg = tmp_path / 'v2.yaml'
    cfg.write_text('MODEL:\n  TYPE: swinv2\n  NUM_CLASSES: 3\n  SWINV2:\n    PATCH_SIZE: 2\n    WINDOW_SIZE: 12\n'
                   '    EMBED_DIM: 24\n    DEPTHS: [2, 2]\n    NUM_HEADS: [3, 6]\nDATA:\n  IMG_SIZE: 48\n')
    config = load_config(str(cfg), environ={})
    output = tmp_path / 'predictions.json'
    assert predict.main([str(path), str(image), '--cfg', str(cfg), '--topk', '3', '--output', str(output),
                         '--device', 'cpu', '--opts', 'DATA.NUM_WORKERS', '0']) == 0
    [record] = json.loads(output.read_text())
    with Image.open(image) as img, torch.no_grad():
        expected = theirs(build_val_transform(config)(img.convert('RGB'))[None]).softmax(-1)[0]
    assert [record[f'index_{k}'] for k in (1, 2, 3)] == expected.argsort(descending=True).tolist()
    assert [record[f'prob_{k}'] for k in (1, 2, 3)] == pytest.approx(
        expected.sort(descending=True).values.tolist(), abs=1e-5)


def test_convert_checkpoint_official_to_timm_and_back_for_v2(tmp_path):
    ours = trained_v2(**FINETUNE)
    official_file, timm_file, back = tmp_path / 'official.pth', tmp_path / 'timm.pth', tmp_path / 'back.pth'
    torch.save({'model': ours.state_dict()}, official_file)
    convert(str(official_file), str(timm_file), 'timm')
    theirs = timm_swinv2(FINETUNE)
    theirs.load_state_dict(torch.load(timm_file, weights_only=True), strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert rel_diff(theirs(x), ours(x)) < 1e-5
    convert(str(timm_file), str(back), 'official')
    restored = torch.load(back, weights_only=True)['model']
    params = dict(ours.named_parameters())
    assert restored.keys() == params.keys()  # the derived buffers are left out, every parameter comes back
    assert all(torch.equal(restored[k], params[k]) for k in params)


# ----------------------------------------------------------------------------- Swin MLP
def test_swin_mlp_checkpoint_loads_strict_and_has_no_timm_layout(tmp_path):
    torch.manual_seed(0)
    model = SwinMLP(num_classes=10, **PRETRAIN).eval()
    path = tmp_path / 'mlp.pth'
    torch.save({'model': model.state_dict(), 'epoch': 3}, path)
    torch.manual_seed(1)
    fresh = SwinMLP(num_classes=10, **PRETRAIN).eval()
    checkpoint.load_model_weights(fresh, str(path), LOGGER)
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    with pytest.raises(CheckpointError, match='timm has no Swin MLP'):
        convert(str(path), str(tmp_path / 'timm.pth'), 'timm')


def mlp_config(tiny_config, img_size, window_size, *opts):
    return tiny_config('MODEL.TYPE', 'swin_mlp', 'DATA.IMG_SIZE', img_size, 'MODEL.SWIN_MLP.PATCH_SIZE', 2,
                       'MODEL.SWIN_MLP.WINDOW_SIZE', window_size, 'MODEL.SWIN_MLP.EMBED_DIM', 24,
                       'MODEL.SWIN_MLP.DEPTHS', [2, 2], 'MODEL.SWIN_MLP.NUM_HEADS', [3, 6], 'MODEL.SWIN_MLP.APE', True,
                       *opts)


def test_swin_mlp_family_is_the_v1_family(tmp_path, tiny_config):
    """What checkpoint/swin.py says of Swin MLP: --pretrained resizes absolute_pos_embed to a new image size, a
    file in timm's v1 key layout is still converted, and a pretrained window other than the model's is refused
    in one line naming a spatial_mlp tensor."""
    torch.manual_seed(0)
    source = build_model(mlp_config(tiny_config, 48, 12)).eval()
    with torch.no_grad():
        source.absolute_pos_embed.normal_()
    path = tmp_path / 'mlp_ape.pth'
    torch.save({'model': source.state_dict()}, path)

    config = mlp_config(tiny_config, 96, 12, 'MODEL.PRETRAINED', str(path))
    model = build_model(config).eval()
    checkpoint.load_pretrained(config, model, LOGGER)
    assert model.absolute_pos_embed.shape == (1, 48 * 48, 24)
    assert torch.equal(model.absolute_pos_embed, checkpoint.swin.resize_pos_embed(source.absolute_pos_embed, 2304))
    key = 'layers.1.blocks.1.spatial_mlp.weight'
    assert torch.equal(model.state_dict()[key], source.state_dict()[key])

    fresh = build_model(mlp_config(tiny_config, 48, 12)).eval()
    checkpoint.load_model_weights(fresh, checkpoint.official_to_timm(source.state_dict()), LOGGER,
                                  model_type='swin_mlp')
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        assert torch.equal(fresh(x), source(x))

    config = mlp_config(tiny_config, 48, 6, 'MODEL.PRETRAINED', str(path))
    with pytest.raises(CheckpointError) as info:
        checkpoint.load_pretrained(config, build_model(config), LOGGER)
    assert '\n' not in str(info.value) and 'spatial_mlp.weight' in str(info.value)
