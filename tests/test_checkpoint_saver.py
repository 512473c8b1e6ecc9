"""Checkpoints that bound lost work and survive disk trouble (checkpoint.saver / checkpoint.writer).

- periodic mid-epoch checkpoints (SAVE_EVERY_MINUTES) do not change training, and a SIGKILL after one resumes
  from it, ending with the weights of an uninterrupted run;
- a DataLoader worker killed mid-training costs nothing (no restart, same weights);
- a failed save (disk full: a real tiny tmpfs, or ENOSPC injected into the real write path) keeps the earlier
  checkpoints, is one line, and stops or continues as SAVE_FAILURE says.
"""
import errno
import io
import os
import re
import signal
import subprocess

import pytest
import torch

import checkpoint.files
import main
from checkpoint.writer import CheckpointWriter, cpu_snapshot
from helpers import (
    ROOT,
    assert_same_weights,
    child_env,
    load_weights,
    main_command,
    make_image_folder,
    read,
    run_main,
    tiny_yaml,
    wait_for,
)

pytestmark = pytest.mark.slow

RECIPE = "TRAIN:\n  EPOCHS: 4\n  WARMUP_EPOCHS: 1\n"
STEP_FILE = re.compile(r'^ckpt_epoch_(\d+)_step_(\d+)\.pth$')


@pytest.fixture(scope='module')
def config_path(tmp_path_factory):
    data = make_image_folder(tmp_path_factory.mktemp('images'))
    return tiny_yaml(tmp_path_factory.mktemp('cfg') / 'tiny.yaml', data, extra=RECIPE, num_workers=2)


@pytest.fixture(scope='module')
def reference(tmp_path_factory, config_path):
    """An uninterrupted run without periodic checkpoints."""
    output = tmp_path_factory.mktemp('reference')
    result = run_main('--cfg', config_path, '--output', str(output), '--opts', 'SAVE_EVERY_MINUTES', '0', timeout=900)
    assert result.returncode == 0, result.stderr
    return output / 'tiny' / 'default'


def test_snapshot_is_a_copy_that_later_updates_do_not_touch():
    weights = torch.nn.Linear(3, 2).state_dict()
    buffers = {}
    first = cpu_snapshot({'model': weights, 'epoch': 1}, buffers)
    with torch.no_grad():
        weights['weight'].add_(1.0)
    assert not torch.equal(first['model']['weight'], weights['weight']) and first['epoch'] == 1
    second = cpu_snapshot({'model': weights, 'epoch': 2}, buffers)
    assert second['model']['weight'].data_ptr() == first['model']['weight'].data_ptr()  # the buffer is reused
    assert torch.equal(second['model']['weight'], weights['weight'])


def test_writer_reports_an_os_error_as_one_line_once(tmp_path):
    writer = CheckpointWriter()

    def write(snapshot):
        raise OSError(errno.ENOSPC, 'No space left on device', str(tmp_path / '.x.tmp'))

    writer.submit(write, {'w': torch.zeros(2)}, path_hint=str(tmp_path / 'ckpt_epoch_1.pth'))
    writer.wait()
    failure = writer.failure()
    assert str(failure) == (f"saving checkpoint {tmp_path / 'ckpt_epoch_1.pth'} failed: the disk is full (ENOSPC: "
                            f"{tmp_path / '.x.tmp'}); earlier checkpoints are intact")
    assert writer.failure() is None


def test_periodic_checkpoint_then_sigkill_resumes_exactly(tmp_path, config_path, reference):
    output = tmp_path / 'out'
    run_dir = output / 'tiny' / 'default'
    args = ('--cfg', config_path, '--output', str(output), '--opts', 'SAVE_EVERY_MINUTES', '0.001')
    process = subprocess.Popen(main_command(*args), cwd=ROOT, env=child_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)

    def periodic_file_of_epoch_1():
        return run_dir.is_dir() and any((m := STEP_FILE.match(n)) and m.group(1) == '1' for n in os.listdir(run_dir))

    try:
        wait_for(periodic_file_of_epoch_1, 600, 'a periodic checkpoint in epoch 1')
    finally:
        process.kill()
        process.communicate()
    log = read(run_dir / 'log_rank0.txt')
    assert re.search(r"periodic checkpoint \(SAVE_EVERY_MINUTES 0.001\): ckpt_epoch_\d+_step_\d+\.pth, training "
                     r"waited \d+ ms", log)
    assert 'Training done' not in log

    result = run_main(*args, timeout=900)
    assert result.returncode == 0, result.stderr
    # a mid-epoch state (last.pth may be the name found: it is a hard link to the newest file)
    resumed = re.search(r"resumed from \S+: epoch \d+, micro-batch (\d+)", read(run_dir / 'log_rank0.txt'))
    assert resumed and int(resumed.group(1)) > 0
    assert_same_weights(load_weights(run_dir / 'last.pth'), load_weights(reference / 'last.pth'))
    # retention: mid-epoch files older than the last save are gone; the newest file is the one last.pth names
    names = os.listdir(run_dir)
    assert not [n for n in names if STEP_FILE.match(n)], names
    assert os.path.samefile(run_dir / 'last.pth', run_dir / 'ckpt_epoch_3.pth')


