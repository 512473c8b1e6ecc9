"""Throughput of our Swin Transformer (v1 or V2) against timm's (and optionally the official repo's), in one process.

For each model size, every implementation gets the same batch, dtype and inputs. Rounds are interleaved (the
order rotates each round); the table shows the median images/s over the rounds, and each ratio is the median of
the per-round ratios, so that load from other processes hits both sides of a ratio alike. Two measurements:

* infer: eval mode, ``torch.inference_mode``, forward only.
* train: train mode, forward + cross-entropy + backward + AdamW step (the whole optimizer step; fp16 with a
  GradScaler). bf16/fp16 run under autocast with fp32 weights, as in training.

On CUDA, training rows also report MFU = images/s x 6 x MACs per image / peak FLOP/s (``flops()`` counts
multiply-accumulates of one forward; forward + backward is about 3 forwards, 2 FLOPs per MAC).

Examples::

    python scripts/benchmark.py                                   # CPU or CUDA fp32, Swin-T
    python scripts/benchmark.py --models T,S,B --batch-size 8 --iters 2 --rounds 5
    python scripts/benchmark.py --models V2-T,V2-S                # SwinV2 vs timm's swinv2_*_window8_256
    python scripts/benchmark.py --device cuda --dtypes fp32,bf16,fp16 --batch-size 128 --compile
    python scripts/benchmark.py --official /path/to/Swin-Transformer   # adds the official code as a column
"""
import argparse
import importlib.util
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from models import SwinTransformer, SwinTransformerV2  # noqa: E402

# name -> (row label, the timm model of the same size, our class, official constructor arguments, image size)
_V2 = dict(window_size=8, embed_dim=96, num_heads=[3, 6, 12, 24])
ARCHS = {
    'T': ('Swin-T', 'swin_tiny_patch4_window7_224', SwinTransformer,
          dict(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24]), 224),
    'S': ('Swin-S', 'swin_small_patch4_window7_224', SwinTransformer,
          dict(embed_dim=96, depths=[2, 2, 18, 2], num_heads=[3, 6, 12, 24]), 224),
    'B': ('Swin-B', 'swin_base_patch4_window7_224', SwinTransformer,
          dict(embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32]), 224),
    'V2-T': ('SwinV2-T', 'swinv2_tiny_window8_256', SwinTransformerV2, dict(_V2, depths=[2, 2, 6, 2]), 256),
    'V2-S': ('SwinV2-S', 'swinv2_small_window8_256', SwinTransformerV2, dict(_V2, depths=[2, 2, 18, 2]), 256),
}
# our class -> the official file and class of the same family
OFFICIAL = {SwinTransformer: ('swin_transformer.py', 'SwinTransformer'),
            SwinTransformerV2: ('swin_transformer_v2.py', 'SwinTransformerV2')}
DTYPES = {'fp32': torch.float32, 'bf16': torch.bfloat16, 'fp16': torch.float16}
# dense peak TFLOP/s per device-name fragment: fp32 without TF32, and 16-bit tensor cores
PEAK_TFLOPS = {
    'H200': {'fp32': 67.0, 'tf32': 494.7, 'bf16': 989.4, 'fp16': 989.4},
    'H100': {'fp32': 67.0, 'tf32': 494.7, 'bf16': 989.4, 'fp16': 989.4},
    'A100': {'fp32': 19.5, 'tf32': 156.0, 'bf16': 312.0, 'fp16': 312.0},
}


def log(message):
    print(message, file=sys.stderr, flush=True)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--models', default='T', help='comma-separated sizes from T,S,B,V2-T,V2-S (default: T)')
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--img-size', type=int, default=None,
                        help="default: the timm model's (224 for Swin, 256 for SwinV2)")
    parser.add_argument('--device', default='auto', help='auto | cpu | cuda | cuda:N')
    parser.add_argument('--dtypes', default=None,
                        help='comma-separated from fp32,bf16,fp16 (autocast); default fp32 on CPU, all three on CUDA')
    parser.add_argument('--modes', default='infer,train', help='comma-separated from infer,train')
    parser.add_argument('--compile', action='store_true', help='also measure torch.compile of every model')
    parser.add_argument('--iters', type=int, default=3, help='steps per timed round')
    parser.add_argument('--warmup', type=int, default=2, help='untimed steps per model before the rounds')
    parser.add_argument('--rounds', type=int, default=5, help='interleaved timed rounds (the median is reported)')
    parser.add_argument('--attn', default='fused', choices=['fused', 'manual'], help='our attention path')
    parser.add_argument('--timm-fused-attn', action='store_true',
                        help="switch timm's window attention to its SDPA path (timm 1.0 default: explicit softmax)")
    parser.add_argument('--official', metavar='PATH', default=None,
                        help='microsoft/Swin-Transformer checkout (or its models/swin_transformer.py): adds a column')
    parser.add_argument('--tf32', action='store_true', help='allow TF32 matmuls for fp32 on CUDA')
    parser.add_argument('--peak-tflops', type=float, default=None, help='peak for MFU (default: from a table)')
    parser.add_argument('--threads', type=int, default=None, help='torch CPU threads (default: torch default)')
    parser.add_argument('--clock', default='wall', choices=['wall', 'cpu'],
                        help='cpu: time CPU seconds of this process (for a busy shared CPU with --threads 1)')
    return parser.parse_args(argv)


def load_official(path, cls):
    """The official class of our ``cls``'s family, loaded by file path (its package is also called ``models``)."""
    filename, name = OFFICIAL[cls]
    if os.path.isdir(path):
        path = os.path.join(path, 'models', filename)
    elif os.path.basename(path) != filename:  # a single file given: the one of this family beside it
        path = os.path.join(os.path.dirname(path), filename)
    if not os.path.isfile(path):
        raise SystemExit(f'--official: no file {path}')
    spec = importlib.util.spec_from_file_location(f'official_{filename[:-3]}', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, name)


