"""Train, evaluate or benchmark a Swin Transformer.

    python main.py --cfg configs/demo.yaml                                   # CPU demo, tiny Swin on digits
    torchrun --nproc_per_node 8 main.py --cfg configs/swin_tiny.yaml --data-path /imagenet
    python main.py --cfg configs/swin_tiny.yaml --data-path /imagenet --eval --resume swin_tiny.pth
    python main.py --cfg configs/swin_tiny.yaml --throughput --batch-size 64

The story of a run, in order: config -> processes -> logging -> model -> data -> optimizer and schedule
-> resume or pretrained weights -> throughput | eval | train (epoch: train, validate, checkpoint).
"""
from __future__ import annotations

import os
import sys
import time
import traceback

import torch
from timm.data import Mixup
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from yacs.config import CfgNode

import checkpoint
import utils
from config import build_parser, get_config
from data import build_loader, check_bad_images, to_device
from engine import throughput, train_one_epoch, validate
from errors import SwinTrainError
from evaluation import ClassCounts, write_eval_results
from logger import MetricWriter, create_logger, format_eta, format_max_accuracy, format_network_accuracy, save_config
from lr_scheduler import build_scheduler
from models import build_model
from optimizer import build_optimizer
from run_state import RunState, Runtime, TrainingObjects
from tasks import build_task


def main(config: CfgNode) -> int:
    device = utils.init_distributed(config)
    logger = create_logger(config.OUTPUT_DIR, config.RANK, name=config.MODEL.NAME)
    if utils.is_main_process():
        save_config(config, config.OUTPUT_DIR)
    runtime = Runtime(device, utils.resolve_precision(config, device), logger)
    logger.info(f"rank {config.RANK}/{config.WORLD_SIZE} (pid {os.getpid()}) on {device}, precision "
                f"{runtime.precision}; full config: {config.OUTPUT_DIR}/config.yaml")

    model = build_model(config, is_pretrain=config.MODEL.TASK == 'simmim').to(device)
    logger.info(f"model {config.MODEL.NAME}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, "
                f"{model.flops() / 1e9:.2f} GMACs at {config.DATA.IMG_SIZE}px")

    if config.THROUGHPUT_MODE:
        return run_throughput(config, model, runtime)

    _, _, loader_train, loader_val, mixup_fn = build_loader(config, device)

    if config.EVAL_MODE:
        return run_eval(config, model, loader_val, runtime)

    return run_training(config, model, loader_train, loader_val, mixup_fn, runtime)


def run_throughput(config: CfgNode, model: torch.nn.Module, runtime: Runtime) -> int:
    """Images/s of the forward pass; a real val batch when a dataset is given, random input otherwise."""
    device = runtime.device
    if config.DATA.DATA_PATH:
        images, _ = to_device(next(iter(build_loader(config, device)[3])), device)
    else:
        runtime.logger.info("no --data-path: measuring throughput on random input")
        images = torch.randn(config.DATA.BATCH_SIZE, 3, config.DATA.IMG_SIZE, config.DATA.IMG_SIZE, device=device)
    throughput(images, model, runtime.precision, runtime.logger)
    return 0


def run_eval(config: CfgNode, model: torch.nn.Module, loader_val: DataLoader, runtime: Runtime) -> int:
    """Evaluate released or trained weights (never trains, never writes a checkpoint); rank 0 writes
    eval_results.json, and confusion_matrix.png for at most 100 classes, into the output folder."""
    logger = runtime.logger
    if config.MODEL.PRETRAINED:
        path = config.MODEL.PRETRAINED
        checkpoint.load_pretrained(config, model, logger)
    else:
        path = config.MODEL.RESUME or checkpoint.find_resume_checkpoint(config.OUTPUT_DIR, logger)
        if not path:
            raise SwinTrainError("--eval needs weights: give --resume PATH or --pretrained PATH")
        checkpoint.load_model_weights(model, path, logger, model_type=config.MODEL.TYPE)
    counts = ClassCounts(config.MODEL.NUM_CLASSES, runtime.device)
    acc1, acc5, loss = validate(config, loader_val, model, runtime.device, runtime.precision, logger,
                                class_counts=counts)
    logger.info(format_network_accuracy(len(loader_val.dataset), acc1))
    if utils.is_main_process():
        summary = {'checkpoint': os.path.abspath(path), 'images': int(counts.images.sum()), 'acc1': acc1,
                   'acc5': acc5, 'loss': loss}
        for written in write_eval_results(config, summary, counts, loader_val.dataset.classes):
            logger.info(f"wrote {written}")
    return 0


