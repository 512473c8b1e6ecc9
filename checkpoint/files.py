"""Files that survive a crash at any moment, and the ways checkpoints are read: ``load_file`` (torch's format,
``weights_only``) and ``load_safetensors`` (the safetensors format, weights only by construction).

The atomic-save rule: write a hidden temp file next to the target, fsync it, rename it onto the target, fsync
the folder. A reader then sees either the old file or the complete new one, never a half-written one. Temp
names never end in ``.pth``, so a stray one (a killed save) is never taken for a checkpoint;
``is_temp_name`` recognizes them for the resume scan, which removes them.
"""
from __future__ import annotations

import os
import pickle
import re
import shutil
import threading
import uuid
import zipfile
from collections.abc import Callable
from typing import Any

import torch

from errors import CheckpointError

_TEMP_NAME = re.compile(r'^\..+\.\d+\.[0-9a-f]{8}\.tmp$')


def temp_path(path: str | os.PathLike) -> str:
    """A hidden, unique name next to path: ``.{name}.{pid}.{8 hex}.tmp``."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f'.{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp')


def is_temp_name(name: str) -> bool:
    """Whether a file name is one temp_path makes (left behind by an interrupted save)."""
    return bool(_TEMP_NAME.match(name))


def _fsync_dir(folder):
    # the rename itself lives in the directory entry: without this a power loss can undo it
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # platforms without directory file descriptors
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_renames = threading.Lock()  # a rename and freeze_saves() never interleave
_frozen = False


def freeze_saves() -> None:
    """From now on no file is replaced (a rename under way finishes first): what the folder holds when this
    returns is what a rerun finds. For an exit at once, which can then say truthfully which checkpoint is kept."""
    global _frozen
    with _renames:
        _frozen = True


def replace_atomically(write: Callable[[str], None], path: str | os.PathLike) -> None:
    """Call write(temp_path), fsync, then rename onto path: path is either the old or the complete new file."""
    temp = temp_path(path)
    try:
        write(temp)
        with open(temp, 'rb') as f:  # hard links and copies need their own flush to disk
            os.fsync(f.fileno())
        with _renames:
            if _frozen:
                raise CheckpointError(f"{path} not written: the run is stopping at once")
            os.replace(temp, path)
    finally:
        if os.path.lexists(temp):  # a failed write, or a rename onto a link of the same file (a no-op)
            os.remove(temp)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def write_text_atomically(path: str | os.PathLike, text: str) -> str | os.PathLike:
    def write(temp):
        with open(temp, 'x') as f:
            f.write(text)

    replace_atomically(write, path)
    return path


def atomic_save(obj: Any, path: str | os.PathLike) -> str | os.PathLike:
    """torch.save obj to path so that a crash at any moment leaves either the old file or the whole new one."""
    def write(temp):
        with open(temp, 'xb') as f:
            try:
                torch.save(obj, f)
            except RuntimeError as e:
                # Ctrl-C mid-write: torch's zip writer, closing, replaces the KeyboardInterrupt with an 'unexpected
                # pos' RuntimeError; give the interrupt back (the temp file is removed, the old file stays)
                if isinstance(e.__context__, KeyboardInterrupt):
                    raise KeyboardInterrupt from None
                raise

    replace_atomically(write, path)
    return path


def save_safetensors(state_dict: dict[str, torch.Tensor], path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> str | os.PathLike:
    """Write tensors (and string metadata) as a .safetensors file, atomically: no pickle, loadable anywhere."""
    from safetensors.torch import save

    # safetensors refuses views into shared or non-contiguous storage: hand it plain contiguous tensors
    data = save({key: value.contiguous() for key, value in state_dict.items()}, metadata)

    def write(temp):
        with open(temp, 'xb') as f:
            f.write(data)

    replace_atomically(write, path)
    return path


def load_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors on the CPU, string metadata) of a .safetensors file; any failure is a one-line CheckpointError."""
    from safetensors import SafetensorError, safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with safe_open(path, framework='pt', device='cpu') as f:
            return {key: f.get_tensor(key) for key in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} is not a readable safetensors file ({first_line(e)})") from None


def is_safetensors(path: str | os.PathLike) -> bool:
    return os.fspath(path).lower().endswith('.safetensors')


def link_atomically(source: str, path: str) -> None:
    """path becomes the same file as source (a hard link, or a copy where links are not supported)."""
    def write(temp):
        try:
            os.link(source, temp)
        except OSError:
            shutil.copyfile(source, temp)

    replace_atomically(write, path)


def load_file(path: str | os.PathLike, mmap: bool = False) -> Any:
    """torch.load(path, map_location='cpu', weights_only=True); any failure is a one-line CheckpointError.

    mmap=True maps the tensors instead of reading them (cheap when only the metadata is needed).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    if mmap and not zipfile.is_zipfile(path):
        mmap = False  # legacy (pre-zip) files cannot be mapped; truncated ones fail below either way
    try:
        return torch.load(path, map_location='cpu', weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        refused, detail = _weights_only_refusal(str(e))
        if refused:
            raise CheckpointError(f"checkpoint {path} holds pickled objects other than tensors and built-in types, "
                                  f"refused for safety (weights_only): {detail}") from None
        raise CheckpointError(f"checkpoint {path} is corrupt or not a checkpoint ({detail})") from None
    except Exception as e:  # noqa: BLE001 -- torch reports truncation as RuntimeError, empty files as EOFError, ...
        raise CheckpointError(f"checkpoint {path} is truncated, corrupt or not a checkpoint "
                              f"({type(e).__name__}: {first_line(e)})") from None


def _weights_only_refusal(message):
    """(True, the refused class/function) when weights_only met a pickled object; (False, detail) for bytes that
    are not a pickle at all (an image, a text file, ...)."""
    detail = message.split('WeightsUnpickler error:', 1)[-1].split('Check the documentation')[0].strip()
    detail = detail.splitlines()[0] if detail else 'unreadable pickle data'
    if 'WeightsUnpickler error:' not in message or detail.startswith('Unsupported operand'):
        return False, detail[:200]
    return True, detail.split(' was not an allowed global')[0]


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (at most 200 characters), for one-line errors."""
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else 'no details'
