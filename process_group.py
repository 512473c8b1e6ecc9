"""Forming the process group so that torchrun restarts work, and never waiting forever for a lost rank.

Why a restart used to fail: with c10d (and static) rendezvous, torchrun's agent hosts ONE TCPStore for the
whole job (``TORCHELASTIC_USE_AGENT_STORE=True``, the same ``MASTER_PORT`` in every round), and
``init_process_group('env://')`` keys it only by ``default_pg/``. A restarted round therefore finds the
previous round's keys, e.g. rank 0's old Gloo address ``default_pg/0//cpu//0/0``: a rank that reads it before
the new rank 0 overwrites it connects to a dead process ("Gloo connectFullMesh failed ... Connection
refused"), or waits on state of a round that is gone (a hang of up to the 30-minute default timeout).
``TORCHELASTIC_RESTART_COUNT`` cannot name the round: each agent counts only its own failures.

The fix: every (re)start agrees on a fresh key prefix before anything else touches the store (``_agree_on_round``),
and the process group lives under it. Forming is bounded by ``DIST.PEER_TIMEOUT`` (a round that cannot form
ends with one line, so torchrun's next round can try); collectives by ``DIST.TIMEOUT``; a ``PeerWatch`` thread
exits with one line naming a rank whose heartbeat stops, wherever the main thread is blocked.
"""
import logging
import os
import signal
import socket
import threading
import time
import uuid
from datetime import timedelta

import torch.distributed as dist

from errors import DistributedError, print_line

NAMESPACE = 'swin_train'
_POLL = 0.05  # seconds between looks at the store while ranks agree on a round


# -----------------------------------------------------------------------------
# Forming the group
# -----------------------------------------------------------------------------
def _store_address(environ):
    try:
        return environ['MASTER_ADDR'], int(environ['MASTER_PORT'])
    except (KeyError, ValueError):
        raise DistributedError("WORLD_SIZE > 1 but MASTER_ADDR / MASTER_PORT are not set: start the processes "
                               "with torchrun (or set them as torchrun does)") from None


def _uses_agent_store(environ):
    return environ.get('TORCHELASTIC_USE_AGENT_STORE') == 'True'


def connect_store(rank, world_size, timeout, environ=None, client=False):
    """A TCPStore client of the torchrun agent's store, or on rank 0 of processes started without an agent,
    the store server itself (it lives as long as the returned object). client=True: always a client."""
    environ = os.environ if environ is None else environ
    host, port = _store_address(environ)
    hosts = rank == 0 and not client and not _uses_agent_store(environ)
    try:
        return dist.TCPStore(host, port, world_size if hosts else None, is_master=hosts,
                             timeout=timedelta(seconds=timeout), wait_for_workers=False, multi_tenant=hosts)
    except (RuntimeError, ValueError) as e:
        raise DistributedError(f"rank {rank}: cannot reach the rendezvous store at {host}:{port} within "
                               f"DIST.PEER_TIMEOUT {timeout:g}s ({_first_line(e)})") from None


def _agree_on_round(store, rank, world_size, deadline):
    """A key prefix every rank of this (re)start shares and no earlier start used.

    The store may hold any keys of earlier rounds, whose processes are all gone (agents stop every worker
    before the next rendezvous). Each rank says hello with a fresh nonce; rank 0 publishes a plan (its own
    fresh round id + the hellos it read, stale or not) until every other rank has acknowledged a plan that
    carries that rank's own nonce -- which no earlier round can have carried.
    """
    mine = uuid.uuid4().hex
    store.set(f'{NAMESPACE}/ack/{rank}', '')  # before the hello: once rank 0 sees a hello, the ack key exists
    store.set(f'{NAMESPACE}/hello/{rank}', mine)
    if rank == 0:
        hello_keys = [f'{NAMESPACE}/hello/{r}' for r in range(world_size)]
        ack_keys = [f'{NAMESPACE}/ack/{r}' for r in range(1, world_size)]
        while True:
            hellos = [v.decode() for v in _multi_get(store, hello_keys, deadline)]
            store.set(f'{NAMESPACE}/plan', ' '.join([mine] + hellos))
            acks = [v.decode() for v in _multi_get(store, ack_keys, deadline)]
            missing = [r for r, ack, hello in zip(range(1, world_size), acks, hellos[1:], strict=True)
                       if ack != f'{mine}:{hello}']
            if not missing:
                return mine
            _wait_or_fail(deadline, f"ranks {_ranks_text(missing)} did not join this round")
    while True:
        plan = _get(store, f'{NAMESPACE}/plan', deadline).decode().split()
        if len(plan) == world_size + 1 and plan[1 + rank] == mine:
            store.set(f'{NAMESPACE}/ack/{rank}', f'{plan[0]}:{mine}')
            return plan[0]
        _wait_or_fail(deadline, "rank 0 of this round did not answer")


