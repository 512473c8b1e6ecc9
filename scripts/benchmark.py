"""Throughput of our Swin models against timm's (and optionally the official repo's), in one process.

For each model family and size, every implementation gets the same batch, dtype and inputs. Rounds are
interleaved (the order rotates each round); the table shows the median images/s over the rounds, and each
ratio is the median of the per-round ratios, so that load from other processes hits both sides of a ratio
alike. Two measurements:

* infer: eval mode, ``torch.inference_mode``, forward only.
* train: the step training runs, by calling the training loop's own ``engine.forward_backward`` and
  ``engine.optimizer_step`` (one micro-batch): forward + cross-entropy under autocast, backward
  (through a GradScaler for fp16), gradient-norm clipping at TRAIN.CLIP_GRAD, and the optimizer training builds
  (``optimizer.build_optimizer``: AdamW over decay / no-decay groups, fused on CUDA). fp32 weights, as in training.

Families are every MODEL.TYPE that ``models.build_model`` builds (``--families``); each is compared with timm's
model of the same size where timm has one, and with the official class when ``--official`` (or the
``OFFICIAL_SWIN`` environment variable) points at the official ``models/swin_transformer.py`` or its folder
(``swin_transformer_v2.py`` / ``swin_mlp.py`` beside it serve the other families).

On CUDA, training rows also report MFU = images/s x 6 x MACs per image / peak FLOP/s (``flops()`` counts
multiply-accumulates of one forward; forward + backward is about 3 forwards, 2 FLOPs per MAC). The peak comes
from the exact device name (``PEAK_TFLOPS``) or ``--peak-tflops``.

Examples::

    python scripts/benchmark.py                                   # CPU or CUDA fp32, Swin-T
    python scripts/benchmark.py --models T,S,B --batch-size 8 --iters 2 --rounds 5
    python scripts/benchmark.py --models V2-T,V2-S                # SwinV2 vs timm's swinv2_*_window8_256
    python scripts/benchmark.py --device cuda --dtypes fp32,bf16,fp16 --batch-size 128 --compile both
    python scripts/benchmark.py --official /path/to/Swin-Transformer   # adds the official code as a column
    python scripts/benchmark.py --columns ours,ours-plain,timm --modes infer   # CPU: what models/cpu_linear gains
"""
import argparse
import copy
import importlib.util
import itertools
import json
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from config import load_config  # noqa: E402
from engine import forward_backward, optimizer_step  # noqa: E402
from errors import SwinTrainError  # noqa: E402
from lr_scheduler import build_scheduler  # noqa: E402
from models import build_model, cpu_linear  # noqa: E402
from optimizer import build_optimizer  # noqa: E402
from run_state import TrainingObjects  # noqa: E402
from tasks import ClassificationTask  # noqa: E402
from utils import Precision, synchronize  # noqa: E402

