"""Swin as a detection / segmentation backbone (models/backbone.py): stage maps of every family, torchvision's
Faster / Mask R-CNN training on them, the segmentation head, pretrained loads, scripts/finetune_detection.py."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torchvision.models.detection import RetinaNet
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from conftest import ROOT, make_tiny_config
from helpers import child_env, load_script, randomized
from models import SwinBackbone, SwinSegmenter, build_backbone, build_model, swin_detector, swin_fpn_backbone

pytestmark = pytest.mark.usefixtures('one_thread')

# 64 px, patch 4, window 4, four stages: maps 16, 8, 4, 2 at strides 4, 8, 16, 32 (the last one is one window)
STAGES = {'DEPTHS': [2, 2, 2, 2], 'NUM_HEADS': [3, 6, 12, 24], 'PATCH_SIZE': 4, 'WINDOW_SIZE': 4, 'EMBED_DIM': 24}
NODES = {'swin': 'SWIN', 'swinv2': 'SWINV2', 'swin_mlp': 'SWIN_MLP'}


def family_opts(family='swin'):
    opts = ['MODEL.TYPE', family, 'DATA.IMG_SIZE', 64, 'MODEL.DROP_PATH_RATE', 0.0]
    for key, value in STAGES.items():
        opts += [f'MODEL.{NODES[family]}.{key}', value]
    return opts


def config(family='swin', *opts):
    return make_tiny_config(None, *family_opts(family), *opts)


def boxes_batch(sizes, seed=0):
    """Images (H, W in sizes) each with two bright rectangles on a dark background, their boxes, labels (1, 2)
    and masks: something a detector can learn in a few steps."""
    generator = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for h, w in sizes:
        image = torch.rand(3, h, w, generator=generator) * 0.2
        boxes, masks = [], []
        for label, (top, left, bottom, right) in ((1, (h // 8, w // 8, h // 2, w // 2)),
                                                  (2, (h // 2, w // 2, h - h // 8, w - w // 10))):
            image[label - 1, top:bottom, left:right] = 0.9
            mask = torch.zeros(h, w, dtype=torch.uint8)
            mask[top:bottom, left:right] = 1
            boxes.append([left, top, right, bottom])
            masks.append(mask)
        images.append(image)
        targets.append({'boxes': torch.tensor(boxes, dtype=torch.float32), 'labels': torch.tensor([1, 2]),
                        'masks': torch.stack(masks)})
    return images, targets


def tiny_detector(mask=False, min_size=64, max_size=64, family='swin'):
    """Faster / Mask R-CNN on the tiny backbone, with small heads and few sampled anchors and RoIs."""
    torch.manual_seed(0)
    backbone = swin_fpn_backbone(build_model(config(family)), fpn_channels=32)
    return swin_detector(backbone, num_classes=3, mask=mask, box_head_size=64, mask_head_channels=16,
                         min_size=min_size, max_size=max_size, rpn_batch_size_per_image=64,
                         rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100, rpn_pre_nms_top_n_test=100,
                         rpn_post_nms_top_n_test=50, box_batch_size_per_image=32)


def train_losses(model, images, targets, steps=8, lr=1e-3):
    """Loss-dict sums of ``steps`` AdamW steps on the same batch; the seed is reset before each forward so
    that the RPN / RoI samplers draw the same anchors every time (only the weights differ)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    totals = []
    for _ in range(steps):
        torch.manual_seed(1)
        losses = model(images, targets)
        loss = sum(losses.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        totals.append(loss.item())
    return totals, losses


# -----------------------------------------------------------------------------
# The backbone
# -----------------------------------------------------------------------------
@pytest.mark.parametrize('family', ['swin', 'swinv2', 'swin_mlp'])
def test_backbone_returns_the_stage_maps_of_every_family(family):
    torch.manual_seed(0)
    reference = randomized(build_model(config(family)))
    model = build_model(config(family))
    model.load_state_dict(reference.state_dict())
    backbone = SwinBackbone(model, norm=False).eval()
    x = torch.randn(2, 3, 64, 64)
    out = backbone(x)
    assert list(out) == backbone.featmap_names == ['0', '1', '2', '3']
    assert backbone.out_channels == [24, 48, 96, 192] and backbone.strides == [4, 8, 16, 32]
    assert [tuple(v.shape) for v in out.values()] == [(2, 24 * 2 ** i, 16 // 2 ** i, 16 // 2 ** i) for i in range(4)]
    with torch.no_grad():
        expected = reference.forward_intermediates(x, intermediates_only=True)
    for got, want in zip(out.values(), expected, strict=True):
        torch.testing.assert_close(got, want)
    # head and final norm gone: every parameter left takes part in the maps (DDP needs no unused parameters)
    assert isinstance(model.head, torch.nn.Identity) and isinstance(model.norm, torch.nn.Identity)
    backbone.train()
    sum(v.square().mean() for v in backbone(x).values()).backward()
    assert all(p.grad is not None for p in backbone.parameters())


def test_backbone_keeps_only_the_stages_it_returns():
    torch.manual_seed(0)
    reference = randomized(build_model(config()))
    model = build_model(config())
    model.load_state_dict(reference.state_dict())
    backbone = SwinBackbone(model, out_indices=(1, 2)).eval()
    assert len(model.layers) == 3 and model.layers[2].downsample is None
    x = torch.randn(1, 3, 64, 64)
    out = backbone(x)
    assert list(out) == ['1', '2'] and backbone.out_channels == [48, 96] and backbone.strides == [8, 16]
    with torch.no_grad():
        expected = reference.forward_intermediates(x, indices=[1, 2], intermediates_only=True)
    for got, want in zip(out.values(), expected, strict=True):  # per-map LayerNorm (fresh: weight 1, bias 0)
        torch.testing.assert_close(got, F.layer_norm(want.permute(0, 2, 3, 1), want.shape[1:2]).permute(0, 3, 1, 2))
    backbone.train()
    sum(v.sum() for v in backbone(x).values()).backward()
    assert all(p.grad is not None for p in backbone.parameters())


def test_fpn_backbone_has_torchvisions_contract():
    torch.manual_seed(0)
    fpn = swin_fpn_backbone(build_model(config()), fpn_channels=32)
    assert fpn.out_channels == 32 and fpn.featmap_names == ['0', '1', '2', '3']
    assert fpn.strides == [4, 8, 16, 32, 64]
    out = fpn(torch.randn(2, 3, 64, 64))
    assert list(out) == ['0', '1', '2', '3', 'pool']
    assert [tuple(v.shape) for v in out.values()] == [(2, 32, 16, 16), (2, 32, 8, 8), (2, 32, 4, 4), (2, 32, 2, 2),
                                                       (2, 32, 1, 1)]
    # RetinaNet's layout: stages 1-3 + P6, P7 = the five levels of its default anchor generator
    retina_fpn = swin_fpn_backbone(build_model(config()), out_indices=(1, 2, 3), fpn_channels=32,
                                   extra_blocks=LastLevelP6P7(32, 32))
    assert retina_fpn.strides == [8, 16, 32, 64, 128]
    retina = RetinaNet(retina_fpn, num_classes=3, min_size=64, max_size=64)
    images, targets = boxes_batch([(64, 64)])
    losses = retina(images, [{k: v for k, v in t.items() if k != 'masks'} for t in targets])
    assert set(losses) == {'classification', 'bbox_regression'} and all(torch.isfinite(v) for v in losses.values())


# -----------------------------------------------------------------------------
# torchvision's detectors on it
# -----------------------------------------------------------------------------
def test_faster_rcnn_trains_and_detects():
    detector = tiny_detector()
    images, targets = boxes_batch([(64, 64), (64, 64)])
    targets = [{k: v for k, v in t.items() if k != 'masks'} for t in targets]
    totals, losses = train_losses(detector, images, targets)
    assert set(losses) == {'loss_classifier', 'loss_box_reg', 'loss_objectness', 'loss_rpn_box_reg'}
    assert totals[-1] < 0.7 * totals[0], totals
    assert all(p.grad is not None for p in detector.backbone.parameters())  # the backbone is trained too
    detector.eval()
    with torch.no_grad():
        detections = detector(images)
    assert len(detections) == 2
    for found in detections:
        assert found['boxes'].shape[1] == 4 and len(found['boxes']) == len(found['labels']) == len(found['scores'])
        assert len(found['boxes']) > 0 and set(found['labels'].tolist()) <= {1, 2}
        assert (found['boxes'] >= 0).all() and (found['boxes'] <= 64).all()


def test_mask_rcnn_trains_and_predicts_masks():
    detector = tiny_detector(mask=True)
    images, targets = boxes_batch([(64, 64), (64, 64)], seed=1)
    totals, losses = train_losses(detector, images, targets, steps=10, lr=5e-4)
    assert 'loss_mask' in losses and torch.isfinite(losses['loss_mask'])
    assert totals[-1] < 0.75 * totals[0], totals
    detector.eval()
    with torch.no_grad():
        detections = detector(images[:1])
    masks = detections[0]['masks']
    assert len(masks) > 0 and masks.shape[1:] == (1, 64, 64) and len(masks) == len(detections[0]['boxes'])
    assert ((masks >= 0) & (masks <= 1)).all()


def test_detectors_take_non_square_batches_of_any_size():
    """Needs models that take any input size: the transform pads this batch to 64 x 96, not the config's 64."""
    detector = tiny_detector(mask=True, min_size=64, max_size=96)
    images, targets = boxes_batch([(64, 96), (48, 80)])
    batch, _ = detector.transform(images, targets)
    assert tuple(batch.tensors.shape[-2:]) == (64, 96) and batch.image_sizes == [(64, 96), (57, 96)]
    totals, losses = train_losses(detector, images, targets, steps=2)
    assert all(torch.isfinite(v) for v in losses.values())
    assert all(p.grad is not None for p in detector.backbone.parameters())
    detector.eval()
    for size in ((80, 64), (40, 72)):  # padded to 96 x 64 and to 64 x 96 (resized to 53 x 96)
        with torch.no_grad():
            found = detector([torch.rand(3, *size)])[0]
        assert found['masks'].shape[2:] == size and found['boxes'].shape[1] == 4


# -----------------------------------------------------------------------------
# Segmentation
# -----------------------------------------------------------------------------
def segmentation_batch(size=(64, 64), seed=0):
    images, targets = boxes_batch([size] * 2, seed=seed)
    labels = torch.stack([(t['masks'] * t['labels'].view(-1, 1, 1)).amax(0).long() for t in targets])
    return torch.stack(images), labels


def test_segmenter_trains_on_synthetic_masks():
    torch.manual_seed(0)
    segmenter = SwinSegmenter(SwinBackbone(build_model(config())), num_classes=3, channels=32)
    images, labels = segmentation_batch()
    optimizer = torch.optim.AdamW(segmenter.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        logits = segmenter(images)
        assert logits.shape == (2, 3, 64, 64)
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    assert all(p.grad is not None for p in segmenter.parameters())


def test_segmenter_output_has_the_input_size_of_any_size():
    """Needs models that take any input size (48 x 80 is neither the config's 64 nor a multiple of 32)."""
    torch.manual_seed(0)
    segmenter = SwinSegmenter(SwinBackbone(build_model(config())), num_classes=3, channels=32).eval()
    with torch.no_grad():
        assert segmenter(torch.randn(1, 3, 48, 80)).shape == (1, 3, 48, 80)


# -----------------------------------------------------------------------------
# Pretrained weights through build_backbone
# -----------------------------------------------------------------------------
def assert_maps_of(backbone, encoder):
    """The backbone's maps are the encoder's stage maps (after the backbone's fresh per-map LayerNorm)."""
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        got = backbone.eval()(x)
        want = encoder.eval().forward_intermediates(x, intermediates_only=True)
    assert len(got) == len(want) == 4
    for a, b in zip(got.values(), want, strict=True):
        torch.testing.assert_close(a, F.layer_norm(b.permute(0, 2, 3, 1), b.shape[1:2]).permute(0, 3, 1, 2))


@pytest.mark.parametrize('family', ['swin', 'swinv2'])
def test_build_backbone_loads_simmim_pretraining_weights(tmp_path, family):
    simmim = randomized(build_model(config(family, 'MODEL.NAME', 'simmim_pretrain_tiny'), is_pretrain=True))
    torch.save({'model': simmim.state_dict()}, tmp_path / 'simmim.pth')
    backbone = build_backbone(config(family, 'MODEL.PRETRAINED', str(tmp_path / 'simmim.pth')))
    assert_maps_of(backbone, simmim.encoder)
    with pytest.raises(AssertionError):  # the comparison sees weights that were not loaded
        assert_maps_of(build_backbone(config(family)), simmim.encoder)


@pytest.mark.parametrize('family', ['swin', 'swinv2', 'swin_mlp'])
def test_build_backbone_loads_official_classification_weights(tmp_path, family):
    classifier = randomized(build_model(config(family)))  # a 10-class head: dropped by the headless backbone
    torch.save({'model': classifier.state_dict()}, tmp_path / 'official.pth')
    backbone = build_backbone(config(family, 'MODEL.PRETRAINED', str(tmp_path / 'official.pth')))
    assert not any(key.startswith('model.head') for key in backbone.state_dict())
    assert_maps_of(backbone, classifier)


# -----------------------------------------------------------------------------
# scripts/finetune_detection.py
# -----------------------------------------------------------------------------
def coco_folder(folder, count=4, size=64):
    """count images with a red and a green rectangle, and their COCO JSON (one image without boxes)."""
    os.makedirs(folder / 'images')
    images, annotations = [], []
    for i in range(count):
        picture = Image.new('RGB', (size, size), (20, 20, 20))
        draw = ImageDraw.Draw(picture)
        boxes = [] if i == count - 1 else [(1, [8 + i, 8, 24, 20]), (2, [30, 34 - i, 26, 22])]
        for category, (x, y, w, h) in boxes:
            draw.rectangle([x, y, x + w - 1, y + h - 1], fill=(230, 30, 30) if category == 1 else (30, 230, 30))
            annotations.append({'id': len(annotations) + 1, 'image_id': i + 1, 'bbox': [x, y, w, h],
                                'category_id': category, 'area': w * h, 'iscrowd': 0})
        picture.save(folder / 'images' / f'{i}.png')
        images.append({'id': i + 1, 'file_name': f'{i}.png', 'width': size, 'height': size})
    coco = {'images': images, 'annotations': annotations,
            'categories': [{'id': 1, 'name': 'red'}, {'id': 2, 'name': 'green'}]}
    (folder / 'coco.json').write_text(json.dumps(coco))
    return folder / 'images', folder / 'coco.json'


def finetune(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, 'scripts', 'finetune_detection.py'), *map(str, args)],
                          capture_output=True, text=True, env=child_env(), cwd=ROOT)


def test_finetune_script_trains_and_saves_the_detector(tmp_path):
    images, annotations = coco_folder(tmp_path)
    classifier = randomized(build_model(config()))
    torch.save({'model': classifier.state_dict()}, tmp_path / 'official.pth')
    result = finetune('--images', images, '--annotations', annotations, '--epochs', 1, '--batch-size', 2,
                      '--min-size', 64, '--max-size', 64, '--workers', 0, '--device', 'cpu',
                      '--pretrained', tmp_path / 'official.pth', '--output', tmp_path / 'out', '--opts', *family_opts())
    assert result.returncode == 0, result.stderr
    assert '4 images, 6 boxes, 2 categories' in result.stdout
    assert 'epoch 1/1: mean loss ' in result.stdout and 'ETA 0:00:00' in result.stdout
    saved = torch.load(tmp_path / 'out' / 'detector.pth', weights_only=True)
    assert saved['epoch'] == 1 and [c['name'] for c in saved['categories']] == ['red', 'green']
    detector = swin_detector(swin_fpn_backbone(build_backbone(config())), num_classes=3, min_size=64, max_size=64)
    detector.load_state_dict(saved['model'])  # strict: the saved detector is this architecture
    # started from --pretrained (random N(0, 0.2) weights; two AdamW steps at lr <= 1e-4 move them by ~1e-4)
    for name in ('patch_embed.proj.weight', 'layers.3.blocks.1.mlp.fc2.weight'):
        torch.testing.assert_close(saved['model'][f'backbone.body.model.{name}'], classifier.state_dict()[name],
                                   atol=1e-3, rtol=0)
    assert 'MODEL' in saved['config'] and os.listdir(tmp_path / 'out') == ['detector.pth']  # no temp file left


def test_finetune_script_reports_a_missing_annotations_file_in_one_line(tmp_path):
    images, _ = coco_folder(tmp_path, count=1)
    result = finetune('--images', images, '--annotations', tmp_path / 'nope.json', '--output', tmp_path / 'out')
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"error: --annotations {tmp_path / 'nope.json'}: no such file"]
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('content, message', [
    ('{"images": [', 'not readable as JSON'),
    ('{"images": [], "annotations": []}', "not COCO-style detection JSON (missing field or unknown id 'categories')"),
    ('{"images": [{"id": 1, "file_name": "0.png"}], "annotations": [{"image_id": 7, "bbox": [0, 0, 4, 4], '
     '"category_id": 1}], "categories": [{"id": 1, "name": "a"}]}', 'unknown id 7'),
], ids=['not-json', 'no-categories', 'unknown-image-id'])
def test_finetune_script_rejects_bad_annotations_in_one_line(tmp_path, capsys, content, message):
    images, _ = coco_folder(tmp_path, count=1)
    (tmp_path / 'bad.json').write_text(content)
    script = load_script('finetune_detection')
    assert script.main(['--images', str(images), '--annotations', str(tmp_path / 'bad.json')]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: --annotations ') and message in lines[0]
    assert script.main(['--images', str(tmp_path / 'none'), '--annotations', str(tmp_path / 'bad.json')]) == 2
    assert capsys.readouterr().err == f"error: --images {tmp_path / 'none'}: no such folder\n"
