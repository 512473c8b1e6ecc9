"""The checks config.finalize() runs when a config is built: each bad value fails then, in one line naming the
key and the allowed values, not later inside a library (tables of choice keys and minimums, the shapes a family
needs, and values only a library's own parser can judge)."""
import os

from yacs.config import CfgNode

from errors import ConfigError
from optimizer import optimizer_name

# Keys with a fixed set of values, and numeric keys with their smallest value, checked when the config is built
_CHOICES = {
    'MODEL.TYPE': ('swin', 'swinv2', 'swin_mlp'),  # parameters in MODEL.<TYPE upper-cased>
    'MODEL.TASK': ('auto', 'classification', 'simmim'),
    'DATA.DATASET': ('imagenet', 'imagenet22K', 'digits'),
    'DATA.CACHE_MODE': ('no', 'full', 'part'), 'AMP_DTYPE': ('auto', 'float16', 'bfloat16'),
    'DATA.INTERPOLATION': ('bicubic', 'bilinear', 'random', 'nearest', 'box', 'hamming', 'lanczos'),
    'TRAIN.LR_SCHEDULER.NAME': ('cosine', 'linear', 'step', 'multistep'),
    'AUG.REMODE': ('const', 'rand', 'pixel'), 'AUG.MIXUP_MODE': ('batch', 'pair', 'elem', 'half'),
    'SAVE_FAILURE': ('stop', 'continue'), 'TRAIN.LOSS': ('ce', 'bce'),
    'DISTILL.TYPE': ('none', 'soft', 'hard'),
}
_ANY_CASE = ('TRAIN.LR_SCHEDULER.NAME', 'AUG.REMODE')  # read lower-cased, as officially
_MINIMUMS = {'DATA.BATCH_SIZE': 1, 'DATA.NUM_WORKERS': 0, 'DATA.IMG_SIZE': 1, 'TRAIN.ACCUMULATION_STEPS': 1,
             'TRAIN.EPOCHS': 0, 'SAVE_FREQ': 1, 'SAVE_EVERY_MINUTES': 0, 'PRINT_FREQ': 1, 'MODEL.NUM_CLASSES': 1,
             'DIST.TIMEOUT': 1, 'DIST.PEER_TIMEOUT': 1,
             'AUG.REPEATS': 0, 'THROUGHPUT.WARMUP_PASSES': 1, 'THROUGHPUT.TIMED_PASSES': 1, 'TRAIN.FREEZE.STAGES': 0}


def get_value(config: CfgNode, key: str):
    """The value at a dotted key ('TRAIN.OPTIMIZER.NAME')."""
    for part in key.split('.'):
        config = config[part]
    return config