# MODEL.TYPE -> input size and window of its reference configs, timm's model name per size, official file/class
FAMILIES = {
    'swin': dict(img_size=224, window_size=7, timm='swin_{}_patch4_window7_224',
                 official=('swin_transformer.py', 'SwinTransformer')),
    'swinv2': dict(img_size=256, window_size=8, timm='swinv2_{}_window8_256',
                   official=('swin_transformer_v2.py', 'SwinTransformerV2')),
    'swin_mlp': dict(img_size=256, window_size=8, timm=None, official=('swin_mlp.py', 'SwinMLP')),
}
# size -> timm's size word, official constructor arguments (toy: the test suite's tiny model, for dry runs)
SIZES = {
    'T': ('tiny', dict(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24])),
    'S': ('small', dict(embed_dim=96, depths=[2, 2, 18, 2], num_heads=[3, 6, 12, 24])),
    'B': ('base', dict(embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32])),
    'toy': ('tiny', dict(embed_dim=24, depths=[2, 2], num_heads=[3, 6], patch_size=2, window_size=4, img_size=32)),
}
FAMILY_PREFIX = {'swin': 'Swin', 'swinv2': 'SwinV2', 'swin_mlp': 'SwinMLP'}
DTYPES = {'fp32': torch.float32, 'bf16': torch.bfloat16, 'fp16': torch.float16}
DROP_PATH_RATE = 0.1  # the same stochastic depth for every implementation (timm's own default is 0)
# Dense (no sparsity) peak TFLOP/s by the exact name torch.cuda.get_device_name() reports: fp32 without TF32,
# TF32, and 16-bit tensor cores. PCIe / NVL cards run at lower clocks and power than SXM ones of the same chip.
_HOPPER_SXM = {'fp32': 67.0, 'tf32': 494.7, 'bf16': 989.4, 'fp16': 989.4}
_HOPPER_NVL = {'fp32': 60.0, 'tf32': 417.5, 'bf16': 835.5, 'fp16': 835.5}
_HOPPER_PCIE = {'fp32': 51.2, 'tf32': 378.0, 'bf16': 756.5, 'fp16': 756.5}
_A100 = {'fp32': 19.5, 'tf32': 156.0, 'bf16': 312.0, 'fp16': 312.0}
PEAK_TFLOPS = {
    'NVIDIA H100 80GB HBM3': _HOPPER_SXM,
    'NVIDIA H100 SXM5 80GB': _HOPPER_SXM,
    'NVIDIA H100 PCIe': _HOPPER_PCIE,
    'NVIDIA H100 NVL': _HOPPER_NVL,
    'NVIDIA H200': _HOPPER_SXM,
    'NVIDIA H200 NVL': _HOPPER_NVL,
    'NVIDIA GH200 480GB': _HOPPER_SXM,
    'NVIDIA A100-SXM4-40GB': _A100,
    'NVIDIA A100-SXM4-80GB': _A100,
    'NVIDIA A100-PCIE-40GB': _A100,
    'NVIDIA A100 80GB PCIe': _A100,
    'NVIDIA L40S': {'fp32': 91.6, 'tf32': 183.0, 'bf16': 362.1, 'fp16': 362.1},
    'NVIDIA L40': {'fp32': 90.5, 'tf32': 90.5, 'bf16': 181.0, 'fp16': 181.0},
    'NVIDIA L4': {'fp32': 30.3, 'tf32': 60.0, 'bf16': 121.0, 'fp16': 121.0},
    'NVIDIA A10': {'fp32': 31.2, 'tf32': 62.5, 'bf16': 125.0, 'fp16': 125.0},
}


def log(message):
    print(message, file=sys.stderr, flush=True)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--models', default='T',
                        help='comma-separated sizes from T,S,B,toy (default: T), each for every --families; '
                             'V2-T, V2-S, ...: that size of swinv2 only')
    parser.add_argument('--families', default='swin',
                        help="comma-separated MODEL.TYPEs (swin, swinv2, swin_mlp), or 'all': those that build here")
    parser.add_argument('--columns', default='ours,timm,official',
                        help='implementations to compare, from ours,timm,official (official needs --official) and '
                             'ours-plain (ours with models/cpu_linear switched off: F.linear everywhere)')
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--img-size', type=int, default=None,
                        help="default: the family's reference size (224 for Swin, 256 for SwinV2 and Swin-MLP)")
    parser.add_argument('--device', default='auto', help='auto | cpu | cuda | cuda:N')
    parser.add_argument('--dtypes', default=None,
                        help='comma-separated from fp32,bf16,fp16 (autocast); default fp32 on CPU, all three on CUDA')
    parser.add_argument('--modes', default='infer,train', help='comma-separated from infer,train')
    parser.add_argument('--compile', nargs='?', default='no', const='both', choices=['no', 'both', 'only'],
                        help='torch.compile (mode default): no, both eager and compiled rows (also: a bare '
                             '--compile), or compiled only')
    parser.add_argument('--iters', type=int, default=3, help='steps per timed round')
    parser.add_argument('--warmup', type=int, default=2, help='untimed steps per model before the rounds')
    parser.add_argument('--rounds', type=int, default=5, help='interleaved timed rounds (the median is reported)')
    parser.add_argument('--attn', default='fused', choices=['fused', 'manual'], help='our attention path')
    parser.add_argument('--timm-fused-attn', action='store_true',
                        help="switch timm's window attention to its SDPA path (timm 1.0 default: explicit softmax)")
    parser.add_argument('--official', metavar='PATH', default=os.environ.get('OFFICIAL_SWIN') or None,
                        help='official models/swin_transformer.py, its folder or the repo (default: $OFFICIAL_SWIN)')
    parser.add_argument('--tf32', action='store_true', help='allow TF32 matmuls for fp32 on CUDA')
    parser.add_argument('--peak-tflops', type=float, default=None, help='peak for MFU (default: from a table)')
    parser.add_argument('--threads', type=int, default=None, help='torch CPU threads (default: torch default)')
    parser.add_argument('--clock', default='wall', choices=['wall', 'cpu'],
                        help='cpu: time CPU seconds of this process (for a busy shared CPU with --threads 1)')
    parser.add_argument('--profile', type=int, default=0, metavar='STEPS',
                        help='after each row, profile STEPS steps of every column: the top kernels (Markdown)')
    parser.add_argument('--profile-out', metavar='PATH', help='write the profiles there (default: stdout)')
    parser.add_argument('--json', metavar='PATH', help='also write the rows as JSON (rewritten after every row)')
    return parser.parse_args(argv)


