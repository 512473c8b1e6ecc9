"""Convert Swin v1 / V2 weights between the official layout and timm's (>= 0.9) layout, and to / from safetensors.

    python scripts/convert_checkpoint.py IN OUT --to official   # {'model': state_dict}, as the official releases
    python scripts/convert_checkpoint.py IN OUT --to timm       # writes a bare state_dict, as timm's files
    python scripts/convert_checkpoint.py IN OUT.safetensors --to official|timm   # the weights as safetensors

IN may be one of our training checkpoints (its model weights, or with --ema its EMA weights), an official
checkpoint, a {'state_dict': ...} file, a bare state_dict in either layout, or a .safetensors file. Only weights are
written (no optimizer state), with the class names and training config of one of our checkpoints (official .pth:
beside 'model'; .safetensors: as metadata), so that predict.py / export_onnx.py need no --cfg.
relative_position_index / attn_mask (and V2's relative_coords_table) are not written to timm files (timm computes
them) and are left out of official files converted from timm; every loader recomputes them from the model's config.
V2 (timm's swinv2_*) moves the same keys as v1; Swin MLP has no timm layout. A .safetensors OUT holds the
state_dict's tensors (no pickle: safe to load from anywhere) and, as string metadata, the layout, the checkpoint's
class names (JSON), which predict.py shows, and its config.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from checkpoint import atomic_save, extract_state_dict, is_safetensors, official_to_timm, read_weights, save_safetensors
from errors import CheckpointError, exit_status


def convert(src, dst, to, ema=False):
    """Read src, write dst in the `to` layout; returns the number of tensors written."""
    obj = source = read_weights(src)
    if ema:
        if not isinstance(obj, dict) or obj.get('model_ema') is None:
            raise CheckpointError(f"checkpoint {src} has no EMA weights (model_ema)")
        obj = obj['model_ema']
    sd = extract_state_dict(obj, f"checkpoint {src}")  # always comes back in the official layout
    if 'patch_embed.proj.weight' not in sd:
        raise CheckpointError(f"checkpoint {src} does not hold Swin weights (no patch_embed.proj.weight)")
    if to == 'timm':
        if any('.spatial_mlp.' in key for key in sd):
            raise CheckpointError(f"checkpoint {src} holds Swin MLP weights: timm has no Swin MLP (no layout to "
                                  f"convert to)")
        sd = official_to_timm(sd)
    folder = os.path.dirname(os.path.abspath(dst))
    if not os.path.isdir(folder):
        raise CheckpointError(f"output folder does not exist: {folder}")
    # what the tools need to rebuild the model from the file alone: its class names and training config
    names, config = (source.get('class_names'), source.get('config')) if isinstance(source, dict) else (None, None)
    if is_safetensors(dst):
        metadata = {'format': 'pt', 'layout': to, 'class_names': json.dumps(list(names or []))}
        save_safetensors(sd, dst, {**metadata, **({'config': config} if config else {})})
    elif to == 'timm':
        atomic_save(sd, dst)  # timm's layout is a bare state dict
    else:
        extra = {key: value for key, value in (('class_names', names), ('config', config)) if value}
        atomic_save({'model': sd, **extra}, dst)
    return len(sd)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('src', metavar='IN', help='checkpoint or weights file to read (.safetensors too)')
    parser.add_argument('dst', metavar='OUT', help='file to write (replaced atomically); .safetensors: safetensors')
    parser.add_argument('--to', required=True, choices=['official', 'timm'], help='layout of OUT')
    parser.add_argument('--ema', action='store_true', help="convert the EMA weights of one of our training checkpoints")
    args = parser.parse_args(argv)
    return exit_status(run, args)


def run(args):
    count = convert(args.src, args.dst, args.to, args.ema)
    print(f"wrote {args.dst}: {count} tensors in the {args.to} layout")
    return 0


if __name__ == '__main__':
    sys.exit(main())
