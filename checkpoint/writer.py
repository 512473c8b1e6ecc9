"""Checkpoint files written in the background: training waits only for a CPU copy of the state.

One file is in flight at a time (a new save first waits for the previous one, so files appear in order and
retention never races a write). A failed write (disk full, read-only file system, permission) leaves every
earlier checkpoint intact -- files are replaced atomically -- and becomes one CheckpointError line, which the
training loop turns into a stop or a logged warning (SAVE_FAILURE).
"""
import errno
import os
import threading
import time

import torch

from errors import CheckpointError


def cpu_snapshot(obj, buffers=None, where=()):
    """A copy of obj in which every tensor is a CPU tensor of its own: later optimizer steps cannot change it.

    buffers (a dict, kept by the caller between saves) holds the CPU tensors of the previous snapshot, reused
    when shape and dtype still match: copying into memory already touched costs a fraction of fresh pages.
    CUDA tensors are copied into pinned buffers without blocking; the caller synchronizes once.
    """
    if isinstance(obj, torch.Tensor):
        source = obj.detach()
        buffer = buffers.get(where) if buffers is not None else None
        if buffer is None or buffer.shape != source.shape or buffer.dtype != source.dtype:
            buffer = torch.empty(source.shape, dtype=source.dtype, pin_memory=source.is_cuda)
            if buffers is not None:
                buffers[where] = buffer
        return buffer.copy_(source, non_blocking=source.is_cuda)
    if isinstance(obj, dict):
        return type(obj)((key, cpu_snapshot(value, buffers, where + (key,))) for key, value in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_snapshot(value, buffers, where + (i,)) for i, value in enumerate(obj))
    return obj


def describe_failure(exc, path):
    """One line for a failed save. torch.save reports a full disk as a RuntimeError of its zip writer
    ("unexpected pos ...") raised while handling the OSError: the OSError in the chain is what counts."""
    cause = exc
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__ or cause.__context__
    if cause is None:
        text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''
        return f"saving checkpoint {path} failed: {type(exc).__name__}: {text}; earlier checkpoints are intact"
    return describe_os_error(cause, path)


def describe_os_error(exc, path):
    """One line for a failed save: what went wrong, in words a user can act on."""
    causes = {errno.ENOSPC: 'the disk is full', errno.EDQUOT: 'the disk quota is exceeded',
              errno.EROFS: 'the file system is read-only', errno.EACCES: 'permission denied',
              errno.EPERM: 'operation not permitted', errno.EIO: 'an I/O error'}
    cause = causes.get(exc.errno, exc.strerror or type(exc).__name__)
    code = errno.errorcode.get(exc.errno, exc.errno)
    where = f": {exc.filename}" if exc.filename and os.fspath(exc.filename) != os.fspath(path) else ''
    return f"saving checkpoint {path} failed: {cause} ({code}{where}); earlier checkpoints are intact"


class CheckpointWriter:
    """Runs ``write(state)`` (rank 0's file writing) on a background thread, one at a time.

    ``submit`` blocks only for ``cpu_snapshot`` (and for a previous write still in flight); ``wait`` joins
    the write in flight; ``failure()`` is the CheckpointError of the last finished write, once.
    """

    def __init__(self, background=True):
        self.background = background
        self._thread = None
        self._failure = None
        self._buffers = {}  # the previous snapshot's tensors, reused by the next one
        self.last_stall = 0.0  # seconds the caller was blocked by the last submit (measured for the log)

    def submit(self, write, state, path_hint=''):
        start = time.perf_counter()
        self.wait()
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # the copy is memory-bound: more OpenMP threads gain little, and stall on a busy host
        try:
            snapshot = cpu_snapshot(state, self._buffers)
        finally:
            torch.set_num_threads(threads)
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()  # the non-blocking copies into pinned memory are complete
        if self.background:
            self._thread = threading.Thread(target=self._run, args=(write, snapshot, path_hint),
                                            name='checkpoint-writer', daemon=True)
            self._thread.start()
        else:
            self._run(write, snapshot, path_hint)
        self.last_stall = time.perf_counter() - start

    def _run(self, write, snapshot, path_hint):
        try:
            write(snapshot)
        except CheckpointError as e:
            self._failure = e
        except Exception as e:  # noqa: BLE001 -- any failure becomes one line for the training thread
            self._failure = CheckpointError(describe_failure(e, path_hint))

    def wait(self):
        """Block until the write in flight (if any) is on disk or failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    @property
    def busy(self):
        return self._thread is not None and self._thread.is_alive()

    def failure(self):
        """The CheckpointError of a finished write (reported once), or None."""
        if self.busy:
            return None
        failure, self._failure = self._failure, None
        return failure
