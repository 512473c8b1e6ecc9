"""The training engine as users run it: main.py in real processes on a tiny dataset."""
import glob
import os
import re
import signal
import subprocess

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from helpers import (
    ROOT,
    assert_same_weights,
    child_env,
    load_weights,
    logged_losses,
    main_command,
    make_image_folder,
    read,
    run_main,
    sigterm_after,
    tiny_yaml,
    wait_for,
)

# every test here starts main.py as a process (seconds each on 2 cores): the full suite runs them, the fast
# loop (-m "not slow") does not
pytestmark = pytest.mark.slow

RECIPE = """TRAIN:
  EPOCHS: 2
  WARMUP_EPOCHS: 1
  BASE_LR: 2e-3
  MIN_LR: 1e-5
  WARMUP_LR: 1e-6
MODEL_EMA: True
MODEL_EMA_DECAY: 0.9
"""


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp('images'))


@pytest.fixture(scope='module')
def train_config(tmp_path_factory, dataset):
    # real loader workers and the full augmentation recipe (RandAugment, erasing, Mixup/CutMix, drop path)
    return tiny_yaml(tmp_path_factory.mktemp('cfg') / 'tiny.yaml', dataset, extra=RECIPE, num_workers=2)


@pytest.fixture(scope='module')
def reference_run(tmp_path_factory, train_config):
    """One uninterrupted 2-epoch run that the interrupted runs must reproduce bit for bit."""
    output = tmp_path_factory.mktemp('reference')
    result = run_main('--cfg', train_config, '--output', str(output))
    assert result.returncode == 0, result.stderr
    return os.path.join(output, 'tiny', 'default'), result


def test_training_run_writes_logs_checkpoints_and_events(reference_run):
    run_dir, result = reference_run
    log = read(os.path.join(run_dir, 'log_rank0.txt'))
    assert log.count('Test: 21 images') == 2            # every val image counted once
    assert log.count('Test (EMA): 21 images') == 2      # the EMA weights are evaluated alongside, labelled
    # the official summary lines, in the official order, after every validation
    for epoch in range(2):
        assert re.search(rf"EPOCH {epoch} training takes \d+:\d\d:\d\d\n(.*\n)*?.* \* Acc@1 [\d.]+ Acc@5 [\d.]+\n"
                         r".*Accuracy of the network on the 21 test images: [\d.]+%\n(.*\n)*?.*Max accuracy: [\d.]+%",
                         log), epoch
    assert log.count(' * EMA Acc@1 ') == log.count('Accuracy of the EMA network on the 21 test images') == 2
    assert re.search(r'Training time \d+:\d\d:\d\d', log)
    assert 'swin.data' in log and '12 batches per epoch' in log   # data/ messages reach the rank's file
    assert len(logged_losses(log)) == 2 * 12            # 48 images / batch 4, PRINT_FREQ 1, 2 epochs
    assert 'Training done in' in result.stdout and 'best Acc@1' in result.stdout
    for name in ('config.yaml', 'last.pth', 'best.pth', 'ckpt_epoch_0.pth', 'ckpt_epoch_1.pth'):
        assert os.path.isfile(os.path.join(run_dir, name)), name
    state = torch.load(os.path.join(run_dir, 'last.pth'), map_location='cpu', weights_only=True)
    assert state['epoch'] == 1 and state['class_names'] == ['circle', 'square', 'stripes']
    assert state['model_ema'].keys() == state['model'].keys()
    assert not torch.equal(state['model_ema']['head.weight'], state['model']['head.weight'])
    events = EventAccumulator(run_dir)
    events.Reload()
    tags = events.Tags()['scalars']
    for tag in ('train/loss', 'train/lr', 'train/grad_norm', 'val/acc1', 'val/acc5', 'val/loss'):
        assert tag in tags, tag
    assert len(events.Scalars('train/loss')) == 24


def test_kill_9_then_rerun_resumes_exactly(tmp_path, train_config, reference_run):
    """A run killed with SIGKILL after its first checkpoint, then simply rerun, ends bit-identical."""
    output = tmp_path / 'out'
    run_dir = output / 'tiny' / 'default'
    process = subprocess.Popen(main_command('--cfg', train_config, '--output', str(output)), cwd=ROOT,
                               env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: (run_dir / 'ckpt_epoch_0.pth').exists(), 240, 'the first checkpoint')
    finally:
        process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL
    result = run_main('--cfg', train_config, '--output', str(output))
    assert result.returncode == 0, result.stderr
    log = read(run_dir / 'log_rank0.txt')
    assert 'resumed from' in log
    # as official: the resumed weights are validated before training goes on
    resumed = log[log.index('resumed from'):]
    assert resumed.index('Accuracy of the network on the 21 test images') < resumed.index('Train: [1/2]')
    reference_dir = reference_run[0]
    for key in ('model', 'model_ema'):
        assert_same_weights(load_weights(run_dir / 'last.pth', key),
                            load_weights(os.path.join(reference_dir, 'last.pth'), key))
    assert logged_losses(log) == logged_losses(read(os.path.join(reference_dir, 'log_rank0.txt')))


