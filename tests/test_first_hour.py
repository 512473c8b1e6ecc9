"""A new user's first hour, as real main.py processes: own-data recipe warnings, --pretrained next to an old
checkpoint, the demo config on a photo folder, when config.yaml is written, errors in the log file, Ctrl-C
feedback, the ETA and throughput lines."""
import glob
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from timm.data import auto_augment

from config import load_config
from data import build_transform
from errors import ConfigError
from helpers import ROOT, child_env, main_command, make_image_folder, read, run_main, tiny_yaml, wait_for
from lr_scheduler import schedule_warnings

ONE_EPOCH = "TRAIN:\n  EPOCHS: 1\n  WARMUP_EPOCHS: 0\n  LINEAR_SCALE_LR: False\n"


# -----------------------------------------------------------------------------
# Config: the augmentation policy and the LR warnings (no process needed)
# -----------------------------------------------------------------------------
POLICY_TYPES = (auto_augment.RandAugment, auto_augment.AutoAugment, auto_augment.AugMixAugment)


def policy_steps(transform):
    """The RandAugment / AutoAugment / AugMix steps anywhere in a (nested) transform."""
    found, stack = [], [transform]
    while stack:
        step = stack.pop()
        if isinstance(step, POLICY_TYPES):
            found.append(step)
        stack.extend(getattr(step, 'transforms', None) or [])
    return found


def describe(step):
    """What a policy step does: its kind, its settings and every op (name, probability, magnitude and its std)."""
    def ops(sequence):
        return [(op.name, op.prob, op.magnitude, op.magnitude_std) for op in sequence]
    if isinstance(step, auto_augment.RandAugment):
        weights = None if step.choice_weights is None else [round(float(w), 6) for w in step.choice_weights]
        return 'rand', step.num_layers, weights, ops(step.ops)
    if isinstance(step, auto_augment.AugMixAugment):
        return 'augmix', step.alpha, step.width, step.depth, step.blended, ops(step.ops)
    return 'auto', [ops(sub_policy) for sub_policy in step.policy]


@pytest.mark.parametrize('policy', ['rand-m9-mstd0.5-inc1', 'rand-m9-n3-mstd0.5-tweights', 'original', 'v0',
                                    'original-mstd0.5', 'augmix-m5-w3', 'none', ''])
def test_timm_augmentation_policies_are_accepted(policy):
    """A policy the config accepts is one the train transform applies: timm's step for exactly that string
    (what timm's own parser makes of it), and no policy step for 'none' / ''."""
    config = load_config(None, ['AUG.AUTO_AUGMENT', policy])
    assert config.AUG.AUTO_AUGMENT == policy
    steps = policy_steps(build_transform(True, config))
    if policy in ('none', ''):
        assert steps == []
        return
    parse = (auto_augment.rand_augment_transform if policy.startswith('rand') else
             auto_augment.augment_and_mix_transform if policy.startswith('augmix') else
             auto_augment.auto_augment_transform)
    assert [describe(step) for step in steps] == [describe(parse(policy, {}))]


@pytest.mark.parametrize('policy', ['rand-m9-mstd0.5-icn1', 'orignal', 'augmix-q3', 'randaugment'])
def test_misspelled_augmentation_policy_is_one_line(policy):
    with pytest.raises(ConfigError) as error:
        load_config(None, ['AUG.AUTO_AUGMENT', policy])
    message = str(error.value)
    assert '\n' not in message and f"AUG.AUTO_AUGMENT {policy!r}" in message and 'rand-m9-mstd0.5-inc1' in message


@pytest.mark.parametrize('key, value', [('DATA.INTERPOLATION', 'bicubc'), ('AUG.MIXUP_MODE', 'bach')])
def test_misspelled_choice_is_one_line(key, value):
    with pytest.raises(ConfigError) as error:
        load_config(None, [key, value])
    assert f"{key} {value!r}" in str(error.value) and '\n' not in str(error.value)


