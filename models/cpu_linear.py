"""Linear layers for CPU inference: oneDNN's matmul on a weight packed once, GELU fused where it follows.

``F.linear`` on the CPU broadcasts the bias into the output (one pass over it) and then runs MKL's sgemm; an
``nn.GELU`` after it is another pass. oneDNN's matmul adds the bias and applies GELU inside the product, and
reads a weight reordered once into its blocked layout. Whole models infer 1.11-1.21x faster in fp32 and the
logits move by about 3e-6 relative, 7x the plain path's difference from the official code
(``scripts/benchmark.py --columns ours,ours-plain``, docs/PERFORMANCE.md). It is what PyTorch's own compiler
emits for frozen CPU graphs; here it runs in eager mode.

Where it is on (the policy, stated here only): OFF by default, everywhere. Training, validation during training,
``main.py --eval`` and any code that imports the models get ``F.linear``, the path whose accuracy is the official
code's: a 3e-6 change flips predictions whose top-2 margin is that thin, so an evaluation could differ from the
official figures by an image. It is switched on with ``enabled()`` in exactly two places, where speed matters and
such a change is immaterial: ``scripts/predict.py`` (predictions for image files on a CPU, its ``predict``) and
``main.py --throughput`` (the forward-pass benchmark, ``run_throughput``). ``disabled()`` forces the plain path
inside a block (the 'ours-plain' column of scripts/benchmark.py). The switch is one per process, not per thread.

Even where it is switched on it is used only where nothing can notice: no autograd (``torch.no_grad`` /
``torch.inference_mode``), plain CPU float32 tensors outside CPU autocast, and no tracing, compiling or exporting
(those see ``F.linear``, which they know). Packed weights are cached per parameter, held weakly, and packed again
when the parameter changes (its version counter or storage) and whenever the layer switches between train and
eval mode. On processors other than x86-64 and where this PyTorch build has no oneDNN (``available()`` is False)
``F.linear`` runs as before.
"""
import contextlib
import platform

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

_packed = WeakIdKeyDictionary()  # weight parameter -> ((version, data pointer), packed weight)
# measured on x86-64 only (AMD EPYC, AVX-512); ARM builds keep their own BLAS path
_available = (platform.machine().lower() in ('x86_64', 'amd64') and torch.backends.mkldnn.is_available()
              and hasattr(torch.ops.mkldnn, '_linear_pointwise'))
_enabled = False  # True only inside enabled(): see the policy above


def available():
    """Whether this machine and PyTorch build can take the oneDNN path (False too once the op rejected a call)."""
    return _available


def packable(x, weight):
    """Whether ``linear`` takes the oneDNN path for input ``x`` and ``weight`` (only inside ``enabled()``)."""
    return (_enabled and _available and not torch.is_grad_enabled() and type(x) is torch.Tensor
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
    global _available
    if packable(x, weight):
        try:
            return torch.ops.mkldnn._linear_pointwise(x, _packed_weight(weight), bias, 'gelu' if gelu else 'none',
                                                      [], 'none' if gelu else '')
        except RuntimeError:  # an op this build of PyTorch lacks or rejects: the plain path from now on
            _available = False
    x = F.linear(x, weight, bias)
    return F.gelu(x) if gelu else x


@contextlib.contextmanager
def _switched(on):
    global _enabled
    before, _enabled = _enabled, on
    try:
        yield
    finally:
        _enabled = before


def enabled():
    """The oneDNN path inside the block, where ``packable``: for ``scripts/predict.py`` and ``main.py
    --throughput`` only (the policy: the module's docstring)."""
    return _switched(True)


def disabled():
    """``F.linear`` everywhere inside the block, also inside ``enabled()``: the plain path, to compare against
    (benchmarks, tests)."""
    return _switched(False)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, keys and init) whose CPU inference goes through ``linear``."""

    def forward(self, x):
        return linear(x, self.weight, self.bias)

    def train(self, mode=True):
        # Fused optimizers update weights without bumping their version counters; training loops switch
        # modes around every update, so a switch drops the packed copy.
        _packed.pop(self.weight, None)
        return super().train(mode)