def build_training_objects(config, model, mixup_fn, steps_per_epoch, precision, logger):
    """Task (batch -> loss), optimizer, per-step LR schedule, gradient scaler (float16 only) and EMA."""
    optimizer = build_optimizer(config, model, logger)
    return TrainingObjects(
        model=model, task=build_task(config, mixup_fn), optimizer=optimizer,
        lr_scheduler=build_scheduler(config, optimizer, steps_per_epoch),
        scaler=torch.amp.GradScaler(precision.device_type) if precision.needs_scaler else None,
        model_ema=ModelEmaV3(model, decay=config.MODEL_EMA_DECAY) if config.MODEL_EMA else None)


def wrap_model(config, model, device, logger):
    """torch.compile (optional) then DistributedDataParallel when running on several processes."""
    if config.TRAIN.COMPILE:
        logger.info("compiling the model with torch.compile (the first steps are slow)")
        model = torch.compile(model)
    if config.WORLD_SIZE > 1:
        model = DistributedDataParallel(model, device_ids=[device] if device.type == 'cuda' else None)
    return model


def resume_or_start(config, objects, steps_per_epoch, logger):
    """Where training starts: explicit --resume > auto-resume (rank 0 picks, broadcast) > --pretrained > scratch."""
    resume_path = config.MODEL.RESUME
    if not resume_path and config.TRAIN.AUTO_RESUME:
        # rank 0 decides, so ranks with their own local output folders cannot resume from different files
        found = checkpoint.find_resume_checkpoint(config.OUTPUT_DIR, logger) if utils.is_main_process() else None
        resume_path = utils.broadcast_object(found)
    state = RunState()
    if resume_path:
        ckpt = checkpoint.load_training_state(resume_path, config, logger)
        state = checkpoint.restore_training_state(ckpt, objects, logger, rank=config.RANK,
                                                  steps_per_epoch=steps_per_epoch)
        logger.info(f"resumed from {resume_path}: epoch {state.epoch}, micro-batch {state.micro_batch} "
                    f"(step {state.steps_in_epoch(config.TRAIN.ACCUMULATION_STEPS)}), "
                    f"max accuracy {state.max_accuracy:.2f}%")
    elif config.MODEL.PRETRAINED:
        checkpoint.load_pretrained(config, objects.model, logger)
    return state


def save(config, objects, state, class_names, logger, is_best=False):
    """Gather every rank's RNG state, then rank 0 writes the checkpoint while the others wait."""
    rng_states = utils.all_gather_objects(checkpoint.capture_rng_state())
    path = None
    if utils.is_main_process():
        ckpt = checkpoint.training_state(config, objects, state, class_names, rng_states)
        path = checkpoint.save_checkpoint(config, ckpt, logger, is_best=is_best)
    utils.barrier()
    return path


