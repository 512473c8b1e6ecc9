"""What a data mode is: where an image becomes the model's float input, and what travels in between.

A run's images go from a file to a normalized float tensor on the device; a *mode* decides how that work is
split between the loader's workers and the device. Each mode is one object in one file:

* ``host_float.HOST_FLOAT``: workers decode, augment and normalize; batches are float tensors (the official way).
* ``device_normalize.DEVICE_NORMALIZE``: workers stop at uint8 pixels, the device converts, normalizes and
  random-erases (DATA.DEVICE_NORMALIZE on a CUDA run): 4x smaller batches, less host work, the same values.
* ``device_decode.DEVICE_DECODE``: workers only parse JPEG headers and draw the crop, the device decodes,
  crops and resizes too (DATA.GPU_DECODE), then normalizes as above.

A mode owns its three pieces: the worker ``transform`` (built from the shared recipe in transforms.py), the
``collate_images`` that stacks its images in a worker, and ``to_device`` that finishes a batch on the device.
``data.build.select_mode`` picks one from the config; a new mode is a new file with a subclass and a line there.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from yacs.config import CfgNode

if TYPE_CHECKING:
    from .loader import Batch


class DataMode:
    """The three pieces of one data mode (see the module docstring). Instances are stateless: they travel to
    loader workers inside the collate function and inside every Batch, which ``data.to_device`` hands back to
    its mode."""
    name = ''

    def for_split(self, is_train: bool, config: CfgNode) -> DataMode:
        """The mode that loads this split: itself, or a simpler one where it cannot do the work."""
        return self

    def decoded(self) -> DataMode:
        """The mode for pipelines that must decode in the worker (SimMIM's own transform): itself, unless its
        point is not to decode there."""
        return self

    def transform(self, is_train: bool, config: CfgNode) -> Callable:
        """The worker transform: a lazily opened PIL image -> one image item for ``collate_images``."""
        raise NotImplementedError

    def finish_steps(self, erasing: Callable | None = None) -> list:
        """The last steps of a transform that produced a decoded PIL image: PIL -> this mode's image item
        (``erasing``: timm's RandomErasing, or None)."""
        raise NotImplementedError

    def collate_images(self, images: Sequence[Any]) -> tuple[Any, tuple]:
        """(the batch's images, its random-erasing plans ``((position, plan), ...)``) of a list of items."""
        raise NotImplementedError

    def to_device(self, batch: Batch, device: torch.device) -> torch.Tensor:
        """The batch's images on ``device`` as normalized float NCHW (non_blocking copies)."""
        raise NotImplementedError

    def __repr__(self):
        return self.name

    def __eq__(self, other):  # stateless: a copy that came back from a worker is the same mode
        return type(self) is type(other)

    def __hash__(self):
        return hash(type(self))
