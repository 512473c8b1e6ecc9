"""Where settings come from, merged into config.py's defaults: YAML files (with ``BASE:`` inheritance), the
command-line flags (the official main.py names) and ``--opts KEY VALUE`` pairs.

yacs's own ``merge_from_file`` / ``merge_from_list`` are not used. Like them, this reads values given as text
as Python literals (``1e-8``, a string in YAML 1.1, is a number) and converts list <-> tuple; unlike them it
 - converts a YAML ``1`` for a float key (yacs wants the default's exact type: int -> float is a "Type mismatch"),
 - keeps ``--opts TAG 123`` a string and reads ``--opts ... true`` as a boolean (yacs refuses both),
 - follows ``BASE:`` lists of files (yacs has none) and refuses a key set twice in one file (PyYAML keeps the last),
 - ends every mistake in one ConfigError line naming the key and the file or --opts that set it, with the closest
   key for a misspelled one (yacs raises KeyError / ValueError / AssertionError naming the key only).
"""
import argparse
import ast
import difflib
import os
from collections.abc import Collection, Sequence
from typing import Any

import yaml
from yacs.config import CfgNode

from errors import ConfigError

# Sections of official config files for families this project does not build: named, not "unknown"
UNSUPPORTED_SECTIONS = {
    'MODEL.SWIN_MOE': 'Swin-MoE (MODEL.TYPE swin_moe, section MODEL.SWIN_MOE) is not supported: this project '
                      'builds swin, swinv2 and swin_mlp (the official Swin-MoE needs the tutel MoE library)',
}


# -----------------------------------------------------------------------------
# YAML files and --opts
# -----------------------------------------------------------------------------
class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys silently; a config file with both is almost surely a mistake."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                line = key_node.start_mark.line + 1
                raise ConfigError(f"config key {key} appears twice in {self.name} (line {line})")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str) -> dict:
    """The mapping in a YAML config file (empty for an empty file)."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path) as f:
            data = yaml.load(f, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of KEY: value, not {type(data).__name__}")
    return data


def merge_file(config: CfgNode, path: str, given: set[str] | None = None) -> None:
    """Merge a YAML file into config: first its ``BASE`` files (paths relative to it, in order), then it.
    ``given`` (when passed) collects the full names of the keys the files set."""
    data = read_yaml(path)
    for base in data.pop('BASE', None) or ['']:
        if base:
            merge_file(config, os.path.join(os.path.dirname(path), base), given)
    merge_dict(config, data, path, given=given)


def merge_dict(config: CfgNode, data: dict, source: str, prefix: str = '', given: set[str] | None = None) -> None:
    """Merge a plain (nested) dict into config; ``source`` names where it came from in error lines."""
    for key, value in data.items():
        full_key = f"{prefix}.{key}" if prefix else key
        if key not in config:
            if full_key in UNSUPPORTED_SECTIONS:
                raise ConfigError(f"{source}: {UNSUPPORTED_SECTIONS[full_key]}")
            raise ConfigError(f"unknown config key {full_key} in {source}{did_you_mean(full_key, config, prefix)}")
        current = config[key]
        if isinstance(current, CfgNode):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {full_key} in {source} must be a section of keys, got {value!r}")
            merge_dict(current, value, source, full_key, given)
        else:
            config[key] = coerce(current, value, full_key, source)
            if given is not None:
                given.add(full_key)


def did_you_mean(full_key: str, node: CfgNode, prefix: str = '') -> str:
    """' (did you mean X?)' with the closest key or section under ``node`` (named from ``prefix``), or ''."""
    def names(section, at):
        for key, value in section.items():
            name = f"{at}.{key}" if at else key
            yield name
            if isinstance(value, CfgNode):
                yield from names(value, name)
    close = difflib.get_close_matches(full_key, list(names(node, prefix)), n=1, cutoff=0.75)
    return f" (did you mean {close[0]}?)" if close else ''


def merge_opts(config: CfgNode, opts: Sequence[Any] | None, derived_keys: Collection[str] = (),
               given: set[str] | None = None) -> None:
    """Apply ``KEY VALUE`` pairs (values as strings from the command line, or already typed); ``given`` (when
    passed) collects the keys set."""
    opts = list(opts or [])
    if len(opts) % 2:
        raise ConfigError(f"--opts takes KEY VALUE pairs; {opts[-1]!r} has no value")
    for key, text in zip(opts[0::2], opts[1::2], strict=True):
        if key in derived_keys:
            raise ConfigError(f"config key {key} in --opts is derived and cannot be set")
        node, parts = config, key.split('.')
        for i, part in enumerate(parts):
            if not isinstance(node, CfgNode) or part not in node:
                raise ConfigError(f"unknown config key {key} in --opts{did_you_mean(key, config)}")
            if i < len(parts) - 1:
                node = node[part]
        if isinstance(node[parts[-1]], CfgNode):
            raise ConfigError(f"config key {key} in --opts is a section; set one of its keys")
        value = parse_value(text)
        if isinstance(node[parts[-1]], str) and not isinstance(value, str):
            value = str(text)
        node[parts[-1]] = coerce(node[parts[-1]], value, key, '--opts')
        if given is not None:
            given.add(key)


def parse_value(text: Any) -> Any:
    """--opts values arrive as strings: read numbers, lists, booleans and None the way YAML does."""
    if not isinstance(text, str):
        return text
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        pass
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def coerce(current: Any, value: Any, full_key: str, where: str) -> Any:
    """Check a new value against the type of the default and convert where it is safe."""
    if current is None or value is None:
        return value
    if isinstance(value, str) and not isinstance(current, str):
        value = parse_value(value)  # YAML 1.1 reads 1e-8 as a string; yacs (and this) read it as a number
    if isinstance(current, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ('true', 'false'):
            return value.lower() == 'true'
        raise ConfigError(f"config key {full_key} in {where} must be true or false, got {value!r}")
    if isinstance(current, (int, float)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key {full_key} in {where} must be a number, got {value!r}")
        return float(value) if isinstance(current, float) else value
    if isinstance(current, (list, tuple)):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {full_key} in {where} must be a list, got {value!r}")
        return type(current)(value)
    if isinstance(current, str) and not isinstance(value, str):
        raise ConfigError(f"config key {full_key} in {where} must be a string, got {value!r}")
    return value


# -----------------------------------------------------------------------------
# Command line: the official flags and the keys they set
# -----------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The official main.py flags (same names and meaning) plus a few of ours."""
    parser = argparse.ArgumentParser('Swin Transformer training and evaluation', add_help=True)
    parser.add_argument('--cfg', type=str, required=True, metavar="FILE", help='path to config file')
    parser.add_argument('--opts', default=None, nargs='+', help="modify config options by adding 'KEY VALUE' pairs")
    # easy config modification; every default is None so that a YAML value is never overridden silently
    parser.add_argument('--batch-size', type=int, help="batch size for single GPU")
    parser.add_argument('--data-path', type=str, help='path to dataset')
    parser.add_argument('--zip', action='store_true', default=None, help='use zipped dataset instead of folder dataset')
    parser.add_argument('--cache-mode', type=str, choices=['no', 'full', 'part'],
                        help='no: no cache, full: cache all data, part: sharding the dataset into nonoverlapping '
                             'pieces and only cache one piece')
    parser.add_argument('--pretrained',
                        help='pretrained weight from checkpoint, could be imagenet22k pretrained weight')
    parser.add_argument('--resume', help='resume from checkpoint')
    parser.add_argument('--accumulation-steps', type=int, help="gradient accumulation steps")
    parser.add_argument('--use-checkpoint', action='store_true', default=None,
                        help="whether to use gradient checkpointing to save memory")
    parser.add_argument('--disable_amp', action='store_true', default=None, help='Disable pytorch amp')
    parser.add_argument('--amp-opt-level', type=str, choices=['O0', 'O1', 'O2'],
                        help='[deprecated apex amp level] O0 turns mixed precision off; O1/O2 keep torch.amp')
    parser.add_argument('--output', type=str, metavar='PATH',
                        help='root of output folder, the full path is <output>/<model_name>/<tag>')
    parser.add_argument('--tag', help='tag of experiment')
    parser.add_argument('--eval', action='store_true', default=None, help='Perform evaluation only')
    parser.add_argument('--throughput', action='store_true', default=None, help='Test throughput only')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=None,
                        help='accepted for torch.distributed.launch; torchrun sets LOCAL_RANK instead')
    parser.add_argument('--fused_window_process', action='store_true', default=None,
                        help='[official CUDA kernel] accepted; the SDPA attention path is used instead')
    parser.add_argument('--fused_layernorm', action='store_true', default=None, help='[official apex] accepted')
    parser.add_argument('--optim', type=str, help='overwrite optimizer if provided, can be adamw/sgd')
    # ours
    parser.add_argument('--device', type=str, help='auto | cpu | cuda | cuda:N')
    parser.add_argument('--compile', action='store_true', default=None, help='torch.compile the model')
    parser.add_argument('--seed', type=int, help='random seed')
    parser.add_argument('--epochs', type=int, help='total training epochs')
    parser.add_argument('--debug', action='store_true', help='show full tracebacks for errors')
    return parser


