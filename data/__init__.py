"""Data pipeline: ``build_loader(config)`` for the engine, ``to_device`` for every batch and
``check_bad_images`` after every epoch. See build.py, samplers.py and loader.py for the contracts."""
from .build import build_dataset, build_loader, build_mixup
from .digits import ensure_digits
from .loader import check_bad_images, to_device

__all__ = ['build_loader', 'build_dataset', 'build_mixup', 'check_bad_images', 'to_device', 'ensure_digits']
