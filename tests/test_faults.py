"""Fault tolerance under real torchrun (c10d rendezvous, gloo, CPU).

- a restarted round forms its process group although the store still holds the previous round's keys;
  a round that cannot form ends within DIST.PEER_TIMEOUT with one line;
- ranks and DataLoader workers SIGKILLed at random moments: torchrun restarts, the job finishes, and its
  final weights equal an uninterrupted run's bit for bit;
- a node (agent + worker) that vanishes is named by the survivor, which exits within a bounded time.
"""
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from data.recovery import survive_worker_deaths
from data.samplers import DistributedEpochSampler
from helpers import (
    ROOT,
    assert_same_weights,
    child_env,
    free_port,
    load_weights,
    make_image_folder,
    read,
    tiny_yaml,
    wait_for,
)

pytestmark = pytest.mark.slow

PROBE = os.path.join(ROOT, 'tests', 'fault_probe.py')
MAIN = os.path.join(ROOT, 'main.py')
RECIPE = "TRAIN:\n  EPOCHS: 24\n  WARMUP_EPOCHS: 1\n"  # long enough for three kills


def c10d_torchrun(nproc, *args, nnodes=1, max_restarts=0, endpoint=None):
    return [sys.executable, '-m', 'torch.distributed.run', '--nnodes', str(nnodes), '--nproc_per_node', str(nproc),
            '--max-restarts', str(max_restarts), '--rdzv-backend', 'c10d', '--rdzv-id', 'faults',
            '--rdzv-endpoint', endpoint or f'127.0.0.1:{free_port()}', '--monitor-interval', '0.5', *args]