def _multi_get(store, keys, deadline):
    _limit_wait(store, deadline)
    try:
        return store.multi_get(keys)  # waits for keys that do not exist yet, up to the store's timeout
    except (RuntimeError, dist.DistError) as e:
        try:
            absent = [key.rsplit('/', 1)[1] for key in keys if not store.check([key])]
        except (RuntimeError, dist.DistError):
            raise DistributedError(f"the store stopped answering ({_first_line(e)})") from None
        raise DistributedError(f"ranks {_ranks_text(absent)} never appeared") from None


def _get(store, key, deadline):
    _limit_wait(store, deadline)
    try:
        return store.get(key)
    except (RuntimeError, dist.DistError):
        raise DistributedError("rank 0 never published the round") from None


def _limit_wait(store, deadline):
    store.set_timeout(timedelta(seconds=max(deadline - time.monotonic(), 0.1)))


def _wait_or_fail(deadline, what):
    if time.monotonic() > deadline:
        raise DistributedError(what)
    time.sleep(_POLL)


def _ranks_text(ranks):
    ranks = [str(r) for r in ranks]
    return ', '.join(ranks[:8]) + (f" and {len(ranks) - 8} more" if len(ranks) > 8 else '')


def _first_line(exc):
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def form_process_group(backend, rank, world_size, timeout, peer_timeout, device_id=None, environ=None):
    """Join this round's process group; returns the started PeerWatch.

    Forming (agreeing on the round, connecting every pair, one barrier) must finish within ``peer_timeout``
    seconds, else DistributedError with one line; collectives then time out after ``timeout`` seconds.
    """
    environ = os.environ if environ is None else environ
    deadline = time.monotonic() + peer_timeout
    store = connect_store(rank, world_size, peer_timeout, environ)
    try:
        round_id = _agree_on_round(store, rank, world_size, deadline)
    except DistributedError as e:
        raise DistributedError(f"rank {rank}: the process group did not form within DIST.PEER_TIMEOUT "
                               f"{peer_timeout:g}s: {e}{_restart_hint(environ)}") from None
    prefix = f'{NAMESPACE}/{round_id}'
    try:
        remaining = timedelta(seconds=max(deadline - time.monotonic(), 1.0))
        dist.init_process_group(backend, store=dist.PrefixStore(prefix, store), rank=rank, world_size=world_size,
                                timeout=remaining, device_id=device_id)
        dist.barrier()
    except (RuntimeError, dist.DistError) as e:
        raise DistributedError(f"rank {rank}: the process group did not form within DIST.PEER_TIMEOUT "
                               f"{peer_timeout:g}s ({_first_line(e)}){_restart_hint(environ)}") from None
    set_timeout = getattr(dist, 'set_timeout', None) or dist.distributed_c10d._set_pg_timeout
    set_timeout(timedelta(seconds=timeout))
    store.set_timeout(timedelta(seconds=timeout))
    global _watch
    _watch = PeerWatch(lambda wait=peer_timeout: dist.PrefixStore(prefix, connect_store(rank, world_size, wait, environ,
                                                                                        client=True)),
                       rank, world_size, peer_timeout, store_address='{}:{}'.format(*_store_address(environ)),
                       agent_pid=os.getppid() if 'TORCHELASTIC_RUN_ID' in environ else None)
    _watch.keep_alive = store  # a store hosted here (no agent) must live as long as this process
    _watch.start()
    return _watch


_watch = None


def peer_watch():
    """The PeerWatch of this process (None in a single process)."""
    return _watch


def leave(reason='finished'):
    """Stop this rank's heartbeat with a goodbye (before destroying the process group)."""
    if _watch is not None:
        _watch.stop(reason)


