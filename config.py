"""All settings of a run: the defaults (with the official Swin key names), derived values, validation.

Precedence, lowest to highest: the defaults below, the YAML file (and its ``BASE:`` files), ``--opts KEY VALUE``
pairs, command-line flags (as officially); reading and merging them is config_merge.py's job. Derived values
("derived" below) are computed once by ``finalize``; the frozen result is the run's only source of settings.
"""
import argparse
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import yaml
from yacs.config import CfgNode as CN

from config_checks import get_value, validate
from config_merge import build_parser, merge_dict, merge_file, merge_flags, merge_opts

__all__ = ['build_parser', 'config_from_yaml_text', 'finalize', 'get_config', 'get_defaults', 'load_config',
           'not_implemented_settings', 'not_implemented_warning']

_C = CN()

# Base config files, relative to the file that lists them (merged first, this file overrides them)
_C.BASE = ['']

# -----------------------------------------------------------------------------
# Data settings
# -----------------------------------------------------------------------------
_C.DATA = CN()
# Batch size for a single GPU/process (the global batch is this x world size x accumulation steps)
_C.DATA.BATCH_SIZE = 128
# Path to the dataset root (holds train/ and val/, or train.zip/val.zip in zip mode)
_C.DATA.DATA_PATH = ''
# Dataset name: imagenet | imagenet22K | digits (the embedded demo set)
_C.DATA.DATASET = 'imagenet'
# Input image size (square)
_C.DATA.IMG_SIZE = 224
# Interpolation: bicubic | bilinear | random (timm picks per image; val: bilinear) | nearest | box | hamming | lanczos
_C.DATA.INTERPOLATION = 'bicubic'
# Read images straight out of train.zip / val.zip (official zip layout with *_map.txt)
_C.DATA.ZIP_MODE = False
# Zip mode caching: no (read on demand) | full (cache all in RAM) | part (each rank caches its shard)
_C.DATA.CACHE_MODE = 'part'
# Pin CPU memory in the DataLoader for faster host-to-device copies; data loading workers per process
_C.DATA.PIN_MEMORY = True
_C.DATA.NUM_WORKERS = 8
# SimMIM pre-training: side of the square mask patches in pixels (a multiple of the model's patch size that
# divides IMG_SIZE), and the fraction of them masked in each image
_C.DATA.MASK_PATCH_SIZE = 32
_C.DATA.MASK_RATIO = 0.6
# Largest fraction of unreadable images tolerated in one epoch before the run stops
_C.DATA.MAX_BAD_FRACTION = 0.01
# Keep loader workers alive between epochs (saves start-up time each epoch)
_C.DATA.PERSISTENT_WORKERS = True
# Batches each worker loads ahead
_C.DATA.PREFETCH_FACTOR = 2
# Opt-in faster train crops (off: timm's pixels; scripts/crop_fidelity.py). FAST_CROP: torch's uint8 resize (most
# values within a level); FAST_DECODE: JPEG decoded at 1/2..1/8 scale when the crop keeps IMG_SIZE (~10 levels off)
_C.DATA.FAST_CROP = False
_C.DATA.FAST_DECODE = False
# Val: the same fast resize for the val resize + center crop (opt-in: pixels may differ from PIL's by a level)
_C.DATA.VAL_FAST_RESIZE = False
# Where images are finished is a data mode (data/mode.py); the device is the GPU, as these two keys say.
# With CUDA: loaders yield uint8 images that the GPU normalizes and random-erases (the device_normalize mode)
_C.DATA.DEVICE_NORMALIZE = True
# With DEVICE_NORMALIZE (the device_decode mode): JPEGs are decoded, cropped and resized on the GPU (nvJPEG via
# TorchCodec, else torchvision.io); workers only read files and draw crops. Validation always; training when the
# recipe has no PIL-only augmentation (AUG.AUTO_AUGMENT none, AUG.COLOR_JITTER 0). Pixels within about a level of
# the CPU path
_C.DATA.GPU_DECODE = False