def buildable_families():
    """The MODEL.TYPEs (official names) that the config accepts and models.build_model builds here."""
    found = []
    for family in FAMILIES:
        try:
            with torch.device('meta'):  # no weights: only whether it builds
                ours(family, dict(model_kwargs(family, 'toy'), num_heads=[3, 6]), fused=True)
        except SwinTrainError:  # "MODEL.TYPE ... is not supported"
            continue
        found.append(family)
    return found


def official_class(path, family):
    """The official model class of ``family``, loaded by file path (its package is also called ``models``);
    None when the file is not there."""
    filename, class_name = FAMILIES[family]['official']
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    if os.path.isdir(os.path.join(folder, 'models')):
        folder = os.path.join(folder, 'models')
    file = path if (os.path.isfile(path) and family == 'swin') else os.path.join(folder, filename)
    if not os.path.isfile(file):
        return None
    spec = importlib.util.spec_from_file_location(f'official_{filename[:-3]}', file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, class_name)


def model_kwargs(family, size, img_size=None):
    """Official constructor arguments of one family and size (``img_size``: instead of the reference size)."""
    kwargs = {'img_size': FAMILIES[family]['img_size'], 'window_size': FAMILIES[family]['window_size']}
    kwargs.update(SIZES[size][1])
    if img_size:
        kwargs['img_size'] = img_size
    return kwargs


def ours(family, kwargs, fused):
    """Our model of ``family`` built the way training builds it, and the config it came from."""
    node = f'MODEL.{family.upper()}.'
    opts = ['MODEL.TYPE', family, 'DATA.IMG_SIZE', kwargs['img_size'], 'MODEL.NUM_CLASSES', 1000,
            'MODEL.DROP_PATH_RATE', DROP_PATH_RATE]
    for key in ('embed_dim', 'depths', 'num_heads', 'window_size'):
        opts += [node + key.upper(), kwargs[key]]
    if 'patch_size' in kwargs:
        opts += [node + 'PATCH_SIZE', kwargs['patch_size']]
    config = load_config(None, opts, environ={})
    model = build_model(config)
    for module in model.modules():
        if hasattr(module, 'fused_attn'):
            module.fused_attn = fused
    return model, config


def build_models(family, size, args):
    """{column name: model} for one family and size (a column is left out where that implementation has no
    model), all at their default (official) init and the same drop-path rate; and the config."""
    import timm
    kwargs = model_kwargs(family, size, args.img_size)
    models = {}
    models['ours'], config = ours(family, kwargs, args.attn == 'fused')
    if 'ours-plain' in args.columns:
        models['ours-plain'] = copy.deepcopy(models['ours'])
    timm_name = FAMILIES[family]['timm']
    if 'timm' in args.columns and timm_name:
        theirs = timm.create_model(timm_name.format(SIZES[size][0]), pretrained=False,
                                   drop_path_rate=DROP_PATH_RATE, **kwargs)
        if args.timm_fused_attn:
            for module in theirs.modules():
                if hasattr(module, 'fused_attn'):
                    module.fused_attn = True
        models['timm'] = theirs
    if 'official' in args.columns and args.official:
        try:
            official = official_class(args.official, family)
            if official is not None:
                models['official'] = official(drop_path_rate=DROP_PATH_RATE, **kwargs)
        except Exception as e:  # foreign code: report and measure the rest
            log(f'official {family} model from {args.official} not usable: {type(e).__name__}: {e}')
    return models, config


def with_cpu_linear(step):
    """``step`` run with models/cpu_linear's oneDNN path on (off by default; the column 'ours')."""
    def fast_step():
        with cpu_linear.enabled():
            return step()
    return fast_step


def without_cpu_linear(step):
    """``step`` run with models/cpu_linear switched off (the column 'ours-plain')."""
    def plain_step():
        with cpu_linear.disabled():
            return step()
    return plain_step


