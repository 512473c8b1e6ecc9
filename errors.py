"""Project exceptions: user-facing failures that end a run with one clear line, not a traceback."""


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