def test_schedule_warnings_name_the_numbers_and_keys():
    # the case: an official config for 2 epochs at batch 8 peaks at 7.8e-6
    config = load_config(os.path.join(ROOT, 'configs', 'swin_tiny.yaml'),
                         ['DATA.BATCH_SIZE', 8, 'TRAIN.EPOCHS', 2])
    warmup, scaling = schedule_warnings(config)
    assert 'TRAIN.WARMUP_EPOCHS 20 >= TRAIN.EPOCHS 2' in warmup and '7.81e-06' in warmup
    assert 'global batch 8' in scaling and '64x smaller' in scaling and 'TRAIN.LINEAR_SCALE_LR False' in scaling
    # the own-data recipe at its batch, and a 10x shrink exactly at the limit, do not warn
    assert schedule_warnings(load_config(os.path.join(ROOT, 'configs', 'finetune_own_data.yaml'))) == []
    assert schedule_warnings(load_config(None, ['DATA.BATCH_SIZE', 52, 'TRAIN.WARMUP_EPOCHS', 5])) == []


def test_sample_photo_set_has_ten_class_folders(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, 'scripts'))
    try:
        from make_sample_photos import make_sample_photos
    finally:
        sys.path.pop(0)
    root = make_sample_photos(str(tmp_path), train_per_class=2, val_per_class=1, size=48)
    for split, count in (('train', 2), ('val', 1)):
        classes = sorted(os.listdir(os.path.join(root, split)))
        assert len(classes) == 10
        assert all(len(os.listdir(os.path.join(root, split, name))) == count for name in classes)


# -----------------------------------------------------------------------------
# Real runs
# -----------------------------------------------------------------------------
pytest_slow = pytest.mark.slow


@pytest.fixture(scope='module')
def images(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp('images'), train_per_class=4, val_per_class=2)


@pytest.fixture(scope='module')
def trained(tmp_path_factory, images):
    """A finished 1-epoch run from scratch: (config file, output root, run folder)."""
    config = tiny_yaml(tmp_path_factory.mktemp('cfg') / 'tiny.yaml', images, extra=ONE_EPOCH)
    output = tmp_path_factory.mktemp('out')
    result = run_main('--cfg', config, '--output', str(output))
    assert result.returncode == 0, result.stderr
    return config, str(output), os.path.join(output, 'tiny', 'default')


def one_error_line(result):
    assert 'Traceback' not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith('error')]
    assert len(errors) == 1, result.stderr
    return errors[0]


def snapshot(path):
    with open(path, 'rb') as f:
        return f.read(), os.stat(path).st_mtime_ns


@pytest_slow
def test_missing_pretrained_file_is_an_error_before_anything_runs(tmp_path, images):
    config = tiny_yaml(tmp_path / 'tiny.yaml', images, extra=ONE_EPOCH)
    result = run_main('--cfg', config, '--output', str(tmp_path / 'out'), '--pretrained', str(tmp_path / 'no.pth'))
    assert result.returncode == 2
    assert f"{tmp_path / 'no.pth'} does not exist" in one_error_line(result)
    assert not os.path.exists(tmp_path / 'out')  # nothing ran: not even the output folder was made


@pytest_slow
def test_pretrained_next_to_a_checkpoint_is_refused_unless_it_started_the_run(tmp_path, trained):
    config, output, run_dir = trained
    weights = tmp_path / 'pretrained.pth'
    torch.save({'model': torch.load(os.path.join(run_dir, 'last.pth'), weights_only=True)['model']}, weights)
    before = snapshot(os.path.join(run_dir, 'config.yaml'))

    refused = run_main('--cfg', config, '--output', output, '--pretrained', str(weights))
    assert refused.returncode == 2
    line = one_error_line(refused)
    assert f"--pretrained {weights} would be ignored" in line
    assert '--output' in line and 'TRAIN.AUTO_RESUME False' in line
    assert snapshot(os.path.join(run_dir, 'config.yaml')) == before  # a rejected run writes no config.yaml
    assert line in read(os.path.join(run_dir, 'log_rank0.txt'))       # and its error reaches the log file

    # elsewhere, the fine-tuning run starts from the weights, and records them: its own rerun resumes
    finetune = str(tmp_path / 'finetune')
    first = run_main('--cfg', config, '--output', finetune, '--pretrained', str(weights))
    assert first.returncode == 0, first.stderr
    assert f'loaded pretrained weights {weights}' in first.stdout
    saved = torch.load(os.path.join(finetune, 'tiny', 'default', 'last.pth'), weights_only=True)
    assert saved['pretrained_from'] == os.path.realpath(weights)
    again = run_main('--cfg', config, '--output', finetune, '--pretrained', str(weights))
    assert again.returncode == 0, again.stderr
    assert 'resumed from' in again.stdout and 'loaded pretrained weights' not in again.stdout

    # the way out that keeps the folder: no auto-resume, so the pretrained weights are loaded
    restart = run_main('--cfg', config, '--output', output, '--pretrained', str(weights),
                       '--opts', 'TRAIN.AUTO_RESUME', 'False')
    assert restart.returncode == 0, restart.stderr
    assert f'loaded pretrained weights {weights}' in restart.stdout


