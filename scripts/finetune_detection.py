"""Fine-tune a Faster R-CNN on a Swin backbone (FPN) on a folder of images with COCO-style box annotations.

    python scripts/finetune_detection.py --images DIR --annotations FILE.json --cfg CFG [--pretrained FILE]
           [--opts KEY VALUE ...] [--epochs N] [--batch-size N] [--lr LR] [--device D] [--output DIR]
           [--min-size N] [--max-size N] [--workers N]

An example of using the backbone (models/backbone.py), kept short: boxes only, AdamW with a linear warm-up,
random horizontal flips, no evaluation. The annotations file needs the COCO fields ``images`` [{id, file_name,
width, height}], ``annotations`` [{image_id, bbox: [x, y, w, h], category_id}] and ``categories`` [{id, name}];
file names are relative to --images. The backbone comes from --cfg (+ --opts), started from --pretrained (our,
official, timm or SimMIM weights, loaded as for classification fine-tuning). Images are resized by torchvision's
detection transform (shorter side --min-size, longer at most --max-size, padded to a multiple of 32). After every
epoch a line with the mean loss and an ETA is printed and ``--output/detector.pth`` is replaced atomically:
{'model': the detector's state_dict, 'categories', 'epoch', 'config'} (loadable with weights_only=True).
"""
import argparse
import json
import logging
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from checkpoint import atomic_save
from config import load_config
from errors import ConfigError, DataError, TrainingError, run_script
from logger import format_eta
from models import build_backbone, swin_detector, swin_fpn_backbone
from optimizer import param_groups
from utils import resolve_device

_logger = logging.getLogger('finetune_detection')


def read_coco(annotations, images_dir):
    """(samples [(image path, boxes (N, 4) x1 y1 x2 y2, labels (N,) 1..K)], categories sorted by id); labels
    number the categories from 1 in id order (0 is the detectors' background). DataError for what does not fit."""
    if not os.path.isdir(images_dir):
        raise DataError(f"--images {images_dir}: no such folder")
    if not os.path.isfile(annotations):
        raise DataError(f"--annotations {annotations}: no such file")
    try:
        with open(annotations, encoding='utf-8') as f:
            coco = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"--annotations {annotations}: not readable as JSON ({e})") from None
    try:
        categories = sorted(({'id': c['id'], 'name': str(c['name'])} for c in coco['categories']),
                            key=lambda c: c['id'])
        label = {c['id']: i + 1 for i, c in enumerate(categories)}
        found = {image['id']: (os.path.join(images_dir, image['file_name']), [], []) for image in coco['images']}
        for annotation in coco['annotations']:
            x, y, w, h = (float(v) for v in annotation['bbox'])
            if w > 0 and h > 0:  # COCO has a few degenerate boxes; the detectors' losses reject them
                _, boxes, labels = found[annotation['image_id']]
                boxes.append([x, y, x + w, y + h])
                labels.append(label[annotation['category_id']])
    except (KeyError, TypeError, ValueError) as e:
        what = f"missing field or unknown id {e}" if isinstance(e, KeyError) else str(e)
        raise DataError(f"--annotations {annotations}: not COCO-style detection JSON ({what})") from None
    if not categories or not found:
        raise DataError(f"--annotations {annotations}: no categories or no images")
    missing = [path for path, _, _ in found.values() if not os.path.isfile(path)]
    if missing:
        raise DataError(f"{len(missing)} image(s) of {annotations} are not in {images_dir}, e.g. {missing[0]}")
    samples = [(path, torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), torch.tensor(labels, dtype=torch.int64))
               for path, boxes, labels in found.values()]
    return samples, categories


class CocoBoxes(torch.utils.data.Dataset):
    """(image float (3, H, W) in [0, 1], target {'boxes', 'labels'}), flipped left-right half of the time."""

    def __init__(self, samples, flip=True):
        self.samples, self.flip = samples, flip

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, boxes, labels = self.samples[index]
        with Image.open(path) as image:
            image = pil_to_tensor(image.convert('RGB')).float() / 255
        if self.flip and random.random() < 0.5:
            image = image.flip(-1)
            boxes = torch.stack([image.shape[-1] - boxes[:, 2], boxes[:, 1], image.shape[-1] - boxes[:, 0],
                                 boxes[:, 3]], dim=1)
        return image, {'boxes': boxes, 'labels': labels}


def collate(batch):
    return tuple(zip(*batch))  # detectors take lists: images of different sizes


