"""Pieces of the gpu_check.sh report, as Markdown on stdout.

    python scripts/gpu_report.py env                   # versions, device, peak FLOP/s known for it
    python scripts/gpu_report.py table ROWS.json       # a benchmark.py --json file as its table (partial: fine)
    python scripts/gpu_report.py goals ROWS.json       # the speed goals of issue 15; exit 3 when one is missed
"""
import json
import os
import platform
import sys

SCRIPTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, SCRIPTS)

# (mode, other column, minimum ours/other): Swin-T, bf16, eager, batch 128, same process, interleaved
GOALS = (('train', 'official', 1.5), ('train', 'timm', 1.2), ('infer', 'timm', 1.2))


def version(module):
    try:
        return __import__(module).__version__
    except Exception as e:  # absent or broken: the report says which
        return f'not importable ({type(e).__name__})'


def env():
    import benchmark
    import torch
    lines = [f'- python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}, '
             f'cuDNN {torch.backends.cudnn.version()}), torchvision {version("torchvision")}, timm '
             f'{version("timm")}, torchcodec {version("torchcodec")}, pytest {version("pytest")}',
             f'- CPU cores: {os.cpu_count()}']
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            name = torch.cuda.get_device_name(i)
            props = torch.cuda.get_device_properties(i)
            peak = benchmark.PEAK_TFLOPS.get(name)
            peak = (', '.join(f'{k} {v}' for k, v in peak.items()) + ' TFLOP/s' if peak
                    else 'not in the table (MFU column empty)')
            lines.append(f'- GPU {i}: `{name}`, {props.total_memory / 2 ** 30:.0f} GiB, capability '
                         f'{props.major}.{props.minor}, bf16 {torch.cuda.is_bf16_supported()}; MFU peak: {peak}')
    else:
        lines.append('- no CUDA device: dry mode (toy sizes on the CPU)')
    print('\n'.join(lines))


def load_rows(path):
    with open(path) as f:
        return json.load(f)


def table(path):
    import benchmark
    data = load_rows(path)
    columns = []
    for row in data['rows']:
        columns += [c for c in row['median'] if c not in columns]
    print(f"device `{data['device']}`, torch {data['torch']}, batch {data['batch']}, median of {data['rounds']} "
          f"interleaved rounds x {data['iters']} steps (ratios: median of per-round ratios)"
          f"{', fp32 with TF32' if data.get('tf32') else ''}\n")
    print(benchmark.format_table(data['rows'], columns))


def goals(path):
    """One line per goal (met / MISSED / not measured) and the MFU; False when any goal is not met."""
    rows = [r for r in load_rows(path)['rows'] if r['dtype'] == 'bf16' and r['compile'] == 'no']
    ok = True
    print('| goal | measured | result |\n|---|---|---|')
    for mode, other, minimum in GOALS:
        row = next((r for r in rows if r['mode'] == mode), None)
        ratio = row['ratios'].get(other) if row else None
        met = ratio is not None and ratio >= minimum
        ok &= met
        measured = f'{ratio:.3f}x' if ratio is not None else 'not measured'
        print(f'| {mode}: ours >= {minimum}x {other} | {measured} | {"met" if met else "MISSED"} |')
    train = next((r for r in rows if r['mode'] == 'train'), None)
    mfu = f"{100 * train['mfu']:.1f}%" if train and train['mfu'] is not None else 'unknown (device not in the table)'
    print(f'| MFU of our bf16 train step (reported) | {mfu} | - |')
    return ok


def main(argv):
    if len(argv) >= 1 and argv[0] == 'env':
        return env()
    if len(argv) == 2 and argv[0] == 'table':
        return table(argv[1])
    if len(argv) == 2 and argv[0] == 'goals':
        return 0 if goals(argv[1]) else 3
    raise SystemExit(__doc__)


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
