"""Top-k predictions of a trained or released Swin model for image files, folders or glob patterns.

    python scripts/predict.py CKPT INPUTS... [--cfg CFG] [--opts KEY VALUE ...] [--topk K]
                              [--output FILE.csv|FILE.json] [--batch-size N] [--device D]

INPUTS: image files, folders (searched recursively for common image extensions) or glob patterns (quote them; ``**``
recurses). The model is built from --cfg, or without it from the config our checkpoints carry (an unset
MODEL.NUM_CLASSES comes from the checkpoint's head); CKPT may be one of our checkpoints, an official release or timm
weights (.pth or .safetensors). Images get exactly the validation transform of data/ and are read in batches by
DATA.NUM_WORKERS workers; on CUDA the model runs under AMP (as validation does), on a CPU its float32 linear
layers run through oneDNN (models/cpu_linear.py: faster, logits within about 3e-6 of main.py --eval's). Results
stream to --output as they come (memory stays flat however many images): CSV with a header and one row per image,
columns ``path``, then for k = 1..K ``index_k``, ``class_k``, ``prob_k``, then ``error``; JSON, a list of records
with the same keys. Without --output a table is printed (after the progress bar has ended). An unreadable file gets
a row with its error (and empty predictions); it never stops the run. Class names: those stored in the checkpoint,
else the ImageNet-1K names when MODEL.NUM_CLASSES is 1000, else the class index. Progress (images/s) goes to stderr.
"""
import argparse
import csv
import json
import logging
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
from timm.data import ImageNetInfo
from tqdm import tqdm

from checkpoint import config_for_weights, load_model_weights, read_weights
from data import build_val_transform, usable_workers
from data.inference import find_images, image_files_loader
from errors import ConfigError, run_script
from models import build_model, cpu_linear
from utils import Precision, resolve_device, resolve_precision  # noqa: F401 (Precision: for callers)

_logger = logging.getLogger('predict')


def class_names(checkpoint, num_classes):
    """Names stored in the checkpoint, else the ImageNet-1K names for 1000 classes, else None (indices)."""
    names = checkpoint.get('class_names') if isinstance(checkpoint, dict) else None
    if names and len(names) == num_classes:
        return [str(name) for name in names]
    if num_classes == 1000:
        return ImageNetInfo('imagenet-1k').label_descriptions()
    return None


def load_model(checkpoint_path, checkpoint, config, device):
    """(model in eval mode on device, class names or None) for a checkpoint's content (``read_weights``)."""
    model = build_model(config, pad_windows=True)  # another DATA.IMG_SIZE than the weights' is padded, and said
    load_model_weights(model, checkpoint, _logger, name=checkpoint_path, model_type=config.MODEL.TYPE)
    return model.to(device).eval(), class_names(checkpoint, config.MODEL.NUM_CLASSES)


def columns(topk):
    return ['path'] + [f'{field}_{k}' for k in range(1, topk + 1) for field in ('index', 'class', 'prob')] + ['error']


def predict(model, loader, paths, names, topk, device, precision, writer):
    """Run the model over the loader's batches, hand each batch's records (in input order) to writer.write;
    yields the number of images of each batch after it is written."""
    for batch in loader:
        top = None
        if batch.images.numel():
            # the oneDNN CPU path (models/cpu_linear.py: on here, where speed matters and 3e-6 is immaterial)
            with torch.inference_mode(), precision.autocast(), cpu_linear.enabled():
                logits = model(batch.images.to(device, non_blocking=True))
            top = logits.float().softmax(dim=-1).topk(topk, dim=-1)
            top = zip(top.indices.tolist(), top.values.tolist(), strict=True)
        records = []
        for position, readable, error in zip(batch.positions, batch.readable, batch.errors, strict=True):
            record = {'path': paths[position]}
            indices, probs = next(top) if readable else ([None] * topk, [None] * topk)
            for k, (index, prob) in enumerate(zip(indices, probs, strict=True), 1):
                record[f'index_{k}'] = index
                record[f'class_{k}'] = None if index is None else (names[index] if names else str(index))
                record[f'prob_{k}'] = None if prob is None else round(prob, 6)
            record['error'] = error or None
            records.append(record)
        writer.write(records)
        yield len(records)


class CsvWriter:
    """CSV rows, flushed after every batch; empty cells for missing values."""

    def __init__(self, file, topk):
        self.file = file
        self.writer = csv.DictWriter(file, fieldnames=columns(topk))
        self.writer.writeheader()

    def write(self, records):
        self.writer.writerows({key: '' if value is None else value for key, value in record.items()}
                              for record in records)
        self.file.flush()

    def close(self):
        pass


class JsonWriter:
    """A JSON list of records written one batch at a time (valid JSON once closed)."""

    def __init__(self, file, topk):
        self.file = file
        self.count = 0
        file.write('[')

    def write(self, records):
        for record in records:
            self.file.write((',\n' if self.count else '\n') + json.dumps(record))
            self.count += 1
        self.file.flush()

    def close(self):
        self.file.write('\n]\n' if self.count else ']\n')