def build_models(arch, args, img_size):
    """{column name: model} for one size, all at their default (official) init and drop-path rate."""
    import timm
    _, timm_name, cls, kwargs, _ = ARCHS[arch]
    models = {'ours': cls(img_size=img_size, fused_attn=args.attn == 'fused', **kwargs)}
    theirs = timm.create_model(timm_name, pretrained=False, img_size=img_size)
    if args.timm_fused_attn:
        for module in theirs.modules():
            if hasattr(module, 'fused_attn'):
                module.fused_attn = True
    models['timm'] = theirs
    if args.official:
        models['official'] = load_official(args.official, cls)(img_size=img_size, **kwargs)
    return models


def synchronize(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def make_step(model, mode, device, dtype, images, labels):
    """A closure running one step of ``mode`` on ``model`` (already on the device)."""
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    if mode == 'infer':
        model.eval()

        def step():
            with torch.inference_mode(), autocast:
                model(images)
        return step

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)  # as a real fp16 run would

    def step():
        with autocast:
            loss = F.cross_entropy(model(images), labels)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
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


def peak_tflops(device, dtype_name, args):
    if args.peak_tflops:
        return args.peak_tflops
    if device.type != 'cuda':
        return None
    key = 'tf32' if dtype_name == 'fp32' and args.tf32 else dtype_name
    name = torch.cuda.get_device_name(device)
    for fragment, table in PEAK_TFLOPS.items():
        if fragment in name:
            return table[key]
    return None


def paired_ratio(ours, theirs):
    """Median over rounds of ours/theirs: each round's pair ran back to back, so load changes cancel."""
    return statistics.median(a / b for a, b in zip(ours, theirs))


def format_table(rows, columns):
    header = ['model', 'dtype', 'compile', 'mode'] + [f'{c} img/s' for c in columns]
    header += [f'ours/{c}' for c in columns if c != 'ours'] + ['MFU ours']
    lines = [header]
    for row in rows:
        line = [row['model'], row['dtype'], row['compile'], row['mode']]
        line += [f"{statistics.median(row['rates'][c]):.2f}" for c in columns]
        line += [f"{paired_ratio(row['rates']['ours'], row['rates'][c]):.3f}x" for c in columns if c != 'ours']
        line += [f"{100 * row['mfu']:.1f}%" if row['mfu'] is not None else '-']
        lines.append(line)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = ['| ' + ' | '.join(cell.ljust(w) for cell, w in zip(line, widths)) + ' |' for line in lines]
    out.insert(1, '|' + '|'.join('-' * (w + 2) for w in widths) + '|')
    return '\n'.join(out)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device('cuda' if args.device == 'auto' and torch.cuda.is_available() else
                          'cpu' if args.device == 'auto' else args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == 'cpu' and device.type != 'cpu':
        raise SystemExit('--clock cpu measures CPU time: use it with --device cpu')
    if device.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
    dtype_names = (args.dtypes or ('fp32,bf16,fp16' if device.type == 'cuda' else 'fp32')).split(',')
    archs = [a.strip().upper() for a in args.models.split(',')]
    modes = args.modes.split(',')
    for name in archs:
        if name not in ARCHS:
            raise SystemExit(f'--models: unknown size {name!r} (choose from {",".join(ARCHS)})')
    compile_flags = [False, True] if args.compile else [False]

    if device.type == 'cuda':
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = f'CPU ({torch.get_num_threads()} threads)'
    img_sizes = ','.join(str(size) for size in sorted({args.img_size or ARCHS[arch][4] for arch in archs}))
    log(f'device {device_name}, torch {torch.__version__}, batch {args.batch_size}, img {img_sizes}, '
        f'{args.rounds} rounds x {args.iters} steps (median), our attention: {args.attn}')

    torch.manual_seed(0)
    rows, columns = [], None
    for arch in archs:
        img_size = args.img_size or ARCHS[arch][4]
        models = build_models(arch, args, img_size)
        columns = list(models)
        macs = models['ours'].flops()
        for model in models.values():
            model.to(device)
        images = torch.randn(args.batch_size, 3, img_size, img_size, device=device)
        labels = torch.randint(0, 1000, (args.batch_size,), device=device)
        for compiled in compile_flags:
            runnable = {n: torch.compile(m) if compiled else m for n, m in models.items()}
            for dtype_name in dtype_names:
                for mode in modes:
                    label = f'{ARCHS[arch][0]} {dtype_name} {"compiled" if compiled else "eager"} {mode}'
                    log(f'{label}: {", ".join(columns)}')
                    steps = {n: make_step(m, mode, device, DTYPES[dtype_name], images, labels)
                             for n, m in runnable.items()}
                    rates = measure(steps, args, device, args.batch_size, label)
                    peak = peak_tflops(device, dtype_name, args)
                    ours = statistics.median(rates['ours'])
                    mfu = ours * 6 * macs / (peak * 1e12) if peak and mode == 'train' else None
                    rows.append(dict(model=ARCHS[arch][0], dtype=dtype_name, compile='yes' if compiled else 'no',
                                     mode=mode, rates=rates, mfu=mfu))
        del models
    print(f'device: {device_name}; torch {torch.__version__}; batch {args.batch_size}; img {img_sizes}; '
          f'median of {args.rounds} interleaved rounds x {args.iters} steps (ratios: median of per-round ratios); '
          f'our attention: {args.attn}; clock: {args.clock}'
          f'{"; timm attention: fused" if args.timm_fused_attn else ""}')
    print(format_table(rows, columns))


if __name__ == '__main__':
    main()
