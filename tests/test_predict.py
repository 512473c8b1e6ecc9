"""scripts/predict.py: inputs (files, folders, globs), CSV / JSON / table output, unreadable files, streaming,
agreement with main.py --eval, and its CPU fast path (models/cpu_linear.py)."""
import csv
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_OPTS, make_tiny_config
from data.inference import find_images
from errors import DataError
from helpers import CLASSES, ROOT, child_env, load_script, make_image_folder, run_main, tiny_yaml
from models import build_model, cpu_linear

predict = load_script('predict')
OPTS = ['--opts'] + [str(v) for v in TINY_OPTS]

pytestmark = pytest.mark.usefixtures('one_thread')  # tiny models: see conftest.one_thread


def save_checkpoint(path, num_classes, class_names=None, seed=0):
    """Random tiny-Swin weights as {'model': state_dict, 'class_names': [...]}, like a training checkpoint."""
    torch.manual_seed(seed)
    model = build_model(make_tiny_config(None, 'MODEL.NUM_CLASSES', num_classes))
    torch.save({'model': model.state_dict(), 'class_names': list(class_names or [])}, path)
    return str(path)


def write_images(folder, count, size=(40, 30), seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(count):
        paths.append(os.path.join(folder, f'{i:04d}.png'))
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(paths[-1])
    return paths


@pytest.fixture
def cfg(tmp_path):
    path = tmp_path / 'empty.yaml'
    path.write_text('')
    return str(path)


def read_csv(path):
    with open(path, newline='') as f:
        return list(csv.DictReader(f))


def test_find_images_expands_files_folders_and_globs(tmp_path):
    write_images(tmp_path / 'a' / 'deep', 2)
    write_images(tmp_path / 'b', 1)
    (tmp_path / 'a' / 'notes.txt').write_text('not an image')
    (tmp_path / 'photo.JPG').write_bytes(b'x')
    (tmp_path / 'explicit.dat').write_bytes(b'x')
    root = str(tmp_path)

    def rel(inputs):
        return [os.path.relpath(p, root) for p in find_images([os.path.join(root, i) for i in inputs])]

    # each file once, in the order of the inputs; a file named explicitly is taken whatever its extension
    assert rel(['a', 'explicit.dat', '*.JPG', '**/0000.png', 'b/0000.png']) == [
        'a/deep/0000.png', 'a/deep/0001.png', 'explicit.dat', 'photo.JPG', 'b/0000.png']
    # a glob keeps image files (extension in any case) and expands the folders it matches
    assert rel(['*']) == ['a/deep/0000.png', 'a/deep/0001.png', 'b/0000.png', 'photo.JPG']
    with pytest.raises(DataError, match='input not found: .*absent.png'):
        find_images([f'{root}/absent.png'])
    with pytest.raises(DataError, match=r'matches no image file'):
        find_images([f'{root}/*.gif'])


@pytest.mark.slow
def test_csv_rows_error_column_and_top1_equal_to_eval(tmp_path):
    """predict over a class-folder tree with a corrupt file; main.py --eval of the same weights (as safetensors)
    on the same images: the same Acc@1 and per-class accuracy, written with a confusion-matrix PNG."""
    data = make_image_folder(tmp_path / 'data', train_per_class=1)
    config = tiny_yaml(tmp_path / 'tiny.yaml', data, num_workers=2)
    ckpt = save_checkpoint(tmp_path / 'ckpt.pth', 3, CLASSES, seed=1)
    weights = str(tmp_path / 'ckpt.safetensors')
    assert load_script('convert_checkpoint').main([ckpt, weights, '--to', 'official']) == 0
    result = run_main('--cfg', config, '--eval', '--resume', weights, '--output', str(tmp_path / 'eval'))
    assert result.returncode == 0, result.stderr
    eval_acc1 = float(re.search(r' \* Acc@1 ([0-9.]+)', result.stdout).group(1))
    results = json.loads((tmp_path / 'eval' / 'tiny' / 'default' / 'eval_results.json').read_text())
    assert results['checkpoint'] == weights and results['images'] == 21 and round(results['acc1'], 3) == eval_acc1
    assert results['config']['DATA']['DATA_PATH'] == data and 0 < results['loss'] < 10
    with Image.open(tmp_path / 'eval' / 'tiny' / 'default' / 'confusion_matrix.png') as png:
        assert png.format == 'PNG' and png.width > 300 and png.height > 300

    val = os.path.join(data, 'val')
    with open(os.path.join(val, 'square', 'corrupt.png'), 'wb') as f:
        f.write(b'\x89PNG\r\n\x1a\n' + os.urandom(200))  # a PNG signature, then garbage
    out = tmp_path / 'predictions.csv'
    assert predict.main([ckpt, val, '--cfg', config, '--topk', '2', '--batch-size', '4', '--output', str(out),
                         '--device', 'cpu']) == 0

    rows = read_csv(out)
    assert list(rows[0]) == ['path', 'index_1', 'class_1', 'prob_1', 'index_2', 'class_2', 'prob_2', 'error']
    assert len(rows) == 22 and [row['path'] for row in rows] == sorted(row['path'] for row in rows)
    bad = [row for row in rows if row['error']]
    assert len(bad) == 1 and bad[0]['path'].endswith('corrupt.png') and bad[0]['class_1'] == ''
    good = [row for row in rows if not row['error']]
    assert all(row['class_1'] == CLASSES[int(row['index_1'])] for row in good)
    assert all(1 >= float(row['prob_1']) >= float(row['prob_2']) > 0 for row in good)
    assert len({row['class_1'] for row in good}) > 1  # the weights tell images apart: a meaningful comparison
    hits = {name: [row['class_1'] == name for row in good if os.path.basename(os.path.dirname(row['path'])) == name]
            for name in CLASSES}
    assert f'{100 * sum(map(sum, hits.values())) / len(good):.3f}' == f'{eval_acc1:.3f}'
    assert {name: 100 * sum(h) / len(h) for name, h in hits.items()} == {
        name: entry['acc1'] for name, entry in results['per_class'].items()}


def test_eval_and_predict_at_another_resolution(tmp_path):
    """32 px weights evaluated with --opts DATA.IMG_SIZE 40 (stage 1's 10x10 map is not a multiple of the window
    4): main.py --eval pads it and says so, says the weights' own size, and predict.py gives the same accuracy."""
    data = make_image_folder(tmp_path / 'data', train_per_class=1)
    config = tiny_yaml(tmp_path / 'tiny.yaml', data)
    torch.manual_seed(1)
    trained_config = make_tiny_config(None, 'MODEL.NUM_CLASSES', 3)
    ckpt = str(tmp_path / 'ckpt.pth')
    torch.save({'model': build_model(trained_config).state_dict(), 'class_names': list(CLASSES),
                'config': trained_config.dump()}, ckpt)
    result = run_main('--cfg', config, '--eval', '--resume', ckpt, '--output', str(tmp_path / 'eval'),
                      '--opts', 'DATA.IMG_SIZE', '40')
    assert result.returncode == 0, result.stderr
    assert ('gives a 10x10 feature map in stage 1, not a multiple of MODEL.SWIN.WINDOW_SIZE 4: padded to 12x12'
            in result.stdout)
    assert f'checkpoint {ckpt} was trained at 32x32 px (DATA.IMG_SIZE of its config); evaluating them at 40x40 px' \
        in result.stdout
    eval_acc1 = float(re.search(r' \* Acc@1 ([0-9.]+)', result.stdout).group(1))

    out = tmp_path / 'predictions.csv'
    assert predict.main([ckpt, os.path.join(data, 'val'), '--cfg', config, '--opts', 'DATA.IMG_SIZE', '40',
                         '--output', str(out), '--device', 'cpu', '--quiet']) == 0
    rows = read_csv(out)
    hits = [row['class_1'] == os.path.basename(os.path.dirname(row['path'])) for row in rows]
    assert len(rows) == 21 and f'{100 * sum(hits) / len(hits):.3f}' == f'{eval_acc1:.3f}'


def test_json_output_and_class_indices_without_names(tmp_path, cfg, capsys):
    ckpt = save_checkpoint(tmp_path / 'ckpt.pth', 10)  # no class names stored: the index is the name
    paths = write_images(tmp_path / 'images', 3)
    (tmp_path / 'images' / 'empty.jpg').write_bytes(b'')
    out = tmp_path / 'out.json'
    assert predict.main([ckpt, str(tmp_path / 'images'), '--cfg', cfg, '--output', str(out), '--topk', '3',
                         '--device', 'cpu'] + OPTS) == 0
    records = json.loads(out.read_text())
    assert [r['path'] for r in records] == paths + [str(tmp_path / 'images' / 'empty.jpg')]
    assert records[-1]['error'] and records[-1]['index_1'] is None and records[-1]['prob_1'] is None
    for record in records[:-1]:
        assert list(record) == ['path', 'index_1', 'class_1', 'prob_1', 'index_2', 'class_2', 'prob_2',
                                'index_3', 'class_3', 'prob_3', 'error']
        assert record['error'] is None and record['class_1'] == str(record['index_1'])
    err = capsys.readouterr().err
    assert 'unreadable image' in err and 'empty.jpg' in err and '4 images (1 unreadable)' in err


def test_table_on_stdout_and_one_line_errors(tmp_path, cfg, capsys):
    # safetensors weights: the class names come from the file's metadata
    pth = save_checkpoint(tmp_path / 'ckpt.pth', 10, [f'class{i}' for i in range(10)])
    ckpt = str(tmp_path / 'ckpt.safetensors')
    assert load_script('convert_checkpoint').main([pth, ckpt, '--to', 'timm']) == 0
    paths = write_images(tmp_path, 2)
    capsys.readouterr()
    assert predict.main([ckpt] + paths + ['--cfg', cfg, '--topk', '2', '--device', 'cpu'] + OPTS) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ['path', 'top-1', 'top-2'] and len(lines) == 3
    assert lines[1].startswith(paths[0]) and re.search(r'class\d \(\d+\.\d\d%\)\s+class\d \(', lines[1])

    assert predict.main([ckpt, str(tmp_path / 'absent.png'), '--cfg', cfg] + OPTS) == 2
    assert capsys.readouterr().err.strip().endswith('input not found: ' + str(tmp_path / 'absent.png'))
    assert predict.main([ckpt] + paths + ['--cfg', cfg, '--output', str(tmp_path / 'out.txt')] + OPTS) == 2
    assert 'must end in .csv or .json' in capsys.readouterr().err


def onednn_products(fn):
    """(fn(), how many linear layers ran through oneDNN's matmul, models/cpu_linear.py's fast path)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = fn()
    return out, sum(e.count for e in prof.key_averages() if e.key == 'mkldnn::_linear_pointwise')


@pytest.mark.skipif(not cpu_linear.available(), reason='cpu_linear.available() is False: no oneDNN linear here')
def test_cpu_predictions_take_the_onednn_path(tmp_path, cfg, capsys):
    """predict is where the oneDNN path is switched on: every batch's linear layers go through it (5 images in
    batches of 2: 3 forward passes), and the switch is off again once predict returns."""
    ckpt = save_checkpoint(tmp_path / 'ckpt.pth', 10)
    paths = write_images(tmp_path / 'images', 5)
    status, products = onednn_products(lambda: predict.main(
        [ckpt, *paths, '--cfg', cfg, '--batch-size', '2', '--device', 'cpu', '--quiet'] + OPTS))
    assert status == 0 and len(capsys.readouterr().out.splitlines()) == 1 + 5
    model = build_model(make_tiny_config(None, 'MODEL.NUM_CLASSES', 10)).eval()
    layers = sum(isinstance(m, cpu_linear.Linear) for m in model.modules())
    assert layers > 0 and products == 3 * layers
    with torch.inference_mode():
        assert onednn_products(lambda: model(torch.randn(1, 3, 32, 32)))[1] == 0


def test_rows_are_flushed_batch_by_batch(tmp_path):
    """Results stream to the file: after the first batch its rows are on disk while the rest is still unread
    (so memory does not grow with the number of images)."""
    config = make_tiny_config(None, 'DATA.NUM_WORKERS', 2)
    paths = write_images(tmp_path / 'images', 300, size=(20, 20))
    ckpt = save_checkpoint(tmp_path / 'ckpt.pth', 10)
    model, names = predict.load_model(ckpt, predict.read_weights(ckpt), config, torch.device('cpu'))
    loader = predict.image_files_loader(paths, predict.build_val_transform(config), 32, 2)
    out = tmp_path / 'out.csv'
    with open(out, 'w', newline='') as f:
        writer = predict.CsvWriter(f, 1)
        batches = predict.predict(model, loader, paths, names, 1, torch.device('cpu'), predict.Precision('cpu'),
                                  writer)
        assert next(batches) == 32
        assert [row['path'] for row in read_csv(out)] == paths[:32]  # read back through another handle
        assert sum(batches) == 300 - 32
    assert [row['path'] for row in read_csv(out)] == paths


@pytest.mark.slow
def test_tools_work_from_the_checkpoint_alone_for_a_model_whose_classes_came_from_the_folders(tmp_path, capsys):
    """Trained with MODEL.NUM_CLASSES left to the class folders (3, not the default 1000): predict, export and
    convert need no --cfg, and a --cfg that leaves the class count unset works too."""
    data = make_image_folder(tmp_path / 'data', train_per_class=2)
    config = tiny_yaml(tmp_path / 'tiny.yaml', data, extra='TRAIN:\n  EPOCHS: 1\n  WARMUP_EPOCHS: 0\n')
    unset = tmp_path / 'unset.yaml'
    unset.write_text(''.join(line + '\n' for line in open(config).read().splitlines() if 'NUM_CLASSES' not in line))
    result = run_main('--cfg', str(unset), '--output', str(tmp_path / 'out'))
    assert result.returncode == 0, result.stderr
    best = str(tmp_path / 'out' / 'tiny' / 'default' / 'best.pth')
    val = os.path.join(data, 'val')

    tables = []
    for args in ([], ['--cfg', str(unset)], ['--cfg', str(tmp_path / 'out' / 'tiny' / 'default' / 'config.yaml')]):
        assert predict.main([best, val, '--device', 'cpu', '--quiet', '--topk', '2'] + args) == 0
        tables.append(capsys.readouterr().out)
    assert tables[0] == tables[1] == tables[2] and all(name in tables[0] for name in CLASSES)

    converted = str(tmp_path / 'weights.safetensors')
    official = str(tmp_path / 'weights.pth')
    convert = load_script('convert_checkpoint')
    assert convert.main([best, converted, '--to', 'official']) == 0
    assert convert.main([best, official, '--to', 'official']) == 0
    capsys.readouterr()
    for path in (converted, official):
        assert predict.main([path, val, '--device', 'cpu', '--quiet', '--topk', '2']) == 0
        assert capsys.readouterr().out == tables[0]

    onnx = str(tmp_path / 'model.onnx')
    assert load_script('export_onnx').main([best, '--output', onnx]) == 0
    assert 'logits (batch, 3)' in capsys.readouterr().out

    bare = str(tmp_path / 'bare.pth')
    torch.save({'model': torch.load(best, weights_only=True)['model']}, bare)  # as an official release: no config
    assert predict.main([bare, val, '--device', 'cpu']) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"{bare} carries no config" in error and 'give --cfg' in error


def test_the_table_follows_the_progress_bar_on_a_shared_terminal(tmp_path, cfg):
    """stdout and stderr into one stream, as on a terminal: the bar (stderr) ends before the table (stdout) starts."""
    ckpt = save_checkpoint(tmp_path / 'ckpt.pth', 10)
    paths = write_images(tmp_path / 'images', 40, size=(20, 20))
    script = os.path.join(ROOT, 'scripts', 'predict.py')
    result = subprocess.run([sys.executable, script, ckpt, *paths, '--cfg', cfg, '--batch-size', '4', '--topk', '1',
                             '--device', 'cpu', *OPTS], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=child_env(), text=True, timeout=120)
    assert result.returncode == 0, result.stdout
    shared = result.stdout
    header, bar_end = shared.index('path '), shared.rindex('img/s')  # tqdm's rate, on every redraw
    assert bar_end < header, shared
    assert all(path in shared[header:] for path in paths)