# -----------------------------------------------------------------------------
# Model settings
# -----------------------------------------------------------------------------
_C.MODEL = CN()
# Model type: swin (Swin Transformer v1), swinv2 (Swin Transformer V2) or swin_mlp (Swin MLP)
_C.MODEL.TYPE = 'swin'
# Model name: names the output sub-folder
_C.MODEL.NAME = 'swin_tiny_patch4_window7_224'
# classification | simmim (SimMIM pre-training on DATA_PATH/train, no labels, no validation) | auto: simmim when
# MODEL.NAME starts with 'simmim_pretrain' (as the official pre-training files), else classification (saved resolved)
_C.MODEL.TASK = 'auto'
# Pretrained weights for fine-tuning (official or timm format); optimizer state is not restored
_C.MODEL.PRETRAINED = ''
# Checkpoint to resume training from (wins over TRAIN.AUTO_RESUME)
_C.MODEL.RESUME = ''
# Number of classes; must match the dataset. Unset in YAML (BASE chain too) and --opts: the dataset's count, logged
_C.MODEL.NUM_CLASSES = 1000
# Dropout rate (after the patch embedding, on the attention projection and in the MLPs, as officially)
_C.MODEL.DROP_RATE = 0.0
# Stochastic depth rate (linearly increasing over blocks)
_C.MODEL.DROP_PATH_RATE = 0.1
# Label smoothing (used when Mixup/CutMix are off; otherwise folded into the mixed targets)
_C.MODEL.LABEL_SMOOTHING = 0.1

# Swin Transformer v1 parameters
_C.MODEL.SWIN = CN()
# Patch size of the patch embedding (stride of the first conv)
_C.MODEL.SWIN.PATCH_SIZE = 4
# Input channels
_C.MODEL.SWIN.IN_CHANS = 3
# Channels of the first stage (doubled at every stage)
_C.MODEL.SWIN.EMBED_DIM = 96
# Blocks per stage
_C.MODEL.SWIN.DEPTHS = [2, 2, 6, 2]
# Attention heads per stage
_C.MODEL.SWIN.NUM_HEADS = [3, 6, 12, 24]
# Attention window size (tokens per side)
_C.MODEL.SWIN.WINDOW_SIZE = 7
# Hidden width of the MLP relative to the embedding width
_C.MODEL.SWIN.MLP_RATIO = 4.
# Learnable bias for query, key and value
_C.MODEL.SWIN.QKV_BIAS = True
# Override of the attention scale head_dim ** -0.5 (None keeps the default)
_C.MODEL.SWIN.QK_SCALE = None
# Absolute position embedding added after the patch embedding
_C.MODEL.SWIN.APE = False
# LayerNorm after the patch embedding
_C.MODEL.SWIN.PATCH_NORM = True
# Window attention through torch's scaled_dot_product_attention (False: the explicit softmax path)
_C.MODEL.SWIN.FUSED_ATTN = True

