import logging
import os

import pytest
import torch
from yacs.config import CfgNode

from config import (
    build_parser,
    config_from_yaml_text,
    get_config,
    get_defaults,
    load_config,
    not_implemented_settings,
)
from config_merge import merge_file, merge_opts
from errors import ConfigError
from utils import resolve_precision

# The official release's configs/swin/swin_tiny_patch4_window7_224.yaml, verbatim
OFFICIAL_TINY = """MODEL:
  TYPE: swin
  NAME: swin_tiny_patch4_window7_224
  DROP_PATH_RATE: 0.2
  SWIN:
    EMBED_DIM: 96
    DEPTHS: [ 2, 2, 6, 2 ]
    NUM_HEADS: [ 3, 6, 12, 24 ]
    WINDOW_SIZE: 7
"""

# An official fine-tuning file (swin_base_patch4_window12_384_22kto1k_finetune.yaml), verbatim
OFFICIAL_FINETUNE = """DATA:
  IMG_SIZE: 384
MODEL:
  TYPE: swin
  NAME: swin_base_patch4_window12_384_22kto1k_finetune
  DROP_PATH_RATE: 0.2
  SWIN:
    EMBED_DIM: 128
    DEPTHS: [ 2, 2, 18, 2 ]
    NUM_HEADS: [ 4, 8, 16, 32 ]
    WINDOW_SIZE: 12
TRAIN:
  EPOCHS: 30
  WARMUP_EPOCHS: 5
  WEIGHT_DECAY: 1e-8
  BASE_LR: 2e-05
  WARMUP_LR: 2e-08
  MIN_LR: 2e-07
TEST:
  CROP: False
"""


def write(path, text):
    path.write_text(text)
    return str(path)


def parse(*argv):
    return build_parser().parse_args(list(argv))


def test_official_yaml_loads_unchanged(tmp_path):
    config = load_config(write(tmp_path / 'tiny.yaml', OFFICIAL_TINY), environ={})
    assert config.MODEL.NAME == 'swin_tiny_patch4_window7_224'
    assert config.MODEL.SWIN.DEPTHS == [2, 2, 6, 2]
    assert config.MODEL.DROP_PATH_RATE == 0.2
    finetune = load_config(write(tmp_path / 'ft.yaml', OFFICIAL_FINETUNE), environ={})
    # YAML 1.1 reads "1e-8" as a string; it must still arrive as a number
    assert finetune.TRAIN.WEIGHT_DECAY == pytest.approx(1e-8)
    assert finetune.TRAIN.BASE_LR == pytest.approx(2e-5)
    assert finetune.TEST.CROP is False and finetune.DATA.IMG_SIZE == 384


def test_base_inheritance_and_override(tmp_path):
    (tmp_path / 'sub').mkdir()
    write(tmp_path / 'base.yaml', "DATA:\n  IMG_SIZE: 192\n  BATCH_SIZE: 64\nTRAIN:\n  EPOCHS: 90\n")
    child = write(tmp_path / 'sub' / 'child.yaml', "BASE: ['../base.yaml']\nDATA:\n  BATCH_SIZE: 32\n")
    config = load_config(child, environ={})
    assert config.DATA.IMG_SIZE == 192        # from the base file
    assert config.DATA.BATCH_SIZE == 32       # the child wins
    assert config.TRAIN.EPOCHS == 90


