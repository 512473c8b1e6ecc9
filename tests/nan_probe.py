"""Run by tests/test_distributed.py under real torchrun: main.py, except that one rank's loss turns NaN.

    python -m torch.distributed.run ... tests/nan_probe.py RANK CALL [main.py arguments]

On rank RANK the CALL-th criterion call returns NaN (a loss blowing up on one rank only); the other ranks
compute normally.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import main  # noqa: E402
import tasks  # noqa: E402


class NaNAtCall(torch.nn.Module):
    def __init__(self, criterion, bad_call):
        super().__init__()
        self.criterion, self.calls, self.bad_call = criterion, 0, bad_call

    def forward(self, output, target):
        self.calls += 1
        loss = self.criterion(output, target)
        return loss * float('nan') if self.calls == self.bad_call else loss


def patch_criterion(bad_rank, bad_call):
    build = tasks.build_criterion  # what tasks.build_task calls for the classification loss

    def build_criterion(config, mixup_fn):
        criterion = build(config, mixup_fn)
        return NaNAtCall(criterion, bad_call) if config.RANK == bad_rank else criterion

    tasks.build_criterion = build_criterion


if __name__ == '__main__':
    patch_criterion(int(sys.argv[1]), int(sys.argv[2]))
    sys.exit(main.run(sys.argv[3:]))
