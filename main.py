"""Train, evaluate or benchmark a Swin Transformer.

    python main.py --cfg configs/demo.yaml                                   # CPU demo, tiny Swin on digits
    torchrun --nproc_per_node 8 main.py --cfg configs/swin_tiny.yaml --data-path /imagenet
    python main.py --cfg configs/swin_tiny.yaml --data-path /imagenet --eval --resume swin_tiny.pth
    python main.py --cfg configs/swin_tiny.yaml --throughput --batch-size 64

The story of a run, in order: config -> processes -> logging -> model -> data -> optimizer and schedule
-> resume or pretrained weights -> throughput | eval | train (epoch: train, validate, checkpoint).
"""
from __future__ import annotations

import dataclasses
import gc
import inspect
import logging
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
import process_group
import utils
from config import build_parser, get_config, not_implemented_warning
from coordinator import StepCoordinator
from data import build_loader, check_bad_images, dataset_num_classes, to_device
from distillation import build_teacher
from engine import throughput, train_one_epoch, validate
from errors import SwinTrainError, print_line
from evaluation import ClassCounts, write_eval_results
from logger import (
    MetricWriter,
    create_logger,
    format_eta,
    format_max_accuracy,
    format_network_accuracy,
    log_to_files,
    save_config,
)
from lr_scheduler import build_scheduler, schedule_warnings
from models import build_model, cpu_linear
from optimizer import build_optimizer, freeze_parameters
from run_state import RunState, Runtime, TrainingObjects
from tasks import build_task


def main(config: CfgNode) -> int:
    check_paths(config)
    device = utils.init_distributed(config)
    logger = create_logger(config.OUTPUT_DIR, config.RANK, name=config.MODEL.NAME)
    unimplemented = not_implemented_warning(config)
    if config.RANK == 0 and unimplemented:  # said on stderr before the log files existed
        log_to_files(config.MODEL.NAME, unimplemented, logging.WARNING)
    config = classes_from_dataset(config, logger)
    runtime = Runtime(device, utils.resolve_precision(config, device), logger)
    tf32 = f" (TF32 {'on' if config.TF32 else 'off'} for float32 matmuls)" if device.type == 'cuda' else ''
    logger.info(f"rank {config.RANK}/{config.WORLD_SIZE} (pid {os.getpid()}) on {device}, precision "
                f"{runtime.precision}{tf32}; output folder {config.OUTPUT_DIR}")
    if process_group.peer_watch() is not None:
        process_group.peer_watch().logger = logger
        logger.info(f"process group formed: collectives time out after DIST.TIMEOUT {config.DIST.TIMEOUT:g}s, "
                    f"a silent or missing rank after DIST.PEER_TIMEOUT {config.DIST.PEER_TIMEOUT:g}s")

    # evaluation at another resolution may pad stage maps to the window; training keeps the official rule
    model = build_model(config, is_pretrain=config.MODEL.TASK == 'simmim',
                        pad_windows=config.EVAL_MODE or config.THROUGHPUT_MODE).to(device)
    logger.info(f"model {config.MODEL.NAME}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, "
                f"{model.flops() / 1e9:.2f} GMACs at {config.DATA.IMG_SIZE}px")

    if config.THROUGHPUT_MODE:
        return run_throughput(config, model, runtime)

    _, _, loader_train, loader_val, mixup_fn = build_loader(config, device)

    if config.EVAL_MODE:
        return run_eval(config, model, loader_val, runtime)

    return run_training(config, model, loader_train, loader_val, mixup_fn, runtime)