def test_the_yacs_gaps_config_merge_names(tmp_path):
    """config_merge.py's reasons for not using yacs' merge_from_file / merge_from_list hold: what yacs does
    with each case, next to what config_merge does."""
    def yacs_file(text):
        node = get_defaults()
        node.merge_from_file(write(tmp_path / 'yacs.yaml', text))
        return node

    def ours_file(text):
        node = get_defaults()
        merge_file(node, write(tmp_path / 'ours.yaml', text))
        return node

    # both read 1e-8 (a string in YAML 1.1) as a number
    assert yacs_file("TRAIN:\n  MIN_LR: 1e-8\n").TRAIN.MIN_LR == ours_file("TRAIN:\n  MIN_LR: 1e-8\n").TRAIN.MIN_LR
    # an int for a float key
    with pytest.raises(ValueError, match='Type mismatch'):
        yacs_file("TRAIN:\n  MIN_LR: 0\n")
    assert ours_file("TRAIN:\n  MIN_LR: 0\n").TRAIN.MIN_LR == 0.0
    # --opts TAG 123 and a lower-case boolean
    for opts in (['TAG', '123'], ['TRAIN.AUTO_RESUME', 'false']):
        with pytest.raises(ValueError, match='Type mismatch'):
            get_defaults().merge_from_list(opts)
    node = get_defaults()
    merge_opts(node, ['TAG', '123', 'TRAIN.AUTO_RESUME', 'false'])
    assert node.TAG == '123' and node.TRAIN.AUTO_RESUME is False
    # BASE lists
    write(tmp_path / 'base.yaml', "TRAIN:\n  EPOCHS: 7\n")
    child = "BASE: ['base.yaml']\nDATA:\n  IMG_SIZE: 192\n"
    assert yacs_file(child).TRAIN.EPOCHS == 300 and ours_file(child).TRAIN.EPOCHS == 7
    # a key set twice in one file
    twice = "TRAIN:\n  EPOCHS: 7\n  EPOCHS: 8\n"
    assert yacs_file(twice).TRAIN.EPOCHS == 8
    with pytest.raises(ConfigError, match='appears twice'):
        ours_file(twice)
    # an unknown key: yacs names the key only
    with pytest.raises(KeyError) as error:
        yacs_file("TRAIN:\n  EPOCH: 7\n")
    assert 'TRAIN.EPOCH' in str(error.value) and 'yacs.yaml' not in str(error.value)
    with pytest.raises(ConfigError, match=r'unknown config key TRAIN\.EPOCH in .*ours\.yaml \(did you mean'):
        ours_file("TRAIN:\n  EPOCH: 7\n")


def test_opts_and_flags_override_yaml(tmp_path):
    cfg = write(tmp_path / 'tiny.yaml', OFFICIAL_TINY + "DATA:\n  CACHE_MODE: 'no'\n")
    args = parse('--cfg', cfg, '--batch-size', '16', '--tag', 'exp1', '--output', str(tmp_path / 'out'),
                 '--opts', 'TRAIN.EPOCHS', '5', 'MODEL.SWIN.DEPTHS', '[2, 2, 2, 2]', 'AUG.AUTO_AUGMENT', 'none',
                 'TRAIN.CLIP_GRAD', 'None')
    config = get_config(args)
    assert config.DATA.BATCH_SIZE == 16
    assert config.TRAIN.EPOCHS == 5
    assert config.MODEL.SWIN.DEPTHS == [2, 2, 2, 2]
    assert config.AUG.AUTO_AUGMENT == 'none'
    assert config.TRAIN.CLIP_GRAD is None
    # a CLI flag that was not given must not override the YAML value with its default
    assert config.DATA.CACHE_MODE == 'no'
    assert config.OUTPUT_DIR == os.path.join(str(tmp_path / 'out'), 'swin_tiny_patch4_window7_224', 'exp1')


def test_flags_win_over_opts_as_officially(tmp_path):
    cfg = write(tmp_path / 'tiny.yaml', OFFICIAL_TINY)
    config = get_config(parse('--cfg', cfg, '--batch-size', '16', '--tag', 'flag',
                              '--opts', 'DATA.BATCH_SIZE', '32', 'TAG', 'opts', 'TRAIN.EPOCHS', '7'))
    assert (config.DATA.BATCH_SIZE, config.TAG, config.TRAIN.EPOCHS) == (16, 'flag', 7)


def test_amp_opt_level_o0_disables_amp_and_disable_amp_measures_float32(tmp_path):
    cfg = write(tmp_path / 'tiny.yaml', OFFICIAL_TINY)
    cpu = torch.device('cpu')
    bf16 = ('--opts', 'AMP_DTYPE', 'bfloat16')  # on a CPU, AMP runs only with bfloat16 asked for
    assert str(resolve_precision(get_config(parse('--cfg', cfg, *bf16)), cpu)) == 'bfloat16'
    for flags in (['--amp-opt-level', 'O0'], ['--disable_amp']):
        config = get_config(parse('--cfg', cfg, *flags, *bf16))
        assert not config.AMP_ENABLE and not resolve_precision(config, cpu).enabled, flags
    assert get_config(parse('--cfg', cfg, '--amp-opt-level', 'O1')).AMP_ENABLE
    with pytest.raises(SystemExit):
        parse('--cfg', cfg, '--amp-opt-level', 'O3')


