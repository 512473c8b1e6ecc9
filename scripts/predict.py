"""Top-k predictions of a trained or released Swin model for a few images.

    python scripts/predict.py CKPT IMAGES... --cfg CFG [--opts KEY VALUE ...] [--topk 5] [--device auto]

The model is built from the config; CKPT may be one of our checkpoints, an official release or timm weights.
Images get the validation transform (resize to int(256/224 * IMG_SIZE) + center crop, or a plain resize with
TEST.CROP False; ImageNet mean/std). Class names: those stored in the checkpoint, else the ImageNet-1K names
when MODEL.NUM_CLASSES is 1000, else class indices.
"""
import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
from PIL import Image, UnidentifiedImageError
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, ImageNetInfo
from torchvision import transforms

from checkpoint import load_file, load_model_weights
from config import load_config
from errors import DataError, SwinTrainError
from models import build_model

_INTERPOLATION = {'bilinear': transforms.InterpolationMode.BILINEAR,
                  'bicubic': transforms.InterpolationMode.BICUBIC,
                  'random': transforms.InterpolationMode.BICUBIC}  # random is a training-time choice


def build_val_transform(config):
    size = config.DATA.IMG_SIZE
    interpolation = _INTERPOLATION.get(config.DATA.INTERPOLATION, transforms.InterpolationMode.BICUBIC)
    if config.TEST.CROP:
        resize = [transforms.Resize(int(256 / 224 * size), interpolation=interpolation), transforms.CenterCrop(size)]
    else:
        resize = [transforms.Resize((size, size), interpolation=interpolation)]
    return transforms.Compose(resize + [transforms.ToTensor(),
                                        transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)])


def class_names(checkpoint, num_classes):
    names = checkpoint.get('class_names') if isinstance(checkpoint, dict) else None
    if names and len(names) == num_classes:
        return list(names)
    if num_classes == 1000:
        return ImageNetInfo('imagenet-1k').label_descriptions()
    return [str(i) for i in range(num_classes)]


def read_image(path):
    if not os.path.isfile(path):
        raise DataError(f"image not found: {path}")
    try:
        with Image.open(path) as image:
            return image.convert('RGB')
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"cannot read image {path}: {e}") from None


def predict(checkpoint_path, image_paths, config, topk=5, device='cpu'):
    """[(image path, [(probability, class index, name), ...]), ...] with the top-k classes of each image."""
    images = [read_image(path) for path in image_paths]  # fail on a bad path before the slow part
    checkpoint = load_file(checkpoint_path)
    model = build_model(config)
    load_model_weights(model, checkpoint, logging.getLogger('predict'), name=checkpoint_path,
                       model_type=config.MODEL.TYPE)
    model.to(device).eval()
    names = class_names(checkpoint, config.MODEL.NUM_CLASSES)
    transform = build_val_transform(config)
    batch = torch.stack([transform(image) for image in images]).to(device)
    with torch.inference_mode():
        probs = model(batch).float().softmax(dim=-1).cpu()
    top = probs.topk(min(topk, probs.shape[1]), dim=-1)
    return [(path, [(p.item(), i.item(), names[i]) for p, i in zip(values, indices)])
            for path, values, indices in zip(image_paths, top.values, top.indices)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('checkpoint', metavar='CKPT', help='weights to load')
    parser.add_argument('images', metavar='IMAGES', nargs='+', help='image files')
    parser.add_argument('--cfg', required=True, metavar='FILE', help='config of the model')
    parser.add_argument('--opts', default=None, nargs='+', help="override config options with 'KEY VALUE' pairs")
    parser.add_argument('--topk', type=int, default=5, help='classes to show per image')
    parser.add_argument('--device', default='auto', help='auto | cpu | cuda | cuda:N')
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format='%(message)s')
    device = ('cuda' if torch.cuda.is_available() else 'cpu') if args.device == 'auto' else args.device
    try:
        config = load_config(args.cfg, args.opts or [])
        results = predict(args.checkpoint, args.images, config, max(args.topk, 1), device)
    except SwinTrainError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path, top in results:
        print(path)
        for rank, (prob, index, name) in enumerate(top, 1):
            print(f"  {rank}. {100 * prob:6.2f}%  {name} ({index})")
    return 0


if __name__ == '__main__':
    sys.exit(main())
