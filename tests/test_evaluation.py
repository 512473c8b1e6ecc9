"""evaluation.py: per-class counts, eval_results.json, the confusion-matrix PNG."""
import json

import matplotlib
import numpy as np
import torch
from PIL import Image

from conftest import make_tiny_config
from evaluation import ClassCounts, save_confusion_matrix, write_eval_results

NAMES = ['ant', 'bee', 'cat', 'dog']
BLUES = matplotlib.colormaps['Blues']  # the figure's colour map: 0% to 100% of the true class


def one_hot_logits(predicted, num_classes):
    return torch.nn.functional.one_hot(torch.tensor(predicted), num_classes).float()


def read_png(path):
    with Image.open(path) as png:
        assert png.format == 'PNG'
        return np.asarray(png.convert('RGB')).astype(int)


def render(folder, confusion, title, name='figure'):
    return read_png(save_confusion_matrix(torch.tensor(confusion), NAMES, title, str(folder / f'{name}.png')))


def rgb(percent):
    return np.array(BLUES(percent / 100)[:3]) * 255


def near(pixels, colour, tolerance=4):
    return np.abs(pixels - colour).max(axis=-1) <= tolerance


def one_per_row(columns, counts):
    confusion = [[0] * len(columns) for _ in columns]
    for row, (column, count) in enumerate(zip(columns, counts, strict=True)):
        confusion[row][column] = count
    return confusion


def matrix_grid(folder, title):
    """(top, left, cell height, cell width) of the 4x4 matrix in figures of NAMES with this title, found from two
    figures whose 100% cells share no position: the cells dark in exactly one of them (the colour bar's dark end
    is in both) span every row and column."""
    a = near(render(folder, one_per_row([1, 3, 0, 2], [1] * 4), title, 'grid_a'), rgb(100))
    b = near(render(folder, one_per_row([2, 0, 3, 1], [1] * 4), title, 'grid_b'), rgb(100))
    ys, xs = np.nonzero(a ^ b)
    height, width = (ys.max() + 1 - ys.min()) / 4, (xs.max() + 1 - xs.min()) / 4
    assert height > 20 and abs(height - width) < 2  # square cells (imshow's equal aspect)
    return ys.min(), xs.min(), height, width


def cell_percents(pixels, grid):
    """The percentage each cell's colour stands for (the nearest of 0..100 on the colour map), read off a corner of
    the cell away from its count; and whether the cell's centre holds anything but its colour (a count)."""
    top, left, height, width = grid
    levels = np.array([rgb(p) for p in range(101)])
    percents, written = [], []
    for i in range(4):
        for j in range(4):
            colour = pixels[int(top + (i + 0.2) * height), int(left + (j + 0.2) * width)]
            percents.append(int(np.abs(levels - colour).max(axis=1).argmin()))
            centre = pixels[int(top + (i + 0.35) * height):int(top + (i + 0.65) * height),
                            int(left + (j + 0.35) * width):int(left + (j + 0.65) * width)]
            written.append(not near(centre, colour).all())
    return np.array(percents).reshape(4, 4).tolist(), np.array(written).reshape(4, 4).tolist()


def row_percents(confusion):
    return [[round(100 * c / max(sum(row), 1)) for c in row] for row in confusion]


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

    pixels = read_png(paths[1])
    assert pixels.shape[1] >= 400 and pixels.shape[0] >= 300
    # the figure of these counts: each true class (row) in percent of its images, counts written where non-zero
    grid = matrix_grid(tmp_path, 'swin_tiny_test: Acc@1 80.00% on 5 images')
    confusion = [[1, 0, 0, 0], [0, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 2]]
    assert counts.confusion.tolist() == confusion
    percents, written = cell_percents(pixels, grid)
    assert percents == row_percents(confusion)
    assert written == [[c > 0 for c in row] for row in confusion]


def test_confusion_png_shows_each_rows_percentages_and_counts(tmp_path):
    """Read back off the PNG: every cell's shade is its share of the true class (also 25/50/75%, and 0 for a
    class without images), every non-zero count is written in its own cell and nowhere else."""
    title = 'tiny: Acc@1 30.00% on 10 images'
    grid = matrix_grid(tmp_path, title)
    confusion = [[2, 1, 1, 0], [0, 3, 0, 0], [1, 0, 0, 3], [0, 0, 0, 0]]
    mixed = render(tmp_path, confusion, title)
    percents, written = cell_percents(mixed, grid)
    assert percents == row_percents(confusion) == [[50, 25, 25, 0], [0, 100, 0, 0], [25, 0, 0, 75], [0, 0, 0, 0]]
    assert written == [[c > 0 for c in row] for row in confusion]

    # the same shares with another count in one cell: only that cell's pixels change
    base = render(tmp_path, one_per_row([1, 3, 0, 2], [2, 1, 3, 1]), title, 'base')
    other = render(tmp_path, one_per_row([1, 3, 0, 2], [5, 1, 3, 1]), title, 'other')
    assert cell_percents(base, grid) == cell_percents(other, grid)
    top, left, height, width = grid
    ys, xs = np.nonzero((base != other).any(axis=-1))
    assert len(ys) and set(((ys - top) // height).astype(int)) == {0} and set(((xs - left) // width).astype(int)) == {1}
    # and the figure outside the matrix (title, labels, colour bar) is the same for any counts
    inside = np.zeros(base.shape[:2], bool)
    inside[int(top) - 2:int(top + 4 * height) + 3, int(left) - 2:int(left + 4 * width) + 3] = True
    assert np.array_equal(mixed[~inside], base[~inside])


def test_no_confusion_png_above_100_classes(tmp_path):
    config = make_tiny_config(tmp_path, 'MODEL.NUM_CLASSES', 101)
    counts = ClassCounts(101, 'cpu')
    assert counts.confusion is None
    counts.update(one_hot_logits([5], 101), torch.tensor([5]))
    summary = {'checkpoint': 'x.pth', 'images': 1, 'acc1': 100.0, 'acc5': 100.0, 'loss': 0.1}
    paths = write_eval_results(config, summary, counts, [str(i) for i in range(101)])
    assert len(paths) == 1 and paths[0].endswith('eval_results.json')
    assert json.loads(open(paths[0]).read())['per_class']['0'] == {'images': 0, 'acc1': None}
