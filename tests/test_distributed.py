"""Real torchrun with gloo on CPU: two ranks train, agree on weights, validate exactly, stop together;
compiled DDP trains like eager DDP."""
import logging
import os
import re
import signal
import subprocess
import threading
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from conftest import make_tiny_config
from coordinator import Action, StepCoordinator
from helpers import (
    ROOT,
    assert_same_weights,
    child_env,
    free_port,
    load_weights,
    make_image_folder,
    read,
    tiny_yaml,
    torchrun_command,
    wait_for,
)
from main import wrap_model
from models import build_model
from utils import unwrap_model

pytestmark = pytest.mark.slow

RECIPE = "TRAIN:\n  EPOCHS: 3\n  WARMUP_EPOCHS: 1\n"
CHECKSUM = re.compile(r"weights checksum (\S+)")


@pytest.fixture(scope='module')
def config_path(tmp_path_factory):
    data = make_image_folder(tmp_path_factory.mktemp('images'))
    return tiny_yaml(tmp_path_factory.mktemp('cfg') / 'tiny.yaml', data, extra=RECIPE)


@pytest.fixture(scope='module')
def two_rank_run(tmp_path_factory, config_path):
    output = tmp_path_factory.mktemp('ddp')
    result = subprocess.run(torchrun_command(2, '--cfg', config_path, '--output', str(output)), cwd=ROOT,
                            env=child_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return output / 'tiny' / 'default'


def test_two_ranks_train_and_agree(two_rank_run):
    logs = [read(two_rank_run / f'log_rank{rank}.txt') for rank in (0, 1)]
    checksums = [CHECKSUM.findall(log) for log in logs]
    assert checksums[0] and checksums[0] == checksums[1]
    for rank, log in enumerate(logs):
        # 21 val images over 2 ranks: exact, no padded duplicates, on every rank's view of the result
        assert log.count('Test: 21 images') == 3
        assert f'rank {rank}/2 (pid ' in log  # each process logs its own rank of the two
    # 48 train images / (batch 4 x 2 ranks) = 6 steps per epoch
    assert 'Train: [2/3][6/6]' in logs[0]
    assert ' * Acc@1 ' in logs[0] and 'Max accuracy: ' in logs[0]
    assert 'global batch 8 = 4 x 2 processes' in logs[0]
    files = os.listdir(two_rank_run)
    assert any(name.startswith('events.out.tfevents') for name in files)
    assert {'last.pth', 'best.pth', 'ckpt_epoch_1.pth', 'config.yaml'} <= set(files)


def test_sequential_validation_on_two_ranks_finishes_with_exact_counts(tmp_path, config_path):
    # rank 1 gets no val batches: validation must not go through DDP's forward (a collective per call)
    result = subprocess.run(torchrun_command(2, '--cfg', config_path, '--output', str(tmp_path),
                                             '--opts', 'TEST.SEQUENTIAL', 'True', 'TRAIN.EPOCHS', '1'),
                            cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    for rank in (0, 1):
        assert read(tmp_path / 'tiny' / 'default' / f'log_rank{rank}.txt').count('Test: 21 images') == 1


def test_compiled_ddp_trains_like_eager_ddp_with_official_keys(tmp_path, two_rank_run):
    # aot_eager: the DDP graph splitting and the traced graphs of inductor, run by eager kernels (the same
    # random draws for drop path, so the weights compare); inductor would take minutes to compile on 2 CPU cores
    result = subprocess.run(torchrun_command(2, '--cfg', str(two_rank_run / 'config.yaml'), '--output',
                                             str(tmp_path), '--opts', 'TRAIN.COMPILE', 'True',
                                             'TRAIN.COMPILE_BACKEND', 'aot_eager'),
                            cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    run_dir = tmp_path / 'tiny' / 'default'
    assert 'compiling the model with torch.compile (backend aot_eager' in read(run_dir / 'log_rank0.txt')
    compiled, eager = load_weights(run_dir / 'last.pth'), load_weights(two_rank_run / 'last.pth')
    assert list(compiled) == list(eager)   # official keys: no '_orig_mod.' / 'module.' prefixes
    for key in eager:
        torch.testing.assert_close(compiled[key], eager[key], rtol=1e-4, atol=1e-5, msg=key)


def test_nonfinite_loss_on_one_rank_stops_every_rank_with_the_same_line(tmp_path, config_path):
    # rank 1's loss is NaN at step 2; DDP spreads it, so rank 0's turns NaN at step 3, where the losses are read
    command = torchrun_command(2, '--cfg', config_path, '--output', str(tmp_path),
                               '--opts', 'PRINT_FREQ', '3', 'TRAIN.EPOCHS', '1')
    script = command.index(os.path.join(ROOT, 'main.py'))
    command[script:script + 1] = [os.path.join(ROOT, 'tests', 'nan_probe.py'), '1', '2']   # rank 1, call 2
    result = subprocess.run(command, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    errors = dict(re.findall(r"error \(rank (\d)\): (.*)", output))
    assert errors.keys() == {'0', '1'}, output
    assert errors['0'] == errors['1'] and 'loss became NaN/inf at optimizer step 2 ' in errors['0'], output
    run_dir = tmp_path / 'tiny' / 'default'
    for rank in (0, 1):
        assert 'Train: [0/1][3/6]' in read(run_dir / f'log_rank{rank}.txt')   # both got as far as step 3
    assert not [name for name in os.listdir(run_dir) if name.endswith('.pth')]   # no checkpoint of NaN weights


def test_wrap_order_is_ddp_then_compile_and_validation_skips_ddp(tmp_path):
    config = make_tiny_config(tmp_path, 'TRAIN.COMPILE', True,
                              environ={'WORLD_SIZE': '2', 'RANK': '0', 'LOCAL_RANK': '0'})
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{free_port()}', rank=0, world_size=1)
    try:
        model = build_model(config)
        train_model, eval_model = wrap_model(config, model, torch.device('cpu'), logging.getLogger('test'))
    finally:
        dist.destroy_process_group()
    ddp = train_model._orig_mod    # torch.compile of the DDP module: DDP-aware graph splitting
    assert isinstance(ddp, DistributedDataParallel) and ddp.module is model and not ddp.broadcast_buffers
    assert eval_model._orig_mod is model and unwrap_model(train_model) is model


def test_sigterm_to_one_rank_stops_both_and_resumes_exactly(tmp_path, config_path, two_rank_run):
    output = tmp_path / 'out'
    run_dir = output / 'tiny' / 'default'
    process = subprocess.Popen(torchrun_command(2, '--cfg', config_path, '--output', str(output)), cwd=ROOT,
                               env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    rank1_log = run_dir / 'log_rank1.txt'
    wait_for(lambda: rank1_log.exists() and 'Train: [0/3][2/6]' in read(rank1_log), 300, 'rank 1 at step 2')
    rank1_pid = int(re.search(r"rank 1/2 \(pid (\d+)\)", read(rank1_log)).group(1))
    os.kill(rank1_pid, signal.SIGTERM)         # only one rank is told; both must stop at the same step
    out, _ = process.communicate(timeout=300)
    assert process.returncode != 0
    assert 'SIGTERM received: stopped at epoch' in read(run_dir / 'log_rank0.txt'), out
    assert any('_step_' in name for name in os.listdir(run_dir)), out

    result = subprocess.run(torchrun_command(2, '--cfg', config_path, '--output', str(output)), cwd=ROOT,
                            env=child_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert_same_weights(load_weights(run_dir / 'last.pth'), load_weights(two_rank_run / 'last.pth'))


def _poll_while_signalled(rank, port, results):
    """Rank 1 is already waiting inside the coordinator's all-reduce when its SIGTERM arrives."""
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=2)
    coordinator = StepCoordinator().install()
    if rank == 0:
        time.sleep(1.0)  # hold the all-reduce open
    else:
        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM)).start()
    polls = [coordinator.after_step(lambda: -1, True, 0.1) is Action.STOP for _ in range(2)]
    results[rank] = (polls, coordinator.signal_name, coordinator.exit_code)
    coordinator.uninstall()
    dist.destroy_process_group()


def test_signal_during_the_agreement_all_reduce_is_not_lost():
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_poll_while_signalled, args=(free_port(), results), nprocs=2)
        results = dict(results)
    # the first poll may or may not include it (the handler runs when the all-reduce returns); the next must
    for rank in (0, 1):
        polls, name, code = results[rank]
        assert polls[1] is True and name == 'SIGTERM' and code == 143, (rank, results[rank])
    assert results[0][0] == results[1][0]  # every poll agrees across ranks
