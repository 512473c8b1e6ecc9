"""Project exceptions: user-facing failures that end a run with one clear line, not a traceback."""
import logging
import sys


class SwinTrainError(Exception):
    """Base class. main.py prints ``str(exc)`` and exits 2 (``--debug`` shows the traceback)."""


class ConfigError(SwinTrainError):
    """A bad config file, key, value or command-line combination."""


class DataError(SwinTrainError):
    """Missing dataset paths, empty splits, too many unreadable images."""


class CheckpointError(SwinTrainError):
    """A checkpoint that cannot be read, or does not fit the model/config."""


class TrainingError(SwinTrainError):
    """A run that cannot go on (non-finite loss, unusable device, ...)."""


class DistributedError(SwinTrainError):
    """The process group cannot form, or a rank vanished: ends the process with code 1, so that torchrun's
    next round (when restarts are left) can try again."""
    exit_code = 1


def print_line(line):
    """``line`` on stderr in ONE write: the ranks of a job share their terminal or log pipe, and print() writes
    the text and its newline separately, so two ranks' lines could run into each other."""
    sys.stderr.write(line + '\n')
    sys.stderr.flush()


def exit_status(function, *args):
    """``function(*args)`` as a command-line tool's exit status: its return value, or 2 after printing
    ``error: ...`` (one line, on stderr) when it stops on a SwinTrainError. For scripts/; main.py adds
    ``--debug`` and ranks."""
    try:
        return function(*args)
    except SwinTrainError as e:
        print_line(f"error: {e}")
        return 2


def run_script(parser, run, argv=None):
    """A script's ``main``: parse ``argv`` with ``parser``, show warnings (and errors) as bare lines, and return
    ``run(args)`` as the exit status (``exit_status``)."""
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format='%(message)s')
    return exit_status(run, args)
