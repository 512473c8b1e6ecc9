"""A picture of what a SimMIM pre-training checkpoint reconstructs: one row per image, three columns.

    python scripts/simmim_visualize.py CKPT --cfg CFG --data-path D --output grid.png [--num-images 4]

Columns: the pre-training input (the SimMIM transform's crop, unnormalized), the masked input (masked patches
grey), the reconstruction (visible patches from the input, masked ones predicted by the model; with
MODEL.SIMMIM.NORM_TARGET the prediction is mapped back to pixels with the input's local mean and std). Images are
``--num-images`` spread evenly over the sorted files of D/train (D/val, or D itself when it has neither) with fixed
crop and mask draws (``--seed``), so two checkpoints of one run are shown on the same inputs.
"""
import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from checkpoint import load_model_weights
from config import load_config
from data.datasets import UnlabeledFolderDataset
from data.samplers import sample_seed
from data.simmim import SimMIMTransform
from errors import DataError, SwinTrainError
from models import build_model
from models.simmim import local_mean_std

GREY = 0.5


def image_folder(data_path):
    """The folder to draw images from (at any depth): D/train, else D/val, else D."""
    for split in ('train', 'val'):
        if os.path.isdir(os.path.join(data_path, split)):
            return os.path.join(data_path, split)
    if not os.path.isdir(data_path):
        raise DataError(f"--data-path {data_path} does not exist or is not a folder")
    return data_path


def unnormalize(images):
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    return (images * std + mean).clamp(0, 1)


@torch.no_grad()
def reconstruct(model, images, mask):
    """(input, masked input, reconstruction) as [0, 1] image batches."""
    model.eval()
    pixel_mask = model.pixel_mask(mask).float()
    recon = model.reconstruct(images, mask)
    if model.norm_target_window:  # the decoder predicts locally normalized pixels: undo with the input's stats
        mean, std = local_mean_std(images, model.norm_target_window)
        recon = recon * std + mean
    shown = unnormalize(images)
    masked = shown * (1 - pixel_mask) + GREY * pixel_mask
    filled = shown * (1 - pixel_mask) + unnormalize(recon) * pixel_mask
    return shown, masked, filled


def grid_image(columns, cell_size):
    """A PIL image: one row per image, one cell per column, each cell_size x cell_size."""
    rows = columns[0].shape[0]
    grid = Image.new('RGB', (cell_size * len(columns), cell_size * rows))
    for c, batch in enumerate(columns):
        for r in range(rows):
            pixels = (batch[r].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
            cell = Image.fromarray(pixels).resize((cell_size, cell_size), Image.NEAREST)
            grid.paste(cell, (c * cell_size, r * cell_size))
    return grid


def visualize(checkpoint_path, config, data_path, num_images=4, cell_size=None, seed=0):
    """The grid (a PIL image) for the first ``num_images`` images under data_path."""
    model = build_model(config, is_pretrain=True)
    load_model_weights(model, checkpoint_path, logging.getLogger('simmim_visualize'))
    dataset = UnlabeledFolderDataset(image_folder(data_path), SimMIMTransform(config))
    count = min(num_images, len(dataset))
    indices = [i * len(dataset) // count for i in range(count)]  # spread over the (sorted) folder: several classes
    samples = [dataset[(i, sample_seed(seed, 0, i))].image for i in indices]
    images = torch.stack([image for image, _ in samples])
    mask = torch.stack([mask for _, mask in samples])
    return grid_image(reconstruct(model, images, mask), cell_size or max(config.DATA.IMG_SIZE, 128))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('checkpoint', metavar='CKPT', help='SimMIM pre-training checkpoint (ours or official)')
    parser.add_argument('--cfg', required=True, metavar='FILE', help='the pre-training config')
    parser.add_argument('--data-path', required=True, help='dataset root (images from train/)')
    parser.add_argument('--output', required=True, help='PNG file to write')
    parser.add_argument('--opts', default=None, nargs='+', help="override config options with 'KEY VALUE' pairs")
    parser.add_argument('--num-images', type=int, default=4, help='rows of the grid')
    parser.add_argument('--cell-size', type=int, default=None, help='pixels per cell (default: IMG_SIZE, >= 128)')
    parser.add_argument('--seed', type=int, default=0, help='seed of the crops and masks')
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format='%(message)s')
    try:
        config = load_config(args.cfg, args.opts or [])
        grid = visualize(args.checkpoint, config, args.data_path, max(args.num_images, 1), args.cell_size,
                         args.seed)
    except SwinTrainError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    grid.save(args.output, format='PNG')
    print(f"wrote {args.output}: {grid.size[0]}x{grid.size[1]} ({len(grid.getbands())} channels)")
    return 0


if __name__ == '__main__':
    sys.exit(main())