@pytest_slow
def test_demo_config_on_a_photo_folder_points_to_the_dataset_kind(images):
    before = sorted(glob.glob(os.path.join(images, '**'), recursive=True))
    result = run_main('--cfg', os.path.join(ROOT, 'configs', 'demo.yaml'), '--data-path', images,
                      '--output', os.path.join(images, '..', 'demo_out'))
    assert result.returncode == 2
    line = one_error_line(result)
    assert 'DATA.DATASET imagenet' in line and 'remove' not in line.lower() and 'delete' not in line.lower()
    assert sorted(glob.glob(os.path.join(images, '**'), recursive=True)) == before


@pytest_slow
@pytest.mark.parametrize('args, message', [
    (['--opts', 'MODEL.SWIN.EMBED_DIM', '48'], 'MODEL.SWIN.EMBED_DIM'),   # architecture drift on resume
    (['--opts', 'MODEL.NUM_CLASSES', '5'], '5'),                          # class-count error (data)
    (['--opts', 'AUG.AUTO_AUGMENT', 'rand-m9-mstd0.5-icn1'], 'AUG.AUTO_AUGMENT'),  # bad value (config)
])
def test_rejected_rerun_keeps_config_yaml_and_logs_its_error(trained, args, message):
    config, output, run_dir = trained
    before = snapshot(os.path.join(run_dir, 'config.yaml'))
    result = run_main('--cfg', config, '--output', output, *args)
    assert result.returncode == 2
    line = one_error_line(result)
    assert message in line
    assert snapshot(os.path.join(run_dir, 'config.yaml')) == before
    if 'AUTO_AUGMENT' not in message:  # a config error comes before the logger exists: nothing to log to
        assert line in read(os.path.join(run_dir, 'log_rank0.txt'))


@pytest_slow
def test_eval_and_throughput_never_write_config_yaml(trained):
    config, output, run_dir = trained
    before = snapshot(os.path.join(run_dir, 'config.yaml'))
    evaluated = run_main('--cfg', config, '--output', output, '--eval', '--opts', 'DATA.BATCH_SIZE', '2')
    assert evaluated.returncode == 0, evaluated.stderr
    measured = run_main('--cfg', config, '--output', output, '--throughput')
    assert measured.returncode == 0, measured.stderr
    assert snapshot(os.path.join(run_dir, 'config.yaml')) == before
    assert load_config(os.path.join(run_dir, 'eval_config.yaml')).DATA.BATCH_SIZE == 2


@pytest_slow
def test_unreadable_images_stop_reaches_the_log_file(tmp_path):
    root = make_image_folder(tmp_path / 'images', train_per_class=4, val_per_class=2)
    for path in glob.glob(os.path.join(root, 'train', '*', '00[01].png')):
        with open(path, 'wb') as f:
            f.write(b'not an image')
    config = tiny_yaml(tmp_path / 'tiny.yaml', root, extra=ONE_EPOCH)
    result = run_main('--cfg', config, '--output', str(tmp_path / 'out'))
    assert result.returncode == 2
    line = one_error_line(result)
    assert line in read(tmp_path / 'out' / 'tiny' / 'default' / 'log_rank0.txt')


@pytest_slow
def test_train_lines_end_with_the_run_eta_and_leave_out_mem_on_cpu(trained):
    config, output, run_dir = trained
    lines = [line for line in read(os.path.join(run_dir, 'log_rank0.txt')).splitlines() if 'Train: [' in line]
    assert lines and all('\teta_run ' in line and line.rsplit('\t', 1)[1].startswith('eta_run ') for line in lines)
    assert not any('\tmem ' in line for line in lines)