def run_training(config: CfgNode, model: torch.nn.Module, loader_train: DataLoader, loader_val: DataLoader,
                 mixup_fn: Mixup | None, runtime: Runtime) -> int:
    """Train from scratch, a checkpoint or pretrained weights; validate and save after every epoch."""
    logger, accumulation = runtime.logger, config.TRAIN.ACCUMULATION_STEPS
    steps_per_epoch = len(loader_train) // accumulation  # >= 1: build_loader checks
    objects = build_training_objects(config, model, mixup_fn, steps_per_epoch, runtime.precision, logger)
    logger.info(f"global batch {config.TRAIN.GLOBAL_BATCH_SIZE} = {config.DATA.BATCH_SIZE} x "
                f"{config.WORLD_SIZE} processes x {accumulation} accumulation -> lr "
                f"{config.TRAIN.EFFECTIVE_LR:.3g} (warmup from {config.TRAIN.EFFECTIVE_WARMUP_LR:.3g}, "
                f"min {config.TRAIN.EFFECTIVE_MIN_LR:.3g}); {steps_per_epoch} steps per epoch")

    state = resume_or_start(config, objects, steps_per_epoch, logger)
    objects.lr_scheduler.step_update(state.global_step)
    objects.model = wrap_model(config, model, runtime.device, logger)
    class_names = list(loader_train.dataset.classes)
    runtime.writer = writer = MetricWriter(config.OUTPUT_DIR, enabled=utils.is_main_process())
    runtime.stop = stop = utils.StopRequest().install()
    acc1 = None
    logger.info(f"Start training: epochs {state.epoch}..{config.TRAIN.EPOCHS - 1}")
    start_time = time.time()
    try:
        while state.epoch < config.TRAIN.EPOCHS:
            epoch = state.epoch
            loader_train.sampler.set_epoch(epoch, start_index=state.micro_batch * config.DATA.BATCH_SIZE)
            result = train_one_epoch(config, objects, loader_train, state, steps_per_epoch, runtime)
            check_bad_images(loader_train, logger)
            if result.stopped:
                path = save(config, objects, state, class_names, logger)
                logger.info(f"{stop.signal_name} received: stopped at epoch {epoch} step "
                            f"{state.steps_in_epoch(accumulation)}/{steps_per_epoch}, "
                            f"checkpoint {path or 'written by rank 0'}; run the same command to resume")
                return stop.exit_code

            acc1 = validate_epoch(config, objects, loader_val, epoch, result.loss, runtime)
            is_best = state.finish_epoch(acc1)
            if acc1 is not None:
                logger.info(format_max_accuracy(state.max_accuracy))
            if (epoch + 1) % config.SAVE_FREQ == 0 or epoch == config.TRAIN.EPOCHS - 1 or is_best:
                save(config, objects, state, class_names, logger, is_best=is_best)
    finally:
        stop.uninstall()
        writer.close()

    logger.info(f"weights checksum {utils.weights_checksum(model):.12e}")
    total = format_eta(time.time() - start_time)
    if objects.task.validates:
        final = f"final Acc@1 {acc1:.2f}%, " if acc1 is not None else ''
        logger.info(f"Training done in {total}: {final}best Acc@1 {state.max_accuracy:.2f}%. Outputs in "
                    f"{config.OUTPUT_DIR} (best.pth, last.pth, log_rank0.txt, config.yaml, TensorBoard)")
    else:
        logger.info(f"Pre-training done in {total}. Outputs in {config.OUTPUT_DIR} (last.pth, log_rank0.txt, "
                    f"config.yaml, TensorBoard); fine-tune with --pretrained {config.OUTPUT_DIR}/last.pth")
    return 0


def validate_epoch(config, objects, loader_val, epoch, train_loss, runtime):
    """Validate the model (and its EMA) after an epoch and write the epoch's scalars; returns Acc@1, or None
    for a task that does not validate (SimMIM pre-training: the training loss is its measure)."""
    writer = runtime.writer
    if not objects.task.validates:
        runtime.logger.info(f"EPOCH {epoch} mean training loss {train_loss:.4f}")
        writer.add_scalars({'train/epoch_loss': train_loss}, epoch)
        return None
    acc1, acc5, val_loss = validate(config, loader_val, objects.model, runtime.device, runtime.precision,
                                    runtime.logger)
    writer.add_scalars({'val/acc1': acc1, 'val/acc5': acc5, 'val/loss': val_loss, 'train/epoch_loss': train_loss},
                       epoch)
    if objects.model_ema is not None:
        ema_acc1, ema_acc5, _ = validate(config, loader_val, objects.model_ema.module, runtime.device,
                                         runtime.precision, runtime.logger, header='EMA')
        writer.add_scalars({'val/ema_acc1': ema_acc1, 'val/ema_acc5': ema_acc5}, epoch)
    return acc1


def run(argv: list[str] | None = None) -> int:
    """Command-line entry: user mistakes end with one line (and exit 2), not a traceback."""
    args = build_parser().parse_args(argv)
    try:
        return main(get_config(args))
    except SwinTrainError as e:
        if args.debug:
            traceback.print_exc()
        rank = utils.get_rank()
        print(f"error{f' (rank {rank})' if utils.is_distributed() else ''}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        utils.cleanup_distributed()


if __name__ == '__main__':
    sys.exit(run())