class TableWriter:
    """A readable table on stdout: path, then 'class (prob%)' per rank, or the error. Paths are padded to
    path_width (a longer one shifts its row, it is never cut). With ``hold`` (a progress bar is drawn on the same
    terminal) the rows wait for close(), after the bar has ended, so the two never interleave."""

    def __init__(self, file, topk, path_width, hold=False):
        self.file, self.topk, self.path_width = file, topk, path_width
        self.held = [] if hold else None
        header = f"{'path':<{path_width}}  " + '  '.join(f"{f'top-{k}':<28}" for k in range(1, topk + 1))
        self._print([header.rstrip()])

    def write(self, records):
        lines = []
        for record in records:
            path = record['path']
            if record['error']:
                cells = [f"error: {record['error']}"]
            else:
                cells = [f"{record[f'class_{k}']} ({100 * record[f'prob_{k}']:.2f}%)"[:28].ljust(28)
                         for k in range(1, self.topk + 1)]
            lines.append(f"{path:<{self.path_width}}  " + '  '.join(cells).rstrip())
        self._print(lines)

    def _print(self, lines):
        if not lines:
            return
        if self.held is not None:
            self.held.extend(lines)
            return
        print(*lines, sep='\n', file=self.file)
        self.file.flush()

    def close(self):
        if self.held:
            held, self.held = self.held, None
            self._print(held)


def open_writer(output, topk, paths, hold=False):
    """(writer, file to close or None) for --output (.csv or .json) or stdout (``hold``: see TableWriter)."""
    if not output:
        return TableWriter(sys.stdout, topk, min(100, max(len(path) for path in paths)), hold), None
    kind = os.path.splitext(output)[1].lower()
    if kind not in ('.csv', '.json'):
        raise ConfigError(f"--output {output}: the file name must end in .csv or .json")
    folder = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(folder):
        raise ConfigError(f"--output {output}: folder {folder} does not exist")
    file = open(output, 'w', newline='' if kind == '.csv' else None, encoding='utf-8')
    return (CsvWriter if kind == '.csv' else JsonWriter)(file, topk), file


def run(args):
    if args.topk < 1 or (args.batch_size is not None and args.batch_size < 1):
        raise ConfigError(f"--topk {args.topk} / --batch-size {args.batch_size}: both must be at least 1")
    weights = read_weights(args.checkpoint)
    config = config_for_weights(args.cfg, (args.opts or []) + ['DEVICE', args.device], weights, args.checkpoint)
    paths = find_images(args.inputs)
    device = resolve_device(config)
    precision = resolve_precision(config, device)
    model, names = load_model(args.checkpoint, weights, config, device)
    topk = min(args.topk, config.MODEL.NUM_CLASSES)
    loader = image_files_loader(paths, build_val_transform(config), args.batch_size or config.DATA.BATCH_SIZE,
                                usable_workers(config.DATA.NUM_WORKERS), pin_memory=device.type == 'cuda')
    writer, file = open_writer(args.output, topk, paths, hold=not args.quiet)
    start = time.time()
    try:
        with tqdm(total=len(paths), unit='img', file=sys.stderr, mininterval=1.0, disable=args.quiet) as bar:
            reporter = _ReportErrors(writer, bar)
            for count in predict(model, loader, paths, names, topk, device, precision, reporter):
                bar.update(count)
        writer.close()  # after the bar has ended: a held table prints now
    finally:
        if file is not None:
            file.close()
    elapsed = time.time() - start
    where = f", results in {args.output}" if args.output else ''
    print(f"{len(paths)} images ({reporter.errors} unreadable) in {elapsed:.1f}s, "
          f"{len(paths) / max(elapsed, 1e-9):.1f} images/s on {device} ({precision}){where}", file=sys.stderr)
    return 0


class _ReportErrors:
    """Writer wrapper: each unreadable file is reported on stderr (above the progress bar) and counted."""

    def __init__(self, writer, bar):
        self.writer, self.bar, self.errors = writer, bar, 0

    def write(self, records):
        for record in records:
            if record['error']:
                self.errors += 1
                self.bar.write(f"unreadable image {record['path']}: {record['error']}", file=sys.stderr)
        self.writer.write(records)



def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('checkpoint', metavar='CKPT', help='weights to load')
    parser.add_argument('inputs', metavar='INPUTS', nargs='+', help='image files, folders or glob patterns')
    parser.add_argument('--cfg', metavar='FILE', help="config of the model (default: the one the checkpoint carries)")
    parser.add_argument('--opts', default=None, nargs='+', help="override config options with 'KEY VALUE' pairs")
    parser.add_argument('--topk', type=int, default=5, help='classes per image (default 5)')
    parser.add_argument('--output', metavar='FILE', help='results file, .csv or .json (default: a table on stdout)')
    parser.add_argument('--batch-size', type=int, help='images per forward pass (default DATA.BATCH_SIZE)')
    parser.add_argument('--device', default='auto', help='auto | cpu | cuda | cuda:N (default auto)')
    parser.add_argument('--quiet', action='store_true', help='no progress bar')
    return parser


def main(argv=None):
    return run_script(build_parser(), run, argv)


if __name__ == '__main__':
    sys.exit(main())