@pytest_slow
def test_accepted_but_unimplemented_keys_are_named_in_the_log_file_too(tmp_path):
    config = tiny_yaml(tmp_path / 'tiny.yaml', '')
    result = run_main('--cfg', config, '--throughput', '--output', str(tmp_path), '--fused_window_process')
    assert result.returncode == 0, result.stderr
    assert 'FUSED_WINDOW_PROCESS True' in result.stderr  # said while the config was read
    logged = [line for line in read(tmp_path / 'tiny' / 'default' / 'log_rank0.txt').splitlines()
              if 'not implemented, so without effect' in line]
    assert len(logged) == 1 and 'WARNING' in logged[0] and 'FUSED_WINDOW_PROCESS True' in logged[0]


@pytest_slow
def test_throughput_pass_counts_come_from_the_config(tmp_path):
    config = tiny_yaml(tmp_path / 'tiny.yaml', '')
    result = run_main('--cfg', config, '--throughput', '--output', str(tmp_path),
                      '--opts', 'THROUGHPUT.WARMUP_PASSES', '2', 'THROUGHPUT.TIMED_PASSES', '3')
    assert result.returncode == 0, result.stderr
    assert 'throughput: 2 warm-up + 3 timed forward passes of batch 4' in result.stdout
    assert 'throughput averaged with 3 times' in result.stdout and '3 passes in ' in result.stdout
    for key in ('THROUGHPUT.WARMUP_PASSES', 'THROUGHPUT.TIMED_PASSES'):
        result = run_main('--cfg', config, '--throughput', '--output', str(tmp_path), '--opts', key, '0')
        assert result.returncode != 0 and 'Traceback' not in result.stderr
        assert result.stderr.strip().splitlines()[-1].count(key) == 1, result.stderr


@pytest_slow
def test_throughput_shows_progress_and_a_rounded_result(tmp_path):
    config = tiny_yaml(tmp_path / 'tiny.yaml', '')
    result = run_main('--cfg', config, '--throughput', '--output', str(tmp_path))
    assert result.returncode == 0, result.stderr
    first = [line for line in result.stdout.splitlines() if 'throughput: ' in line][0]
    assert 'throughput: 50 warm-up + 30 timed forward passes of batch 4 (float32' in first  # the official protocol
    assert re.search(r'the first pass took [0-9.]+s, so about \d+:\d\d:\d\d in all', first)
    assert 'throughput averaged with 30 times' in result.stdout
    official = [line for line in result.stdout.splitlines() if 'batch_size 4 throughput ' in line]
    value = float(official[0].rsplit(' ', 1)[1])  # the official line, as scripts parse it
    assert value > 0
    assert f'throughput: {value:.2f} images/s (batch 4, float32' in result.stdout  # rounded, unit, precision