def record_failure(exc):
    """The main thread of this rank failed with exc: say goodbye, and unless exc is a failed collective (the echo
    of another rank's trouble), record it as the job's first failure for the other ranks to name."""
    if _watch is not None and _watch.is_alive():
        if threading.current_thread() is threading.main_thread():
            # torchrun's agent SIGTERMs the workers as soon as one fails; this rank is ending anyway, and its one
            # line must come out first (the agent waits 30 s before SIGKILL; explaining takes a few seconds)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _watch.record_failure(exc)


def explain_failure():
    """After record_failure: one line naming the other rank that failed first or vanished, or None (this rank's
    own failure, or nothing to tell)."""
    return _watch.explain_failure() if _watch is not None and _watch.is_alive() else None


def is_communication_error(exc):
    text = str(exc)
    return isinstance(exc, dist.DistError) or any(word in text for word in _COMMUNICATION_WORDS)


_COMMUNICATION_WORDS = ('gloo', 'Gloo', 'NCCL', 'Connection reset', 'Connection closed', 'Connection refused',
                        'Broken pipe', 'Socket Timeout')


def _restart_hint(environ):
    restarts = int(environ.get('TORCHELASTIC_MAX_RESTARTS', 0)) - int(environ.get('TORCHELASTIC_RESTART_COUNT', 0))
    return f"; torchrun will retry ({restarts} restarts left)" if restarts > 0 else ''


