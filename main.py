"""Train, evaluate or benchmark a Swin Transformer.

    python main.py --cfg configs/demo.yaml                                   # CPU demo, tiny Swin on digits
    torchrun --nproc_per_node 8 main.py --cfg configs/swin_tiny.yaml --data-path /imagenet
    python main.py --cfg configs/swin_tiny.yaml --data-path /imagenet --eval --resume swin_tiny.pth
    python main.py --cfg configs/swin_tiny.yaml --throughput --batch-size 64

The story of a run, in order: config -> processes -> logging -> model -> data -> optimizer and schedule
-> resume or pretrained weights -> throughput | eval | train (epoch: train, validate, checkpoint).
"""
import os
import sys
import time
import traceback

import torch
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel

import checkpoint
import utils
from config import build_parser, get_config
from data import build_loader, check_bad_images, to_device
from engine import throughput, train_one_epoch, validate
from errors import SwinTrainError
from logger import (MetricWriter, create_logger, format_eta, format_max_accuracy, format_network_accuracy,
                    save_config)
from lr_scheduler import build_scheduler
from models import build_model
from optimizer import build_optimizer


def main(config):
    device = utils.init_distributed(config)
    logger = create_logger(config.OUTPUT_DIR, config.RANK, name=config.MODEL.NAME)
    if utils.is_main_process():
        save_config(config, config.OUTPUT_DIR)
    precision = utils.resolve_precision(config, device)
    logger.info(f"rank {config.RANK}/{config.WORLD_SIZE} (pid {os.getpid()}) on {device}, precision {precision}; "
                f"full config: {config.OUTPUT_DIR}/config.yaml")

    model = build_model(config).to(device)
    logger.info(f"model {config.MODEL.NAME}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, "
                f"{model.flops() / 1e9:.2f} GMACs at {config.DATA.IMG_SIZE}px")

    if config.THROUGHPUT_MODE:
        return run_throughput(config, model, device, precision, logger)

    dataset_train, dataset_val, loader_train, loader_val, mixup_fn = build_loader(config)

    if config.EVAL_MODE:
        return run_eval(config, model, loader_val, device, precision, logger)

    return run_training(config, model, dataset_train, loader_train, loader_val, mixup_fn,
                        device, precision, logger)


def run_throughput(config, model, device, precision, logger):
    """Images/s of the forward pass; a real val batch when a dataset is given, random input otherwise."""
    if config.DATA.DATA_PATH:
        images, _ = to_device(*next(iter(build_loader(config)[3])), device)
    else:
        logger.info("no --data-path: measuring throughput on random input")
        images = torch.randn(config.DATA.BATCH_SIZE, 3, config.DATA.IMG_SIZE, config.DATA.IMG_SIZE, device=device)
    throughput(images, model, precision, logger)
    return 0


def run_eval(config, model, loader_val, device, precision, logger):
    """Evaluate released or trained weights (never trains, never writes a checkpoint)."""
    if config.MODEL.PRETRAINED:
        checkpoint.load_pretrained(config, model, logger)
    else:
        path = config.MODEL.RESUME or checkpoint.find_resume_checkpoint(config.OUTPUT_DIR, logger)
        if not path:
            raise SwinTrainError("--eval needs weights: give --resume PATH or --pretrained PATH")
        checkpoint.load_model_weights(model, path, logger)
    acc1, acc5, _ = validate(config, loader_val, model, device, precision, logger)
    logger.info(format_network_accuracy(len(loader_val.dataset), acc1))
    return 0


def build_criterion(config, mixup_fn):
    if mixup_fn is not None:
        return SoftTargetCrossEntropy()  # label smoothing is folded into the mixed targets
    if config.MODEL.LABEL_SMOOTHING > 0:
        return LabelSmoothingCrossEntropy(smoothing=config.MODEL.LABEL_SMOOTHING)
    return torch.nn.CrossEntropyLoss()


def wrap_model(config, model, device, logger):
    """torch.compile (optional) then DistributedDataParallel when running on several processes."""
    if config.TRAIN.COMPILE:
        logger.info("compiling the model with torch.compile (the first steps are slow)")
        model = torch.compile(model)
    if config.WORLD_SIZE > 1:
        model = DistributedDataParallel(model, device_ids=[device] if device.type == 'cuda' else None)
    return model


def save(config, state_args, logger, is_best=False):
    """Gather every rank's RNG state, then rank 0 writes the checkpoint while the others wait."""
    rng_states = utils.all_gather_objects(checkpoint.capture_rng_state())
    path = None
    if utils.is_main_process():
        state = checkpoint.training_state(config, rng_states=rng_states, **state_args)
        path = checkpoint.save_checkpoint(config, state, logger, is_best=is_best)
    utils.barrier()
    return path


