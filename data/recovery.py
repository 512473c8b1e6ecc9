"""A DataLoader worker that dies (the OOM killer, a SIGKILL) costs a restart of the workers, not the run.

The pass continues at the batch it was on: train samplers are re-positioned with ``set_epoch(epoch,
start_index)`` (each sample's augmentation is seeded by (SEED, epoch, index), so the batches are the ones the
dead worker would have made); samplers without a start position are replayed and the batches already
delivered dropped. Deaths are detected where the batch is fetched: torch's SIGCHLD handler, which raises
the same error asynchronously wherever the main thread happens to be (mid-step, mid-optimizer update), is
switched off.
"""
import logging
import signal
import threading
import time

_logger = logging.getLogger('swin.data')
MAX_RESTARTS_PER_PASS = 3


def dead_workers(iterator):
    """Pids of the iterator's worker processes that have ended. A death shows up as torch's "DataLoader worker
    ... exited unexpectedly", or as a ConnectionResetError/EOFError when a batch the dead worker had already
    queued is unpickled (its tensors are file descriptors that process was to hand over)."""
    return [w.pid for w in getattr(iterator, '_workers', ()) if not w.is_alive()]


def _await_dead_workers(iterator, patience=2.0):
    """dead_workers, allowing a worker that is being killed right now (its socket already reset) to finish dying."""
    deadline = time.monotonic() + patience
    while True:
        dead = dead_workers(iterator)
        if dead or time.monotonic() > deadline:
            return dead
        time.sleep(0.05)


def _quiet_sigchld():
    # torch installs its handler when the first worker iterator starts (once per process); without it a dead
    # worker is noticed by the fetch that waits for its batch (within ~5 s), where it can be recovered
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)


def _discard(loader, iterator):
    """Stop the surviving workers of a broken iterator; a persistent loader then starts fresh ones."""
    shutdown = getattr(iterator, '_shutdown_workers', None)
    if shutdown is not None:
        shutdown()
    if getattr(loader, '_iterator', None) is iterator:
        loader._iterator = None  # persistent_workers: DataLoader.__iter__ would otherwise reuse it


def survive_worker_deaths(loader, start_pass, max_restarts=MAX_RESTARTS_PER_PASS):
    """The batches of one pass of ``loader``; ``start_pass()`` returns a fresh torch iterator of it. A death may
    also surface while a pass starts (persistent workers are asked to reset), which is recovered the same way."""
    sampler = loader.sampler
    first = getattr(sampler, 'start_index', None)  # EpochSampler: where this pass started in the epoch
    iterator, delivered, skip, restarts = None, 0, 0, 0
    while True:
        try:
            if iterator is None:
                iterator = start_pass()
                _quiet_sigchld()
                for _ in range(skip):
                    next(iterator)
            batch = next(iterator)
        except StopIteration:
            return
        except Exception as e:  # noqa: BLE001 -- which error a death causes depends on timing, see dead_workers
            broken = iterator if iterator is not None else getattr(loader, '_iterator', None)
            dead = _await_dead_workers(broken)
            if not dead or restarts >= max_restarts:
                raise
            restarts += 1
            _logger.warning(f"DataLoader worker (pid {', '.join(map(str, dead))}) died ({type(e).__name__}): "
                            f"restarting the loader's workers, the pass goes on at batch {delivered} "
                            f"({restarts}/{max_restarts} restarts of this pass)")
            _discard(loader, broken)
            iterator, skip = None, delivered
            if first is not None:
                sampler.set_epoch(sampler.epoch, start_index=first + delivered * loader.batch_size)
                skip = 0
            continue
        delivered += 1
        yield batch