def children(pid):
    """Live child processes of pid (from /proc: no psutil needed)."""
    found = []
    for entry in os.listdir('/proc'):
        if not entry.isdigit():
            continue
        try:
            with open(f'/proc/{entry}/stat') as f:
                fields = f.read().rsplit(')', 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != 'Z':
            found.append(int(entry))
    return found


def kill(pid):
    try:
        os.kill(pid, signal.SIGKILL)
        return True
    except ProcessLookupError:
        return False


@pytest.fixture(scope='module')
def config_path(tmp_path_factory):
    data = make_image_folder(tmp_path_factory.mktemp('images'))
    return tiny_yaml(tmp_path_factory.mktemp('cfg') / 'tiny.yaml', data, extra=RECIPE, num_workers=1)


# -----------------------------------------------------------------------------
# Forming the group
# -----------------------------------------------------------------------------
def run_probe(scenario, peer_timeout, max_restarts):
    return subprocess.run(c10d_torchrun(2, PROBE, scenario, str(peer_timeout), max_restarts=max_restarts),
                          cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=600)


def test_restarted_round_forms_despite_the_previous_rounds_store_keys():
    result = run_probe('restart', 60, max_restarts=1)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    for rank in (0, 1):
        match = re.search(rf"round 1 rank {rank} formed in \S+ \((\d+) keys in the store before\)", out)
        assert match, out
        assert int(match.group(1)) > 0, out  # the agent's store still held round 0's keys
    assert 'connectFullMesh' not in out


def test_a_round_that_cannot_form_fails_within_peer_timeout():
    result = run_probe('absent', 4, max_restarts=0)
    out = result.stdout + result.stderr
    assert result.returncode != 0
    match = re.search(r"round 0 rank 1 error after ([0-9.]+)s: rank 1: the process group did not form within "
                      r"DIST.PEER_TIMEOUT 4s: rank 0 never published the round", out)
    assert match, out
    assert 4 <= float(match.group(1)) < 4 + 30, out  # generous slack: the machine may be loaded


# -----------------------------------------------------------------------------
# A DataLoader worker killed (OOM killer): the pass goes on at the same batch
# -----------------------------------------------------------------------------
class DyingWorkerDataset(Dataset):
    """Sample i is tensor(i); the worker process that first loads sample ``fatal`` SIGKILLs itself."""

    def __init__(self, size, fatal, marker):
        self.size, self.fatal, self.marker = size, fatal, str(marker)

    def __len__(self):
        return self.size

    def __getitem__(self, key):
        index = key[0] if isinstance(key, tuple) else key  # train samplers yield (index, augmentation seed)
        if index == self.fatal and not os.path.exists(self.marker):
            open(self.marker, 'w').close()
            os.kill(os.getpid(), signal.SIGKILL)
        return torch.tensor(index)


def one_pass(loader):
    return [int(i) for batch in survive_worker_deaths(loader, lambda: DataLoader.__iter__(loader)) for i in batch]


@pytest.mark.parametrize('persistent', [True, False])
def test_a_killed_loader_worker_costs_a_restart_of_the_workers_not_the_pass(tmp_path, caplog, persistent):
    sampler = DistributedEpochSampler(40, rank=0, world_size=1, seed=5)
    sampler.set_epoch(3, start_index=8)  # a pass that itself resumes mid-epoch
    expected = [index for index, _ in sampler][:32 // 4 * 4]
    fatal = expected[13]
    loader = DataLoader(DyingWorkerDataset(40, fatal, tmp_path / 'died'), sampler=sampler, batch_size=4,
                        num_workers=2, persistent_workers=persistent, drop_last=True)
    assert one_pass(loader) == expected
    assert (tmp_path / 'died').exists()
    assert "restarting the loader's workers, the pass goes on at batch" in caplog.text
    sampler.set_epoch(4)  # the loader keeps working for the next epoch
    assert one_pass(loader) == [index for index, _ in sampler]


def test_a_persistent_worker_killed_between_epochs_is_replaced_when_the_next_pass_starts(tmp_path, caplog):
    sampler = DistributedEpochSampler(24, rank=0, world_size=1, seed=5)
    loader = DataLoader(DyingWorkerDataset(24, -1, tmp_path / 'unused'), sampler=sampler, batch_size=4,
                        num_workers=2, persistent_workers=True, drop_last=True)
    one_pass(loader)
    victim = loader._iterator._workers[0]
    os.kill(victim.pid, signal.SIGKILL)  # idle between epochs: noticed when the next pass asks it to reset
    victim.join()
    sampler.set_epoch(1)
    assert one_pass(loader) == [index for index, _ in sampler]
    assert f"DataLoader worker (pid {victim.pid}) died" in caplog.text


def test_a_killed_worker_of_a_loader_without_start_positions_is_replayed(tmp_path):
    loader = DataLoader(DyingWorkerDataset(30, 17, tmp_path / 'died'), batch_size=4, num_workers=2)
    assert one_pass(loader) == list(range(30))  # each sample exactly once, in order
    assert (tmp_path / 'died').exists()


# -----------------------------------------------------------------------------
# Random SIGKILLs: restarts resume exactly
# -----------------------------------------------------------------------------
@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory, config_path):
    output = tmp_path_factory.mktemp('uninterrupted')
    result = subprocess.run(c10d_torchrun(2, MAIN, '--cfg', config_path, '--output', str(output)), cwd=ROOT,
                            env=child_env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    return output / 'tiny' / 'default'


def _live_ranks(agent, dead, deadline):
    """The two rank processes of the current round (after a rank's kill, those torchrun restarted)."""
    while time.time() < deadline and agent.poll() is None:
        ranks = [pid for pid in children(agent.pid) if pid not in dead]
        if len(ranks) == 2:
            return ranks
        time.sleep(0.1)
    return []


def test_random_sigkills_of_ranks_and_loader_workers_resume_exactly(tmp_path, config_path, uninterrupted):
    seed = int.from_bytes(os.urandom(4), 'little')
    rng = random.Random(seed)
    output = tmp_path / 'out'
    log = open(tmp_path / 'torchrun.log', 'w')
    agent = subprocess.Popen(c10d_torchrun(2, MAIN, '--cfg', config_path, '--output', str(output), max_restarts=3),
                             cwd=ROOT, env=child_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    kills, dead = [], set()
    try:
        # a rank, then a DataLoader worker, then either: each at a random moment of a fresh round's training
        for target in ('rank', 'loader worker', rng.choice(('rank', 'loader worker'))):
            ranks = _live_ranks(agent, dead, time.time() + 300)
            if not ranks:
                break
            # loader workers exist once the round trains (a random moment of start-up would often be the import)
            wait_for(lambda ranks=ranks: agent.poll() is not None or any(children(r) for r in ranks), 300,
                     'DataLoader workers')
            time.sleep(rng.uniform(0.0, 2.0))
            deadline = time.time() + 10  # workers of one pass end between passes: take the next pass's
            while agent.poll() is None and time.time() < deadline:
                victims = [w for r in ranks for w in children(r)] if target == 'loader worker' else ranks
                if victims and kill(rng.choice(victims)):
                    kills.append(target)
                    if target == 'rank':  # torchrun ends the round's other rank and starts two new ones
                        dead.update(ranks)
                    break
                time.sleep(0.05)
        returncode = agent.wait(timeout=900)
    finally:
        if agent.poll() is None:
            os.killpg(agent.pid, signal.SIGKILL)
        log.close()
    out = read(tmp_path / 'torchrun.log')
    context = f"seed {seed}, kills {kills}\n{out[-6000:]}"
    assert returncode == 0, context
    assert len(kills) >= 2 and 'loader worker' in kills, context
    assert out.count('failed (exitcode') >= 1, context  # torchrun saw the deaths and restarted
    run_dir = output / 'tiny' / 'default'
    assert_same_weights(load_weights(run_dir / 'last.pth'), load_weights(uninterrupted / 'last.pth'))


# -----------------------------------------------------------------------------
# A vanished node: the survivor names it and exits within a bound
# -----------------------------------------------------------------------------
PEER_TIMEOUT = 10


def _listening(port):
    with socket.socket() as s:
        return s.connect_ex(('127.0.0.1', port)) == 0


@pytest.mark.parametrize('lost', [1, 0])
def test_survivor_names_a_vanished_node_and_exits_in_bounded_time(tmp_path, config_path, lost):
    """Agents start one after the other (torchrun ranks nodes by agent pid): agent ``lost`` and its worker,
    rank ``lost``, are SIGKILLed. Node 0 also hosts both stores (rendezvous backend, the workers' store)."""
    output = tmp_path / 'out'
    run_dir = output / 'tiny' / 'default'
    port = free_port()
    logs = [open(tmp_path / f'agent{i}.log', 'w') for i in range(2)]
    command = c10d_torchrun(1, MAIN, '--cfg', config_path, '--output', str(output), '--opts', 'TRAIN.EPOCHS', '50',
                            'DIST.PEER_TIMEOUT', str(PEER_TIMEOUT), nnodes=2, endpoint=f'127.0.0.1:{port}')
    agents = []
    try:
        for log in logs:
            agents.append(subprocess.Popen(command, cwd=ROOT, env=child_env(), stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True))
            wait_for(lambda: _listening(port), 300, 'the rendezvous store')
        wait_for(lambda: all((run_dir / f'log_rank{r}.txt').exists() and 'Train: [1/50]' in
                             read(run_dir / f'log_rank{r}.txt') for r in (0, 1)), 600, 'both ranks training')
        worker = children(agents[lost].pid)[0]
        victim_rank = next(r for r in (0, 1) if f"(pid {worker})" in read(run_dir / f'log_rank{r}.txt'))
        kill(agents[lost].pid)  # the agent, then its worker and the worker's loader processes (their own session)
        os.killpg(worker, signal.SIGKILL)
        killed_at = time.monotonic()
        returncode = agents[1 - lost].wait(timeout=600)
        elapsed = time.monotonic() - killed_at
    finally:
        for a in agents:
            if a.poll() is None:
                os.killpg(a.pid, signal.SIGKILL)
        for log in logs:
            log.close()
    out = read(logs[1 - lost].name)
    survivor = 1 - victim_rank
    # rank 0's node also holds the store the workers share (torchrun's agent of rank 0 hosts it)
    named = (rf"rank 1 \(host \S+, pid {worker}\) vanished" if victim_rank == 1 else
             rf"(rank 0 \(host \S+, pid {worker}\) vanished|the rendezvous store at \S+ \(on rank 0's node\))")
    assert returncode != 0, out[-4000:]
    assert re.search(rf"error \(rank {survivor}\): {named}", out), out[-4000:]
    # the bound: DIST.PEER_TIMEOUT plus slack for torchrun's own shutdown on a loaded machine (not 30 minutes)
    assert elapsed < PEER_TIMEOUT + 120, (elapsed, out[-4000:])


def test_a_frozen_rank_is_named_while_the_others_wait_in_a_collective(tmp_path, config_path):
    """SIGSTOP keeps rank 1's sockets open: rank 0 blocks in a collective that would wait DIST.TIMEOUT (30 min);
    its heartbeat watch ends it after DIST.PEER_TIMEOUT with one line instead."""
    output = tmp_path / 'out'
    run_dir = output / 'tiny' / 'default'
    agent = subprocess.Popen(c10d_torchrun(2, MAIN, '--cfg', config_path, '--output', str(output), '--opts',
                                           'TRAIN.EPOCHS', '50', 'DIST.PEER_TIMEOUT', str(PEER_TIMEOUT)),
                             cwd=ROOT, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    rank1_pid = None
    try:
        rank1_log, rank0_log = run_dir / 'log_rank1.txt', run_dir / 'log_rank0.txt'
        wait_for(lambda: rank1_log.exists() and 'Train: [1/50]' in read(rank1_log), 600, 'both ranks training')
        rank1_pid = int(re.search(r"rank 1/2 \(pid (\d+)\)", read(rank1_log)).group(1))
        os.kill(rank1_pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        wait_for(lambda: 'vanished' in read(rank0_log), PEER_TIMEOUT + 120, 'the verdict of rank 0')
        elapsed = time.monotonic() - stopped_at
    finally:
        if rank1_pid is not None:
            kill(rank1_pid)
        agent.wait(timeout=600)
    line = [text for text in read(rank0_log).splitlines() if 'vanished' in text][0]
    assert re.search(rf"error \(rank 0\): rank 1 \(host \S+, pid {rank1_pid}\) vanished: no heartbeat for "
                     rf"\d+s; exiting", line), line
    # the silence is measured from the last beat seen before the stop (beats are 1 s apart, later on a busy host)
    assert PEER_TIMEOUT / 2 <= elapsed < PEER_TIMEOUT + 60, elapsed
    assert agent.returncode != 0