def run_training(config, model, dataset_train, loader_train, loader_val, mixup_fn, device, precision, logger):
    criterion = build_criterion(config, mixup_fn)
    optimizer = build_optimizer(config, model, logger)
    steps_per_epoch = len(loader_train) // config.TRAIN.ACCUMULATION_STEPS
    if steps_per_epoch == 0:
        raise SwinTrainError(f"the train split has {len(dataset_train)} images: too few for one step of "
                             f"DATA.BATCH_SIZE {config.DATA.BATCH_SIZE} x {config.WORLD_SIZE} processes x "
                             f"TRAIN.ACCUMULATION_STEPS {config.TRAIN.ACCUMULATION_STEPS}")
    lr_scheduler = build_scheduler(config, optimizer, steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type) if precision.needs_scaler else None
    model_ema = ModelEmaV3(model, decay=config.MODEL_EMA_DECAY) if config.MODEL_EMA else None
    logger.info(f"global batch {config.TRAIN.GLOBAL_BATCH_SIZE} = {config.DATA.BATCH_SIZE} x "
                f"{config.WORLD_SIZE} processes x {config.TRAIN.ACCUMULATION_STEPS} accumulation -> lr "
                f"{config.TRAIN.EFFECTIVE_LR:.3g} (warmup from {config.TRAIN.EFFECTIVE_WARMUP_LR:.3g}, "
                f"min {config.TRAIN.EFFECTIVE_MIN_LR:.3g}); {steps_per_epoch} steps per epoch")

    start_epoch, start_step, global_step, max_accuracy = 0, 0, 0, 0.0
    resume_path = config.MODEL.RESUME
    if not resume_path and config.TRAIN.AUTO_RESUME:
        # rank 0 decides, so ranks with their own local output folders cannot resume from different files
        found = checkpoint.find_resume_checkpoint(config.OUTPUT_DIR, logger) if utils.is_main_process() else None
        resume_path = utils.broadcast_object(found)
    if resume_path:
        state = checkpoint.load_training_state(resume_path, config, logger)
        start_epoch, start_step, global_step, max_accuracy = checkpoint.restore_training_state(
            state, model, optimizer, lr_scheduler, scaler, model_ema, logger, rank=config.RANK,
            steps_per_epoch=steps_per_epoch)
        logger.info(f"resumed from {resume_path}: epoch {start_epoch}, step {start_step}, "
                    f"max accuracy {max_accuracy:.2f}%")
    elif config.MODEL.PRETRAINED:
        checkpoint.load_pretrained(config, model, logger)
    lr_scheduler.step_update(global_step)
    train_model = wrap_model(config, model, device, logger)

    def state_args(epoch, step_in_epoch):
        return dict(model=model, optimizer=optimizer, lr_scheduler=lr_scheduler, scaler=scaler,
                    model_ema=model_ema, epoch=epoch, step_in_epoch=step_in_epoch, global_step=global_step,
                    max_accuracy=max_accuracy, class_names=list(dataset_train.classes))

    writer = MetricWriter(config.OUTPUT_DIR, enabled=utils.is_main_process())
    stop = utils.StopRequest().install()
    acc1 = None
    logger.info(f"Start training: epochs {start_epoch}..{config.TRAIN.EPOCHS - 1}")
    start_time = time.time()
    try:
        for epoch in range(start_epoch, config.TRAIN.EPOCHS):
            loader_train.sampler.set_epoch(epoch, start_index=start_step * config.DATA.BATCH_SIZE)
            result = train_one_epoch(config, train_model, criterion, loader_train, optimizer, lr_scheduler,
                                     scaler, mixup_fn, epoch, steps_per_epoch, start_step, global_step,
                                     device, precision, logger, writer, model_ema, stop)
            global_step = result.global_step
            check_bad_images(loader_train, logger)
            if result.stopped_at is not None:
                path = save(config, state_args(epoch, result.stopped_at), logger)
                logger.info(f"{stop.signal_name} received: stopped at epoch {epoch} step "
                            f"{result.stopped_at // config.TRAIN.ACCUMULATION_STEPS}/{steps_per_epoch}, "
                            f"checkpoint {path or 'written by rank 0'}; run the same command to resume")
                return stop.exit_code
            start_step = 0

            acc1, acc5, val_loss = validate(config, loader_val, train_model, device, precision, logger)
            writer.add_scalars({'val/acc1': acc1, 'val/acc5': acc5, 'val/loss': val_loss,
                                'train/epoch_loss': result.loss}, epoch)
            if model_ema is not None:
                ema_acc1, ema_acc5, _ = validate(config, loader_val, model_ema.module, device, precision,
                                                 logger, header='EMA')
                writer.add_scalars({'val/ema_acc1': ema_acc1, 'val/ema_acc5': ema_acc5}, epoch)
            is_best = acc1 > max_accuracy
            max_accuracy = max(max_accuracy, acc1)
            logger.info(format_max_accuracy(max_accuracy))
            if (epoch + 1) % config.SAVE_FREQ == 0 or epoch == config.TRAIN.EPOCHS - 1 or is_best:
                save(config, state_args(epoch, 0), logger, is_best=is_best)
    finally:
        stop.uninstall()
        writer.close()

    logger.info(f"weights checksum {utils.weights_checksum(model):.12e}")
    total = format_eta(time.time() - start_time)
    final = f"final Acc@1 {acc1:.2f}%, " if acc1 is not None else ''
    logger.info(f"Training done in {total}: {final}best Acc@1 {max_accuracy:.2f}%. "
                f"Outputs in {config.OUTPUT_DIR} (best.pth, last.pth, log_rank0.txt, config.yaml, TensorBoard)")
    return 0


def run(argv=None):
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
