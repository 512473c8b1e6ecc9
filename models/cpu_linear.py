"""Linear layers for CPU inference: oneDNN's matmul on a weight packed once, GELU fused where it follows.

``F.linear`` on the CPU broadcasts the bias into the output (one pass over it) and then runs MKL's sgemm; an
``nn.GELU`` after it is another pass. oneDNN's matmul adds the bias and applies GELU inside the product, and
reads a weight reordered once into its blocked layout. Whole models infer 1.11-1.21x faster in fp32 and the
logits move by about 1e-6 (``scripts/benchmark.py --columns ours,ours-plain``, docs/PERFORMANCE.md). It is
what PyTorch's own compiler emits for frozen CPU graphs; here it runs in eager mode.

It is used only where nothing can notice: no autograd (``torch.no_grad`` / ``torch.inference_mode``), plain
CPU float32 tensors outside CPU autocast, and no tracing, compiling or exporting (those see ``F.linear``, which
they know). Packed weights are cached per parameter, held weakly, and packed again when the parameter changes
(its version counter or storage) and whenever the layer switches between train and eval mode. Anywhere else,
on processors other than x86-64 and where this PyTorch build has no oneDNN, ``F.linear`` runs as before.
"""
import contextlib
import platform

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

_packed = WeakIdKeyDictionary()  # weight parameter -> ((version, data pointer), packed weight)
# measured on x86-64 only (AMD EPYC, AVX-512); ARM builds keep their own BLAS path
_enabled = (platform.machine().lower() in ('x86_64', 'amd64') and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, '_linear_pointwise'))


def packable(x, weight):
    """Whether ``linear`` may take the oneDNN path for input ``x`` and ``weight``."""
    return (_enabled and not torch.is_grad_enabled() and type(x) is torch.Tensor
            and x.dtype == torch.float32 and x.device.type == 'cpu' and weight.dtype == torch.float32
            and weight.device.type == 'cpu' and not torch.is_autocast_enabled('cpu') and not _graph_capture())


def _graph_capture():
    return torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export()


def _packed_weight(weight):
    key = (weight._version, weight.data_ptr())
    entry = _packed.get(weight)
    if entry is None or entry[0] != key:
        entry = (key, torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None))
        _packed[weight] = entry
    return entry[1]


def linear(x, weight, bias=None, gelu=False):
    """``F.linear(x, weight, bias)``, followed by exact GELU when ``gelu``; through oneDNN where ``packable``."""
    global _enabled
    if packable(x, weight):
        try:
            return torch.ops.mkldnn._linear_pointwise(x, _packed_weight(weight), bias, 'gelu' if gelu else 'none',
                                                      [], 'none' if gelu else '')
        except RuntimeError:  # an op this build of PyTorch lacks or rejects: the plain path from now on
            _enabled = False
    x = F.linear(x, weight, bias)
    return F.gelu(x) if gelu else x


@contextlib.contextmanager
def disabled():
    """``F.linear`` everywhere inside the block: the plain path, to compare against (benchmarks, tests)."""
    global _enabled
    enabled, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = enabled


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, keys and init) whose CPU inference goes through ``linear``."""

    def forward(self, x):
        return linear(x, self.weight, self.bias)

    def train(self, mode=True):
        # Fused optimizers update weights without bumping their version counters; training loops switch
        # modes around every update, so a switch drops the packed copy.
        _packed.pop(self.weight, None)
        return super().train(mode)