# Swin Transformer V2 parameters (MODEL.TYPE swinv2); the keys as in MODEL.SWIN, plus:
_C.MODEL.SWINV2 = CN()
_C.MODEL.SWINV2.PATCH_SIZE = 4
_C.MODEL.SWINV2.IN_CHANS = 3
_C.MODEL.SWINV2.EMBED_DIM = 96
_C.MODEL.SWINV2.DEPTHS = [2, 2, 6, 2]
_C.MODEL.SWINV2.NUM_HEADS = [3, 6, 12, 24]
_C.MODEL.SWINV2.WINDOW_SIZE = 7
_C.MODEL.SWINV2.MLP_RATIO = 4.
_C.MODEL.SWINV2.QKV_BIAS = True
_C.MODEL.SWINV2.APE = False
_C.MODEL.SWINV2.PATCH_NORM = True
# Window size of each stage in pre-training (normalizes the position bias coordinates; 0: WINDOW_SIZE)
_C.MODEL.SWINV2.PRETRAINED_WINDOW_SIZES = [0, 0, 0, 0]
# Window attention through torch's scaled_dot_product_attention (False: the explicit softmax path)
_C.MODEL.SWINV2.FUSED_ATTN = True
# Swin MLP parameters (MODEL.TYPE swin_mlp); NUM_HEADS = channel groups of the spatial MLPs
_C.MODEL.SWIN_MLP = CN()
_C.MODEL.SWIN_MLP.PATCH_SIZE = 4
_C.MODEL.SWIN_MLP.IN_CHANS = 3
_C.MODEL.SWIN_MLP.EMBED_DIM = 96
_C.MODEL.SWIN_MLP.DEPTHS = [2, 2, 6, 2]
_C.MODEL.SWIN_MLP.NUM_HEADS = [3, 6, 12, 24]
_C.MODEL.SWIN_MLP.WINDOW_SIZE = 7
_C.MODEL.SWIN_MLP.MLP_RATIO = 4.
_C.MODEL.SWIN_MLP.APE = False
_C.MODEL.SWIN_MLP.PATCH_NORM = True
# SimMIM: reconstruct pixels normalized by the mean / std of their PATCH_SIZE x PATCH_SIZE neighbourhood (odd)
_C.MODEL.SIMMIM = CN()
_C.MODEL.SIMMIM.NORM_TARGET = CN()
_C.MODEL.SIMMIM.NORM_TARGET.ENABLE = False
_C.MODEL.SIMMIM.NORM_TARGET.PATCH_SIZE = 47

# Exponential moving average of the weights, evaluated alongside the model; its decay per optimizer step
_C.MODEL_EMA = False
_C.MODEL_EMA_DECAY = 0.9999
# EMA warmup (timm ModelEmaV3 use_warmup): the decay at step t is min(MODEL_EMA_DECAY, 1 - (1 + t) ** (-2/3))
_C.MODEL_EMA_WARMUP = False
# Distillation (distillation.py): (1 - ALPHA) * task loss + ALPHA * (none | soft: KL at temperature TAU x TAU^2 |
# hard: CE on the teacher's argmax); teacher: a config of a family built here, or a timm name; local weights
_C.DISTILL = CN()
_C.DISTILL.TYPE = 'none'
_C.DISTILL.ALPHA = 0.5
_C.DISTILL.TAU = 1.0
_C.DISTILL.TEACHER_CFG = ''
_C.DISTILL.TEACHER_TIMM = ''
_C.DISTILL.TEACHER_WEIGHTS = ''

