"""Text logs per rank, config.yaml, TensorBoard scalars, the official log line formats."""
import itertools
import logging
import os

import pytest

from config import load_config
from errors import ConfigError
from logger import (
    LIBRARY_LOGGER,
    MetricWriter,
    create_logger,
    format_accuracy,
    format_eta,
    format_max_accuracy,
    format_network_accuracy,
    format_throughput,
    save_config,
)

_names = itertools.count()


@pytest.fixture
def logger_name():
    """A logger name of its own per test; its handlers are closed afterwards."""
    name = f'test_logger_{next(_names)}'
    yield name
    for logger in (logging.getLogger(name), logging.getLogger(LIBRARY_LOGGER)):
        for handler in [h for h in logger.handlers if getattr(h, '_swin_train', False) or logger.name == name]:
            logger.removeHandler(handler)
            handler.close()


def read(path):
    with open(path) as f:
        return f.read()


def test_rank0_console_and_file(tmp_path, capsys, logger_name):
    logger = create_logger(str(tmp_path), 0, logger_name)
    logger.info('hello from rank 0')
    logger.debug('details for the file')
    out = capsys.readouterr().out
    assert 'hello from rank 0' in out and 'details for the file' not in out
    assert '\033[' not in out  # no color codes when stdout is not a terminal
    text = read(tmp_path / 'log_rank0.txt')
    assert 'hello from rank 0' in text and 'details for the file' in text
    assert 'test_logger.py' in text and 'INFO' in text  # file:line and level
    assert not logger.propagate


def test_other_ranks_only_write_their_file(tmp_path, capfd, logger_name):
    logger = create_logger(str(tmp_path), 3, logger_name)
    logger.info('hello from rank 3')
    logger.warning('careful')
    captured = capfd.readouterr()
    assert captured.out == '' and captured.err == ''
    text = read(tmp_path / 'log_rank3.txt')
    assert 'hello from rank 3' in text and 'WARNING careful' in text
    assert not (tmp_path / 'log_rank0.txt').exists()


def test_library_loggers_reach_the_rank_file_and_console(tmp_path, capsys, logger_name):
    """data/, config and models log under 'swin.': their lines land in log_rank*.txt like the run's own."""
    create_logger(str(tmp_path), 0, logger_name)
    logging.getLogger('swin.data').info('train: 12 batches per epoch')
    logging.getLogger('swin.data').warning('skipped unreadable image x.jpg')
    text = read(tmp_path / 'log_rank0.txt')
    assert 'swin.data' in text and 'train: 12 batches per epoch' in text and 'skipped unreadable image' in text
    assert 'train: 12 batches per epoch' in capsys.readouterr().out
    create_logger(str(tmp_path / 'again'), 1, logger_name)  # a second call replaces, never duplicates
    logging.getLogger('swin.data').info('once')
    assert read(tmp_path / 'again' / 'log_rank1.txt').count('once') == 1
    assert 'once' not in read(tmp_path / 'log_rank0.txt')


def test_second_call_does_not_duplicate(tmp_path, capsys, logger_name):
    create_logger(str(tmp_path), 0, logger_name)
    logger = create_logger(str(tmp_path), 0, logger_name)
    assert len(logger.handlers) == 2
    logger.info('once')
    assert capsys.readouterr().out.count('once') == 1
    assert read(tmp_path / 'log_rank0.txt').count('once') == 1


def test_creates_output_dir(tmp_path, logger_name):
    output_dir = tmp_path / 'a' / 'b'
    create_logger(str(output_dir), 1, logger_name).info('x')
    assert (output_dir / 'log_rank1.txt').is_file()


def test_unwritable_output_dir(tmp_path, logger_name):
    blocker = tmp_path / 'a_file'
    blocker.write_text('not a folder')
    bad = str(blocker / 'output')
    with pytest.raises(ConfigError, match='not writable') as info:
        create_logger(bad, 0, logger_name)
    assert bad in str(info.value)
    with pytest.raises(ConfigError, match='not writable'):
        save_config(load_config(environ={}), bad)


def test_save_config_round_trip(tmp_path, tiny_config):
    config = tiny_config('TRAIN.BASE_LR', 1e-3, 'MODEL.SWIN.APE', True)
    path = save_config(config, str(tmp_path))
    assert path == str(tmp_path / 'config.yaml')
    assert os.listdir(tmp_path) == ['config.yaml']  # no temporary file left behind
    loaded = load_config(path, environ={})
    assert loaded == config
    assert loaded.TRAIN.BASE_LR == 1e-3 and loaded.MODEL.SWIN.APE
    save_config(config, str(tmp_path))  # overwriting is fine
    assert load_config(path, environ={}) == config


def test_tensorboard_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    writer = MetricWriter(str(tmp_path), enabled=True)
    writer.add_scalars({'train/loss': 2.5, 'train/lr': 1e-3}, step=1)
    writer.add_scalars({'train/loss': 1.5, 'train/lr': 2e-3}, step=2)
    writer.add_scalar('val/acc1', 50.0, 7)
    writer.flush()
    writer.close()
    writer.add_scalar('val/acc1', 60.0, 8)  # ignored after close
    assert any(name.startswith('events.out.tfevents') for name in os.listdir(tmp_path))

    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert set(events.Tags()['scalars']) == {'train/loss', 'train/lr', 'val/acc1'}
    assert [(e.step, e.value) for e in events.Scalars('train/loss')] == [(1, 2.5), (2, 1.5)]
    assert [(e.step, e.value) for e in events.Scalars('train/lr')] == [(1, pytest.approx(1e-3)),
                                                                       (2, pytest.approx(2e-3))]
    assert [(e.step, e.value) for e in events.Scalars('val/acc1')] == [(7, 50.0)]


def test_disabled_writer_writes_nothing(tmp_path):
    writer = MetricWriter(str(tmp_path / 'tb'), enabled=False)
    writer.add_scalars({'train/loss': 1.0}, step=1)
    writer.add_scalar('val/acc1', 1.0, 1)
    writer.flush()
    writer.close()
    assert not (tmp_path / 'tb').exists()


def test_official_line_formats():
    assert format_accuracy(81.23456, 95.5) == ' * Acc@1 81.235 Acc@5 95.500'
    assert format_network_accuracy(50000, 81.234) == 'Accuracy of the network on the 50000 test images: 81.2%'
    assert format_max_accuracy(81.236) == 'Max accuracy: 81.24%'
    assert format_throughput(64, 1234.5) == 'batch_size 64 throughput 1234.5'
    # another model's lines are labelled, so parsers of the official lines never mistake them for the model's
    assert format_accuracy(81.23456, 95.5, 'EMA') == ' * EMA Acc@1 81.235 Acc@5 95.500'
    assert format_network_accuracy(50000, 81.234, 'EMA') == ('Accuracy of the EMA network on the 50000 test images: '
                                                             '81.2%')
    assert format_max_accuracy(81.236, 'EMA') == 'Max EMA accuracy: 81.24%'
    assert format_eta(3725.9) == '1:02:05'
    assert format_eta(90000) == '1 day, 1:00:00'