# -----------------------------------------------------------------------------
# Ctrl-C: a real SIGINT to a real run
# -----------------------------------------------------------------------------
def start(config, output, *args):
    """main.py in its own process group, so that ctrl_c reaches it and its loader workers, as a terminal's does."""
    return subprocess.Popen(main_command('--cfg', config, '--output', str(output), *args), cwd=ROOT,
                            env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def ctrl_c(process):
    """SIGINT to the process group, as a terminal sends it."""
    os.killpg(process.pid, signal.SIGINT)


@pytest_slow
@pytest.mark.parametrize('signum', [signal.SIGINT, signal.SIGTERM], ids=['SIGINT', 'SIGTERM'])
def test_first_stop_signal_says_at_once_what_will_happen(tmp_path, images, signum):
    """Sent to the whole process group, as a terminal's Ctrl-C or a cluster's SIGTERM: loader workers leave it
    to the main process, whose step in progress (2 micro-batches) still gets its batches."""
    config = tiny_yaml(tmp_path / 'tiny.yaml', images, extra="TRAIN:\n  EPOCHS: 3\n  ACCUMULATION_STEPS: 2\n",
                       num_workers=2)
    process = start(config, tmp_path / 'out', '--batch-size', '2')
    run_dir = tmp_path / 'out' / 'tiny' / 'default'
    log = run_dir / 'log_rank0.txt'
    wait_for(lambda: log.exists() and 'Train: [0/3][1/' in read(log), 240, 'the first training line')
    os.killpg(process.pid, signum)
    first = process.stderr.readline()  # the first thing on stderr, before the step ends
    name = signal.Signals(signum).name
    assert f'{name} received: finishing the current step, saving a checkpoint, then exit' in first
    out, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, err
    assert 'Traceback' not in err
    # the announced stop checkpoint is the one saved after it (a fast machine may have finished epoch 0 and
    # saved its end-of-epoch checkpoint before the signal arrived: the stop then comes in epoch 1)
    said = re.search(rf'{name} received: saving a checkpoint at epoch (\d+) step (\d+)/', out)
    assert said, out
    stop_checkpoint = run_dir / f'ckpt_epoch_{said[1]}_step_{said[2]}.pth'
    assert f'saved checkpoint {stop_checkpoint}' in out[said.end():], out
    assert stop_checkpoint.exists()


@pytest_slow
def test_second_ctrl_c_during_a_save_exits_130_and_keeps_the_last_checkpoint(tmp_path, images):
    # a wide model: its checkpoint (~200 MB with the AdamW state) takes long enough to write that the second
    # SIGINT, sent when the log announces the save, arrives while the file is being written
    config = tiny_yaml(tmp_path / 'tiny.yaml', images, extra="TRAIN:\n  EPOCHS: 2\n  WARMUP_EPOCHS: 0\n",
                       num_workers=2)
    wide = ('--opts', 'MODEL.SWIN.EMBED_DIM', '384', 'MODEL.SWIN.NUM_HEADS', '[6, 12]')
    output = tmp_path / 'out'
    run_dir = output / 'tiny' / 'default'
    process = start(config, output, *wide)
    log = run_dir / 'log_rank0.txt'
    wait_for(lambda: log.exists() and 'Train: [1/2][1/' in read(log), 600, 'a training line of epoch 1')
    ctrl_c(process)
    wait_for(lambda: 'saving a checkpoint at epoch 1' in read(log), 120, 'the save to start')
    ctrl_c(process)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert 'Traceback' not in err
    said = re.search(r'interrupted: stopped at once; any save still in flight is abandoned; the same command '
                     r'resumes from (\S+)', err)
    assert said, err
    assert said.group(0) in read(log)
    assert 'saved checkpoint' not in read(log).split('interrupted: stopped at once')[1]  # nothing lands after it
    last = torch.load(run_dir / 'last.pth', weights_only=True, map_location='cpu')
    assert (last['epoch'], last['micro_batch']) == (0, 0)  # the end of epoch 0: the last complete checkpoint
    assert not glob.glob(str(run_dir / 'ckpt_epoch_1_step_*.pth'))  # the abandoned save never landed

    resumed = run_main('--cfg', config, '--output', str(output), *wide)
    assert resumed.returncode == 0, resumed.stderr
    assert f'auto-resume: {said.group(1)}' in resumed.stdout or f'resumed from {said.group(1)}' in resumed.stdout


@pytest_slow
def test_rerunning_a_finished_run_says_it_is_complete_and_exits_0(trained, tmp_path):
    config, output, run_dir = trained
    copy = tmp_path / 'out'
    shutil.copytree(output, copy)  # the module's run stays as the other tests read it
    config_yaml = read(copy / 'tiny' / 'default' / 'config.yaml')
    best = float(re.findall(r'Max accuracy: ([0-9.]+)%', read(os.path.join(run_dir, 'log_rank0.txt')))[-1])
    result = run_main('--cfg', config, '--output', str(copy))
    assert result.returncode == 0, result.stderr
    assert (f"run complete: 1/1 epochs trained (best Acc@1 {best:.2f}%; outputs in {copy / 'tiny' / 'default'})"
            in result.stdout)
    assert ' * Acc@1 ' not in result.stdout and 'Start training' not in result.stdout  # no re-validation
    assert read(copy / 'tiny' / 'default' / 'config.yaml') == config_yaml
    more = run_main('--cfg', config, '--output', str(copy), '--epochs', '2')  # asking for more still trains
    assert more.returncode == 0, more.stderr
    assert 'Train: [1/2]' in more.stdout and 'run complete' not in more.stdout