def test_sigterm_mid_epoch_saves_and_resumes_exactly(tmp_path, train_config, reference_run):
    output = tmp_path / 'out'
    run_dir, out = sigterm_after(train_config, output, 'Train: [0/2][2/12]')
    log_path = run_dir / 'log_rank0.txt'
    assert 'SIGTERM received: stopped at epoch' in out and 'run the same command to resume' in out
    mid = glob.glob(str(run_dir / 'ckpt_epoch_*_step_*.pth'))
    assert len(mid) == 1, os.listdir(run_dir)
    state = torch.load(mid[0], map_location='cpu', weights_only=True)
    assert state['micro_batch'] > 0

    result = run_main('--cfg', train_config, '--output', str(output))
    assert result.returncode == 0, result.stderr
    reference_dir = reference_run[0]
    for key in ('model', 'model_ema'):
        assert_same_weights(load_weights(run_dir / 'last.pth', key),
                            load_weights(os.path.join(reference_dir, 'last.pth'), key))
    assert logged_losses(read(log_path)) == logged_losses(read(os.path.join(reference_dir, 'log_rank0.txt')))


def test_step_means_optimizer_step_with_accumulation(tmp_path, dataset):
    """With 2 micro-batches per optimizer step, the log, TensorBoard and the file name count the same steps."""
    config = tiny_yaml(tmp_path / 'tiny.yaml', dataset, extra="TRAIN:\n  EPOCHS: 2\n  ACCUMULATION_STEPS: 2\n")
    # 48 images / batch 4 = 12 micro-batches = 6 optimizer steps per epoch
    run_dir, out = sigterm_after(config, tmp_path / 'out', 'Train: [0/2][2/6]')

    step = max(s for (_, s) in logged_losses(read(run_dir / 'log_rank0.txt')))  # the last step the log reported
    assert step >= 2 and f'stopped at epoch 0 step {step}/6' in out
    assert [p.name for p in run_dir.glob('ckpt_epoch_*.pth')] == [f'ckpt_epoch_0_step_{step}.pth']
    state = torch.load(run_dir / f'ckpt_epoch_0_step_{step}.pth', map_location='cpu', weights_only=True)
    assert (state['epoch'], state['micro_batch'], state['global_step']) == (0, 2 * step, step)
    events = EventAccumulator(str(run_dir))
    events.Reload()
    assert [event.step for event in events.Scalars('train/loss')] == list(range(1, step + 1))


@pytest.mark.slow
def test_pretrained_run_validates_first_and_starts_at_train_start_epoch(tmp_path, train_config, reference_run):
    """--pretrained weights are validated before training; TRAIN.START_EPOCH 1 trains epoch 1 only, on the
    schedule's epoch-1 learning rates (those of the reference run)."""
    weights = os.path.join(reference_run[0], 'last.pth')
    result = run_main('--cfg', train_config, '--pretrained', weights, '--output', str(tmp_path),
                      '--opts', 'TRAIN.START_EPOCH', '1')
    assert result.returncode == 0, result.stderr
    log = read(tmp_path / 'tiny' / 'default' / 'log_rank0.txt')
    assert log.index('Accuracy of the network on the 21 test images') < log.index('Train: [')
    assert 'Train: [0/2]' not in log and 'Train: [1/2][12/12]' in log
    lrs = re.findall(r'Train: \[1/2\]\[(\d+)/12\].* lr ([\d.]+)', log)
    reference_lrs = re.findall(r'Train: \[1/2\]\[(\d+)/12\].* lr ([\d.]+)',
                               read(os.path.join(reference_run[0], 'log_rank0.txt')))
    assert lrs == reference_lrs and len(lrs) == 12


def test_eval_reports_accuracy_and_never_changes_weights(tmp_path, train_config, reference_run):
    checkpoint = os.path.join(reference_run[0], 'last.pth')
    before = open(checkpoint, 'rb').read()
    output = tmp_path / 'eval'
    result = run_main('--cfg', train_config, '--eval', '--resume', checkpoint, '--output', str(output))
    assert result.returncode == 0, result.stderr
    assert ' * Acc@1 ' in result.stdout and 'Accuracy of the network on the 21 test images' in result.stdout
    assert open(checkpoint, 'rb').read() == before
    assert not glob.glob(str(output / '**' / '*.pth'), recursive=True)