def parameter_groups(detector, weight_decay):
    """AdamW groups with the training's own rule (optimizer.param_groups): no weight decay for norms, biases and
    the backbone's position tables (as the official Swin detection recipe)."""
    swin = detector.backbone.body.model
    # the detector's names are prefixed (backbone.body.model.absolute_pos_embed): the backbone's exact-name skips
    # match as keywords
    keywords = set(swin.no_weight_decay()) | set(swin.no_weight_decay_keywords())
    groups, _ = param_groups(detector, weight_decay, skip_keywords=keywords)
    return groups


def run(args):
    if min(args.epochs, args.batch_size, args.min_size, args.max_size) < 1 or args.lr <= 0:
        raise ConfigError("--epochs, --batch-size, --min-size, --max-size and --lr must be positive")
    samples, categories = read_coco(args.annotations, args.images)  # data errors before the model is built
    opts = list(args.opts or []) + ['DEVICE', args.device]
    if args.pretrained:
        opts += ['MODEL.PRETRAINED', args.pretrained]
    config = load_config(args.cfg, opts, environ={})
    device = resolve_device(config)
    torch.manual_seed(config.SEED)
    random.seed(config.SEED)

    detector = swin_detector(swin_fpn_backbone(build_backbone(config, _logger)), num_classes=len(categories) + 1,
                             min_size=args.min_size, max_size=args.max_size).to(device)
    loader = torch.utils.data.DataLoader(CocoBoxes(samples), batch_size=args.batch_size, shuffle=True,
                                         num_workers=args.workers, collate_fn=collate, drop_last=False)
    optimizer = torch.optim.AdamW(parameter_groups(detector, args.weight_decay), lr=args.lr)
    steps = args.epochs * len(loader)
    warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.001, total_iters=max(1, min(500, steps // 5)))
    boxes = sum(len(labels) for _, _, labels in samples)
    print(f"{len(samples)} images, {boxes} boxes, {len(categories)} categories; {config.MODEL.TYPE} backbone "
          f"{config.MODEL.NAME}{' from ' + args.pretrained if args.pretrained else ''}, on {device}", flush=True)

    os.makedirs(args.output, exist_ok=True)
    path = os.path.join(args.output, 'detector.pth')
    start = time.time()
    for epoch in range(args.epochs):
        detector.train()
        total, epoch_start = 0.0, time.time()
        for images, targets in loader:
            images = [image.to(device, non_blocking=True) for image in images]
            targets = [{key: value.to(device) for key, value in target.items()} for target in targets]
            loss = sum(detector(images, targets).values())
            if not torch.isfinite(loss):
                raise TrainingError(f"epoch {epoch + 1}: the loss is {loss.item()}; try a lower --lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            warmup.step()
            total += loss.item()
        atomic_save({'model': detector.state_dict(), 'categories': categories, 'epoch': epoch + 1,
                     'config': config.dump()}, path)
        eta = (time.time() - start) / (epoch + 1) * (args.epochs - epoch - 1)
        print(f"epoch {epoch + 1}/{args.epochs}: mean loss {total / len(loader):.4f} "
              f"({time.time() - epoch_start:.1f}s, ETA {format_eta(eta)}), saved {path}",
              flush=True)
    return 0


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--images', required=True, metavar='DIR', help='folder the file names are relative to')
    parser.add_argument('--annotations', required=True, metavar='FILE', help='COCO-style JSON with boxes')
    parser.add_argument('--cfg', metavar='FILE', help='config of the Swin backbone (default: the defaults)')
    parser.add_argument('--opts', default=None, nargs='+', help="override config options with 'KEY VALUE' pairs")
    parser.add_argument('--pretrained', metavar='FILE', help='weights to start the backbone from (MODEL.PRETRAINED)')
    parser.add_argument('--epochs', type=int, default=12, help='default 12 (the "1x" schedule length)')
    parser.add_argument('--batch-size', type=int, default=2, help='images per step (default 2)')
    parser.add_argument('--lr', type=float, default=1e-4, help='AdamW learning rate (default 1e-4)')
    parser.add_argument('--weight-decay', type=float, default=0.05, help='default 0.05')
    parser.add_argument('--min-size', type=int, default=800, help='shorter image side after resizing (default 800)')
    parser.add_argument('--max-size', type=int, default=1333, help='longest side at most (default 1333)')
    parser.add_argument('--workers', type=int, default=2, help='data loading processes (default 2)')
    parser.add_argument('--device', default='auto', help='auto | cpu | cuda | cuda:N (default auto)')
    parser.add_argument('--output', default='output/detection', metavar='DIR',
                        help='folder for detector.pth (default output/detection)')
    return parser


def main(argv=None):
    return run_script(build_parser(), run, argv)


if __name__ == '__main__':
    sys.exit(main())
