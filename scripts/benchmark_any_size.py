"""Forward time of Swin-T at its config size on the config-size code and on the any-size code, and at a detection size.

Swin-T (MODEL.TYPE swin defaults: embed 96, depths 2-2-6-2, heads 3-6-12-24, window 7, img 224), batch 1, eval
mode under ``torch.no_grad``, random weights:

* 224 x 224 on the config-size path (what classification runs) and on the any-size path forced at 224 (every
  block's ``forward_any_size``: padding, rolling and a cached shift mask). Rounds alternate the two (the order
  rotates), each round times ``--iters`` passes of each; the table shows the median ms per pass over the
  rounds, and the ratio is the median of the per-round ratios, so that load from other processes hits both
  sides alike.
* ``--size`` (800 x 1216 by default, a detection input): ``--passes`` single passes, the first building the
  shift masks of that size, the later ones reusing them.

    python scripts/benchmark_any_size.py --threads 2
    python scripts/benchmark_any_size.py --threads 1 --rounds 5 --iters 3 --size 800 1216 --passes 2
"""
import argparse
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from models import SwinTransformer  # noqa: E402
from models.swin_transformer import SwinTransformerBlock  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--threads', type=int, default=torch.get_num_threads(), help='torch.set_num_threads')
    parser.add_argument('--rounds', type=int, default=5, help='alternating rounds at 224')
    parser.add_argument('--iters', type=int, default=3, help='passes of each path per round')
    parser.add_argument('--warmup', type=int, default=2, help='untimed passes of each path first')
    parser.add_argument('--size', type=int, nargs=2, default=(800, 1216), metavar=('H', 'W'),
                        help='the other input size')
    parser.add_argument('--passes', type=int, default=2, help='timed passes at --size')
    parser.add_argument('--seed', type=int, default=0)
    return parser.parse_args(argv)


def force_any_size(model, on):
    """Every block runs ``forward_any_size`` (on) or its usual dispatch (off), whatever the map size."""
    for module in model.modules():
        if isinstance(module, SwinTransformerBlock):
            if on:
                module.forward = module.forward_any_size
            else:
                module.__dict__.pop('forward', None)


def time_passes(model, x, count):
    """Milliseconds per pass, averaged over ``count`` passes."""
    start = time.perf_counter()
    for _ in range(count):
        model(x)
    return (time.perf_counter() - start) * 1000 / count


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = SwinTransformer().eval()  # Swin-T, img 224, window 7
    x = torch.randn(1, 3, 224, 224)
    print(f"Swin-T, CPU, batch 1, eval + no_grad, torch {torch.__version__}, {args.threads} thread(s); "
          f"{args.rounds} rounds x {args.iters} passes per path at 224x224", flush=True)
    paths = {'config-size path': False, 'any-size path (forced)': True}
    times = {name: [] for name in paths}
    with torch.no_grad():
        for on in paths.values():
            force_any_size(model, on)
            time_passes(model, x, args.warmup)
        for r in range(args.rounds):
            names = list(paths)[r % 2:] + list(paths)[:r % 2]
            for name in names:
                force_any_size(model, paths[name])
                times[name].append(time_passes(model, x, args.iters))
        force_any_size(model, False)
        fast, general = (times[name] for name in paths)
        for name, values in times.items():
            print(f"  224x224 {name:24s} {statistics.median(values):8.1f} ms")
        ratio = statistics.median(g / f for g, f in zip(general, fast, strict=True))
        print(f"  any-size / config-size at 224: {ratio:.3f}x (median of per-round ratios)")

        blocks = [m for m in model.modules() if isinstance(m, SwinTransformerBlock)]
        for blk in blocks:  # the forced 224 passes cached masks of their own
            blk.shift_masks.masks.clear()
        big = torch.randn(1, 3, *args.size)
        for i in range(args.passes):
            what = 'builds the shift masks' if i == 0 else 'masks cached'
            print(f"  {args.size[0]}x{args.size[1]} pass {i + 1} ({what}): {time_passes(model, big, 1):8.1f} ms",
                  flush=True)
        masks = sum(len(blk.shift_masks) for blk in blocks)
        shifted = sum(blk.any_size_shift > 0 for blk in blocks)
        print(f"  shift masks cached at {args.size[0]}x{args.size[1]}: {masks} ({shifted} blocks shift)")


if __name__ == '__main__':
    main()
