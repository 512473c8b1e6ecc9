"""engine.py pieces in-process: gradient accumulation, the non-finite loss stop, exact top-k counts."""
import logging

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset, default_collate

from data import Batch
from engine import topk_correct, train_one_epoch
from errors import TrainingError
from lr_scheduler import build_scheduler
from models import build_model
from optimizer import build_optimizer
from run_state import RunState, Runtime, TrainingObjects
from tasks import ClassificationTask
from utils import resolve_precision

LOGGER = logging.getLogger('test_engine')


def one_epoch(config, loader, criterion=None, seed=0):
    """Train a freshly seeded tiny model for one epoch over loader; returns (model, run state, result)."""
    torch.manual_seed(seed)
    model = build_model(config)
    optimizer = build_optimizer(config, model)
    steps = len(loader) // config.TRAIN.ACCUMULATION_STEPS
    scheduler = build_scheduler(config, optimizer, steps)
    scheduler.step_update(0)
    device = torch.device('cpu')
    objects = TrainingObjects(model, ClassificationTask(criterion or torch.nn.CrossEntropyLoss()), optimizer, scheduler)
    state = RunState()
    result = train_one_epoch(config, objects, loader, state, steps,
                             Runtime(device, resolve_precision(config, device), LOGGER))
    return model, state, result


def fixed_batches(batch_size, count=16):
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(count, 3, 32, 32, generator=generator)
    labels = torch.randint(0, 10, (count,), generator=generator)
    return DataLoader(TensorDataset(images, labels), batch_size=batch_size, shuffle=False,
                      collate_fn=lambda items: Batch(*default_collate(items)))  # the engine iterates data.Batch


def test_accumulation_of_two_batches_of_4_equals_one_batch_of_8(tiny_config):
    common = ('MODEL.DROP_PATH_RATE', 0.0, 'TRAIN.WARMUP_EPOCHS', 0, 'TRAIN.EPOCHS', 1, 'AUG.MIXUP', 0.0,
              'AUG.CUTMIX', 0.0, 'TRAIN.CLIP_GRAD', 1.0, 'PRINT_FREQ', 1)
    accumulated = tiny_config(*common, 'DATA.BATCH_SIZE', 4, 'TRAIN.ACCUMULATION_STEPS', 2)
    plain = tiny_config(*common, 'DATA.BATCH_SIZE', 8, 'TRAIN.ACCUMULATION_STEPS', 1)
    assert accumulated.TRAIN.EFFECTIVE_LR == plain.TRAIN.EFFECTIVE_LR   # same global batch -> same LR
    model_a, state_a, _ = one_epoch(accumulated, fixed_batches(4))
    model_b, state_b, _ = one_epoch(plain, fixed_batches(8))
    assert state_a.global_step == state_b.global_step == 2
    assert (state_a.micro_batch, state_b.micro_batch) == (4, 2)
    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    # and the update did something: weights moved away from the initial ones
    torch.manual_seed(0)
    initial = build_model(plain).state_dict()
    assert not torch.equal(initial['head.weight'], model_b.state_dict()['head.weight'])


def test_trailing_partial_accumulation_group_is_skipped(tiny_config):
    config = tiny_config('TRAIN.ACCUMULATION_STEPS', 3, 'DATA.BATCH_SIZE', 4, 'AUG.MIXUP', 0.0, 'AUG.CUTMIX', 0.0)
    _, state, result = one_epoch(config, fixed_batches(4))   # 4 micro-batches: one step of 3, one left over
    assert (state.global_step, state.micro_batch) == (1, 3) and not result.stopped


class NonFiniteAt(torch.nn.Module):
    """Cross-entropy whose n-th call returns NaN: a loss blowing up in the middle of an epoch."""

    def __init__(self, bad_call):
        super().__init__()
        self.calls, self.bad_call = 0, bad_call

    def forward(self, output, target):
        self.calls += 1
        loss = torch.nn.functional.cross_entropy(output, target)
        return loss * float('nan') if self.calls == self.bad_call else loss


def test_nonfinite_loss_stops_with_the_step(tiny_config):
    config = tiny_config('DATA.BATCH_SIZE', 4, 'AUG.MIXUP', 0.0, 'AUG.CUTMIX', 0.0, 'PRINT_FREQ', 100)
    with pytest.raises(TrainingError, match=r"NaN/inf at optimizer step 3 .*Lower TRAIN.BASE_LR"):
        one_epoch(config, fixed_batches(4), criterion=NonFiniteAt(bad_call=3))


def test_topk_correct_counts():
    output = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.05], [0.2, 0.3, 0.5]])
    target = torch.tensor([1, 1, 0])
    top1, top2 = topk_correct(output, target, ks=(1, 2))
    assert (top1.item(), top2.item()) == (1, 2)