@pytest.mark.slow
def test_num_classes_left_unset_comes_from_the_dataset_and_the_log_says_so(tmp_path, dataset):
    config = tiny_yaml(tmp_path / 'tiny.yaml', dataset)
    with open(config) as f:
        text = f.read()
    with open(config, 'w') as f:
        f.write(text.replace('  NUM_CLASSES: 3\n', ''))   # the user leaves it to the dataset (3 class folders)
    result = run_main('--cfg', config, '--throughput', '--output', str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert (f"MODEL.NUM_CLASSES 3: not set in the config, taken from the dataset (class folders in "
            f"{os.path.join(dataset, 'train')})") in result.stdout
    assert not (tmp_path / 'tiny' / 'default' / 'config.yaml').exists()   # --throughput never writes a run's config
    set_wrong = run_main('--cfg', config, '--eval', '--output', str(tmp_path), '--opts', 'MODEL.NUM_CLASSES', '5')
    assert set_wrong.returncode == 2 and 'has 3 class folders but MODEL.NUM_CLASSES is 5' in set_wrong.stderr


def test_throughput_prints_the_official_line_without_a_dataset(tmp_path):
    """--throughput with no dataset: random input, the configured warm-up and timed passes, and the official line
    'batch_size B throughput X' whose X is the timed passes' images over their time."""
    config = tiny_yaml(tmp_path / 'tiny.yaml', '')
    result = run_main('--cfg', config, '--throughput', '--output', str(tmp_path),
                      '--opts', 'THROUGHPUT.WARMUP_PASSES', '3', 'THROUGHPUT.TIMED_PASSES', '100')
    assert result.returncode == 0, result.stderr
    log = result.stdout
    assert 'no --data-path: measuring throughput on random input' in log
    where = r'float32 \(AMP off\), cpu'
    assert re.search(rf'throughput: 3 warm-up \+ 100 timed forward passes of batch 4 \({where}\)', log), log
    assert 'throughput averaged with 100 times' in log
    official = re.findall(r'^.*\bbatch_size 4 throughput (\d+(?:\.\d+)?(?:e[-+]?\d+)?)$', log, re.MULTILINE)
    summary = re.findall(rf'throughput: ([\d.]+) images/s \(batch 4, {where}; (\d+) passes in ([\d.]+)s\)', log)
    assert len(official) == 1 and len(summary) == 1, log
    value, (rounded, passes, seconds) = float(official[0]), summary[0]
    assert int(passes) == 100 and value > 0
    assert abs(value - float(rounded)) <= 0.005  # the same measurement, to 2 decimals
    assert abs(100 * 4 / value - float(seconds)) <= 0.05 + 1e-9  # 100 passes x 4 images in the time logged (0.1s)


@pytest.mark.parametrize('args, message', [
    (['--opts', 'TRAIN.EPOCH', '1'], 'unknown config key TRAIN.EPOCH in --opts'),
    (['--data-path', '/no/such/dataset'], '/no/such/dataset'),
    (['--device', 'cuda:0'], 'CUDA was asked for but is not available'),
    (['--resume', '/no/such/ckpt.pth'], '/no/such/ckpt.pth'),
])
def test_user_mistakes_end_with_one_line(tmp_path, train_config, args, message):
    if message.startswith('CUDA') and torch.cuda.is_available():
        pytest.skip('this machine has CUDA')
    result = run_main('--cfg', train_config, '--output', str(tmp_path), *args)
    assert result.returncode == 2
    assert 'Traceback' not in result.stderr
    errors = [text for text in result.stderr.splitlines() if text.startswith('error')]
    assert len(errors) == 1 and message in errors[0], result.stderr


def test_missing_config_file_is_one_line(tmp_path):
    result = run_main('--cfg', str(tmp_path / 'missing.yaml'))
    assert result.returncode == 2 and 'Traceback' not in result.stderr
    assert f"config file not found: {tmp_path / 'missing.yaml'}" in result.stderr


def test_compiled_training_run(tmp_path, dataset):
    """--compile: torch.compile before the (absent) DDP wrap; Inductor generates the code of the whole model's
    training step (forward and backward) and of validation; checkpoints keep the plain state_dict keys."""
    config = tiny_yaml(tmp_path / 'tiny.yaml', dataset, extra="TRAIN:\n  EPOCHS: 1\n  WARMUP_EPOCHS: 0\n")
    # TORCH_LOGS=output_code: Inductor names each module of generated code it compiles or takes from its cache
    result = run_main('--cfg', config, '--compile', '--output', str(tmp_path), timeout=900, TORCH_LOGS='output_code')
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'compiling the model with torch.compile' in result.stdout
    assert len(logged_losses(result.stdout)) == 12  # every step of the epoch (48 images, batch 4) ran
    graphs = {}
    for path in re.findall(r'Output code written to: (\S+\.py)', result.stderr):
        code = read(path)
        graphs.setdefault(re.search(r"# AOT ID: \['\d+_(\w+)'\]", code).group(1), []).append(code)
    assert {'forward', 'backward', 'inference'} <= set(graphs), sorted(graphs)
    # the training graph starts at the model's input: a batch of 4 images of 32 px into the 2x2 patch embedding
    assert any('(4, 3, 32, 32)' in code and '(24, 3, 2, 2)' in code for code in graphs['forward'])
    assert all('def call(' in code for codes in graphs.values() for code in codes)
    weights = load_weights(tmp_path / 'tiny' / 'default' / 'last.pth')
    assert 'head.weight' in weights and not any(key.startswith('_orig_mod') for key in weights)
