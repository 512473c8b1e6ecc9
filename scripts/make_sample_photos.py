"""A small 10-class photo set in the train/<class>/ + val/<class>/ layout, to try "Train on your own images"
without downloading anything.

    python scripts/make_sample_photos.py datasets/sample_photos
    python main.py --cfg configs/own_data_cpu.yaml --data-path datasets/sample_photos

The two photos that ship with scikit-learn (``load_sample_images``: a temple in China, a flower) are each cut
into a 3 x 2 grid of regions, five of which are used; a class is one region, and its images are random crops
inside it (size, position, mirror, slight colour and brightness changes), saved as JPEGs. Classes differ in
content, not in one colour, so the usual photo augmentations (RandAugment, colour jitter) keep them apart.
"""
import argparse
import os

import numpy as np
from PIL import Image, ImageEnhance
from sklearn.datasets import load_sample_images

REGIONS = {'top_left': (0, 0), 'top_middle': (1, 0), 'top_right': (2, 0), 'bottom_left': (0, 1),
           'bottom_middle': (1, 1)}  # (column, row) in a 3 x 2 grid; the regions do not overlap


def region_crop(photo, column, row, rng, size):
    """A random crop (35-100% of the region's side) inside the region, resized to size, lightly jittered."""
    width, height = photo.size
    region_w, region_h = width // 3, height // 2
    side = int(min(region_w, region_h) * rng.uniform(0.35, 1.0))
    x = column * region_w + rng.integers(0, region_w - side + 1)
    y = row * region_h + rng.integers(0, region_h - side + 1)
    image = photo.crop((x, y, x + side, y + side)).resize((size, size), Image.BICUBIC)
    if rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.8, 1.2))
    return ImageEnhance.Color(image).enhance(rng.uniform(0.8, 1.2))


def make_sample_photos(root, train_per_class=40, val_per_class=10, size=128, seed=0):
    """Write the set under root (train/ and val/, 10 class folders each); returns root."""
    rng = np.random.default_rng(seed)
    data = load_sample_images()
    for name, pixels in zip(('temple', 'flower'), data.images, strict=True):
        photo = Image.fromarray(pixels)
        for region, (column, row) in REGIONS.items():
            for split, count in (('train', train_per_class), ('val', val_per_class)):
                folder = os.path.join(root, split, f'{name}_{region}')
                os.makedirs(folder, exist_ok=True)
                for i in range(count):
                    image = region_crop(photo, column, row, rng, size)
                    image.save(os.path.join(folder, f'{i:04d}.jpg'), quality=90)
    return root


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('root', help='output folder (train/ and val/ are written inside)')
    parser.add_argument('--train-per-class', type=int, default=40)
    parser.add_argument('--val-per-class', type=int, default=10)
    parser.add_argument('--size', type=int, default=128, help='side of the saved JPEGs in pixels')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args()
    make_sample_photos(args.root, args.train_per_class, args.val_per_class, args.size, args.seed)
    print(f"wrote {10 * (args.train_per_class + args.val_per_class)} images in 10 classes to {args.root}")


if __name__ == '__main__':
    main()