# -----------------------------------------------------------------------------
# Training settings
# -----------------------------------------------------------------------------
_C.TRAIN = CN()
# First epoch of a fresh run, from scratch or --pretrained (as officially: training starts at this epoch, the LR
# schedule at its first step, START_EPOCH x steps per epoch); a resumed run continues from its checkpoint instead
_C.TRAIN.START_EPOCH = 0
# Total training epochs
_C.TRAIN.EPOCHS = 300
# Linear warmup epochs (counted in steps)
_C.TRAIN.WARMUP_EPOCHS = 20
# AdamW/SGD weight decay (not applied to norms, biases and position tables)
_C.TRAIN.WEIGHT_DECAY = 0.05
# Peak learning rate for a global batch of 512 (scaled linearly, see LINEAR_SCALE_LR)
_C.TRAIN.BASE_LR = 5e-4
# Learning rate at the start of warmup, for a global batch of 512
_C.TRAIN.WARMUP_LR = 5e-7
# Final learning rate of the decay, for a global batch of 512
_C.TRAIN.MIN_LR = 5e-6
# Scale BASE_LR/WARMUP_LR/MIN_LR by global batch / 512 (the official recipe)
_C.TRAIN.LINEAR_SCALE_LR = True
# Gradient clipping max norm (0 or None: no clipping)
_C.TRAIN.CLIP_GRAD = 5.0
# Resume from the newest valid checkpoint in the output folder
_C.TRAIN.AUTO_RESUME = True
# Gradient accumulation steps (micro-batches per optimizer step)
_C.TRAIN.ACCUMULATION_STEPS = 1
# Activation recomputation (the official name says checkpoint: torch.utils.checkpoint; nothing is written to disk):
# each block's activations are recomputed in backward to save memory
_C.TRAIN.USE_CHECKPOINT = False
# torch.compile the DDP-wrapped model (graphs split for DDP) with COMPILE_BACKEND: inductor | aot_eager (debugging)
_C.TRAIN.COMPILE = False
_C.TRAIN.COMPILE_BACKEND = 'inductor'
# Layer-wise learning rate decay for fine-tuning (1.0: off)
_C.TRAIN.LAYER_DECAY = 1.0
# Partial fine-tuning: what does not train (no gradients, no optimizer state, no weight decay); one log line says
# what trains. PATCH_EMBED: the patch embedding (and absolute position embedding); STAGES: the first N stages
# (their blocks and the patch merging that closes each) and the patch embedding before them, as detection
# backbones' frozen_stages; ALL_BUT_HEAD: everything but the classifier (a linear probe)
_C.TRAIN.FREEZE = CN()
_C.TRAIN.FREEZE.PATCH_EMBED = False
_C.TRAIN.FREEZE.STAGES = 0
_C.TRAIN.FREEZE.ALL_BUT_HEAD = False

# LR scheduler
_C.TRAIN.LR_SCHEDULER = CN()
# Schedule: cosine | linear | step | multistep (all with linear warmup, updated every step)
_C.TRAIN.LR_SCHEDULER.NAME = 'cosine'
# Epoch interval to decay LR, used in StepLRScheduler
_C.TRAIN.LR_SCHEDULER.DECAY_EPOCHS = 30
# LR decay rate, used in StepLRScheduler
_C.TRAIN.LR_SCHEDULER.DECAY_RATE = 0.1
# Warmup comes before the decay (the decay then spans EPOCHS - WARMUP_EPOCHS)
_C.TRAIN.LR_SCHEDULER.WARMUP_PREFIX = True
# LR decay factor at each milestone, used in MultiStepLRScheduler
_C.TRAIN.LR_SCHEDULER.GAMMA = 0.1
# Milestone epochs, used in MultiStepLRScheduler
_C.TRAIN.LR_SCHEDULER.MULTISTEPS = []

# Optimizer
_C.TRAIN.OPTIMIZER = CN()
# Optimizer: adamw | sgd (as officially) | fused_lamb (apex's, else timm's lamb) | a timm.optim.list_optimizers()
# name (lamb, lion, adopt, ...), on the same no-weight-decay groups and layer decay
_C.TRAIN.OPTIMIZER.NAME = 'adamw'
# Epsilon, betas (lion's are (0.9, 0.99)) and SGD momentum, each given to every optimizer that takes it
_C.TRAIN.OPTIMIZER.EPS = 1e-8
_C.TRAIN.OPTIMIZER.BETAS = (0.9, 0.999)
_C.TRAIN.OPTIMIZER.MOMENTUM = 0.9
# Training loss: ce | bce (timm's BinaryCrossEntropy as DeiT III; without Mixup, smoothed by MODEL.LABEL_SMOOTHING)
_C.TRAIN.LOSS = 'ce'
# bce only: targets above this become 1, the others 0 (timm --bce-target-thresh; DeiT III uses 0.0); negative: off
_C.TRAIN.BCE_TARGET_THRESHOLD = -1.0

# [Swin-MoE] kept so official YAML files parse
_C.TRAIN.MOE = CN()
_C.TRAIN.MOE.SAVE_MASTER = False

