"""Shared test fixtures: the tiny Swin config every test builds on, and the repository root on sys.path."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from config import load_config  # noqa: E402

# img 32, patch 2, window 4, embed 24, depths 2-2: stage maps 16x16 and 8x8, both divisible by the window
TINY_OPTS = (
    'DATA.IMG_SIZE', 32,
    'DATA.BATCH_SIZE', 8,
    'DATA.NUM_WORKERS', 0,
    'MODEL.NAME', 'swin_tiny_test',
    'MODEL.NUM_CLASSES', 10,
    'MODEL.SWIN.PATCH_SIZE', 2,
    'MODEL.SWIN.WINDOW_SIZE', 4,
    'MODEL.SWIN.EMBED_DIM', 24,
    'MODEL.SWIN.DEPTHS', [2, 2],
    'MODEL.SWIN.NUM_HEADS', [3, 6],
)


def make_tiny_config(output_dir=None, *opts, environ=None):
    """A frozen tiny config; extra KEY VALUE pairs override the tiny defaults."""
    extra = list(opts)
    if output_dir is not None:
        extra += ['OUTPUT', str(output_dir)]
    return load_config(None, list(TINY_OPTS) + extra, environ=environ if environ is not None else {})


@pytest.fixture
def tiny_config(tmp_path):
    """Factory: tiny_config('KEY', value, ...) -> frozen config writing under tmp_path."""
    def factory(*opts):
        return make_tiny_config(tmp_path / 'output', *opts)
    return factory


@pytest.fixture(scope='module')
def one_thread():
    """One torch thread for a module of tiny-model tests: with two threads on a busy machine OpenMP waits
    dominate (tens of times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
