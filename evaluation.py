"""What --eval writes besides its log lines: ``eval_results.json`` (overall and per-class accuracy) and, for at
most 100 classes, ``confusion_matrix.png``.

``ClassCounts`` is filled batch by batch on the device by ``engine.validate`` and summed over ranks once at
the end, so per-class numbers cost no host sync per batch and count each image once, as Acc@1 does.
"""
import json
import os

import torch
import yaml

from checkpoint import replace_atomically, write_text_atomically
from utils import all_reduce_sum

MAX_CONFUSION_CLASSES = 100  # a larger matrix is unreadable as an image (and 22K^2 counts would not fit)
RESULTS_NAME, CONFUSION_NAME = 'eval_results.json', 'confusion_matrix.png'


class ClassCounts:
    """Images and top-1 hits per true class, and the confusion matrix (true x predicted) for at most
    MAX_CONFUSION_CLASSES classes; device tensors."""

    def __init__(self, num_classes, device):
        self.num_classes = num_classes
        self.images = torch.zeros(num_classes, dtype=torch.long, device=device)
        self.correct = torch.zeros(num_classes, dtype=torch.long, device=device)
        self.confusion = None
        if num_classes <= MAX_CONFUSION_CLASSES:
            self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)

    def update(self, output, target):
        """Add one batch: logits (B, classes) and true classes (B,)."""
        predicted = output.topk(1, dim=1).indices[:, 0]  # the prediction Acc@1 counts (same tie-breaking)
        self.images += torch.bincount(target, minlength=self.num_classes)
        self.correct += torch.bincount(target[predicted == target], minlength=self.num_classes)
        if self.confusion is not None:
            pairs = target * self.num_classes + predicted
            self.confusion += torch.bincount(pairs, minlength=self.num_classes ** 2).view_as(self.confusion)

    def all_reduce(self):
        """Sum over ranks (no-op in a single process)."""
        for tensor in (self.images, self.correct) + ((self.confusion,) if self.confusion is not None else ()):
            all_reduce_sum(tensor)
        return self

    def per_class(self, class_names):
        """{class name: {'images': n, 'acc1': percent or None when the class has no image}}."""
        images, correct = self.images.tolist(), self.correct.tolist()
        return {str(name): {'images': n, 'acc1': 100.0 * c / n if n else None}
                for name, n, c in zip(class_names, images, correct, strict=True)}


def write_eval_results(config, summary, counts, class_names):
    """Write OUTPUT_DIR/eval_results.json: ``summary`` (checkpoint, images, acc1, acc5, loss), the resolved
    config, the per-class accuracy by class name; and confusion_matrix.png when the counts hold a matrix.
    Returns the paths written."""
    folder = config.OUTPUT_DIR
    os.makedirs(folder, exist_ok=True)
    results = dict(summary, config=yaml.safe_load(config.dump()), per_class=counts.per_class(class_names))
    paths = [write_text_atomically(os.path.join(folder, RESULTS_NAME), json.dumps(results, indent=2) + '\n')]
    if counts.confusion is not None:
        title = f"{config.MODEL.NAME}: Acc@1 {summary['acc1']:.2f}% on {summary['images']} images"
        paths.append(save_confusion_matrix(counts.confusion.cpu(), class_names, title,
                                           os.path.join(folder, CONFUSION_NAME)))
    return paths


def save_confusion_matrix(confusion, class_names, title, path):
    """A PNG of the confusion matrix, each row (true class) as percentages of its images; the counts are
    written in the cells when there are at most 20 classes."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend

    n = len(class_names)
    rows = confusion.double()
    percent = (100 * rows / rows.sum(dim=1, keepdim=True).clamp(min=1)).numpy()
    side = min(4 + 0.25 * n, 24)
    figure = Figure(figsize=(side + 1.5, side), dpi=100, layout='constrained')
    axes = figure.add_subplot()
    image = axes.imshow(percent, cmap='Blues', vmin=0, vmax=100)
    figure.colorbar(image, ax=axes, label='% of the true class')
    ticks = range(0, n, max(1, n // 40))  # at most ~40 labels per axis stay legible
    labels = [str(class_names[i]) for i in ticks]
    axes.set_xticks(list(ticks), labels, rotation=90, fontsize=8)
    axes.set_yticks(list(ticks), labels, fontsize=8)
    axes.set_xlabel('predicted class')
    axes.set_ylabel('true class')
    axes.set_title(title)
    if n <= 20:
        cells = ((i, j) for i in range(n) for j in range(n))
        for (i, j), count in zip(cells, confusion.flatten().tolist(), strict=True):
            if count:
                axes.text(j, i, str(count), ha='center', va='center', fontsize=8,
                          color='white' if percent[i, j] > 50 else 'black')

    def write(temp):
        figure.savefig(temp, format='png')

    replace_atomically(write, path)
    return path