# -----------------------------------------------------------------------------
# Augmentation settings
# -----------------------------------------------------------------------------
_C.AUG = CN()
# Color jitter factor
_C.AUG.COLOR_JITTER = 0.4
# AutoAugment policy: "v0", "original", "rand-m9-mstd0.5-inc1", ... ('' or 'none': off)
_C.AUG.AUTO_AUGMENT = 'rand-m9-mstd0.5-inc1'
# Random erasing probability
_C.AUG.REPROB = 0.25
# Random erasing mode: const | rand | pixel
_C.AUG.REMODE = 'pixel'
# Random erasing count
_C.AUG.RECOUNT = 1
# Horizontal flip probability (timm's hflip; 0 for data where mirroring changes the class, e.g. digits)
_C.AUG.HFLIP = 0.5
# Mixup alpha, mixup enabled if > 0
_C.AUG.MIXUP = 0.8
# Cutmix alpha, cutmix enabled if > 0
_C.AUG.CUTMIX = 1.0
# Cutmix min/max ratio, overrides alpha and enables cutmix if set
_C.AUG.CUTMIX_MINMAX = None
# Probability of performing mixup or cutmix when either/both is enabled
_C.AUG.MIXUP_PROB = 1.0
# Probability of switching to cutmix when both mixup and cutmix enabled
_C.AUG.MIXUP_SWITCH_PROB = 0.5
# How to apply mixup/cutmix params: per "batch", "pair", "elem" (element) or "half" (timm)
_C.AUG.MIXUP_MODE = 'batch'
# Repeated augmentation (DeiT, timm --aug-repeats): N >= 2 puts each sampled image N times in an epoch, each
# copy augmented anew, on different ranks; an epoch keeps its length (about 1/N of the images). 0 or 1: off
_C.AUG.REPEATS = 0

# -----------------------------------------------------------------------------
# Testing settings
# -----------------------------------------------------------------------------
_C.TEST = CN()
# Center crop for validation: resize to int(256/224 * IMG_SIZE), then crop IMG_SIZE
_C.TEST.CROP = True
# Validate every image on rank 0 only (slow; results are exact either way)
_C.TEST.SEQUENTIAL = False
# Shuffle the validation set (only changes the order of logged batches)
_C.TEST.SHUFFLE = False