def test_a_loader_worker_killed_mid_training_costs_nothing(tmp_path, config_path, reference):
    output = tmp_path / 'out'
    run_dir = output / 'tiny' / 'default'
    process = subprocess.Popen(main_command('--cfg', config_path, '--output', str(output), '--opts',
                                            'SAVE_EVERY_MINUTES', '0'),
                               cwd=ROOT, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (run_dir / 'log_rank0.txt').exists() and 'Train: [1/4]' in read(run_dir / 'log_rank0.txt'),
                 600, 'training in epoch 1')
        workers = [int(p) for p in subprocess.run(['pgrep', '-P', str(process.pid)], capture_output=True,
                                                  text=True).stdout.split()]
        assert workers
        os.kill(workers[0], signal.SIGKILL)
        _, stderr = process.communicate(timeout=900)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, stderr
    assert "restarting the loader's workers" in read(run_dir / 'log_rank0.txt') + stderr
    assert_same_weights(load_weights(run_dir / 'last.pth'), load_weights(reference / 'last.pth'))


# -----------------------------------------------------------------------------
# Disk trouble
# -----------------------------------------------------------------------------
class _FullDiskFile(io.FileIO):
    """A file on a disk that is full: every write fails with ENOSPC, as the kernel reports it."""

    def write(self, data):
        raise OSError(errno.ENOSPC, 'No space left on device')


def _disk_full_after(files):
    """open() for checkpoint.files: the first ``files`` files written are real, later ones sit on a full disk."""
    opened = []

    def fake_open(path, mode='r', *args, **kwargs):
        if 'x' in mode and 'b' in mode:
            opened.append(path)
            if len(opened) > files:
                return _FullDiskFile(path, 'x')
        return open(path, mode, *args, **kwargs)

    return fake_open


@pytest.mark.parametrize('mode', ['stop', 'continue'])
def test_injected_disk_full_keeps_the_last_checkpoint(tmp_path, config_path, monkeypatch, capsys, mode):
    monkeypatch.setattr(checkpoint.files, 'open', _disk_full_after(1), raising=False)  # inside torch.save's writes
    output = tmp_path / 'out'
    run_dir = output / 'tiny' / 'default'
    code = main.run(['--cfg', config_path, '--output', str(output), '--opts', 'SAVE_FAILURE', mode,
                     'DATA.NUM_WORKERS', '0', 'TRAIN.EPOCHS', '3', 'SAVE_EVERY_MINUTES', '0'])
    stderr = capsys.readouterr().err
    line = f"saving checkpoint {run_dir / 'ckpt_epoch_1.pth'} failed: the disk is full (ENOSPC)"
    log = read(run_dir / 'log_rank0.txt')
    if mode == 'stop':
        assert code == 2
        errors = [text for text in stderr.splitlines() if text.startswith('error')]
        assert errors == [f"error: {line}; earlier checkpoints are intact"], stderr
        assert 'Training done' not in log
    else:
        assert code == 0, stderr
        assert line in log and log.count('failed: the disk is full (ENOSPC)') == 2  # epochs 1, 2: one line each
        assert 'training goes on (SAVE_FAILURE continue)' in log and 'Training done' in log
    names = os.listdir(run_dir)
    assert not [n for n in names if n.endswith('.tmp')], names
    assert os.path.samefile(run_dir / 'last.pth', run_dir / 'ckpt_epoch_0.pth')
    assert checkpoint.load_file(run_dir / 'last.pth')['epoch'] == 0  # intact and loadable


@pytest.fixture
def tiny_filesystem(tmp_path):
    """A 1.6 MB tmpfs: room for one tiny checkpoint (~1 MB) and the logs, not for a second one beside it."""
    mount_point = tmp_path / 'tiny_fs'
    mount_point.mkdir()
    mounted = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=1600k', 'tmpfs', str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"mounting a tmpfs needs privileges this run lacks ({mounted.stderr.strip()}); "
                    f"test_injected_disk_full_keeps_the_last_checkpoint covers the same path")
    yield mount_point
    subprocess.run(['umount', '-l', str(mount_point)], check=False)


def test_real_full_disk_stops_with_one_line(tiny_filesystem, config_path):
    run_dir = tiny_filesystem / 'tiny' / 'default'
    result = run_main('--cfg', config_path, '--output', str(tiny_filesystem), '--opts', 'SAVE_EVERY_MINUTES', '0',
                      'KEEP_CHECKPOINTS', '1', timeout=900)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith('error')]
    assert len(errors) == 1 and re.match(rf"error: saving checkpoint {run_dir}/ckpt_epoch_\d+\.pth failed: the disk "
                                         rf"is full \(ENOSPC\); earlier checkpoints are intact$", errors[0]), errors
    last = checkpoint.load_file(run_dir / 'last.pth')
    assert last['epoch'] >= 0 and not [n for n in os.listdir(run_dir) if n.endswith('.tmp')]


def test_full_disk_on_rank_0_is_named_by_the_other_rank(tiny_filesystem, config_path):
    from test_faults import c10d_torchrun
    result = subprocess.run(c10d_torchrun(2, os.path.join(ROOT, 'main.py'), '--cfg', config_path, '--output',
                                          str(tiny_filesystem), '--opts', 'SAVE_EVERY_MINUTES', '0',
                                          'KEEP_CHECKPOINTS', '1'),
                            cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=900)
    out = result.stdout + result.stderr
    assert result.returncode != 0
    rank0 = [line for line in out.splitlines() if line.startswith('error (rank 0): ')]
    rank1 = [line for line in out.splitlines() if line.startswith('error (rank 1): ')]
    assert len(rank0) == 1 and 'failed: the disk is full (ENOSPC)' in rank0[0], out[-3000:]
    named = r"error \(rank 1\): rank 0 \(host \S+, pid \d+\) failed first: CheckpointError: saving .* disk is full"
    assert len(rank1) == 1 and re.match(named, rank1[0]), out[-3000:]