def classes_from_dataset(config: CfgNode, logger: logging.Logger) -> CfgNode:
    """MODEL.NUM_CLASSES from the dataset when the user did not set it (and there is a dataset to ask)."""
    if not config.MODEL.NUM_CLASSES_FROM_DATA or (config.THROUGHPUT_MODE and not config.DATA.DATA_PATH):
        return config
    num_classes, source = dataset_num_classes(config)
    logger.info(f"MODEL.NUM_CLASSES {num_classes}: not set in the config, taken from the dataset ({source})")
    config = config.clone()  # the run's config: a new frozen copy, as official build_loader sets it
    config.defrost()
    config.MODEL.NUM_CLASSES = num_classes
    config.freeze()
    return config


def check_paths(config: CfgNode) -> None:
    """Files the user named must exist before anything runs (a typo in --pretrained is never ignored)."""
    for key, path in (('MODEL.PRETRAINED', config.MODEL.PRETRAINED), ('MODEL.RESUME', config.MODEL.RESUME)):
        if path and not os.path.isfile(path):
            flag = '--pretrained' if key == 'MODEL.PRETRAINED' else '--resume'
            raise SwinTrainError(f"{key} (the {flag} file) {path} does not exist")


def run_throughput(config: CfgNode, model: torch.nn.Module, runtime: Runtime) -> int:
    """Images/s of the forward pass; a real val batch when a dataset is given, random input otherwise."""
    device = runtime.device
    if config.DATA.DATA_PATH:
        images, _ = to_device(next(iter(build_loader(config, device)[3])), device)
    else:
        runtime.logger.info("no --data-path: measuring throughput on random input")
        images = torch.randn(config.DATA.BATCH_SIZE, 3, config.DATA.IMG_SIZE, config.DATA.IMG_SIZE, device=device)
    with cpu_linear.enabled():  # the oneDNN CPU path is on for this benchmark only (models/cpu_linear.py)
        throughput(images, model, runtime.precision, runtime.logger,
                   warmup=config.THROUGHPUT.WARMUP_PASSES, iterations=config.THROUGHPUT.TIMED_PASSES)
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
    if utils.is_main_process():  # the training run's config.yaml stays as it was
        save_config(config, config.OUTPUT_DIR, 'eval_config.yaml')
    counts = ClassCounts(config.MODEL.NUM_CLASSES, runtime.device)
    acc1, acc5, loss = validate_and_report(config, loader_val, model, runtime, class_counts=counts)
    if utils.is_main_process():
        summary = {'checkpoint': os.path.abspath(path), 'images': int(counts.images.sum()), 'acc1': acc1,
                   'acc5': acc5, 'loss': loss}
        for written in write_eval_results(config, summary, counts, loader_val.dataset.classes):
            logger.info(f"wrote {written}")
    return 0


def validate_and_report(config: CfgNode, loader_val: DataLoader, model: torch.nn.Module, runtime: Runtime,
                        label: str = '', class_counts: ClassCounts | None = None) -> tuple[float, float, float]:
    """Validate, then the official summary line: ``Accuracy of the network on the N test images: x%``."""
    acc1, acc5, loss = validate(config, loader_val, model, runtime.device, runtime.precision, runtime.logger, label,
                                class_counts)
    runtime.logger.info(format_network_accuracy(len(loader_val.dataset), acc1, label))
    return acc1, acc5, loss


def build_training_objects(config, model, mixup_fn, steps_per_epoch, precision, logger):
    """Task (batch -> loss), optimizer over what trains (TRAIN.FREEZE), per-step LR schedule, gradient scaler
    (float16 only) and EMA."""
    freeze_parameters(config, model, logger)
    optimizer = build_optimizer(config, model, logger)
    teacher = None
    if config.DISTILL.TYPE != 'none':
        teacher = build_teacher(config, next(model.parameters()).device, logger)
    return TrainingObjects(
        model=model, task=build_task(config, mixup_fn, teacher), optimizer=optimizer,
        lr_scheduler=build_scheduler(config, optimizer, steps_per_epoch),
        scaler=torch.amp.GradScaler(precision.device_type) if precision.needs_scaler else None,
        model_ema=ModelEmaV3(model, decay=config.MODEL_EMA_DECAY, use_warmup=config.MODEL_EMA_WARMUP)
        if config.MODEL_EMA else None)


