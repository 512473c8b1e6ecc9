"""evaluation.py: per-class counts, eval_results.json, the confusion-matrix PNG."""
import json

import numpy as np
import torch
from PIL import Image

from conftest import make_tiny_config
from evaluation import ClassCounts, write_eval_results


def one_hot_logits(predicted, num_classes):
    return torch.nn.functional.one_hot(torch.tensor(predicted), num_classes).float()


def test_class_counts_per_class_and_confusion():
    counts = ClassCounts(3, 'cpu')
    # two batches: true classes and predictions
    counts.update(one_hot_logits([0, 1, 2, 2], 3), torch.tensor([0, 1, 1, 2]))
    counts.update(one_hot_logits([0, 0], 3), torch.tensor([0, 2]))
    assert counts.images.tolist() == [2, 2, 2] and counts.correct.tolist() == [2, 1, 1]
    assert counts.confusion.tolist() == [[2, 0, 0], [0, 1, 1], [1, 0, 1]]  # row: true, column: predicted
    assert counts.all_reduce() is counts  # one process: unchanged
    per_class = counts.per_class(['a', 'b', 'c'])
    assert per_class == {'a': {'images': 2, 'acc1': 100.0}, 'b': {'images': 2, 'acc1': 50.0},
                         'c': {'images': 2, 'acc1': 50.0}}


def test_results_json_and_confusion_png(tmp_path):
    config = make_tiny_config(tmp_path, 'MODEL.NUM_CLASSES', 4)
    counts = ClassCounts(4, 'cpu')
    counts.update(one_hot_logits([0, 1, 1, 3, 3], 4), torch.tensor([0, 1, 2, 3, 3]))
    summary = {'checkpoint': 'x.pth', 'images': 5, 'acc1': 80.0, 'acc5': 100.0, 'loss': 0.5}
    paths = write_eval_results(config, summary, counts, ['ant', 'bee', 'cat', 'dog'])

    results = json.loads(open(paths[0]).read())
    assert {key: results[key] for key in summary} == summary
    assert results['config']['MODEL']['NUM_CLASSES'] == 4 and results['config']['DATA']['IMG_SIZE'] == 32
    assert results['per_class']['cat'] == {'images': 1, 'acc1': 0.0}
    assert results['per_class']['dog'] == {'images': 2, 'acc1': 100.0}

    with Image.open(paths[1]) as png:
        assert png.format == 'PNG' and png.width >= 400 and png.height >= 300
        pixels = np.asarray(png.convert('RGB'))
    assert pixels.std() > 10  # a drawn figure, not a blank canvas


def test_no_confusion_png_above_100_classes(tmp_path):
    config = make_tiny_config(tmp_path, 'MODEL.NUM_CLASSES', 101)
    counts = ClassCounts(101, 'cpu')
    assert counts.confusion is None
    counts.update(one_hot_logits([5], 101), torch.tensor([5]))
    summary = {'checkpoint': 'x.pth', 'images': 1, 'acc1': 100.0, 'acc5': 100.0, 'loss': 0.1}
    paths = write_eval_results(config, summary, counts, [str(i) for i in range(101)])
    assert len(paths) == 1 and paths[0].endswith('eval_results.json')
    assert json.loads(open(paths[0]).read())['per_class']['0'] == {'images': 0, 'acc1': None}