@pytest.mark.parametrize('key, value, allowed', [
    ('TRAIN.LR_SCHEDULER.NAME', 'cosin', 'cosine, linear, step, multistep'),
    ('DATA.INTERPOLATION', 'bicubik', 'bicubic, bilinear, random'),
    ('AUG.REMODE', 'noise', 'const, rand, pixel'),
    ('AUG.MIXUP_MODE', 'batches', 'batch, pair, elem'),
    ('DATA.DATASET', 'imagenet1k', 'imagenet, imagenet22K, digits'),
    ('MODEL.TYPE', 'swin3', 'swin'),
])
def test_every_choice_key_names_its_allowed_values(key, value, allowed):
    with pytest.raises(ConfigError, match=f"^{key} '{value}' is not supported \\(choose one of: {allowed}") as info:
        load_config(None, [key, value], environ={})
    assert '\n' not in str(info.value)


def test_official_spellings_of_choice_keys_are_accepted():
    config = load_config(None, ['TRAIN.OPTIMIZER.NAME', 'AdamW', 'TRAIN.LR_SCHEDULER.NAME', 'Cosine',
                                'AUG.REMODE', 'Pixel', 'DATA.INTERPOLATION', 'random'], environ={})
    assert config.TRAIN.OPTIMIZER.NAME == 'AdamW'


def test_num_classes_left_to_the_dataset_only_when_nobody_set_it(tmp_path):
    (tmp_path / 'sub').mkdir()
    unset = write(tmp_path / 'unset.yaml', OFFICIAL_TINY)
    assert load_config(unset, environ={}).MODEL.NUM_CLASSES_FROM_DATA
    assert get_config(parse('--cfg', unset)).MODEL.NUM_CLASSES_FROM_DATA
    write(tmp_path / 'base.yaml', OFFICIAL_TINY + "  NUM_CLASSES: 1000\n")   # even the default value
    child = write(tmp_path / 'sub' / 'child.yaml', "BASE: ['../base.yaml']\nTRAIN:\n  EPOCHS: 3\n")
    assert not load_config(child, environ={}).MODEL.NUM_CLASSES_FROM_DATA          # set in the BASE chain
    assert not get_config(parse('--cfg', unset, '--opts', 'MODEL.NUM_CLASSES', '10')).MODEL.NUM_CLASSES_FROM_DATA
    with pytest.raises(ConfigError, match='MODEL.NUM_CLASSES_FROM_DATA in --opts is derived'):
        load_config(unset, ['MODEL.NUM_CLASSES_FROM_DATA', 'True'], environ={})


def test_flags_with_official_names(tmp_path):
    cfg = write(tmp_path / 'tiny.yaml', OFFICIAL_TINY)
    config = get_config(parse('--cfg', cfg, '--zip', '--cache-mode', 'full', '--accumulation-steps', '2',
                              '--use-checkpoint', '--disable_amp', '--eval', '--throughput', '--local_rank', '0',
                              '--resume', 'a.pth', '--pretrained', 'b.pth', '--data-path', '/data'))
    assert config.DATA.ZIP_MODE and config.DATA.CACHE_MODE == 'full'
    assert config.TRAIN.ACCUMULATION_STEPS == 2 and config.TRAIN.USE_CHECKPOINT
    assert not config.AMP_ENABLE and config.EVAL_MODE and config.THROUGHPUT_MODE
    assert config.MODEL.RESUME == 'a.pth' and config.MODEL.PRETRAINED == 'b.pth'
    assert config.DATA.DATA_PATH == '/data'


def test_unknown_key_in_yaml_names_key_and_file(tmp_path):
    cfg = write(tmp_path / 'bad.yaml', "MODEL:\n  SWIN:\n    WINDOW_SZE: 7\n")
    with pytest.raises(ConfigError) as err:
        load_config(cfg, environ={})
    message = str(err.value)
    assert 'MODEL.SWIN.WINDOW_SZE' in message and cfg in message
    assert '\n' not in message