def wrap_model(config, model, device, logger):
    """The model the training loop calls, and the one validation calls.

    Training: DistributedDataParallel on several processes, then torch.compile of the DDP module -- the order
    PyTorch documents for compiled DDP: graphs split at gradient-bucket boundaries, so the all-reduce overlaps
    backward. No buffer broadcast: every buffer (relative_position_index, attn_mask) is derived from the config.
    Validation calls the bare model (compiled too with TRAIN.COMPILE): DDP's forward is not for passes whose
    batch counts differ between ranks (TEST.SEQUENTIAL). Checkpoints and EMA unwrap either (utils.unwrap_model).
    """
    train_model, eval_model = model, model
    if config.WORLD_SIZE > 1:
        # torch >= 2.14 names the per-forward buffer sync forward_sync_buffers (broadcast_buffers is deprecated)
        no_buffer_sync = ({'forward_sync_buffers': False} if 'forward_sync_buffers' in
                          inspect.signature(DistributedDataParallel).parameters else {'broadcast_buffers': False})
        train_model = DistributedDataParallel(model, device_ids=[device] if device.type == 'cuda' else None,
                                              **no_buffer_sync)
    if config.TRAIN.COMPILE:
        logger.info(f"compiling the model with torch.compile (backend {config.TRAIN.COMPILE_BACKEND}; the first "
                    f"steps are slow)")
        train_model = torch.compile(train_model, backend=config.TRAIN.COMPILE_BACKEND)
        eval_model = torch.compile(model, backend=config.TRAIN.COMPILE_BACKEND)
    return train_model, eval_model


def resume_or_start(config, objects, steps_per_epoch, logger):
    """Where training starts: explicit --resume > auto-resume (rank 0 picks, broadcast) > --pretrained > scratch
    (at TRAIN.START_EPOCH). Returns the RunState and whether weights were loaded (resume or pretrained)."""
    resume_path = config.MODEL.RESUME
    if not resume_path and config.TRAIN.AUTO_RESUME:
        # rank 0 decides, so ranks with their own local output folders cannot resume from different files
        found = checkpoint.find_resume_checkpoint(config.OUTPUT_DIR, logger) if utils.is_main_process() else None
        resume_path = utils.broadcast_object(found)
    # a fresh run starts at TRAIN.START_EPOCH, its schedule at that epoch's step (as the official loop)
    start_epoch = config.TRAIN.START_EPOCH
    state = RunState(epoch=start_epoch, global_step=start_epoch * steps_per_epoch)
    if resume_path:
        ckpt = checkpoint.read_checkpoint(resume_path, config, logger)
        if not config.MODEL.RESUME:
            check_auto_resume_origin(config, RunState.from_dict(ckpt).pretrained_from, resume_path)
        state = checkpoint.restore_from_checkpoint(ckpt, objects, logger, rank=config.RANK,
                                                   steps_per_epoch=steps_per_epoch)
        logger.info(f"resumed from {resume_path}: epoch {state.epoch}, micro-batch {state.micro_batch} "
                    f"(step {state.steps_in_epoch(config.TRAIN.ACCUMULATION_STEPS)}), "
                    f"max accuracy {state.max_accuracy:.2f}%")
    elif config.MODEL.PRETRAINED:
        checkpoint.load_pretrained(config, objects.model, logger)
        state.pretrained_from = os.path.realpath(config.MODEL.PRETRAINED)
    return state, bool(resume_path or config.MODEL.PRETRAINED)