def make_step(model, mode, device, dtype, images, labels, config):
    """A closure running one step of ``mode`` on ``model`` (already on the device)."""
    precision = Precision(device.type, dtype)
    if mode == 'infer':
        model.eval()

        def step():
            with torch.inference_mode(), precision.autocast():
                model(images)
        return step

    model.train()
    optimizer = build_optimizer(config, model)  # fused AdamW on CUDA, as in training
    objects = TrainingObjects(model, ClassificationTask(torch.nn.CrossEntropyLoss()), optimizer,
                              build_scheduler(config, optimizer, 1),
                              scaler=torch.amp.GradScaler(device.type) if precision.needs_scaler else None)

    def step():  # the training loop's own optimizer step (engine.py), one micro-batch, without the logging
        forward_backward(objects, (images, labels), 1, True, precision)
        optimizer_step(objects, config.TRAIN.CLIP_GRAD)
    return step


def measure(steps, args, device, batch_size, label):
    """Interleaved rounds over the implementations: {name: [images/s of each round]}."""
    names = list(steps)
    clock = time.process_time if args.clock == 'cpu' else time.perf_counter
    for name in names:
        log(f'  {label}: warmup {name}')
        for _ in range(args.warmup):
            steps[name]()
        synchronize(device)
    rates = {name: [] for name in names}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]  # rotate who goes first
        for name in order:
            synchronize(device)
            start = clock()
            for _ in range(args.iters):
                steps[name]()
            synchronize(device)
            rates[name].append(args.iters * batch_size / (clock() - start))
        log(f'  {label}: round {r + 1}/{args.rounds}: ' + ', '.join(f'{n} {rates[n][-1]:.2f}' for n in names))
    return rates


def profile(steps, device, count, label, out):
    """Top ops/kernels by self device time (self CPU time on CPU) of ``count`` steps of each column."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == 'cuda':
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    sort = 'self_device_time_total' if device.type == 'cuda' else 'self_cpu_time_total'
    for name, step in steps.items():
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(count):
                step()
            synchronize(device)
        try:
            table = prof.key_averages().table(sort_by=sort, row_limit=15, max_name_column_width=60)
        except Exception as e:  # profiler key names moved between torch versions (cuda_time -> device_time)
            table = f'profile table failed: {type(e).__name__}: {e}'
        print(f'\n#### profile: {label}, {name} ({count} steps, top 15 by {sort})\n\n```\n{table}\n```',
              file=out, flush=True)


def peak_tflops(device_name, dtype_name, tf32=False):
    """Dense peak TFLOP/s of a device known by its exact name, or None."""
    table = PEAK_TFLOPS.get(device_name)
    if table is None:
        return None
    return table['tf32' if dtype_name == 'fp32' and tf32 else dtype_name]


def paired_ratio(ours_rates, theirs_rates):
    """Median over rounds of ours/theirs: each round's pair ran back to back, so load changes cancel."""
    return statistics.median(a / b for a, b in zip(ours_rates, theirs_rates, strict=True))


def format_table(rows, columns):
    header = ['model', 'dtype', 'compile', 'mode'] + [f'{c} img/s' for c in columns]
    header += [f'ours/{c}' for c in columns if c != 'ours'] + ['MFU ours']
    lines = [header]
    for row in rows:
        line = [row['model'], row['dtype'], row['compile'], row['mode']]
        line += [f"{row['median'][c]:.2f}" if c in row['median'] else '-' for c in columns]
        line += [f"{row['ratios'][c]:.3f}x" if c in row['ratios'] else '-' for c in columns if c != 'ours']
        line += [f"{100 * row['mfu']:.1f}%" if row['mfu'] is not None else '-']
        lines.append(line)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = ['| ' + ' | '.join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)) + ' |' for line in lines]
    out.insert(1, '|' + '|'.join('-' * (w + 2) for w in widths) + '|')
    return '\n'.join(out)


def write_json(path, header, rows):
    if path:
        with open(path + '.tmp', 'w') as f:
            json.dump({**header, 'rows': rows}, f, indent=1)
        os.replace(path + '.tmp', path)


def make_row(label_parts, rates, mfu):
    model, dtype_name, compiled, mode = label_parts
    return dict(model=model, dtype=dtype_name, compile='yes' if compiled else 'no', mode=mode, rates=rates,
                median={c: statistics.median(r) for c, r in rates.items()},
                ratios={c: paired_ratio(rates['ours'], r) for c, r in rates.items() if c != 'ours'}, mfu=mfu)


