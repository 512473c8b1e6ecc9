"""CPU inference through oneDNN (models/cpu_linear.py): off by default (--eval and validation get F.linear's
logits), on inside enabled() (predict, --throughput); where it runs, what it must equal, when it repacks."""
import copy
import gc
import json
import logging
import os

import pytest
import torch
import torch.nn.functional as F

import main
from conftest import make_tiny_config
from data import build_loader
from helpers import make_image_folder
from models import SwinMLP, SwinTransformer, SwinTransformerV2, build_model, cpu_linear
from models.swin_transformer import Mlp
from run_state import Runtime
from utils import Precision

pytestmark = pytest.mark.usefixtures('one_thread')
# the tests of the oneDNN path itself; the default (plain) path is tested everywhere
needs_onednn = pytest.mark.skipif(
    not cpu_linear.available(), reason='cpu_linear.available() is False: not x86-64, or no oneDNN linear in this build')

TINY = dict(img_size=32, patch_size=2, window_size=4, embed_dim=24, depths=[2, 2], num_heads=[3, 6], num_classes=5)
FAMILIES = {'swin': SwinTransformer, 'swinv2': SwinTransformerV2, 'swin_mlp': SwinMLP}
ONEDNN_OP = 'mkldnn::_linear_pointwise'
LOGGER = logging.getLogger('test_cpu_linear')


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


def fast(fn):
    """fn() with the oneDNN path switched on, as scripts/predict.py and --throughput run; (output, oneDNN calls)."""
    with cpu_linear.enabled():
        return onednn_calls(fn)


def plain(fn):
    """fn() with the oneDNN path switched off: F.linear and nn.GELU, as before this module existed."""
    with cpu_linear.disabled():
        out, calls = onednn_calls(fn)
    assert calls == 0
    return out


def linears(model):
    return [m for m in model.modules() if isinstance(m, cpu_linear.Linear)]


def packed(model):
    """How many of the model's linear weights have a packed copy."""
    return sum(m.weight in cpu_linear._packed for m in linears(model))


@pytest.mark.parametrize('family', list(FAMILIES))
def test_by_default_inference_is_exactly_f_linear(family):
    """Anything that imports the models gets the plain path: the same bits as with the switch forced off, no
    oneDNN call, nothing packed."""
    model, x = make(family), torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        default, calls = onednn_calls(lambda: model(x))
        reference = plain(lambda: model(x))
    assert calls == 0 and packed(model) == 0
    assert torch.equal(default, reference)
    with torch.no_grad():
        assert torch.equal(model(x), reference)


def test_the_switch_nests_and_is_restored_after_an_error():
    model, x = make('swin'), torch.randn(1, 3, 32, 32)
    expected = len(linears(model)) if cpu_linear.available() else 0
    with torch.inference_mode():
        with cpu_linear.enabled():
            assert onednn_calls(lambda: model(x))[1] == expected
            with cpu_linear.disabled():
                assert onednn_calls(lambda: model(x))[1] == 0
            assert onednn_calls(lambda: model(x))[1] == expected
        with pytest.raises(KeyError), cpu_linear.enabled():
            raise KeyError('inside the block')
        assert onednn_calls(lambda: model(x))[1] == 0


@needs_onednn
@pytest.mark.parametrize('family', list(FAMILIES))
def test_inference_runs_through_onednn_and_equals_the_plain_path(family):
    model, x = make(family), torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        out, calls = fast(lambda: model(x))
        reference = plain(lambda: model(x))
    assert calls == len(linears(model))  # one product per layer, fc1's GELU inside it
    assert packed(model) == len(linears(model))
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_mlp_fuses_exact_gelu_and_keeps_other_activations():
    torch.manual_seed(0)
    x = torch.randn(2, 7, 16)
    for act in (torch.nn.GELU, lambda: torch.nn.GELU(approximate='tanh'), torch.nn.ReLU):
        mlp = Mlp(16, 40, act_layer=act).eval()
        with torch.no_grad():
            out, calls = fast(lambda m=mlp: m(x))
            reference = plain(lambda m=mlp: m(x))
        assert calls == 2  # fc1 (with or without GELU inside) and fc2
        torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out, mlp.fc2(mlp.act(F.linear(x, mlp.fc1.weight, mlp.fc1.bias))))


@needs_onednn
@pytest.mark.filterwarnings('ignore::torch.jit.TracerWarning', 'ignore::FutureWarning')
def test_autograd_tracing_and_other_dtypes_take_the_plain_path_even_when_enabled():
    model, x = make('swinv2'), torch.randn(2, 3, 32, 32)
    out, calls = fast(lambda: model(x))  # grad mode: training and anything that backpropagates
    assert calls == 0 and out.requires_grad
    out.sum().backward()
    assert model.layers[0].blocks[0].mlp.fc1.weight.grad is not None
    with torch.no_grad():
        _, calls = fast(lambda: torch.jit.trace(model, x, check_trace=False))
        assert calls == 0  # the traced graph (and ONNX export, which traces) holds aten::linear
        _, calls = fast(lambda: copy.deepcopy(model).double()(x.double()))
        assert calls == 0
        with torch.autocast('cpu', dtype=torch.bfloat16):  # autocast picks the dtype: bf16 matmuls stay bf16
            out, calls = fast(lambda: model(x))
        assert calls == 0 and out.dtype == torch.bfloat16