def validate(config: CfgNode) -> None:
    """Raise ConfigError (one line) for the first value a run could not use."""
    def require(ok, message):
        if not ok:
            raise ConfigError(message)

    for key, allowed in _CHOICES.items():
        value = get_value(config, key)
        require((value.lower() if key in _ANY_CASE else value) in allowed, f"{key} {value!r} is not supported "
                f"(choose one of: {', '.join(allowed)})")
    require(config.MODEL.TASK != 'simmim' or not (config.EVAL_MODE or config.THROUGHPUT_MODE),
            "--eval and --throughput apply to classifiers, not to MODEL.TASK simmim: use the fine-tuning config")
    optimizer_name(config.TRAIN.OPTIMIZER.NAME)  # adamw, sgd or a timm registry name
    for key, minimum in _MINIMUMS.items():
        require(get_value(config, key) >= minimum, f"{key} must be at least {minimum}, got {get_value(config, key)}")
    require(config.TRAIN.BCE_TARGET_THRESHOLD < 1.0, f"TRAIN.BCE_TARGET_THRESHOLD must be below 1 (a negative "
            f"value turns it off), got {config.TRAIN.BCE_TARGET_THRESHOLD}: no target would be positive")
    require(config.TRAIN.BCE_TARGET_THRESHOLD < 0 or config.TRAIN.LOSS == 'bce',
            f"TRAIN.BCE_TARGET_THRESHOLD {config.TRAIN.BCE_TARGET_THRESHOLD} applies to TRAIN.LOSS bce, "
            f"not {config.TRAIN.LOSS!r}")
    require(config.AUG.REPEATS <= 1 or not (config.DATA.ZIP_MODE and config.DATA.CACHE_MODE == 'part'),
            f"AUG.REPEATS {config.AUG.REPEATS} needs every image on every rank, and DATA.CACHE_MODE part gives each "
            f"rank its own shard: use CACHE_MODE full or no")
    check_distillation(config.DISTILL, config.MODEL.TASK)
    require(config.MODEL_EMA or not config.MODEL_EMA_WARMUP, "MODEL_EMA_WARMUP applies to MODEL_EMA True")
    require(0.0 <= config.MODEL.LABEL_SMOOTHING < 1.0,
            f"MODEL.LABEL_SMOOTHING must be in [0, 1), got {config.MODEL.LABEL_SMOOTHING}")
    mixup_on = config.AUG.MIXUP > 0 or config.AUG.CUTMIX > 0 or config.AUG.CUTMIX_MINMAX is not None
    require(not (mixup_on and config.AUG.MIXUP_MODE in ('batch', 'pair') and config.DATA.BATCH_SIZE % 2),
            f"DATA.BATCH_SIZE {config.DATA.BATCH_SIZE} must be even for AUG.MIXUP_MODE "
            f"{config.AUG.MIXUP_MODE!r} (Mixup/CutMix pair samples)")
    name = f"MODEL.{config.MODEL.TYPE.upper()}"  # the family's parameters: MODEL.SWIN, MODEL.SWINV2, ...
    swin = config.MODEL[config.MODEL.TYPE.upper()]
    freeze = config.TRAIN.FREEZE
    require(freeze.STAGES <= len(swin.DEPTHS), f"TRAIN.FREEZE.STAGES {freeze.STAGES} is more than the "
            f"{len(swin.DEPTHS)} stages of {name}.DEPTHS {list(swin.DEPTHS)}")
    require(config.MODEL.TASK != 'simmim' or not (freeze.PATCH_EMBED or freeze.STAGES or freeze.ALL_BUT_HEAD),
            "TRAIN.FREEZE applies to fine-tuning a classifier, not to MODEL.TASK simmim pre-training")
    require(len(swin.DEPTHS) == len(swin.NUM_HEADS),
            f"{name}.DEPTHS {list(swin.DEPTHS)} and {name}.NUM_HEADS {list(swin.NUM_HEADS)} "
            f"must have the same length")
    for i, heads in enumerate(swin.NUM_HEADS):
        dim = swin.EMBED_DIM * 2 ** i
        require(heads >= 1 and dim % heads == 0,
                f"{name}.EMBED_DIM {swin.EMBED_DIM} gives {dim} channels in stage {i}, "
                f"not divisible by {name}.NUM_HEADS[{i}] = {heads}")
    require(config.DATA.IMG_SIZE % swin.PATCH_SIZE == 0,
            f"DATA.IMG_SIZE {config.DATA.IMG_SIZE} is not divisible by {name}.PATCH_SIZE {swin.PATCH_SIZE}")
    if config.MODEL.TYPE == 'swinv2':
        require(len(swin.PRETRAINED_WINDOW_SIZES) >= len(swin.DEPTHS),
                f"MODEL.SWINV2.PRETRAINED_WINDOW_SIZES {list(swin.PRETRAINED_WINDOW_SIZES)} needs an entry for "
                f"each of the {len(swin.DEPTHS)} stages of MODEL.SWINV2.DEPTHS")
    check_auto_augment(config.AUG.AUTO_AUGMENT, config.DATA.IMG_SIZE)



def check_distillation(distill: CfgNode, task: str) -> None:
    """DISTILL: a teacher (config or timm name, and weights that exist) exactly when distillation is on."""
    if distill.TYPE == 'none':
        if distill.TEACHER_CFG or distill.TEACHER_TIMM or distill.TEACHER_WEIGHTS:
            raise ConfigError("DISTILL.TEACHER_* is set but DISTILL.TYPE is 'none': set DISTILL.TYPE soft or hard")
        return
    if task == 'simmim':
        raise ConfigError("DISTILL applies to classification, not to MODEL.TASK simmim")
    if bool(distill.TEACHER_CFG) == bool(distill.TEACHER_TIMM):
        raise ConfigError(f"DISTILL.TYPE {distill.TYPE}: give the teacher as DISTILL.TEACHER_CFG (a config file) "
                          f"or DISTILL.TEACHER_TIMM (a timm model name), exactly one")
    for key in ('TEACHER_CFG', 'TEACHER_WEIGHTS'):
        if key == 'TEACHER_CFG' and not distill.TEACHER_CFG:
            continue
        if not os.path.isfile(distill[key]):
            raise ConfigError(f"DISTILL.{key} {distill[key]!r}: no such file")
    if not 0.0 <= distill.ALPHA <= 1.0:
        raise ConfigError(f"DISTILL.ALPHA must be in [0, 1], got {distill.ALPHA}")
    if distill.TAU <= 0:
        raise ConfigError(f"DISTILL.TAU must be positive, got {distill.TAU}")


def check_auto_augment(policy: str, img_size: int) -> None:
    """AUG.AUTO_AUGMENT through timm's parsers, chosen as timm's create_transform chooses them ('rand...',
    'augmix...', else an AutoAugment policy such as 'original' or 'v0'); '' and 'none' mean off."""
    if policy in ('', 'none'):
        return
    from timm.data import auto_augment as aa  # imported here: only configs that use a policy pay for it
    build = (aa.rand_augment_transform if policy.startswith('rand') else
             aa.augment_and_mix_transform if policy.startswith('augmix') else aa.auto_augment_transform)
    try:
        build(policy, dict(translate_const=int(img_size * 0.45), img_mean=(124, 116, 104)))
    except (AssertionError, ValueError, KeyError, IndexError, TypeError) as e:  # timm asserts on unknown sections
        raise ConfigError(f"AUG.AUTO_AUGMENT {policy!r} is not a timm augmentation policy ({str(e) or 'bad name'}); "
                          f"e.g. 'rand-m9-mstd0.5-inc1', 'original', 'v0', 'augmix-m5-w3', or 'none'") from None