def check_auto_resume_origin(config: CfgNode, pretrained_from: str, resume_path: str) -> None:
    """--pretrained with a checkpoint in the output folder: auto-resume would silently win, so this is an error
    unless that checkpoint's run itself started from the same pretrained file."""
    wanted = config.MODEL.PRETRAINED
    if not wanted or os.path.realpath(wanted) == pretrained_from:
        return
    origin = f"started from {pretrained_from}" if pretrained_from else "not started from these weights"
    raise SwinTrainError(f"--pretrained {wanted} would be ignored: {config.OUTPUT_DIR} holds {resume_path} "
                         f"({origin}), which auto-resume continues instead; give --output another folder to "
                         f"fine-tune from {wanted}, or add --opts TRAIN.AUTO_RESUME False to start over in this one")


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
    for warning in schedule_warnings(config):
        logger.warning(warning)

    state, loaded = resume_or_start(config, objects, steps_per_epoch, logger)
    if loaded and state.epoch >= config.TRAIN.EPOCHS:
        best = f"best Acc@1 {state.max_accuracy:.2f}%; " if objects.task.validates else ''
        logger.info(f"run complete: {config.TRAIN.EPOCHS}/{config.TRAIN.EPOCHS} epochs trained ({best}outputs in "
                    f"{config.OUTPUT_DIR}); nothing to do (more epochs: --epochs N, a fresh run: another --output)")
        return 0
    if utils.is_main_process():  # only now: config, data and resume checks have passed
        logger.info(f"full config: {save_config(config, config.OUTPUT_DIR)}")
    if loaded and objects.task.validates:  # as the official loop: loaded weights are validated before training
        validate_and_report(config, loader_val, model, runtime)
    objects.lr_scheduler.step_update(state.global_step)
    objects.model, eval_model = wrap_model(config, model, runtime.device, logger)
    checkpoints = checkpoint.CheckpointSaver(config, objects, list(loader_train.dataset.classes), logger)
    # the training runtime: TensorBoard, and after each step one answer for all ranks (continue, save, stop)
    runtime = dataclasses.replace(runtime, writer=MetricWriter(config.OUTPUT_DIR, enabled=utils.is_main_process()),
                                  coordinator=StepCoordinator(checkpoints).install())
    writer, coordinator = runtime.writer, runtime.coordinator
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
                logger.info(f"{coordinator.signal_name} received: saving a checkpoint at epoch {epoch} step "
                            f"{state.steps_in_epoch(accumulation)}/{steps_per_epoch}, then exit")
                path = checkpoints.save(state)
                checkpoints.finish()
                logger.info(f"{coordinator.signal_name} received: stopped at epoch {epoch} step "
                            f"{state.steps_in_epoch(accumulation)}/{steps_per_epoch}, "
                            f"checkpoint {path or 'written by rank 0'}; run the same command to resume")
                return coordinator.exit_code

            acc1 = validate_epoch(config, objects, loader_val, eval_model, epoch, result.loss, runtime)
            is_best = state.finish_epoch(acc1)
            if acc1 is not None:
                logger.info(format_max_accuracy(state.max_accuracy))
            if (epoch + 1) % config.SAVE_FREQ == 0 or epoch == config.TRAIN.EPOCHS - 1 or is_best:
                checkpoints.save(state, is_best=is_best)
        checkpoints.finish()
    finally:
        coordinator.uninstall()
        writer.close()

    logger.info(f"weights checksum {utils.weights_checksum(model):.12e}")
    total = format_eta(time.time() - start_time)
    logger.info(f"Training time {total}")
    if objects.task.validates:
        final = f"final Acc@1 {acc1:.2f}%, " if acc1 is not None else ''
        logger.info(f"Training done in {total}: {final}best Acc@1 {state.max_accuracy:.2f}%. Outputs in "
                    f"{config.OUTPUT_DIR} (best.pth, last.pth, log_rank0.txt, config.yaml, TensorBoard)")
    else:
        logger.info(f"Pre-training done in {total}. Outputs in {config.OUTPUT_DIR} (last.pth, log_rank0.txt, "
                    f"config.yaml, TensorBoard); fine-tune with --pretrained {config.OUTPUT_DIR}/last.pth")
    return 0


