"""engine.py pieces in-process: gradient accumulation, the non-finite loss stop, exact top-k counts."""
import collections
import logging
import math
import re
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader, TensorDataset, default_collate

import engine
from coordinator import StepCoordinator
from data import Batch
from engine import throughput, topk_correct, train_one_epoch, validate
from errors import TrainingError
from helpers import assert_same_weights, load_script
from lr_scheduler import build_scheduler
from models import build_model
from optimizer import build_optimizer
from run_state import RunState, Runtime, TrainingObjects
from tasks import ClassificationTask
from utils import Precision, resolve_precision

LOGGER = logging.getLogger('test_engine')


def one_epoch(config, loader, criterion=None, seed=0, scaler=None, coordinator=None):
    """Train a freshly seeded tiny model for one epoch over loader; returns (model, run state, result)."""
    torch.manual_seed(seed)
    model = build_model(config)
    optimizer = build_optimizer(config, model)
    steps = len(loader) // config.TRAIN.ACCUMULATION_STEPS
    scheduler = build_scheduler(config, optimizer, steps)
    scheduler.step_update(0)
    device = torch.device('cpu')
    objects = TrainingObjects(model, ClassificationTask(criterion or torch.nn.CrossEntropyLoss()), optimizer, scheduler,
                              scaler)
    state = RunState()
    result = train_one_epoch(config, objects, loader, state, steps,
                             Runtime(device, resolve_precision(config, device), LOGGER,
                                     coordinator=coordinator or StepCoordinator()))
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
    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    # and the update did something: weights moved away from the initial ones
    torch.manual_seed(0)
    initial = build_model(plain).state_dict()
    assert not torch.equal(initial['head.weight'], model_b.state_dict()['head.weight'])


def test_trailing_partial_accumulation_group_is_skipped(tiny_config):
    config = tiny_config('TRAIN.ACCUMULATION_STEPS', 3, 'DATA.BATCH_SIZE', 4, 'AUG.MIXUP', 0.0, 'AUG.CUTMIX', 0.0)
    _, state, result = one_epoch(config, fixed_batches(4))   # 4 micro-batches: one step of 3, one left over
    assert (state.global_step, state.micro_batch) == (1, 3) and not result.stopped


class CorruptLossAt(torch.nn.Module):
    """Cross-entropy whose n-th call is changed by ``corrupt(loss, output)``: a loss going wrong mid-epoch."""

    def __init__(self, bad_call, corrupt):
        super().__init__()
        self.calls, self.bad_call, self.corrupt = 0, bad_call, corrupt

    def forward(self, output, target):
        self.calls += 1
        loss = torch.nn.functional.cross_entropy(output, target)
        return self.corrupt(loss, output) if self.calls == self.bad_call else loss


def nan_loss(loss, output):
    return loss * float('nan')


def infinite_gradient(loss, output):
    """The same value, infinite gradients (sqrt at 0): an fp16 overflow in backward, which the scaler skips."""
    return loss + torch.sqrt(output[0, 0] - output[0, 0].detach())


def test_nonfinite_loss_stops_with_the_step(tiny_config):
    config = tiny_config('DATA.BATCH_SIZE', 4, 'AUG.MIXUP', 0.0, 'AUG.CUTMIX', 0.0, 'PRINT_FREQ', 100)
    with pytest.raises(TrainingError, match=r"NaN/inf at optimizer step 3 .*Lower TRAIN.BASE_LR"):
        one_epoch(config, fixed_batches(4), criterion=CorruptLossAt(3, nan_loss))


def test_steps_the_scaler_skips_are_counted_and_left_out_of_the_grad_norm(tiny_config, caplog):
    def run(print_freq):
        config = tiny_config('DATA.BATCH_SIZE', 4, 'AUG.MIXUP', 0.0, 'AUG.CUTMIX', 0.0, 'PRINT_FREQ', print_freq)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger=LOGGER.name):
            one_epoch(config, fixed_batches(4), criterion=CorruptLossAt(2, infinite_gradient),
                      scaler=torch.amp.GradScaler('cpu'))
        return [line for line in caplog.messages if line.startswith('Train:')]

    per_step = run(print_freq=1)
    norms = [float(line.split('grad_norm ')[1].split()[0]) for line in per_step]
    assert [line.split('skipped ')[1].split()[0] for line in per_step] == ['0', '1', '0', '0']
    assert math.isnan(norms[1]) and all(math.isfinite(n) and n > 0 for n in norms[:1] + norms[2:])
    (window,) = run(print_freq=4)  # one line for the 4 steps: the mean of the 3 taken
    assert 'skipped 1' in window
    mean_of_taken = (norms[0] + norms[2] + norms[3]) / 3
    assert float(window.split('grad_norm ')[1].split()[0]) == pytest.approx(mean_of_taken, abs=2e-4)