# flag name -> config key; applied only when the flag was given (argparse default None)
_FLAG_KEYS = {
    'batch_size': 'DATA.BATCH_SIZE',
    'data_path': 'DATA.DATA_PATH',
    'zip': 'DATA.ZIP_MODE',
    'cache_mode': 'DATA.CACHE_MODE',
    'pretrained': 'MODEL.PRETRAINED',
    'resume': 'MODEL.RESUME',
    'accumulation_steps': 'TRAIN.ACCUMULATION_STEPS',
    'use_checkpoint': 'TRAIN.USE_CHECKPOINT',
    'amp_opt_level': 'AMP_OPT_LEVEL',
    'output': 'OUTPUT',
    'tag': 'TAG',
    'eval': 'EVAL_MODE',
    'throughput': 'THROUGHPUT_MODE',
    'fused_window_process': 'FUSED_WINDOW_PROCESS',
    'fused_layernorm': 'FUSED_LAYERNORM',
    'optim': 'TRAIN.OPTIMIZER.NAME',
    'device': 'DEVICE',
    'compile': 'TRAIN.COMPILE',
    'seed': 'SEED',
    'epochs': 'TRAIN.EPOCHS',
}


def merge_flags(config: CfgNode, args: argparse.Namespace) -> None:
    """Set the keys of the flags that were given (argparse values are already typed). Called after the
    ``--opts`` pairs are merged: as in the official code, a flag wins over ``--opts``."""
    for flag, key in _FLAG_KEYS.items():
        value = getattr(args, flag, None)
        if value is not None:
            node, parts = config, key.split('.')
            for part in parts[:-1]:
                node = node[part]
            node[parts[-1]] = value
    if getattr(args, 'disable_amp', None) or getattr(args, 'amp_opt_level', None) == 'O0':
        config.AMP_ENABLE = False  # as officially: --amp-opt-level O0 means no mixed precision
