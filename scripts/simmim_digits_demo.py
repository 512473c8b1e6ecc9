"""Does SimMIM pre-training help when labels are few? The digits demo, side by side, on a CPU.

    python scripts/simmim_digits_demo.py [--output output/simmim_demo] [--label-fraction 0.1] [--finetune-epochs 60]

1. pre-trains the demo's tiny Swin with SimMIM on every digits train image, labels unused
   (configs/simmim_digits_pretrain.yaml);
2. makes a folder with ``--label-fraction`` of each class's train images (fixed seed) and the whole val split;
3. fine-tunes on it from the SimMIM checkpoint (configs/simmim_digits_finetune.yaml, --pretrained) and, with the
   same recipe and budget, from scratch;
4. prints the final and best val Acc@1 of both and the difference.

Every step is a plain ``main.py`` run (rerunning the script resumes or reuses finished runs, so a second call
with another ``--finetune-epochs`` reuses the pre-training). ``--opts`` go to all three runs (e.g. ``--opts
TRAIN.EPOCHS 10`` for a quick look).
"""
import argparse
import os
import random
import re
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from data.digits import ensure_digits  # noqa: E402

PRETRAIN_CFG = os.path.join(ROOT, 'configs', 'simmim_digits_pretrain.yaml')
FINETUNE_CFG = os.path.join(ROOT, 'configs', 'simmim_digits_finetune.yaml')
_ACC = re.compile(r' \* Acc@1 ([0-9.]+)')
_MAX = re.compile(r'Max accuracy: ([0-9.]+)%')


def few_label_split(digits_root, folder, fraction, seed=0):
    """``folder``/train with ``fraction`` of each class's train images (at least one), ``folder``/val = all of
    val. Hard links (copies where links fail); an existing complete folder is reused."""
    marker = os.path.join(folder, f'.fraction-{fraction}-seed-{seed}')
    if os.path.isfile(marker):
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    rng = random.Random(seed)
    for split in ('train', 'val'):
        for label in sorted(os.listdir(os.path.join(digits_root, split))):
            source = os.path.join(digits_root, split, label)
            names = sorted(os.listdir(source))
            if split == 'train':
                names = sorted(rng.sample(names, max(1, round(fraction * len(names)))))
            os.makedirs(os.path.join(folder, split, label))
            for name in names:
                try:
                    os.link(os.path.join(source, name), os.path.join(folder, split, label, name))
                except OSError:
                    shutil.copyfile(os.path.join(source, name), os.path.join(folder, split, label, name))
    open(marker, 'w').close()
    return folder


def run(args, what):
    """One main.py run; returns its log text. Stops the demo when the run fails."""
    print(f"--- {what}: python main.py {' '.join(args)}", flush=True)
    start = time.time()
    result = subprocess.run([sys.executable, os.path.join(ROOT, 'main.py'), *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        sys.exit(f"{what} failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    print(f"    done in {time.time() - start:.0f}s", flush=True)


def accuracies(run_dir):
    """(final Acc@1, best Acc@1) from a run's log."""
    with open(os.path.join(run_dir, 'log_rank0.txt')) as f:
        log = f.read()
    return float(_ACC.findall(log)[-1]), float(_MAX.findall(log)[-1])


def main(argv=None):
    """Run the three trainings (or reuse finished ones) and print the comparison; 0 on success."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--output', default=os.path.join(ROOT, 'output', 'simmim_demo'), help='root of all runs')
    parser.add_argument('--label-fraction', type=float, default=0.1, help='fraction of train labels to fine-tune on')
    parser.add_argument('--data-path', default='', help='where the digits set is (written on first use; default: '
                        'datasets/digits in the repository)')
    parser.add_argument('--finetune-epochs', type=int, default=60, help='epochs of both fine-tuning runs')
    parser.add_argument('--opts', nargs='+', default=[], help="KEY VALUE pairs for every run")
    args = parser.parse_args(argv)
    output = os.path.abspath(args.output)
    opts = ['--opts', *args.opts] if args.opts else []

    digits = ensure_digits(args.data_path)
    run(['--cfg', PRETRAIN_CFG, '--data-path', digits, '--output', output, '--device', 'cpu', *opts],
        'SimMIM pre-training (no labels)')
    checkpoint = os.path.join(output, 'simmim_pretrain_digits', 'default', 'last.pth')
    few = few_label_split(digits, os.path.join(output, f'digits_{args.label_fraction:g}_labels'),
                          args.label_fraction)
    count, val_count = (sum(len(files) for _, _, files in os.walk(os.path.join(few, split)))
                        for split in ('train', 'val'))
    common = ['--cfg', FINETUNE_CFG, '--data-path', few, '--output', output, '--device', 'cpu',
              '--epochs', str(args.finetune_epochs)]
    tags = {start: f'{start}_{args.finetune_epochs}ep' for start in ('from_simmim', 'from_scratch')}
    run(common + ['--tag', tags['from_simmim'], '--pretrained', checkpoint, *opts], f'fine-tuning on {count} labels')
    run(common + ['--tag', tags['from_scratch'], *opts], f'the same from scratch on {count} labels')

    rows = {start: accuracies(os.path.join(output, 'simmim_finetune_digits', tag)) for start, tag in tags.items()}
    print(f"\n{count} labelled train images ({args.label_fraction:g} of each class), val: all {val_count} images; "
          f"fine-tuning {args.finetune_epochs} epochs")
    print(f"{'start':<14}{'final Acc@1':>12}{'best Acc@1':>12}")
    for tag, (final, best) in rows.items():
        print(f"{tag:<14}{final:>11.2f}%{best:>11.2f}%")
    gain = rows['from_simmim'][0] - rows['from_scratch'][0]
    print(f"SimMIM pre-training vs scratch: {gain:+.2f} points final Acc@1")
    return 0


if __name__ == '__main__':
    sys.exit(main())