def resolve(args):
    """(device, dtype names, [(family, size)], compile flags) from the arguments, checked."""
    device = torch.device('cuda' if args.device == 'auto' and torch.cuda.is_available() else
                          'cpu' if args.device == 'auto' else args.device)
    if args.clock == 'cpu' and device.type != 'cpu':
        raise SystemExit('--clock cpu measures CPU time: use it with --device cpu')
    dtype_names = (args.dtypes or ('fp32,bf16,fp16' if device.type == 'cuda' else 'fp32')).split(',')
    buildable = buildable_families()
    families = buildable if args.families == 'all' else args.families.split(',')
    pairs = []
    for entry in (s.strip() for s in args.models.split(',')):
        family_of_entry, size = ('swinv2', entry[3:]) if entry.upper().startswith('V2-') else (None, entry)
        size = size if size == 'toy' else size.upper()
        if size not in SIZES:
            raise SystemExit(f'--models: unknown size {entry!r} (choose from {",".join(SIZES)}, or V2-<size>)')
        pairs += [(family, size) for family in ([family_of_entry] if family_of_entry else families)]
    for family, _ in pairs:
        if family not in buildable:
            raise SystemExit(f'--families: {family!r} is not buildable here (choose from {",".join(buildable)})')
    compile_flags = {'no': [False], 'both': [False, True], 'only': [True]}[args.compile]
    return device, dtype_names, pairs, compile_flags


def main(argv=None):
    args = parse_args(argv)
    args.columns = args.columns.split(',')
    device, dtype_names, pairs, compile_flags = resolve(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = f'CPU ({torch.get_num_threads()} threads)'
    modes = args.modes.split(',')
    header = dict(device=device_name, torch=torch.__version__, batch=args.batch_size, rounds=args.rounds,
                  iters=args.iters, attn=args.attn, tf32=args.tf32)
    log(f'device {device_name}, torch {torch.__version__}, batch {args.batch_size}, '
        f'{args.rounds} rounds x {args.iters} steps (median), our attention: {args.attn}')
    if device.type == 'cuda' and not args.peak_tflops and device_name not in PEAK_TFLOPS:
        log(f'MFU: no peak known for {device_name!r}; pass --peak-tflops')

    torch.manual_seed(0)
    profile_out = open(args.profile_out, 'w') if args.profile_out else sys.stdout
    rows, columns = [], []
    for family, size in pairs:
        models, config = build_models(family, size, args)
        columns += [c for c in models if c not in columns]
        macs = models['ours'].flops()
        for model in models.values():
            model.to(device)
        img = model_kwargs(family, size, args.img_size)['img_size']
        images = torch.randn(args.batch_size, 3, img, img, device=device)
        labels = torch.randint(0, 1000, (args.batch_size,), device=device)
        name = f'{FAMILY_PREFIX.get(family, family)}-{size}'
        for compiled in compile_flags:
            runnable = {n: torch.compile(m) if compiled else m for n, m in models.items()}
            for dtype_name, mode in itertools.product(dtype_names, modes):
                label = f'{name} {dtype_name} {"compiled" if compiled else "eager"} {mode}'
                log(f'{label}: {", ".join(runnable)}')
                steps = {n: make_step(m, mode, device, DTYPES[dtype_name], images, labels, config)
                         for n, m in runnable.items()}
                if 'ours' in steps:  # our CPU inference path, as predict.py and --throughput run it
                    steps['ours'] = with_cpu_linear(steps['ours'])
                if 'ours-plain' in steps:
                    steps['ours-plain'] = without_cpu_linear(steps['ours-plain'])
                rates = measure(steps, args, device, args.batch_size, label)
                peak = args.peak_tflops or (peak_tflops(device_name, dtype_name, args.tf32)
                                            if device.type == 'cuda' else None)
                mfu = statistics.median(rates['ours']) * 6 * macs / (peak * 1e12) if peak and mode == 'train' else None
                rows.append(make_row((name, dtype_name, compiled, mode), rates, mfu))
                write_json(args.json, header, rows)
                if args.profile:
                    profile(steps, device, args.profile, label, profile_out)
                del steps
        del models, runnable
    print(f'device: {device_name}; torch {torch.__version__}; batch {args.batch_size}; '
          f'median of {args.rounds} interleaved rounds x {args.iters} steps (ratios: median of per-round ratios); '
          f'our attention: {args.attn}{"; timm attention: fused" if args.timm_fused_attn else ""}'
          f'{"; fp32 with TF32" if args.tf32 and device.type == "cuda" else ""}; clock: {args.clock}')
    print(format_table(rows, columns))


if __name__ == '__main__':
    main()