@needs_onednn
@pytest.mark.parametrize('optimizer', ['sgd', 'fused_adamw'])
def test_changed_weights_are_packed_again(optimizer):
    """An optimizer step between two evaluations: SGD bumps the weights' version counters, fused AdamW does not
    (the train/eval switch around it drops the packed copies)."""
    model, x = make('swin'), torch.randn(2, 3, 32, 32)
    with torch.inference_mode(), cpu_linear.enabled():
        before = model(x)
    assert packed(model) == len(linears(model))
    optimizer = (torch.optim.SGD(model.parameters(), lr=0.5) if optimizer == 'sgd'
                 else torch.optim.AdamW(model.parameters(), lr=0.05, fused=True))
    model.train()
    F.cross_entropy(model(x), torch.tensor([0, 1])).backward()
    optimizer.step()  # in-place updates of the same storage
    model.eval()
    with torch.inference_mode(), cpu_linear.enabled():
        after_step = model(x)
        assert not torch.allclose(after_step, before, atol=1e-3)
        torch.testing.assert_close(after_step, plain(lambda: model(x)), rtol=1e-5, atol=1e-5)

    other = make('swin', seed=1)
    model.load_state_dict(other.state_dict())  # copy_ into the same parameters
    with torch.inference_mode(), cpu_linear.enabled():
        torch.testing.assert_close(model(x), plain(lambda: other(x)), rtol=1e-5, atol=1e-5)


@needs_onednn
def test_deepcopy_after_inference_and_the_cache_dies_with_the_model():
    model = make('swinv2')
    with torch.inference_mode(), cpu_linear.enabled():
        out = model(torch.randn(1, 3, 32, 32))
    ema = copy.deepcopy(model)  # what ModelEma does after a packed inference
    with torch.inference_mode(), cpu_linear.enabled():
        torch.testing.assert_close(ema(torch.zeros(1, 3, 32, 32)), model(torch.zeros(1, 3, 32, 32)))
    packed = len(cpu_linear._packed)
    assert packed > 0 and out.shape == (1, 5)
    weights = sum(isinstance(m, cpu_linear.Linear) for m in model.modules())
    del model, ema
    gc.collect()
    assert len(cpu_linear._packed) <= packed - 2 * weights


# -----------------------------------------------------------------------------
# Where main.py runs models: --eval (and validation) plain, --throughput through oneDNN
# -----------------------------------------------------------------------------
def test_eval_gives_the_plain_path_logits(tmp_path):
    """main.py's --eval (run_eval: weights, validate, eval_results.json) on a real val loader: every batch's logits
    are F.linear's to the bit, and no oneDNN product runs, where the same model and input would take the oneDNN
    path inside enabled()."""
    data = make_image_folder(tmp_path / 'data', train_per_class=1, val_per_class=3)
    config = make_tiny_config(tmp_path / 'out', 'DATA.DATA_PATH', data, 'MODEL.NUM_CLASSES', 3, 'DATA.BATCH_SIZE', 4,
                              'EVAL_MODE', True, 'MODEL.RESUME', str(tmp_path / 'weights.pth'))
    torch.manual_seed(0)
    model = build_model(config)
    torch.save({'model': model.state_dict()}, tmp_path / 'weights.pth')
    batches = []
    hook = model.register_forward_hook(lambda module, args, output: batches.append((args[0].clone(), output.clone())))
    _, calls = onednn_calls(lambda: main.run_eval(config, model, build_loader(config, 'cpu')[3],
                                                  Runtime(torch.device('cpu'), Precision('cpu'), LOGGER)))
    hook.remove()
    assert calls == 0 and packed(model) == 0
    assert sum(images.shape[0] for images, _ in batches) == 9
    with open(os.path.join(config.OUTPUT_DIR, 'eval_results.json')) as f:
        assert json.load(f)['images'] == 9
    with torch.inference_mode():
        for images, logits in batches:
            assert torch.equal(logits, plain(lambda x=images: model(x)))
        if cpu_linear.available():  # a model and input the oneDNN path takes, once switched on
            assert fast(lambda: model(batches[0][0]))[1] == len(linears(model))


@needs_onednn
def test_throughput_runs_every_pass_through_onednn():
    """main.py --throughput (run_throughput, random input without a dataset): the configured warm-up and timed
    passes all take the oneDNN path; the switch is off again afterwards."""
    config = make_tiny_config(None, 'DATA.DATA_PATH', '', 'DATA.BATCH_SIZE', 2, 'THROUGHPUT_MODE', True,
                              'THROUGHPUT.WARMUP_PASSES', 2, 'THROUGHPUT.TIMED_PASSES', 3)
    model = build_model(config)
    status, calls = onednn_calls(lambda: main.run_throughput(config, model, Runtime(torch.device('cpu'),
                                                                                    Precision('cpu'), LOGGER)))
    assert status == 0 and calls == (2 + 3) * len(linears(model)) and packed(model) == len(linears(model))
    with torch.inference_mode():
        assert onednn_calls(lambda: model(torch.randn(1, 3, 32, 32)))[1] == 0
