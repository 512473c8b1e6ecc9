"""How long a checkpoint save blocks training: synchronous save (the previous behaviour) against the
background writer (``checkpoint.CheckpointWriter``: CPU copy of the state, file written on a thread).

A real training state (model, AdamW moments, scheduler, RNG) of the chosen config is saved ``--rounds``
times each way, interleaved; the table shows medians of the time the training thread is blocked, the
background write's own duration, and the ratio. Files go to a temporary folder (or ``--output``).

    python scripts/benchmark_checkpoint.py                              # Swin-T on CPU
    python scripts/benchmark_checkpoint.py --cfg configs/swin_base.yaml --device cuda
"""
import argparse
import logging
import os
import statistics
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import checkpoint  # noqa: E402
from config import load_config  # noqa: E402
from lr_scheduler import build_scheduler  # noqa: E402
from models import build_model  # noqa: E402
from optimizer import build_optimizer  # noqa: E402
from run_state import RunState, TrainingObjects  # noqa: E402
from utils import synchronize  # noqa: E402


def training_objects(cfg, device, output):
    config = load_config(cfg, ['OUTPUT', output, 'DEVICE', device, 'KEEP_CHECKPOINTS', 1])
    logger = logging.getLogger('benchmark_checkpoint')
    model = build_model(config).to(device)
    optimizer = build_optimizer(config, model, logger)
    for p in model.parameters():  # one step, so that AdamW holds its moment tensors as in a real run
        p.grad = torch.randn_like(p) * 1e-3
    optimizer.step()
    objects = TrainingObjects(model, torch.nn.CrossEntropyLoss(), optimizer, build_scheduler(config, optimizer, 100))
    return config, objects, logger


def checkpoint_of(config, objects, epoch, micro_batch):
    return checkpoint.checkpoint_contents(config, objects, RunState(epoch, micro_batch, 100 * epoch), [],
                                     [checkpoint.capture_rng_state()])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--cfg', default=os.path.join(ROOT, 'configs', 'swin_tiny.yaml'))
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--output', default='')
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.output or None) as output:
        config, objects, logger = training_objects(args.cfg, args.device, output)
        params = sum(p.numel() for p in objects.model.parameters())
        writer = checkpoint.CheckpointWriter()
        sync_blocked, background_blocked, background_write = [], [], []
        for r in range(args.rounds):
            synchronize(args.device)
            start = time.perf_counter()
            checkpoint.save_checkpoint(config, checkpoint_of(config, objects, r, 1), logger)
            sync_blocked.append(time.perf_counter() - start)

            synchronize(args.device)
            start = time.perf_counter()
            writer.submit(lambda state: checkpoint.save_checkpoint(config, state, logger),
                          checkpoint_of(config, objects, r, 2))
            background_blocked.append(time.perf_counter() - start)
            writer.wait()
            background_write.append(time.perf_counter() - start)
            assert writer.failure() is None
        size = os.path.getsize(os.path.join(config.OUTPUT_DIR, 'last.pth')) / 2 ** 20

    def ms(values):
        return statistics.median(values) * 1000

    print(f"{config.MODEL.NAME}: {params / 1e6:.1f}M params, checkpoint {size:.0f} MB, device {args.device}, "
          f"{args.rounds} rounds (medians)")
    print(f"  synchronous save : training blocked {ms(sync_blocked):8.1f} ms")
    print(f"  background writer: training blocked {ms(background_blocked):8.1f} ms "
          f"(file done after {ms(background_write):.1f} ms)")
    print(f"  stall ratio background / synchronous: {ms(background_blocked) / ms(sync_blocked):.3f}")


if __name__ == '__main__':
    main()