# -----------------------------------------------------------------------------
# Misc
# -----------------------------------------------------------------------------
# [Deprecated] kept so official YAML files parse; use AMP_ENABLE
_C.ENABLE_AMP = False
# Mixed precision on CUDA (on CPU only when AMP_DTYPE is bfloat16 explicitly)
_C.AMP_ENABLE = True
# Mixed precision dtype: auto (bfloat16 where supported, else float16) | float16 | bfloat16
_C.AMP_DTYPE = 'auto'
# float32 matmuls/convolutions on CUDA use TF32 tensor cores (Ampere+, as timm does; 10-bit mantissa). False: IEEE fp32
_C.TF32 = True
# [Deprecated] apex opt level, kept so old YAML files parse; ignored
_C.AMP_OPT_LEVEL = ''
# Root of the output folder: runs write to OUTPUT/MODEL.NAME/TAG
_C.OUTPUT = 'output'
# Tag of the experiment
_C.TAG = 'default'
# Save a checkpoint every SAVE_FREQ epochs (and always after the last epoch)
_C.SAVE_FREQ = 1
# Keep only the newest KEEP_CHECKPOINTS ckpt_epoch_N.pth files (0: keep all); last/best are always kept
_C.KEEP_CHECKPOINTS = 3
# Also save mid-epoch once this many minutes passed since the last checkpoint: bounds the work a crash loses (0: off)
_C.SAVE_EVERY_MINUTES = 30.0
# A failed checkpoint write (disk full, read-only, permission), earlier files intact: stop (exit 2) | continue
_C.SAVE_FAILURE = 'stop'
# Log a training line every PRINT_FREQ steps
_C.PRINT_FREQ = 10
# Random seed (each rank uses SEED + rank)
_C.SEED = 0
# Only evaluate the model (--eval)
_C.EVAL_MODE = False
# Only measure throughput (--throughput)
_C.THROUGHPUT_MODE = False
_C.THROUGHPUT = CN()  # the --throughput protocol; the official one (50 + 30 passes) unless shortened
# Untimed forward passes (>= 1) before the clock starts (a CPU run may want fewer: the first line says how long)
_C.THROUGHPUT.WARMUP_PASSES = 50
# Timed forward passes of one batch
_C.THROUGHPUT.TIMED_PASSES = 30
# Device: auto (cuda when available) | cpu | cuda | cuda:N
_C.DEVICE = 'auto'
# [Official] FUSED_WINDOW_PROCESS: accepted, the SDPA path is used; FUSED_LAYERNORM: apex's, when importable
_C.FUSED_WINDOW_PROCESS = False
_C.FUSED_LAYERNORM = False
_C.DIST = CN()  # distributed runs: timeouts, so that no rank waits forever
# Process-group timeout (s): how long a collective waits for a live but busy rank (rank 0 saving, resume scan)
_C.DIST.TIMEOUT = 1800
# Seconds until a rank missing from a (re)started group, or silent (killed, node lost), ends all with one line
_C.DIST.PEER_TIMEOUT = 60
# Derived values, computed by finalize() -- set from the environment and the keys above, not by hand
# Local rank of this process (from torchrun's LOCAL_RANK; --local_rank is accepted)
_C.LOCAL_RANK = 0
# Global rank and number of processes (from torchrun's RANK / WORLD_SIZE)
_C.RANK = 0
_C.WORLD_SIZE = 1
# The run's folder: OUTPUT/MODEL.NAME/TAG
_C.OUTPUT_DIR = ''
# Global batch = DATA.BATCH_SIZE x WORLD_SIZE x TRAIN.ACCUMULATION_STEPS
_C.TRAIN.GLOBAL_BATCH_SIZE = 0
# Learning rates actually used (the TRAIN.*LR values scaled by the global batch when enabled)
_C.TRAIN.EFFECTIVE_LR = 0.0
_C.TRAIN.EFFECTIVE_WARMUP_LR = 0.0
_C.TRAIN.EFFECTIVE_MIN_LR = 0.0

_C.MODEL.NUM_CLASSES_FROM_DATA = False  # True when no YAML file or --opts pair set MODEL.NUM_CLASSES
_DERIVED_KEYS = ('LOCAL_RANK', 'RANK', 'WORLD_SIZE', 'OUTPUT_DIR', 'MODEL.NUM_CLASSES_FROM_DATA',
                 'TRAIN.GLOBAL_BATCH_SIZE', 'TRAIN.EFFECTIVE_LR', 'TRAIN.EFFECTIVE_WARMUP_LR', 'TRAIN.EFFECTIVE_MIN_LR')
# Official keys accepted so that official YAML files and flags work unchanged, though nothing here implements
# them; one warning names those set to a value other than the default (key: what it switches on officially)
_NOT_IMPLEMENTED = {
    'FUSED_WINDOW_PROCESS': 'the official CUDA window kernel; the SDPA attention path is used instead',
    'AMP_OPT_LEVEL': 'apex AMP; torch.amp is used instead (--amp-opt-level O0 turns it off)',
    'TRAIN.MOE.SAVE_MASTER': 'Swin-MoE',
}
_logger = logging.getLogger('swin.config')


def get_defaults() -> CN:
    """A fresh, mutable copy of the defaults."""
    return _C.clone()


def not_implemented_settings(config: CN) -> list[str]:
    """``KEY value (purpose)`` for each accepted-but-not-implemented key set away from its default."""
    return [f"{key} {get_value(config, key)!r} ({purpose})" for key, purpose in _NOT_IMPLEMENTED.items()
            if get_value(config, key) != get_value(_C, key)]


