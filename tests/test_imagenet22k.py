"""ImageNet-22K in the official layout: JSON map files of [relative path, label] under DATA_PATH."""
import json
import logging
import os

import numpy as np
import pytest
from PIL import Image

from config import load_config
from conftest import make_tiny_config
from data import build_loader, dataset_num_classes
from data.imagenet22k import NUM_CLASSES, ImageNet22KDataset
from errors import DataError

# synset folder -> label; the last label of ImageNet-22K is 21840
SYNSETS = {'n00004475': 0, 'n01440764': 7, 'n15102894': 21840}


def make_22k(root, train_per_class=3, val_per_class=2, size=40):
    """A tiny official-layout ImageNet-22K: images under DATA_PATH/<synset>/, map files in DATA_PATH."""
    rng = np.random.default_rng(0)
    maps = {'train': [], 'val': []}
    for synset, label in SYNSETS.items():
        os.makedirs(os.path.join(root, synset), exist_ok=True)
        for split, count in (('train', train_per_class), ('val', val_per_class)):
            for i in range(count):
                rel = f'{synset}/{synset}_{split}_{i}.JPEG'
                Image.fromarray(rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8)).save(
                    os.path.join(root, rel), format='JPEG')
                maps[split].append([rel, label])
    for split, entries in maps.items():
        write_map(root, split, entries)
    return str(root)


def write_map(root, split, entries):
    with open(os.path.join(root, f'ILSVRC2011fall_whole_map_{split}.txt'), 'w') as f:
        json.dump(entries, f)


def test_reads_the_official_map_files(tmp_path):
    root = make_22k(tmp_path)
    train, val = ImageNet22KDataset(root, 'train'), ImageNet22KDataset(root, 'val')
    assert (len(train), len(val)) == (9, 6)
    assert len(train.classes) == NUM_CLASSES == 21841
    assert sorted(set(train.targets)) == [0, 7, 21840]
    # paths resolve under DATA_PATH, as the official DATA_PATH + '/' + path
    assert train.samples[0] == (os.path.join(root, 'n00004475', 'n00004475_train_0.JPEG'), 0)
    image, target, skipped = val[5]
    assert target == 21840 and image.size == (48, 40) and image.mode == 'RGB' and skipped == ()
    expected = np.asarray(Image.open(os.path.join(root, 'n15102894', 'n15102894_val_1.JPEG')).convert('RGB'))
    assert np.array_equal(np.asarray(image), expected)


def test_synset_folders_name_the_classes_when_every_label_has_one(tmp_path):
    root = make_22k(tmp_path)
    entries = [[f'n{label:08d}/a.JPEG', label] for label in range(NUM_CLASSES)]
    os.makedirs(os.path.join(root, 'n00000000'), exist_ok=True)
    Image.new('RGB', (8, 8)).save(os.path.join(root, 'n00000000', 'a.JPEG'))
    write_map(root, 'train', entries)
    dataset = ImageNet22KDataset(root, 'train')
    assert dataset.classes[0] == 'n00000000' and dataset.classes[21840] == 'n00021840'


def test_unreadable_image_is_replaced_by_the_next_sample(tmp_path):
    root = make_22k(tmp_path)
    with open(os.path.join(root, 'n01440764', 'n01440764_val_0.JPEG'), 'wb') as f:
        f.write(b'not a jpeg')
    val = ImageNet22KDataset(root, 'val')
    image, target, skipped = val[2]  # the broken file ...
    assert target == val.targets[3]  # ... gives the next sample, like every other dataset, and is reported
    assert np.array_equal(np.asarray(image), np.asarray(val[3].image))
    assert [report.path for report in skipped] == [val.samples[2][0]]


def test_leading_slash_paths_stay_under_data_path(tmp_path):
    root = make_22k(tmp_path)
    write_map(root, 'val', [['/n00004475/n00004475_val_0.JPEG', 0]])
    assert ImageNet22KDataset(root, 'val').samples[0][0] == os.path.join(root, 'n00004475',
                                                                         'n00004475_val_0.JPEG')


