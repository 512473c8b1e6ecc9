"""The host-float data mode: workers decode, augment and normalize; batches are float NCHW tensors, as in the
official code. The default, and what every CPU run uses."""
from torch.utils.data import default_collate
from torchvision import transforms

from .mode import DataMode
from .transforms import normalize_steps, train_recipe, val_steps


class HostFloat(DataMode):
    name = 'host_float'

    def transform(self, is_train, config):
        if is_train:
            recipe = train_recipe(config)
            return transforms.Compose(recipe.steps + recipe.augment + recipe.final)  # timm's transform, whole
        return transforms.Compose(val_steps(config) + self.finish_steps())

    def finish_steps(self, erasing=None):
        return normalize_steps() + ([erasing] if erasing is not None else [])

    def collate_images(self, images):
        return default_collate(list(images)), ()

    def to_device(self, batch, device):
        return batch.images.to(device, non_blocking=True)


HOST_FLOAT = HostFloat()
