"""Export a Swin model (any family the project builds) to ONNX with a dynamic batch dimension, and check it.

    python scripts/export_onnx.py CKPT [--cfg CFG] [--opts KEY VALUE ...] --output FILE.onnx [--opset N]

The model is built from the config and loads CKPT like --eval does (ours, official or timm weights; .pth or
.safetensors). The graph takes ``images`` (batch, 3, IMG_SIZE, IMG_SIZE), normalized as by the validation
transform, and returns ``logits`` (batch, NUM_CLASSES). Export runs under no_grad, so window attention is
exported from the ``scaled_dot_product_attention`` path (MODEL.SWIN.FUSED_ATTN True) as plain ONNX operators
(MatMul, Softmax). Opset 18 and later (default 18) use torch's dynamo exporter; opsets 14-17, for older runtimes,
its TorchScript exporter. After export, onnxruntime runs the file on a batch of another size than the export's
and the largest difference to PyTorch, relative to the largest logit, is printed; above 1e-4 the script fails.
Needs the optional packages: pip install onnx onnxruntime onnxscript (or pip install -e '.[export]').
"""
import argparse
import importlib
import logging
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from checkpoint import config_for_weights, load_model_weights, read_weights, replace_atomically
from errors import ConfigError, SwinTrainError, exit_status
from models import build_model

INSTALL = "pip install onnx onnxruntime onnxscript  (or: pip install -e '.[export]')"
EXPORT_BATCH, CHECK_BATCH = 2, 3  # the check runs another batch size than the traced one: the dimension is dynamic
TOLERANCE = 1e-4
_logger = logging.getLogger('export_onnx')


class ExportError(SwinTrainError):
    """The exported graph does not reproduce the PyTorch model."""


def require_packages():
    missing = []
    for name in ('onnx', 'onnxruntime', 'onnxscript'):
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ConfigError(f"ONNX export needs {', '.join(missing)}: {INSTALL}")


def export(model, path, image_size, opset):
    """Write the model's ONNX graph to path (atomically) with a dynamic batch dimension."""
    example = torch.randn(EXPORT_BATCH, 3, image_size, image_size)
    names = dict(input_names=['images'], output_names=['logits'])

    def write(temp):
        with torch.no_grad():  # the inference path: SDPA attention, no autograd bookkeeping in the graph
            if opset >= 18:
                program = torch.onnx.export(model, (example,), dynamo=True, opset_version=opset, verbose=False,
                                            dynamic_shapes=({0: torch.export.Dim('batch')},), **names)
                program.save(temp)
            else:
                with warnings.catch_warnings():  # the traced shape checks concern the fixed image size only
                    warnings.simplefilter('ignore', torch.jit.TracerWarning)
                    warnings.simplefilter('ignore', DeprecationWarning)  # chosen knowingly, for opsets < 18
                    torch.onnx.export(model, (example,), temp, dynamo=False, opset_version=opset,
                                      dynamic_axes={'images': {0: 'batch'}, 'logits': {0: 'batch'}}, **names)

    replace_atomically(write, path)


def check(model, path, image_size, batch_size=CHECK_BATCH, seed=0):
    """Largest |onnxruntime - PyTorch| / largest |PyTorch logit| on a random batch of batch_size images."""
    import onnxruntime

    images = torch.randn(batch_size, 3, image_size, image_size, generator=torch.Generator().manual_seed(seed))
    session = onnxruntime.InferenceSession(path, providers=['CPUExecutionProvider'])
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: images.numpy()})[0])
    with torch.no_grad():
        expected = model(images)
    if got.shape != expected.shape:
        raise ExportError(f"{path}: onnxruntime returned shape {tuple(got.shape)}, PyTorch {tuple(expected.shape)}")
    return ((got - expected).abs().max() / expected.abs().max()).item()


def onnx_opset(path):
    import onnx
    return max(entry.version for entry in onnx.load(path, load_external_data=False).opset_import
               if entry.domain in ('', 'ai.onnx'))


def run(args):
    require_packages()
    if args.opset < 14:
        raise ConfigError(f"--opset {args.opset}: scaled_dot_product_attention exports from opset 14 on")
    folder = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(folder):
        raise ConfigError(f"--output {args.output}: folder {folder} does not exist")
    weights = read_weights(args.checkpoint)
    config = config_for_weights(args.cfg, (args.opts or []) + ['DEVICE', 'cpu'], weights, args.checkpoint)
    model = build_model(config)
    load_model_weights(model, weights, _logger, name=args.checkpoint, model_type=config.MODEL.TYPE)
    model.eval()
    size = config.DATA.IMG_SIZE
    export(model, args.output, size, args.opset)
    diff = check(model, args.output, size)
    print(f"wrote {args.output} ({os.path.getsize(args.output) / 2 ** 20:.1f} MB, opset {onnx_opset(args.output)}): "
          f"images (batch, 3, {size}, {size}) -> logits (batch, {config.MODEL.NUM_CLASSES})")
    print(f"onnxruntime vs PyTorch at batch {CHECK_BATCH} (exported at {EXPORT_BATCH}): rel max diff {diff:.2e}")
    if not diff < TOLERANCE:
        raise ExportError(f"{args.output}: onnxruntime differs from PyTorch by {diff:.2e} (relative), more than "
                          f"{TOLERANCE:g}")
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('checkpoint', metavar='CKPT', help='weights to load')
    parser.add_argument('--cfg', metavar='FILE', help="config of the model (default: the one the checkpoint carries)")
    parser.add_argument('--opts', default=None, nargs='+', help="override config options with 'KEY VALUE' pairs")
    parser.add_argument('--output', required=True, metavar='FILE.onnx', help='ONNX file to write')
    parser.add_argument('--opset', type=int, default=18, help='ONNX opset (default 18; 14-17 use the TorchScript '
                                                              'exporter)')
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format='%(message)s')
    return exit_status(run, args)


if __name__ == '__main__':
    sys.exit(main())