@pytest.mark.parametrize('entries, message', [
    (None, 'ILSVRC2011fall_whole_map_val.txt not found'),
    ([['n00004475/n00004475_val_0.JPEG', 21841]], 'entry 0: label 21841 of n00004475/n00004475_val_0.JPEG is '
                                                   'outside 0..21840'),
    ([['n00004475/n00004475_val_0.JPEG', 0], ['n00004475/n00004475_val_1.JPEG', -1]], 'entry 1: label -1'),
    ([['n00004475/n00004475_val_0.JPEG']], r"entry 0: expected \[path, label\]"),
    ([['n00004475/n00004475_val_0.JPEG', 1.5]], r"entry 0: expected \[path, label\]"),
    ([], 'non-empty JSON list'),
    ([['missing/x.JPEG', 3]], 'first image .*missing/x.JPEG not found'),
    ('not json', 'is not a JSON list'),
])
def test_bad_map_files_are_one_line_data_errors(tmp_path, entries, message):
    root = make_22k(tmp_path)
    path = os.path.join(root, 'ILSVRC2011fall_whole_map_val.txt')
    if entries is None:
        os.remove(path)
    elif isinstance(entries, str):
        with open(path, 'w') as f:
            f.write(entries)
    else:
        write_map(root, 'val', entries)
    with pytest.raises(DataError, match=message) as info:
        ImageNet22KDataset(root, 'val')
    assert '\n' not in str(info.value)


def test_labels_given_as_digit_strings_are_read_as_the_official_int_does(tmp_path):
    root = make_22k(tmp_path)
    write_map(root, 'val', [['n00004475/n00004475_val_0.JPEG', '21840']])
    assert ImageNet22KDataset(root, 'val').targets == [21840]
    assert isinstance(ImageNet22KDataset(root, 'val')[0][1], int)


def loader_config(root, *opts, environ=None):
    return make_tiny_config(None, 'DATA.DATASET', 'imagenet22K', 'DATA.DATA_PATH', root, 'MODEL.NUM_CLASSES', 21841,
                            'DATA.BATCH_SIZE', 2, 'DATA.IMG_SIZE', 32, *opts, environ=environ or {})


def test_build_loader_reads_the_official_layout_sharded_exactly(tmp_path):
    root = make_22k(tmp_path)
    val_targets = []
    for rank in (0, 1):
        config = loader_config(root, environ={'RANK': str(rank), 'WORLD_SIZE': '2'})
        train, val, loader_train, loader_val, mixup_fn = build_loader(config)
        assert isinstance(train, ImageNet22KDataset) and len(train) == 9 and mixup_fn.num_classes == 21841
        val_targets += [t for batch in loader_val for t in batch.targets.tolist()]
        loader_train.sampler.set_epoch(0)
        assert sum(len(batch.targets) for batch in loader_train) == 4   # 9 images over 2 ranks, batch 2
    assert sorted(val_targets) == sorted(val.targets)   # each of the 6 val images exactly once over the ranks


def test_unreadable_22k_image_is_logged_and_counted_by_the_loader(tmp_path):
    root = make_22k(tmp_path)
    with open(os.path.join(root, 'n01440764', 'n01440764_val_0.JPEG'), 'wb') as f:
        f.write(b'not a jpeg')
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    data_logger = logging.getLogger('swin.data')
    data_logger.addHandler(handler)
    try:
        _, _, _, loader_val, _ = build_loader(loader_config(root, 'EVAL_MODE', True, 'DATA.MAX_BAD_FRACTION', 0.5))
        assert sum(len(batch.targets) for batch in loader_val) == 6
    finally:
        data_logger.removeHandler(handler)
    assert loader_val.bad_images == 1
    assert any('n01440764_val_0.JPEG' in record.getMessage() for record in records)


def test_num_classes_comes_from_the_layout_unless_set(tmp_path):
    root = make_22k(tmp_path)
    config = load_config(None, ['DATA.DATASET', 'imagenet22K', 'DATA.DATA_PATH', root], environ={})
    assert dataset_num_classes(config) == (21841, 'ImageNet-22K')
    with pytest.raises(DataError, match='21841 class.* but MODEL.NUM_CLASSES is 1000'):
        build_loader(loader_config(root, 'MODEL.NUM_CLASSES', 1000))
    with pytest.raises(DataError, match='DATA.ZIP_MODE does not apply to DATA.DATASET imagenet22K'):
        build_loader(loader_config(root, 'DATA.ZIP_MODE', True))
