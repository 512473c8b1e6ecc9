"""Images/s of our train and val input pipelines against a plain baseline, in one run.

Baseline: torchvision ImageFolder + the same timm train transform / the official val transform (float
tensors, normalized in the workers), a plain DataLoader with the same workers and batch size. Ours:
``data.build_loader`` in two forms:

* ``ours``: what a CPU run builds (float batches, normalized in the workers).
* ``ours-u8``: what a CUDA run builds (uint8 batches; ``data.to_device`` converts and normalizes them on the
  device). On CUDA the wall-clock loop includes to_device; with ``--device cpu`` (no GPU to measure the
  configuration on) both columns stop at the host's uint8 batch, since the conversion belongs to the GPU.

Two measurements per pipeline: images/s of the real loader (``--workers`` processes, wall clock), and CPU
time per image of the same pipeline run in this process (0 workers, ``time.process_time``: decode,
transforms, collate, to_device), which other load on the machine disturbs less. Rounds are interleaved
(each pipeline once per round, order rotating); the table shows medians over the rounds, and each speed-up is
the median of the per-round speed-ups, so that load from other processes hits both sides of a ratio alike.
Without ``--data-path`` a synthetic ImageNet-like tree (JPEGs of 400-500 px, ``--side``) is written to a
temporary folder.

Examples::

    python scripts/benchmark_data.py                         # synthetic data, 2 workers, batch 32
    python scripts/benchmark_data.py --data-path /data/imagenet --workers 8 --batch-size 128
"""
import argparse
import io
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmark import paired_ratio  # noqa: E402

import data  # noqa: E402
from config import load_config  # noqa: E402
from data.transforms import fix_posterize  # noqa: E402
from utils import synchronize  # noqa: E402


def parse_args():
    parser = argparse.ArgumentParser('input pipeline benchmark')
    parser.add_argument('--data-path', help='ImageFolder root with train/ and val/ (default: synthetic)')
    parser.add_argument('--classes', type=int, default=8, help='synthetic: class folders')
    parser.add_argument('--images-per-class', type=int, default=64, help='synthetic: images per class')
    parser.add_argument('--side', type=int, nargs=2, default=(400, 500), metavar=('MIN', 'MAX'),
                        help='synthetic: range of image width and height in pixels')
    parser.add_argument('--workers', type=int, default=2)
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--batches', type=int, default=12, help='timed batches per measurement')
    parser.add_argument('--warmup', type=int, default=2, help='untimed batches first (worker start-up)')
    parser.add_argument('--rounds', type=int, default=5)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--val-fast-resize', action='store_true', help='also time DATA.VAL_FAST_RESIZE')
    parser.add_argument('--opts', nargs='*', default=[], help='extra config KEY VALUE pairs')
    return parser.parse_args()


def write_synthetic(root, classes, per_class, side=(400, 500), seed=0):
    """An ImageFolder tree of photo-like JPEGs (smooth color fields plus grain, sides in ``side`` px,
    quality 90); val/ holds hard links to the train files."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        for split in ('train', 'val'):
            os.makedirs(os.path.join(root, split, f'class{c:03d}'), exist_ok=True)
        for i in range(per_class):
            name = os.path.join(f'class{c:03d}', f'{i:05d}.jpg')
            with open(os.path.join(root, 'train', name), 'wb') as f:
                f.write(synthetic_jpeg(rng, side))
            os.link(os.path.join(root, 'train', name), os.path.join(root, 'val', name))


def synthetic_jpeg(rng, side=(400, 500)):
    """The bytes of one photo-like JPEG (a smooth color field plus grain, sides in ``side`` px, quality 90)."""
    w, h = (int(v) for v in rng.integers(side[0], side[1] + 1, size=2))
    field = rng.integers(0, 256, (int(rng.integers(3, 10)), int(rng.integers(3, 10)), 3), dtype=np.uint8)
    pixels = np.asarray(Image.fromarray(field).resize((w, h), Image.BICUBIC), dtype=np.int16)
    pixels = np.clip(pixels + rng.normal(0, 10, (h, w, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format='JPEG', quality=90)
    return buffer.getvalue()


def baseline_loaders(config, root, workers, batch_size):
    """torchvision ImageFolder + timm's train transform / the official val transform, plain DataLoader."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
    from torchvision import datasets, transforms

    aug, size = config.AUG, config.DATA.IMG_SIZE
    train_tf = create_transform(size, is_training=True, color_jitter=aug.COLOR_JITTER or None,
                                auto_augment=aug.AUTO_AUGMENT if aug.AUTO_AUGMENT not in ('', 'none') else None,
                                re_prob=aug.REPROB, re_mode=aug.REMODE, re_count=aug.RECOUNT,
                                interpolation=config.DATA.INTERPOLATION)
    for step in train_tf.transforms:
        fix_posterize(step)  # else Pillow 13 raises on PosterizeIncreasing's 0 bits (see data/transforms.py)
    val_tf = transforms.Compose([
        transforms.Resize(int(256 / 224 * size), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(size), transforms.ToTensor(),
        transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)])
    common = dict(batch_size=batch_size, num_workers=workers)
    train = torch.utils.data.DataLoader(datasets.ImageFolder(os.path.join(root, 'train'), train_tf),
                                        shuffle=True, drop_last=True, **common)
    val = torch.utils.data.DataLoader(datasets.ImageFolder(os.path.join(root, 'val'), val_tf), **common)
    return train, val