def test_official_swin_moe_file_names_the_unsupported_family(tmp_path):
    """The start of the official configs/swinmoe files: not 'unknown key', but which family is missing."""
    cfg = write(tmp_path / 'swin_moe_small.yaml', "DATA:\n  IMG_SIZE: 192\nMODEL:\n  TYPE: swin_moe\n"
                "  SWIN_MOE:\n    EMBED_DIM: 96\n    MOE_BLOCKS: [[-1], [-1], [1, 3], [1]]\n")
    with pytest.raises(ConfigError) as err:
        load_config(cfg, environ={})
    message = str(err.value)
    assert message.startswith(cfg) and 'Swin-MoE' in message and 'unknown' not in message and '\n' not in message


def test_duplicate_key_in_yaml_is_an_error(tmp_path):
    cfg = write(tmp_path / 'dup.yaml', "DATA:\n  IMG_SIZE: 32\nMODEL:\n  NAME: x\nDATA:\n  BATCH_SIZE: 4\n")
    with pytest.raises(ConfigError, match=r"config key DATA appears twice in .*dup.yaml \(line 5\)"):
        load_config(cfg, environ={})


def test_unknown_key_in_opts(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key TRAIN\.EPOCH in --opts"):
        load_config(None, ['TRAIN.EPOCH', '3'], environ={})
    with pytest.raises(ConfigError, match="no value"):
        load_config(None, ['TRAIN.EPOCHS'], environ={})
    with pytest.raises(ConfigError, match="derived"):
        load_config(None, ['OUTPUT_DIR', '/x'], environ={})


@pytest.mark.parametrize('where', ['file', 'opts'])
@pytest.mark.parametrize('typo, suggestion', [('TRAIN.EPOCH', 'TRAIN.EPOCHS'), ('DATA.IMGSIZE', 'DATA.IMG_SIZE'),
                                              ('TRAIN.OPTIMIZER.BETA', 'TRAIN.OPTIMIZER.BETAS'),
                                              ('TRAN.EPOCHS', 'TRAIN.EPOCHS')])
def test_a_misspelled_key_names_the_closest_valid_one(tmp_path, where, typo, suggestion):
    source = '--opts'
    if where == 'file':
        *sections, leaf = typo.split('.')
        text = ''.join('  ' * depth + f"{name}:\n" for depth, name in enumerate(sections))
        cfg = write(tmp_path / 'typo.yaml', text + '  ' * len(sections) + f"{leaf}: 3\n")
        source = str(cfg)
        call = dict(path=cfg, opts=None)
    else:
        call = dict(path=None, opts=[typo, '3'])
    with pytest.raises(ConfigError) as error:
        load_config(call['path'], call['opts'], environ={})
    if typo == 'TRAN.EPOCHS' and where == 'file':  # the section is what a file misspells: its name is suggested
        typo, suggestion = 'TRAN', 'TRAIN'
    assert str(error.value) == f"unknown config key {typo} in {source} (did you mean {suggestion}?)"


def test_a_key_unlike_any_other_gets_no_guess():
    with pytest.raises(ConfigError) as error:
        load_config(None, ['ZZZ_QQQ', '1'], environ={})
    assert str(error.value) == "unknown config key ZZZ_QQQ in --opts"


def test_missing_file_and_bad_values(tmp_path):
    missing = str(tmp_path / 'nope.yaml')
    with pytest.raises(ConfigError, match=f"config file not found: {missing}"):
        load_config(missing, environ={})
    with pytest.raises(ConfigError, match="TRAIN.EPOCHS.*must be a number"):
        load_config(None, ['TRAIN.EPOCHS', 'many'], environ={})
    with pytest.raises(ConfigError, match="DATA.BATCH_SIZE must be at least 1"):
        load_config(None, ['DATA.BATCH_SIZE', '0'], environ={})
    with pytest.raises(ConfigError, match="DATA.BATCH_SIZE 7 must be even"):
        load_config(None, ['DATA.BATCH_SIZE', '7'], environ={})
    with pytest.raises(ConfigError, match="NUM_HEADS"):
        load_config(None, ['MODEL.SWIN.NUM_HEADS', '[5, 6, 12, 24]'], environ={})


def test_choice_keys_are_checked_when_the_config_is_built():
    for key, value in (('MODEL.TYPE', 'vit'), ('DATA.DATASET', 'cifar'), ('DATA.CACHE_MODE', 'some'),
                       ('AMP_DTYPE', 'fp8')):
        with pytest.raises(ConfigError) as info:
            load_config(None, [key, value], environ={})
        assert str(info.value).startswith(f"{key} {value!r} is not supported (choose one of: ")


class _Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _config_warnings(build):
    """build()'s result and the 'swin.config' warnings logged meanwhile (captured on that logger itself: another
    test may have made its 'swin' parent stop propagating)."""
    handler, logger = _Warnings(), logging.getLogger('swin.config')
    logger.addHandler(handler)
    try:
        return build(), handler.messages
    finally:
        logger.removeHandler(handler)


def test_accepted_but_unimplemented_keys_load_and_warn_once(tmp_path):
    official_keys = "AMP_OPT_LEVEL: O1\nTRAIN:\n  MOE:\n    SAVE_MASTER: True\n"
    cfg = write(tmp_path / 'fused.yaml', OFFICIAL_TINY + official_keys)
    config, warnings = _config_warnings(lambda: get_config(parse('--cfg', cfg, '--fused_window_process')))
    assert len(warnings) == 1 and '\n' not in warnings[0] and 'not implemented' in warnings[0]
    for setting in ("AMP_OPT_LEVEL 'O1'", 'TRAIN.MOE.SAVE_MASTER True', 'FUSED_WINDOW_PROCESS True'):
        assert setting in warnings[0]
    assert len(not_implemented_settings(config)) == 3
    # other ranks stay silent; at their defaults (an official file that does not set them) nothing is said
    assert _config_warnings(lambda: load_config(cfg, environ={'RANK': '1', 'WORLD_SIZE': '2'}))[1] == []
    plain_file = write(tmp_path / 'plain.yaml', OFFICIAL_TINY)
    plain, warnings = _config_warnings(lambda: load_config(plain_file, environ={}))
    assert warnings == [] and not_implemented_settings(plain) == []


def test_config_is_frozen_and_derived_values(tmp_path):
    config = load_config(None, ['DATA.BATCH_SIZE', '128', 'TRAIN.ACCUMULATION_STEPS', '2'],
                         environ={'WORLD_SIZE': '4', 'RANK': '3', 'LOCAL_RANK': '1'})
    with pytest.raises(AttributeError):
        config.TRAIN.EPOCHS = 1
    assert (config.WORLD_SIZE, config.RANK, config.LOCAL_RANK) == (4, 3, 1)
    assert config.TRAIN.GLOBAL_BATCH_SIZE == 1024
    # the official recipe: 5e-4 per 512 images -> 1e-3 at a global batch of 1024
    assert config.TRAIN.EFFECTIVE_LR == pytest.approx(1e-3)
    assert config.TRAIN.EFFECTIVE_MIN_LR == pytest.approx(1e-5)
    unscaled = load_config(None, ['TRAIN.LINEAR_SCALE_LR', 'False'], environ={'WORLD_SIZE': '4'})
    assert unscaled.TRAIN.EFFECTIVE_LR == unscaled.TRAIN.BASE_LR


def test_yaml_text_round_trip():
    config = load_config(None, ['MODEL.SWIN.WINDOW_SIZE', '12', 'TRAIN.CLIP_GRAD', 'None'], environ={})
    again = config_from_yaml_text(config.dump())
    assert isinstance(again, CfgNode) and again == config


def test_shipped_configs_match_the_official_recipe():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    expected = {'swin_tiny': 0.2, 'swin_small': 0.3, 'swin_base': 0.5}
    for name, drop_path in expected.items():
        config = load_config(os.path.join(root, 'configs', f'{name}.yaml'), environ={})
        assert config.MODEL.DROP_PATH_RATE == drop_path
        assert config.TRAIN.EPOCHS == 300 and config.TRAIN.WARMUP_EPOCHS == 20
        assert config.TRAIN.WEIGHT_DECAY == 0.05 and config.MODEL.LABEL_SMOOTHING == 0.1
        assert (config.AUG.MIXUP, config.AUG.CUTMIX, config.AUG.REPROB) == (0.8, 1.0, 0.25)
        assert config.AUG.AUTO_AUGMENT == 'rand-m9-mstd0.5-inc1'
    b384 = load_config(os.path.join(root, 'configs', 'swin_base_384.yaml'), environ={})
    assert (b384.DATA.IMG_SIZE, b384.MODEL.SWIN.WINDOW_SIZE) == (384, 12)