def test_periodic_checkpoint_never_holds_an_unread_nonfinite_step(tiny_config):
    # a checkpoint is due at every step; losses are logged (read) only every 100 steps
    config = tiny_config('DATA.BATCH_SIZE', 4, 'AUG.MIXUP', 0.0, 'AUG.CUTMIX', 0.0, 'PRINT_FREQ', 100)
    saver = AlwaysDue()
    with pytest.raises(TrainingError, match=r"NaN/inf at optimizer step 2 "):
        one_epoch(config, fixed_batches(4), criterion=CorruptLossAt(2, nan_loss),
                  coordinator=StepCoordinator(saver))
    assert saver.saved == [1]   # the step-2 weights (after a NaN loss) were never saved


class AlwaysDue:
    """A checkpoint saver whose clock says a checkpoint is due at every step; records the steps it saved."""

    def __init__(self):
        self.saved = []

    def due(self):
        return True

    def save_periodic(self, state):
        self.saved.append(state.global_step)



def test_topk_correct_counts():
    output = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.05], [0.2, 0.3, 0.5]])
    target = torch.tensor([1, 1, 0])
    top1, top2 = topk_correct(output, target, ks=(1, 2))
    assert (top1.item(), top2.item()) == (1, 2)


class HostTraffic(TorchDispatchMode):
    """Counts the ops that move data between Python and tensors: ``lift_fresh`` (a tensor made from Python
    numbers, a blocking host-to-device copy when the target is a GPU) and ``_local_scalar_dense`` (.item(), a
    device-to-host sync). The CPU runs the same ops a GPU run would, so the counts are the GPU's."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split('.')[0] in ('lift_fresh', '_local_scalar_dense'):
            self.counts[func.__name__.split('.')[0]] += 1
        return func(*args, **(kwargs or {}))


def test_validation_moves_no_numbers_between_host_and_device_per_batch(tiny_config):
    config = tiny_config('PRINT_FREQ', 1000)
    model = build_model(config).eval()
    device = torch.device('cpu')
    batches = list(fixed_batches(4))   # made (and collated) before counting: loading is not validation's cost
    traffic = {}
    for count in (1, 4):
        with HostTraffic() as mode:
            validate(config, batches[:count], model, device, resolve_precision(config, device), LOGGER)
        traffic[count] = mode.counts
    # the final all-reduce and read are once per validation; nothing grows with the number of batches
    assert traffic[4] == traffic[1], traffic


@pytest.mark.skipif(not torch.cuda.is_available(), reason='the CUDA twin of the test above (sync debug mode)')
def test_validation_on_cuda_adds_no_synchronizing_call_per_batch(tiny_config):
    config = tiny_config('PRINT_FREQ', 1000, 'DEVICE', 'cuda')
    device = torch.device('cuda')
    model = build_model(config).to(device).eval()
    batches = [Batch(b.images.pin_memory(), b.targets.pin_memory()) for b in fixed_batches(4)]  # async copies
    syncs = {}
    for count in (1, 4):
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            torch.cuda.set_sync_debug_mode('warn')
            try:
                validate(config, batches[:count], model, device, resolve_precision(config, device), LOGGER)
            finally:
                torch.cuda.set_sync_debug_mode('default')
        syncs[count] = sum('synchroniz' in str(w.message) for w in caught)
    assert syncs[4] == syncs[1], syncs


# the official line formats (microsoft/Swin-Transformer main.py); ours may add columns after them
NUMBER = r'(\d+\.\d{4})'
TRAIN_LINE = (r'^Train: \[0/1\]\[(\d+)/4\]\teta \d+:\d\d:\d\d lr \d+\.\d{6}\t wd \d+\.\d{4}\t'
              rf'time {NUMBER} \({NUMBER}\)\tloss {NUMBER} \({NUMBER}\)\tgrad_norm {NUMBER} \({NUMBER}\)'
              rf'(?:\tloss_scale {NUMBER} \({NUMBER}\))?(?:\tmem \d+MB)?\t')  # mem: CUDA only
TEST_LINE = (r'^{header}: \[(\d+)/4\]\tTime \d+\.\d{{3}} \(\d+\.\d{{3}}\)\tLoss (\d+\.\d{{4}}) \((\d+\.\d{{4}})\)\t'
             r'Acc@1 (\d+\.\d{{3}}) \((\d+\.\d{{3}})\)\tAcc@5 \d+\.\d{{3}} \(\d+\.\d{{3}}\)(?:\tMem \d+MB)?$')


def messages(caplog):
    return [record.getMessage() for record in caplog.records]


@pytest.mark.parametrize('with_scaler', [False, True])
def test_train_lines_have_the_official_format(tiny_config, caplog, with_scaler):
    caplog.set_level(logging.INFO, logger=LOGGER.name)
    config = tiny_config('DATA.BATCH_SIZE', 4, 'AUG.MIXUP', 0.0, 'AUG.CUTMIX', 0.0, 'PRINT_FREQ', 2,
                         'TRAIN.EPOCHS', 1)
    scaler = torch.amp.GradScaler('cpu', init_scale=1024.0) if with_scaler else None
    _, _, result = one_epoch(config, fixed_batches(4), scaler=scaler)   # 4 steps: lines at steps 2 and 4
    lines = [m for m in messages(caplog) if m.startswith('Train:')]
    matches = [re.match(TRAIN_LINE, line) for line in lines]
    assert len(lines) == 2 and all(matches), lines
    first, last = (m.groups() for m in matches)
    assert [m.group(1) for m in matches] == ['2', '4']
    assert first[3] == first[4]                      # after the first window, window and epoch means agree
    assert float(last[4]) == pytest.approx(result.loss, abs=1e-4)   # (avg): the epoch's mean loss
    assert (last[7] is not None) == with_scaler      # loss_scale only with a GradScaler
    if with_scaler:
        assert float(last[7]) == 1024.0 and 'img/s' in lines[0]
    assert any(m.startswith('EPOCH 0 training takes 0:00:') for m in messages(caplog))


@pytest.mark.parametrize('label, header', [('', 'Test'), ('EMA', r'Test \(EMA\)')])
def test_validation_lines_have_the_official_format(tiny_config, caplog, label, header):
    caplog.set_level(logging.INFO, logger=LOGGER.name)
    config = tiny_config('PRINT_FREQ', 2)
    torch.manual_seed(0)
    model = build_model(config)
    device = torch.device('cpu')
    acc1, acc5, loss = validate(config, fixed_batches(4), model, device, Precision('cpu'), LOGGER, label)
    lines = [m for m in messages(caplog) if m.startswith('Test')]
    matches = [re.match(TEST_LINE.format(header=header), line) for line in lines[:2]]
    assert all(matches), lines
    assert [m.group(1) for m in matches] == ['2', '4']
    assert float(matches[1].group(3)) == pytest.approx(loss, abs=1e-4)     # (avg) over all batches
    assert float(matches[1].group(5)) == pytest.approx(acc1, abs=1e-3)
    summary = f" * {'EMA ' if label else ''}Acc@1 {acc1:.3f} Acc@5 {acc5:.3f}"
    assert summary in messages(caplog)


def test_throughput_states_its_precision(tiny_config, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER.name)
    config = tiny_config()
    model = build_model(config)
    images = torch.randn(2, 3, 32, 32)
    throughput(images, model, Precision('cpu', torch.bfloat16), LOGGER, warmup=1, iterations=2)
    throughput(images, model, Precision('cpu'), LOGGER, warmup=1, iterations=2)
    stated = [m for m in messages(caplog) if m.startswith('throughput averaged with 2 times\tprecision ')]
    assert stated == ['throughput averaged with 2 times\tprecision bfloat16 on cpu',
                      'throughput averaged with 2 times\tprecision float32 (AMP off) on cpu']
    lines = [m for m in messages(caplog) if m.startswith('batch_size 2 throughput ')]
    assert len(lines) == 2 and all(float(line.split()[-1]) > 0 for line in lines)   # the official line, unchanged
    assert sum('the official figures are float32: add --disable_amp' in m for m in messages(caplog)) == 1


@pytest.mark.parametrize('long_run', [False, True])
def test_throughput_runs_the_configured_passes_and_says_how_to_shorten_a_long_run(tiny_config, caplog, monkeypatch,
                                                                                 long_run):
    caplog.set_level(logging.INFO, logger=LOGGER.name)
    model = build_model(tiny_config())
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    if long_run:  # any estimate counts as long: the hint must follow it
        monkeypatch.setattr(engine, '_LONG_SECONDS', 0.0)
    throughput(torch.randn(2, 3, 32, 32), model, Precision('cpu'), LOGGER, warmup=3, iterations=4)
    assert len(calls) == 3 + 4  # the pass that sets the estimate is the first warm-up pass, not an extra one
    first = [m for m in messages(caplog) if m.startswith('throughput: ')][0]
    assert first.startswith('throughput: 3 warm-up + 4 timed forward passes of batch 2 (float32')
    assert ('THROUGHPUT.WARMUP_PASSES 5 THROUGHPUT.TIMED_PASSES 10' in first) is long_run


def test_the_benchmark_times_the_training_loops_own_step(tiny_config):
    """scripts/benchmark.py's train step is engine's: one step there and one step of train_one_epoch, from the same
    weights on the same batch, leave identical weights (clipping and the optimizer included)."""
    benchmark = load_script('benchmark')
    config = tiny_config('DATA.BATCH_SIZE', 8, 'AUG.MIXUP', 0.0, 'AUG.CUTMIX', 0.0, 'TRAIN.CLIP_GRAD', 0.5,
                         'MODEL.DROP_PATH_RATE', 0.0, 'TRAIN.WARMUP_EPOCHS', 0)
    (batch,) = list(fixed_batches(8, count=8))
    model, state, _ = one_epoch(config, [batch])
    assert state.global_step == 1
    torch.manual_seed(0)
    timed = build_model(config)
    benchmark.make_step(timed, 'train', torch.device('cpu'), torch.float32, batch.images, batch.targets, config)()
    assert_same_weights(timed.state_dict(), model.state_dict())