def whole_waves(workers, warmup, batches):
    """(warm-up, timed) batch counts for a loader with ``workers`` processes, each rounded up to whole waves.

    The workers start together and deliver batches in waves of ``workers``. A timed window inside one wave
    counts batches made in parallel as if they had come at once (8 workers, 2 warm-up + 6 timed batches measured
    700000 images/s on a GPU host), so the warm-up is at least the first wave and the timed batches are whole
    waves.
    """
    if workers == 0:
        return warmup, batches
    return max(-(-warmup // workers), 1) * workers, -(-batches // workers) * workers


def seconds_per_image(loader, device, move, warmup, batches, epoch, clock):
    if hasattr(loader.sampler, 'set_epoch'):
        loader.sampler.set_epoch(epoch)
    warmup, batches = whole_waves(loader.num_workers, warmup, batches)
    it = iter(loader)
    for _ in range(warmup):
        move(next(it), device)
    synchronize(device)
    start, seen = clock(), 0
    for _ in range(batches):
        images, _ = move(next(it), device)
        seen += images.shape[0]
    synchronize(device)  # the device's share of the work (copies, to_device) is asynchronous
    elapsed = clock() - start
    del it  # stops the workers
    return elapsed / seen


def plain_move(batch, device):
    images, targets = batch
    return images.to(device, non_blocking=True), targets.to(device, non_blocking=True)


def host_only(batch, device):
    """ours-u8 CPU time: the host's share ends with the uint8 batch (to_device's work runs on the GPU)."""
    return batch.images, batch.targets


def main():
    args = parse_args()
    torch.set_num_threads(1)  # as in loader workers; keeps the in-process CPU times comparable
    tmp = None
    root = args.data_path
    if root is None:
        tmp = tempfile.TemporaryDirectory(prefix='swin-data-bench-')
        root = tmp.name
        print(f"writing {args.classes * args.images_per_class} synthetic JPEGs to {root} ...", flush=True)
        write_synthetic(root, args.classes, args.images_per_class, args.side)
    num_classes = len([d for d in os.scandir(os.path.join(root, 'train')) if d.is_dir()])
    opts = ['DATA.DATA_PATH', root, 'DATA.IMG_SIZE', args.img_size, 'DATA.BATCH_SIZE', args.batch_size,
            'DATA.NUM_WORKERS', args.workers, 'DATA.PERSISTENT_WORKERS', False, 'MODEL.NUM_CLASSES', num_classes,
            'DEVICE', args.device] + list(args.opts)
    warmup, batches = whole_waves(args.workers, args.warmup, args.batches)
    needed = (warmup + batches) * args.batch_size
    print(f"torch {torch.__version__}, workers={args.workers}, batch={args.batch_size}, img={args.img_size}, "
          f"device={args.device}; each measurement: {warmup} warm-up + {batches} timed batches (whole waves of "
          f"the workers; in-process CPU time: {args.warmup} + {args.batches})")

    pipelines = {}  # name -> {'wall': (loader, move), 'cpu': (loader, move)}
    u8_move = {'wall': data.to_device if args.device.startswith('cuda') else host_only, 'cpu': host_only}
    for kind, kind_opts in (('wall', opts), ('cpu', opts + ['DATA.NUM_WORKERS', 0])):
        cfg = load_config(None, kind_opts, environ={})
        base_train, base_val = baseline_loaders(cfg, root, cfg.DATA.NUM_WORKERS, args.batch_size)
        ours_float = data.build_loader(cfg, args.device, normalize_on_device=False)
        ours_u8 = data.build_loader(cfg, args.device, normalize_on_device=True)
        if len(base_train.dataset) < needed:
            sys.exit(f"{root} has {len(base_train.dataset)} train images; this run needs {needed}")
        entries = {
            'train baseline': (base_train, plain_move),
            'train ours': (ours_float[2], data.to_device),
            'train ours-u8': (ours_u8[2], u8_move[kind]),
            'val baseline': (base_val, plain_move),
            'val ours': (ours_float[3], data.to_device),
            'val ours-u8': (ours_u8[3], u8_move[kind]),
        }
        if args.val_fast_resize:
            fast = load_config(None, kind_opts + ['DATA.VAL_FAST_RESIZE', True, 'EVAL_MODE', True], environ={})
            fast_loader = data.build_loader(fast, args.device, normalize_on_device=True)[3]
            entries['val ours-u8-fast'] = (fast_loader, u8_move[kind])
        for name, entry in entries.items():
            pipelines.setdefault(name, {})[kind] = entry

    names = list(pipelines)
    results = {(name, kind): [] for name in names for kind in ('wall', 'cpu')}
    clocks = {'wall': time.perf_counter, 'cpu': time.process_time}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            for kind in ('wall', 'cpu'):
                loader, move = pipelines[name][kind]
                results[name, kind].append(seconds_per_image(loader, args.device, move, args.warmup, args.batches,
                                                             r, clocks[kind]))
        print(f"round {r + 1}/{args.rounds} images/s: "
              + ', '.join(f"{n} {1 / results[n, 'wall'][-1]:.0f}" for n in names), flush=True)

    print(f"\n{'pipeline':<20}{'images/s':>10}{'speed-up':>10}{'host CPU ms/image':>20}{'speed-up':>10}")
    for name in names:
        base = f"{name.split()[0]} baseline"
        wall, cpu = (statistics.median(results[name, kind]) for kind in ('wall', 'cpu'))
        # seconds per image: baseline / ours is the speed-up
        wall_ratio, cpu_ratio = (paired_ratio(results[base, kind], results[name, kind]) for kind in ('wall', 'cpu'))
        print(f"{name:<20}{1 / wall:>10.1f}{wall_ratio:>9.2f}x{cpu * 1e3:>20.2f}{cpu_ratio:>9.2f}x")
    if tmp is not None:
        tmp.cleanup()


if __name__ == '__main__':
    main()