def not_implemented_warning(config: CN) -> str | None:
    """One line naming the accepted-but-not-implemented keys this config sets, or None."""
    ignored = not_implemented_settings(config)
    if not ignored:
        return None
    return f"config keys accepted for compatibility but not implemented, so without effect: {'; '.join(ignored)}"


# -----------------------------------------------------------------------------
# Derived values and validation
# -----------------------------------------------------------------------------
def finalize(config: CN, environ: Mapping[str, str] | None = None) -> CN:
    """Compute derived values from the environment (torchrun) and the keys, validate, freeze; on rank 0,
    warn once about settings that have no effect here."""
    env = os.environ if environ is None else environ
    config.defrost()
    config.LOCAL_RANK = int(env.get('LOCAL_RANK', config.LOCAL_RANK))
    config.RANK = int(env.get('RANK', 0))
    config.WORLD_SIZE = int(env.get('WORLD_SIZE', 1))
    config.OUTPUT_DIR = os.path.join(config.OUTPUT, config.MODEL.NAME, config.TAG)
    if config.ENABLE_AMP:  # the deprecated spelling turns AMP on, as in the official code
        config.AMP_ENABLE = True
    if config.MODEL.TASK == 'auto':
        config.MODEL.TASK = 'simmim' if config.MODEL.NAME.startswith('simmim_pretrain') else 'classification'
    validate(config)
    config.TRAIN.GLOBAL_BATCH_SIZE = config.DATA.BATCH_SIZE * config.WORLD_SIZE * config.TRAIN.ACCUMULATION_STEPS
    scale = config.TRAIN.GLOBAL_BATCH_SIZE / 512.0 if config.TRAIN.LINEAR_SCALE_LR else 1.0
    config.TRAIN.EFFECTIVE_LR = config.TRAIN.BASE_LR * scale
    config.TRAIN.EFFECTIVE_WARMUP_LR = config.TRAIN.WARMUP_LR * scale
    config.TRAIN.EFFECTIVE_MIN_LR = config.TRAIN.MIN_LR * scale
    config.freeze()
    warning = not_implemented_warning(config)
    if warning and config.RANK == 0:
        _logger.warning(warning)
    return config


# -----------------------------------------------------------------------------
# Entry points
# -----------------------------------------------------------------------------
def load_config(path: str | None = None, opts: Sequence[Any] = (),
                environ: Mapping[str, str] | None = None, saved: str | None = None) -> CN:
    """Config from a YAML file (or a checkpoint's ``saved`` YAML text, or only the defaults) and KEY VALUE
    overrides; for scripts and tests. ``environ`` stands in for os.environ (torchrun's RANK, WORLD_SIZE, ...)."""
    config, given = get_defaults(), set()
    if path:
        merge_file(config, path, given)
    elif saved:
        merge_dict(config, yaml.safe_load(saved) or {}, 'the checkpoint\'s config', given=given)
    merge_opts(config, opts, _DERIVED_KEYS, given)
    config.MODEL.NUM_CLASSES_FROM_DATA = 'MODEL.NUM_CLASSES' not in given
    return finalize(config, environ)


def get_config(args: argparse.Namespace) -> CN:
    """Config of a run from the parsed command line (see build_parser)."""
    config, given = get_defaults(), set()
    merge_file(config, args.cfg, given)
    merge_opts(config, args.opts, _DERIVED_KEYS, given)
    merge_flags(config, args)  # after --opts: a flag wins, as in the official code
    config.MODEL.NUM_CLASSES_FROM_DATA = 'MODEL.NUM_CLASSES' not in given
    if getattr(args, 'local_rank', None) is not None and 'LOCAL_RANK' not in os.environ:
        config.LOCAL_RANK = args.local_rank
    return finalize(config)


def config_from_yaml_text(text: str) -> CN:
    """Rebuild a config saved as YAML text (in a checkpoint); derived values are kept as saved."""
    config = get_defaults()
    merge_dict(config, yaml.safe_load(text) or {}, 'checkpoint config')
    config.freeze()
    return config
