"""GPU JPEG decoding (DATA.GPU_DECODE) against the CPU pipeline: images/s, CPU cores saved, pixel agreement.

For train crops (a recipe without PIL-only augmentation: AUTO_AUGMENT none, COLOR_JITTER 0) and the val
resize + center crop, on the same synthetic JPEGs and the same random draws (each image seeded as a train
dataset seeds it):

* CPU path: what a worker runs today (PIL decode, crop, resize to uint8; exact timm/PIL pixels, FAST_CROP off),
  host CPU ms per image (``time.process_time``, one thread);
* device path: the worker's share (header, crop draws, the file's bytes) plus the main process's share
  (``data.to_device``: one batched nvJPEG call, crop, resize, flip on the device), host CPU ms per image, and
  images/s of the device share (wall clock, synchronized);
* cores saved = (CPU-path ms - device-path ms) x device images/s / 1000: the worker cores a run at that rate
  no longer needs;
* pixels: share of uint8 values within one level of the CPU path, mean and max difference.

    python scripts/benchmark_decode.py --device cuda --images 512 --batch-size 128
"""
import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, 'scripts')):
    if path not in sys.path:
        sys.path.insert(0, path)

from benchmark_data import synthetic_jpeg  # noqa: E402

from config import load_config  # noqa: E402
from data import build_transform, collate  # noqa: E402
from data.datasets import Sample, seeded  # noqa: E402
from data.device_decode import DEVICE_DECODE, decode_batch, jpeg_decoder, pil_fallbacks  # noqa: E402
from data.device_normalize import DEVICE_NORMALIZE  # noqa: E402
from data.transforms import open_image  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--images', type=int, default=256, help='synthetic JPEGs')
    parser.add_argument('--side', type=int, nargs=2, default=(400, 500), metavar=('MIN', 'MAX'))
    parser.add_argument('--batch-size', type=int, default=64)
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--rounds', type=int, default=3, help='timed passes over the images (medians)')
    parser.add_argument('--markdown', metavar='PATH', help='also write the result table there')
    return parser.parse_args(argv)


def transforms_for(is_train, img_size):
    """(CPU-path transform, device-path transform) of one split, both ending in uint8 for the device."""
    opts = ['DATA.IMG_SIZE', img_size, 'AUG.AUTO_AUGMENT', 'none', 'AUG.COLOR_JITTER', 0.0, 'AUG.REPROB', 0.0,
            'DATA.FAST_CROP', False]
    cpu = build_transform(is_train, load_config(None, opts, environ={}), normalize_on_device=True)
    device = build_transform(is_train, load_config(None, opts + ['DATA.GPU_DECODE', True], environ={}),
                             normalize_on_device=True)
    return cpu, device


def worker_share(transform, jpegs, start):
    """The dataset Samples of one batch, each seeded by its index as a train dataset does."""
    samples = []
    for i, data in enumerate(jpegs, start=start):
        with seeded(i):
            samples.append(Sample(transform(open_image(data)), 0))
    return samples


def run_pass(transforms, jpegs, args, device):
    """One pass over the images: CPU s of the CPU path; CPU s and wall s of the device path (worker and
    main-process shares); and the uint8 outputs of both paths."""
    cpu_tf, device_tf = transforms
    times = dict(cpu_path=0.0, device_cpu=0.0, device_wall=0.0)
    outputs = ([], [])
    for start in range(0, len(jpegs), args.batch_size):
        chunk = jpegs[start:start + args.batch_size]
        t = time.process_time()
        images = collate(worker_share(cpu_tf, chunk, start), DEVICE_NORMALIZE).images
        times['cpu_path'] += time.process_time() - t
        outputs[0].append(images)

        t = time.process_time()
        encoded = collate(worker_share(device_tf, chunk, start), DEVICE_DECODE).images
        wall = time.perf_counter()
        decoded, _ = decode_batch(encoded, device)
        times['device_cpu'] += time.process_time() - t  # not the wait below: a training step waits anyway
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        times['device_wall'] += time.perf_counter() - wall
        outputs[1].append(decoded.cpu())
    return times, torch.cat(outputs[0]), torch.cat(outputs[1])


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(1)  # a worker's view of the CPU path
    device = torch.device(args.device)
    rng = np.random.default_rng(0)
    jpegs = [synthetic_jpeg(rng, args.side) for _ in range(args.images)]
    decoder = jpeg_decoder()[0]
    header = (f'{args.images} synthetic JPEGs of {args.side[0]}-{args.side[1]} px, batch {args.batch_size}, '
              f'img {args.img_size}, device {device} ({decoder}); medians of {args.rounds} passes')
    print(header, flush=True)
    lines = ['| split | CPU path ms/img | device path ms/img (host) | device img/s | cores saved at that rate '
             '| values within 1 level | mean / max diff |', '|---|---|---|---|---|---|---|']
    for split in ('train', 'val'):
        transforms = transforms_for(split == 'train', args.img_size)
        run_pass(transforms, jpegs[:args.batch_size], args, device)  # warm-up: decoder init, kernels
        passes = [run_pass(transforms, jpegs, args, device) for _ in range(args.rounds)]
        n = len(jpegs)
        cpu_ms, dev_ms = (1e3 * statistics.median(p[0][k] for p in passes) / n for k in ('cpu_path', 'device_cpu'))
        rate = n / statistics.median(p[0]['device_wall'] for p in passes)
        cores = (cpu_ms - dev_ms) * rate / 1e3
        _, expected, got = passes[0]
        diff = (expected.int() - got.int()).abs()
        within = (diff <= 1).float().mean().item()
        lines.append(f'| {split} | {cpu_ms:.2f} | {dev_ms:.2f} | {rate:.0f} | {cores:.1f} | {100 * within:.2f}% '
                     f'| {diff.float().mean().item():.3f} / {diff.max().item()} |')
        print(lines[-1], flush=True)
    lines.append(f'\nDecoder used: {jpeg_decoder()[0]}; JPEGs it rejected (decoded by PIL instead): '
                 f'{pil_fallbacks[0]}')
    table = '\n'.join([header, ''] + lines)
    print('\n' + table)
    if args.markdown:
        with open(args.markdown, 'w') as f:
            f.write(table + '\n')


if __name__ == '__main__':
    main()
