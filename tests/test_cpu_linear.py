"""CPU inference through oneDNN (models/cpu_linear.py): where it runs, what it must equal, when it repacks."""
import copy
import gc

import pytest
import torch
import torch.nn.functional as F

from models import SwinMLP, SwinTransformer, SwinTransformerV2, cpu_linear
from models.swin_transformer import Mlp

pytestmark = [pytest.mark.usefixtures('one_thread'),
              pytest.mark.skipif(not cpu_linear._enabled, reason='this PyTorch build has no oneDNN linear')]

TINY = dict(img_size=32, patch_size=2, window_size=4, embed_dim=24, depths=[2, 2], num_heads=[3, 6], num_classes=5)
FAMILIES = {'swin': SwinTransformer, 'swinv2': SwinTransformerV2, 'swin_mlp': SwinMLP}
ONEDNN_OP = 'mkldnn::_linear_pointwise'


def make(family, seed=0):
    torch.manual_seed(seed)
    model = FAMILIES[family](**TINY).eval()
    with torch.no_grad():  # away from the init (zero biases, zero V2 post-norms) so every term counts
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def onednn_calls(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = fn()
    return out, sum(e.count for e in prof.key_averages() if e.key == ONEDNN_OP)


def plain(fn):
    """fn() with the oneDNN path switched off: F.linear and nn.GELU, as before this module existed."""
    with cpu_linear.disabled():
        out, calls = onednn_calls(fn)
    assert calls == 0
    return out


@pytest.mark.parametrize('family', list(FAMILIES))
def test_inference_runs_through_onednn_and_equals_the_plain_path(family):
    model, x = make(family), torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        fast, calls = onednn_calls(lambda: model(x))
        reference = plain(lambda: model(x))
    linears = [m for m in model.modules() if isinstance(m, cpu_linear.Linear)]
    assert calls == len(linears)  # one product per layer, fc1's GELU inside it
    assert all(m.weight in cpu_linear._packed for m in linears)
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-5)


def test_mlp_fuses_exact_gelu_and_keeps_other_activations():
    torch.manual_seed(0)
    x = torch.randn(2, 7, 16)
    for act in (torch.nn.GELU, lambda: torch.nn.GELU(approximate='tanh'), torch.nn.ReLU):
        mlp = Mlp(16, 40, act_layer=act).eval()
        with torch.no_grad():
            fast, calls = onednn_calls(lambda m=mlp: m(x))
            reference = plain(lambda m=mlp: m(x))
        assert calls == 2  # fc1 (with or without GELU inside) and fc2
        torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fast, mlp.fc2(mlp.act(F.linear(x, mlp.fc1.weight, mlp.fc1.bias))))


@pytest.mark.filterwarnings('ignore::torch.jit.TracerWarning', 'ignore::FutureWarning')
def test_autograd_tracing_and_other_dtypes_take_the_plain_path():
    model, x = make('swinv2'), torch.randn(2, 3, 32, 32)
    out, calls = onednn_calls(lambda: model(x))  # grad mode: training and anything that backpropagates
    assert calls == 0 and out.requires_grad
    out.sum().backward()
    assert model.layers[0].blocks[0].mlp.fc1.weight.grad is not None
    with torch.no_grad():
        _, calls = onednn_calls(lambda: torch.jit.trace(model, x, check_trace=False))
        assert calls == 0  # the traced graph (and ONNX export, which traces) holds aten::linear
        _, calls = onednn_calls(lambda: copy.deepcopy(model).double()(x.double()))
        assert calls == 0
        with torch.autocast('cpu', dtype=torch.bfloat16):  # autocast picks the dtype: bf16 matmuls stay bf16
            out, calls = onednn_calls(lambda: model(x))
        assert calls == 0 and out.dtype == torch.bfloat16


@pytest.mark.parametrize('optimizer', ['sgd', 'fused_adamw'])
def test_changed_weights_are_packed_again(optimizer):
    """An optimizer step between two evaluations: SGD bumps the weights' version counters, fused AdamW does not
    (the train/eval switch around it drops the packed copies)."""
    model, x = make('swin'), torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        before = model(x)
    optimizer = (torch.optim.SGD(model.parameters(), lr=0.5) if optimizer == 'sgd'
                 else torch.optim.AdamW(model.parameters(), lr=0.05, fused=True))
    model.train()
    F.cross_entropy(model(x), torch.tensor([0, 1])).backward()
    optimizer.step()  # in-place updates of the same storage
    model.eval()
    with torch.inference_mode():
        after_step = model(x)
        assert not torch.allclose(after_step, before, atol=1e-3)
        torch.testing.assert_close(after_step, plain(lambda: model(x)), rtol=1e-5, atol=1e-5)

    other = make('swin', seed=1)
    model.load_state_dict(other.state_dict())  # copy_ into the same parameters
    with torch.inference_mode():
        torch.testing.assert_close(model(x), plain(lambda: other(x)), rtol=1e-5, atol=1e-5)


def test_deepcopy_after_inference_and_the_cache_dies_with_the_model():
    model = make('swinv2')
    with torch.inference_mode():
        out = model(torch.randn(1, 3, 32, 32))
    ema = copy.deepcopy(model)  # what ModelEma does after a validation pass
    with torch.inference_mode():
        torch.testing.assert_close(ema(torch.zeros(1, 3, 32, 32)), model(torch.zeros(1, 3, 32, 32)))
    packed = len(cpu_linear._packed)
    assert packed > 0 and out.shape == (1, 5)
    weights = sum(isinstance(m, cpu_linear.Linear) for m in model.modules())
    del model, ema
    gc.collect()
    assert len(cpu_linear._packed) <= packed - 2 * weights
