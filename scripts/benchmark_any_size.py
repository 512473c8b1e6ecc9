"""Forward time of Swin-T at its config size on the config-size code and on the any-size code, and at a detection size.

Swin-T (MODEL.TYPE swin defaults: embed 96, depths 2-2-6-2, heads 3-6-12-24, window 7, img 224), batch 1, eval
mode under ``torch.no_grad``, random weights:

* 224 x 224 on the config-size path (what classification runs) and on the any-size path forced at 224 (every
  block's ``forward_any_size``: padding, rolling and a cached shift mask). Rounds alternate the two (the order
  rotates), each round times ``--iters`` passes of each; the table shows the median ms per pass over the
  rounds, and the ratio is the median of the per-round ratios, so that load from other processes hits both
  sides alike.
* with ``--before REV``, also the models package of git revision REV (e.g. the commit before any-size models),
  built with the same weights: the config-size path before vs after, in the same process on the same input.
* ``--size`` (800 x 1216 by default, a detection input): ``--passes`` single passes, the first building the
  shift masks of that size, the later ones reusing them.

    python scripts/benchmark_any_size.py --threads 2 --before 4802cb9
    python scripts/benchmark_any_size.py --threads 1 --rounds 5 --iters 3 --size 800 1216 --passes 2
"""
import argparse
import contextlib
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import models  # noqa: E402
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
    parser.add_argument('--before', metavar='REV', help="also time the models package of this git revision")
    parser.add_argument('--onednn', choices=('off', 'on'), default='off',
                        help="models/cpu_linear.py's oneDNN path, the same for every column (default off, as "
                             "--eval runs; revisions before #29 had it on by default)")
    return parser.parse_args(argv)


def onednn_state(package, on):
    """A context with models/cpu_linear.py's oneDNN switch of ``package`` (ours or an older revision's) on or off;
    a revision without that switch runs as it is."""
    switch = getattr(package.cpu_linear, 'enabled' if on else 'disabled', None)
    return switch() if switch is not None else contextlib.nullcontext()


def models_at(revision, folder):
    """The models package of git ``revision``, extracted under ``folder`` and imported as ``models_before`` (its
    absolute imports, such as ``errors``, resolve to this tree)."""
    archive = subprocess.run(['git', '-C', ROOT, 'archive', revision, 'models'], capture_output=True, check=False)
    if archive.returncode:
        sys.exit(f"--before {revision}: {archive.stderr.decode().strip()}")
    subprocess.run(['tar', '-x', '-C', folder], input=archive.stdout, check=True)
    package = os.path.join(folder, 'models')
    spec = importlib.util.spec_from_file_location('models_before', os.path.join(package, '__init__.py'),
                                                  submodule_search_locations=[package])
    module = importlib.util.module_from_spec(spec)
    sys.modules['models_before'] = module
    spec.loader.exec_module(module)
    return module


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
    # each path: (model, forced any-size)
    paths = {'config-size path': (model, False), 'any-size path (forced)': (model, True)}
    switches = contextlib.ExitStack()
    switches.enter_context(onednn_state(models, args.onednn == 'on'))
    if args.before:
        package = models_at(args.before, tempfile.mkdtemp())
        switches.enter_context(onednn_state(package, args.onednn == 'on'))
        before = package.SwinTransformer().eval()
        before.load_state_dict(model.state_dict())
        paths[f'before ({args.before})'] = (before, False)
    print(f"  oneDNN linear path (models/cpu_linear.py) {args.onednn} in every column")
    times = {name: [] for name in paths}
    with torch.no_grad(), switches:
        for net, on in paths.values():
            force_any_size(net, on)
            time_passes(net, x, args.warmup)
        for r in range(args.rounds):
            names = list(paths)[r % len(paths):] + list(paths)[:r % len(paths)]
            for name in names:
                net, on = paths[name]
                force_any_size(net, on)
                times[name].append(time_passes(net, x, args.iters))
        force_any_size(model, False)
        for name, values in times.items():
            print(f"  224x224 {name:24s} {statistics.median(values):8.1f} ms")
        names = list(paths)
        for name in names[1:]:
            ratio = statistics.median(t / f for t, f in zip(times[name], times[names[0]], strict=True))
            print(f"  {name} / config-size at 224: {ratio:.3f}x (median of per-round ratios)")

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
