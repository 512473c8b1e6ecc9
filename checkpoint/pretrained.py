"""Fine-tuning from pretrained weights (MODEL.PRETRAINED): a new image / window size, a new classifier.

The model family (MODEL.TYPE, see weights.WeightFamily) converts the layout and resizes what depends on
the image or window size; the classifier rules here are shared by every family.
"""
from __future__ import annotations

import logging
import pkgutil

import torch
from yacs.config import CfgNode

from errors import CheckpointError
from models.simmim import encoder_state_dict, is_simmim_state_dict
from utils import unwrap_model

from .weights import (
    StateDict,
    check_fit,
    extract_state_dict,
    is_derived,
    read_weights,
    weight_family,
    with_model_buffers,
)


def imagenet22k_to_1k_indices() -> list[int]:
    """Row of Swin's 21841-class ImageNet-22K head for each ImageNet-1K class, in 1K order (1000 indices).

    Swin's 22K class order matches timm's imagenet21k_goog_synsets.txt (sorted WordNet ids) for every 1K
    synset; 'teddy, teddy bear' (n04399382) is not among the 22K synsets, and the official map uses
    n03013580 ('... slip, teddy') for it. This reproduces microsoft/Swin-Transformer data/map22kto1k.txt exactly.
    (timm's imagenet22k_ms_synsets.txt is a different order: FocalNet's 21842 classes with 1K first.)
    """
    def synsets(name):
        return pkgutil.get_data('timm.data', f'_info/{name}').decode('utf-8').split()

    row = {synset: i for i, synset in enumerate(synsets('imagenet21k_goog_synsets.txt'))}
    substitute = {'n04399382': 'n03013580'}
    indices = [row[substitute.get(s, s)] for s in synsets('imagenet_synsets.txt')]
    if len(indices) != 1000 or len(set(indices)) != 1000 or max(indices) >= 21841:
        raise CheckpointError("the ImageNet-22K -> 1K class map derived from timm's synset lists is inconsistent")
    return indices


def _adapt_head(sd, model_sd, logger):
    """Keep, map (22K -> 1K) or drop the classifier; returns True when the model's head must be re-initialized."""
    if 'head.weight' not in model_sd:  # a headless model (NUM_CLASSES 0): a pretrained head has no place
        sd.pop('head.weight', None)
        sd.pop('head.bias', None)
        return False
    old, new = sd.get('head.weight'), model_sd['head.weight']
    if old is not None and old.shape == new.shape:
        return False
    if old is not None and old.shape[0] == 21841 and new.shape[0] == 1000 and old.shape[1] == new.shape[1]:
        rows = torch.tensor(imagenet22k_to_1k_indices())
        sd['head.weight'], sd['head.bias'] = old[rows], sd['head.bias'][rows]
        logger.info("classifier: ImageNet-22K head (21841 classes) mapped to the 1000 ImageNet-1K classes")
        return False
    what = f"{old.shape[0]} classes" if old is not None else "no classifier"
    logger.info(f"classifier: the pretrained weights have {what}, the model {new.shape[0]}: head re-initialized "
                f"to zero")
    sd.pop('head.weight', None)
    sd.pop('head.bias', None)
    return True


def _match_absolute_pos_embed(sd, model_sd, logger):
    if 'absolute_pos_embed' in model_sd and 'absolute_pos_embed' not in sd:
        logger.warning("the pretrained weights have no absolute_pos_embed: it keeps its initialization")
        sd['absolute_pos_embed'] = model_sd['absolute_pos_embed']
    if 'absolute_pos_embed' in sd and 'absolute_pos_embed' not in model_sd:
        logger.warning("the pretrained weights have an absolute_pos_embed, the model (APE off) does not: dropped")
        del sd['absolute_pos_embed']


def adapt_pretrained(sd: StateDict, model_sd: StateDict, model_type: str,
                     logger: logging.Logger) -> dict[str, torch.Tensor]:
    """Pretrained weights (official layout) made to fit model_sd: derived buffers from the model, tensors the
    family resizes, the classifier kept / mapped 22K -> 1K / zeroed, the absolute position embedding matched."""
    sd = with_model_buffers(sd, model_sd)
    resized = weight_family(model_type).adapt_pretrained(sd, model_sd, logger)
    if resized:
        logger.info(f"resized by bicubic interpolation: {resized[0]}"
                    + (f" and {len(resized) - 1} more" if len(resized) > 1 else ""))
    if _adapt_head(sd, model_sd, logger):
        sd['head.weight'] = torch.zeros_like(model_sd['head.weight'])
        sd['head.bias'] = torch.zeros_like(model_sd['head.bias'])
    _match_absolute_pos_embed(sd, model_sd, logger)
    return sd


def _simmim_encoder(sd, model_sd, logger):
    """The encoder inside SimMIM pre-training weights (ours or official) when the model is a classifier."""
    if not is_simmim_state_dict(sd) or is_simmim_state_dict(model_sd):
        return sd
    encoder, dropped = encoder_state_dict(sd)
    logger.info(f"SimMIM pre-training weights: the encoder's {len(encoder)} tensors are used ('encoder.' "
                f"prefix removed); left out: {', '.join(dropped)}")
    return encoder


def load_pretrained(config: CfgNode, model: torch.nn.Module, logger: logging.Logger) -> None:
    """Fine-tune start from MODEL.PRETRAINED (official or, per family, foreign weights; or the encoder of SimMIM
    pre-training weights); optimizer state and epoch are not used. Logs the model tensors the file lacks."""
    path = config.MODEL.PRETRAINED
    logger.info(f"fine-tuning from {path}")
    model = unwrap_model(model)
    model_sd = model.state_dict()
    source = f"pretrained weights {path}"
    sd = _simmim_encoder(extract_state_dict(read_weights(path), source, config.MODEL.TYPE), model_sd, logger)
    missing = [key for key in model_sd if key not in sd and not is_derived(key)]
    if missing:
        logger.info(f"not in the pretrained weights (initialized here): {', '.join(missing)}")
    sd = adapt_pretrained(sd, model_sd, config.MODEL.TYPE, logger)
    check_fit(sd, model_sd, source)
    model.load_state_dict(sd, strict=True)
    logger.info(f"loaded pretrained weights {path} ({len(sd)} tensors)")
