"""Logging of a run: text logs (console on rank 0, one file per rank), the resolved config, TensorBoard scalars,
and the formats of the official log lines (so that every caller prints them the same way).
"""
from __future__ import annotations

import datetime
import logging
import os
import sys

from yacs.config import CfgNode

from checkpoint.files import write_text_atomically
from errors import ConfigError

_FORMAT = '[%(asctime)s %(name)s] (%(filename)s %(lineno)d): %(levelname)s %(message)s'
_COLOR_FORMAT = ('\033[32m[%(asctime)s %(name)s]\033[0m\033[33m(%(filename)s %(lineno)d)\033[0m: '
                 '%(levelname)s %(message)s')
_DATE_FORMAT = '%Y-%m-%d %H:%M:%S'


# the project's library loggers (swin.data, swin.config, swin.models) live under this name
LIBRARY_LOGGER = 'swin'


def create_logger(output_dir: str, dist_rank: int = 0, name: str = 'swin') -> logging.Logger:
    """The run's logger: rank 0 also prints to stdout; every rank appends to output_dir/log_rank{rank}.txt.

    The same handlers serve the library loggers under ``swin.`` (data, config, models), so their messages reach
    the console and log_rank*.txt too. Calling it again replaces the handlers it added before.
    """
    log_file = os.path.join(output_dir, f'log_rank{dist_rank}.txt')
    try:
        os.makedirs(output_dir, exist_ok=True)
        file_handler = logging.FileHandler(log_file, mode='a')  # opens the file: the real write check
    except OSError as e:
        raise _not_writable(output_dir, e) from None

    file_handler.setLevel(logging.DEBUG)
    file_handler.setFormatter(logging.Formatter(_FORMAT, datefmt=_DATE_FORMAT))
    handlers = [file_handler]
    if dist_rank == 0:
        console = logging.StreamHandler(sys.stdout)
        console.setLevel(logging.INFO)
        color = hasattr(sys.stdout, 'isatty') and sys.stdout.isatty()  # no escape codes in redirected output
        console.setFormatter(logging.Formatter(_COLOR_FORMAT if color else _FORMAT, datefmt=_DATE_FORMAT))
        handlers.append(console)
    for handler in handlers:
        handler._swin_train = True  # marks the handlers a later call replaces

    for logger_name in dict.fromkeys((name, LIBRARY_LOGGER)):
        target = logging.getLogger(logger_name)
        target.setLevel(logging.DEBUG)
        if logger_name == name:
            target.propagate = False  # the run's lines are printed here only (library records may propagate)
        for handler in [h for h in target.handlers if getattr(h, '_swin_train', False)]:
            target.removeHandler(handler)
            if handler not in handlers:
                handler.close()
        for handler in handlers:
            target.addHandler(handler)
    return logging.getLogger(name)


def log_to_files(name: str, line: str, level: int = logging.ERROR) -> None:
    """Append a line already printed to stderr (a final error, or a warning from before the log files existed)
    to the log files of logger ``name`` only."""
    logger = logging.getLogger(name)
    for handler in logger.handlers:
        if getattr(handler, '_swin_train', False) and isinstance(handler, logging.FileHandler):
            handler.handle(logger.makeRecord(name, level, 'main.py', 0, line, None, None))


def save_config(config: CfgNode, output_dir: str, name: str = 'config.yaml') -> str:
    """Write the full resolved config to output_dir/name (atomically; call on rank 0). Returns the path.
    Training runs write config.yaml once their checks passed; --eval writes eval_config.yaml."""
    try:
        os.makedirs(output_dir, exist_ok=True)
        return write_text_atomically(os.path.join(output_dir, name), config.dump())
    except OSError as e:
        raise _not_writable(output_dir, e) from None


def _not_writable(folder, error):
    return ConfigError(f"output folder {folder} is not writable: {error.strerror or error}")


class MetricWriter:
    """TensorBoard scalars in output_dir (event files); does nothing when not enabled (ranks other than 0)."""

    def __init__(self, output_dir: str, enabled: bool = True):
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter  # imported only where it is used
            self.writer = SummaryWriter(log_dir=output_dir)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, float(value), step)

    def add_scalars(self, scalars: dict[str, float], step: int) -> None:
        """One scalar per ``{tag: value}`` entry, all at ``step`` (tags such as 'train/loss')."""
        for tag, value in scalars.items():
            self.add_scalar(tag, value, step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


# -----------------------------------------------------------------------------
# The official log lines
# -----------------------------------------------------------------------------
def format_accuracy(acc1: float, acc5: float, label: str = '') -> str:
    """`` * Acc@1 x Acc@5 y``; with a label (another model, e.g. 'EMA'): `` * EMA Acc@1 x Acc@5 y``."""
    return f" * {label + ' ' if label else ''}Acc@1 {acc1:.3f} Acc@5 {acc5:.3f}"


def format_network_accuracy(num_images: int, acc1: float, label: str = '') -> str:
    network = f"{label} network" if label else 'network'
    return f"Accuracy of the {network} on the {num_images} test images: {acc1:.1f}%"


def format_max_accuracy(max_accuracy: float, label: str = '') -> str:
    return f"Max {label + ' ' if label else ''}accuracy: {max_accuracy:.2f}%"


def format_meter(value: float, average: float, digits: int = 4) -> str:
    """An official ``v (avg)`` pair: the latest value and the running average."""
    return f"{value:.{digits}f} ({average:.{digits}f})"


def format_throughput(batch_size: int, throughput: float) -> str:
    """``throughput`` in images per second (the official measure: 30 batches / their time). Nothing follows the
    number: scripts read it as the line's last word."""
    return f"batch_size {batch_size} throughput {throughput}"


def format_eta(seconds: float) -> str:
    """Seconds as H:MM:SS (whole seconds), as in the official training lines."""
    return str(datetime.timedelta(seconds=int(seconds)))