def validate_epoch(config, objects, loader_val, model, epoch, train_loss, runtime):
    """Validate the model (and its EMA) after an epoch and write the epoch's scalars; returns Acc@1, or None
    for a task that does not validate (SimMIM pre-training: the training loss is its measure)."""
    writer = runtime.writer
    if not objects.task.validates:
        runtime.logger.info(f"EPOCH {epoch} mean training loss {train_loss:.4f}")
        writer.add_scalars({'train/epoch_loss': train_loss}, epoch)
        return None
    acc1, acc5, val_loss = validate_and_report(config, loader_val, model, runtime)
    writer.add_scalars({'val/acc1': acc1, 'val/acc5': acc5, 'val/loss': val_loss, 'train/epoch_loss': train_loss},
                       epoch)
    if objects.model_ema is not None:
        ema_acc1, ema_acc5, _ = validate_and_report(config, loader_val, objects.model_ema.module, runtime,
                                                    label='EMA')
        writer.add_scalars({'val/ema_acc1': ema_acc1, 'val/ema_acc5': ema_acc5}, epoch)
    return acc1


def run(argv: list[str] | None = None) -> int:
    """Command-line entry: user mistakes end with one line (and exit 2), not a traceback; the line also goes
    to the run's log_rank*.txt when the run got that far."""
    args = build_parser().parse_args(argv)
    reason = 'finished'
    config = None
    interrupted = False
    try:
        config = get_config(args)
        return main(config)
    except SwinTrainError as e:
        reason = f"failed: {type(e).__name__}"
        process_group.record_failure(e)
        if args.debug:
            traceback.print_exc()
        rank = utils.get_rank()
        report(config, f"error{f' (rank {rank})' if utils.is_distributed() else ''}: {e}")
        return getattr(e, 'exit_code', 2)
    except KeyboardInterrupt:
        report(config, f"interrupted: stopped at once; {kept_checkpoint(config)}")
        interrupted = True
        return 130
    except Exception as e:
        reason = f"failed: {type(e).__name__}"
        process_group.record_failure(e)
        cause = process_group.explain_failure()  # another rank failed first or vanished: name it, in one line
        if cause is None:
            raise
        if args.debug:
            traceback.print_exc()
        print_line(f"error (rank {utils.get_rank()}): {cause} (here: {type(e).__name__})")
        return 1
    finally:
        # loaders whose pass an error cut short still hold live workers (in reference cycles): shut them down now,
        # not in multiprocessing's exit hook, which SIGTERMs them, and they ignore SIGTERM (the stop signal is main's)
        gc.collect()
        utils.cleanup_distributed(reason)
        if interrupted:
            # "exit now": not through interpreter shutdown, which aborts (SIGABRT) while a checkpoint-writer
            # thread still ends inside torch's C++ code; a half-written temp file is removed by the next run
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(130)


def kept_checkpoint(config: CfgNode | None) -> str:
    """What a rerun resumes from after an exit at once: saves are frozen first (one in flight is abandoned, or
    had finished), so the answer stays true."""
    checkpoint.freeze_saves()
    if config is None:
        return "no run had started"
    quiet = logging.getLogger(f"{config.MODEL.NAME}.interrupted")
    quiet.setLevel(logging.WARNING)  # the scan's warnings (a temp file removed), not its 'auto-resume:' line
    path = checkpoint.find_resume_checkpoint(config.OUTPUT_DIR, quiet)
    if path is None:
        return f"no checkpoint in {config.OUTPUT_DIR}: a rerun starts from the beginning"
    return f"any save still in flight is abandoned; the same command resumes from {path}"


def report(config: CfgNode | None, line: str) -> None:
    """A final line: to stderr, and to this rank's log file once the logger exists."""
    print_line(line)
    if config is not None:
        log_to_files(config.MODEL.NAME, line)


if __name__ == '__main__':
    sys.exit(run())