# -----------------------------------------------------------------------------
# Heartbeats: a rank that vanishes is named, and nobody waits for it forever
# -----------------------------------------------------------------------------
class PeerWatch(threading.Thread):
    """Heartbeat of this rank, and watch over the next rank's (a ring: every rank is watched by one other).

    Each ``interval`` the thread bumps ``beat/{rank}`` in this round's store prefix. A watched rank whose
    counter stands still for ``peer_timeout`` seconds without having said goodbye (``left/{rank}``) has
    vanished: the watcher records one line in ``vanished``; every rank's thread reads that key each beat,
    logs the line and ends its process (exit code 1), wherever its main thread is blocked. A store that stays
    unreachable for ``peer_timeout`` (the host of the torchrun agent of rank 0 is gone) ends it the same way,
    and so does the death of this worker's own torchrun agent (its workers are in their own sessions, so
    they would otherwise live on as orphans).
    """

    EXIT_CODE = 1
    FAILURE_WAIT = 5.0  # seconds the failure path waits for the store

    def __init__(self, connect, rank, world_size, peer_timeout, store_address='', agent_pid=None):
        super().__init__(name='peer-watch', daemon=True)
        self.connect = connect
        self.rank, self.world_size, self.peer_timeout = rank, world_size, peer_timeout
        self.interval = min(max(peer_timeout / 10.0, 0.1), 2.0)
        self.store_address = store_address
        self.agent_pid = agent_pid  # torchrun's agent: if it dies, this worker must not live on as an orphan
        self.logger = None  # set once logging exists: the verdict line also goes to log_rank*.txt
        self.keep_alive = None
        self._stopped = threading.Event()
        self._store = None
        self._main_store = None  # the failing main thread's own connection (_failure_store)
        self._store_gone = None  # why record_failure could not reach the store: explain_failure then says so

    # -- this rank -------------------------------------------------------------------------------
    def run(self):
        try:
            self._store = store = self.connect()
            store.set(f'info/{self.rank}', f'host {socket.gethostname()}, pid {os.getpid()}')
        except (DistributedError, RuntimeError, dist.DistError) as e:
            self._exit(f"cannot reach the rendezvous store at {self.store_address} ({_first_line(e)})")
        watched = (self.rank + 1) % self.world_size
        seen, seen_at, reachable_at = None, time.monotonic(), time.monotonic()
        while not self._stopped.wait(self.interval):
            now = time.monotonic()
            if self.agent_pid is not None and os.getppid() != self.agent_pid:
                self._exit(f"this rank's torchrun agent (pid {self.agent_pid}) is gone")
            try:
                store.add(f'beat/{self.rank}', 1)
                if store.check(['vanished']):
                    self._exit(store.get('vanished').decode())
                beat = self._beat(store, watched)
                reachable_at = now
            except (RuntimeError, dist.DistError) as e:
                if self.store_refuses():  # nothing listens there any more: its host process is gone for good
                    self._exit(self.store_gone(e))
                if now - reachable_at > self.peer_timeout:
                    self._exit(f"the rendezvous store at {self.store_address} (on rank 0's node) has been "
                               f"unreachable for {now - reachable_at:.0f}s ({_first_line(e)})")
                continue
            if beat != seen:
                seen, seen_at = beat, now
            elif now - seen_at > self.peer_timeout and not store.check([f'left/{watched}']):
                verdict = f"{self.describe(store, watched)} vanished: no heartbeat for {now - seen_at:.0f}s"
                store.compare_set('vanished', '', verdict)  # the first watcher's line wins
                self._exit(store.get('vanished').decode())

    @staticmethod
    def _beat(store, rank):
        key = f'beat/{rank}'
        return int(store.get(key)) if store.check([key]) else 0

    def describe(self, store, rank):
        key = f'info/{rank}'
        return f"rank {rank} ({store.get(key).decode()})" if store.check([key]) else f"rank {rank}"

    def store_refuses(self):
        """True when the store's host answers that nothing listens on the port (its process is dead); False
        when it accepts, or cannot be told within a second (a slow network is not a verdict)."""
        host, _, port = self.store_address.rpartition(':')
        try:
            with socket.create_connection((host, int(port)), timeout=1.0):
                return False
        except ConnectionRefusedError:
            return True
        except (OSError, ValueError):
            return False

    def store_gone(self, exc):
        return f"the rendezvous store at {self.store_address} (on rank 0's node) is gone ({_first_line(exc)})"

    def _exit(self, verdict):
        line = f"error (rank {self.rank}): {verdict}; exiting"
        if self.logger is not None:
            self.logger.error(line)
            for handler in self.logger.handlers:
                handler.flush()
        print_line(line)
        logging.shutdown()
        os._exit(self.EXIT_CODE)

    def stop(self, reason='finished'):
        """Say goodbye (so the watcher does not call this rank vanished) and stop beating."""
        self._stopped.set()
        self.join(timeout=2 * self.interval + 1)  # the thread's last store call ends first
        try:
            if self._store is not None:
                self._store.set(f'left/{self.rank}', reason)
        except (RuntimeError, dist.DistError):
            pass

    # -- after a failure of the main thread -------------------------------------------------------
    def _failure_store(self):
        """Its own connection (the heartbeat thread keeps using its one), with short waits: a store that is gone
        must not hold back the line that says so."""
        if self._main_store is None:
            if self.store_refuses():  # connecting would retry for the whole wait
                raise DistributedError("connection refused")
            wait = min(self.peer_timeout, self.FAILURE_WAIT)
            self._main_store = self.connect(wait)
            self._main_store.set_timeout(timedelta(seconds=wait))
        return self._main_store

    def record_failure(self, exc):
        try:
            store = self._failure_store()
            store.set(f'left/{self.rank}', f'failed: {type(exc).__name__}')
            if not is_communication_error(exc):
                store.compare_set('first_failure', '', f'{self.rank} {type(exc).__name__}: {_first_line(exc)}')
        except (DistributedError, RuntimeError, dist.DistError) as e:
            self._store_gone = e

    def explain_failure(self, grace=None):
        """The other rank that failed first (recorded its error), or ranks that neither beat nor said goodbye
        within ``grace`` seconds; None when neither."""
        try:
            if self._store_gone is not None:
                raise self._store_gone
            store = self._failure_store()
            first = self._first_failure(store)
            if first:
                return first
            if store.check(['vanished']):
                return store.get('vanished').decode()
            others = [r for r in range(self.world_size) if r != self.rank]
            before = {r: self._beat(store, r) for r in others}
            time.sleep(grace if grace is not None else 3 * self.interval + 0.5)
            silent = [r for r in others
                      if self._beat(store, r) == before[r] and not store.check([f'left/{r}'])]
            if silent:
                names = ', '.join(self.describe(store, r) for r in silent[:4])
                return f"{names} vanished: no heartbeat and no goodbye"
            return self._first_failure(store)
        except (DistributedError, RuntimeError, dist.DistError) as e:
            return self.store_gone(e)

    def _first_failure(self, store):
        if not store.check(['first_failure']):
            return None
        rank, what = store.get('first_failure').decode().split(' ', 1)
        if int(rank) == self.rank:
            return None
        return f"{self.describe(store, int(rank))} failed first: {what}"
