"""Recipes beyond the official (issue #26): BCE loss, EMA warmup, repeated augmentation, online distillation, and
training runs through main.py (the optimizer choice itself is tested in test_optimizer.py)."""
import logging
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from timm.loss import BinaryCrossEntropy

from conftest import make_tiny_config
from data import Batch, build_loader
from data.build import build_mixup
from data.samplers import DistributedEpochSampler, RepeatedAugSampler, sample_seed
from distillation import build_teacher, distillation_loss
from errors import ConfigError
from helpers import make_image_folder, run_main, tiny_yaml
from main import build_training_objects
from models import build_model
from tasks import build_task
from utils import resolve_precision

pytestmark = pytest.mark.usefixtures('one_thread')


# ----------------------------------------------------------------------------- BCE
def test_bce_loss_is_one_sigmoid_per_class_on_smoothed_targets():
    config = make_tiny_config(None, 'TRAIN.LOSS', 'bce', 'MODEL.LABEL_SMOOTHING', 0.1, 'MODEL.NUM_CLASSES', 4)
    task = build_task(config)
    assert isinstance(task.criterion, BinaryCrossEntropy)
    torch.manual_seed(0)
    logits, labels = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 0, 1])
    targets = torch.full((6, 4), 0.1 / 4).scatter_(1, labels[:, None], 1 - 0.1 + 0.1 / 4)
    expected = F.binary_cross_entropy_with_logits(logits, targets)
    assert torch.allclose(task.criterion(logits, labels), expected)
    assert not torch.allclose(expected, F.cross_entropy(logits, labels, label_smoothing=0.1))

    unsmoothed = build_task(make_tiny_config(None, 'TRAIN.LOSS', 'bce', 'MODEL.NUM_CLASSES', 4,
                                             'MODEL.LABEL_SMOOTHING', 0.0))
    assert torch.allclose(unsmoothed.criterion(logits, labels),  # bce also without smoothing (timm falls to CE)
                          F.binary_cross_entropy_with_logits(logits, F.one_hot(labels, 4).float()))


def test_bce_with_mixup_takes_the_mixed_targets_and_the_threshold():
    config = make_tiny_config(None, 'TRAIN.LOSS', 'bce', 'AUG.MIXUP', 0.8, 'AUG.CUTMIX', 1.0, 'MODEL.NUM_CLASSES', 10,
                              'TRAIN.BCE_TARGET_THRESHOLD', 0.2)
    task = build_task(config, build_mixup(config))
    torch.manual_seed(0)
    batch = Batch(images=torch.randn(8, 3, 32, 32), targets=torch.arange(8) % 10)
    images, targets = task.prepare(batch, torch.device('cpu'))
    assert targets.shape == (8, 10) and 0 < targets.min() and targets.max() < 1  # mixed, smoothed
    logits = torch.randn(8, 10)
    expected = F.binary_cross_entropy_with_logits(logits, (targets > 0.2).float())
    assert torch.allclose(task.criterion(logits, targets), expected)


@pytest.mark.parametrize('opts, message', [
    (('TRAIN.LOSS', 'focal'), r"TRAIN.LOSS 'focal' is not supported \(choose one of: ce, bce\)"),
    (('TRAIN.LOSS', 'bce', 'TRAIN.BCE_TARGET_THRESHOLD', 1.0), r"TRAIN.BCE_TARGET_THRESHOLD must be below 1"),
    (('TRAIN.BCE_TARGET_THRESHOLD', 0.2), r"TRAIN.BCE_TARGET_THRESHOLD 0.2 applies to TRAIN.LOSS bce, not 'ce'"),
    (('AUG.REPEATS', -1), r"AUG.REPEATS must be at least 0, got -1"),
    (('AUG.REPEATS', 3, 'DATA.ZIP_MODE', True, 'DATA.CACHE_MODE', 'part'), r"AUG.REPEATS 3 needs every image"),
    (('MODEL_EMA_WARMUP', True), r"MODEL_EMA_WARMUP applies to MODEL_EMA True"),
])
def test_bad_recipe_values_are_one_line(opts, message):
    with pytest.raises(ConfigError, match=message) as info:
        make_tiny_config(None, *opts)
    assert '\n' not in str(info.value)


# ----------------------------------------------------------------------------- EMA warmup
@pytest.mark.parametrize('warmup', [False, True])
def test_ema_warmup_follows_the_model_early(warmup):
    """With MODEL_EMA_WARMUP the first averaged step uses timm's decay 1 - (1 + 1) ** (-2/3) = 0.37, not 0.9999."""
    config = make_tiny_config(None, 'MODEL_EMA', True, 'MODEL_EMA_WARMUP', warmup)
    model = build_model(config)
    objects = build_training_objects(config, model, None, 10, resolve_precision(config, torch.device('cpu')),
                                     logging.getLogger('test'))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    objects.model_ema.update(model, step=2)
    decay = 1 - 2 ** (-2 / 3) if warmup else 0.9999
    ema = objects.model_ema.module.state_dict()
    for name, p in model.named_parameters():
        assert torch.allclose(ema[name], decay * start[name] + (1 - decay) * p, atol=1e-6), name


# ----------------------------------------------------------------------------- repeated augmentation
def test_repeated_aug_sampler_deals_each_image_n_times_to_different_ranks():
    world, repeats, size = 3, 3, 20
    samplers = [RepeatedAugSampler(size, rank, world, seed=5, repeats=repeats) for rank in range(world)]
    plain = DistributedEpochSampler(size, 0, world, seed=5)
    for sampler in samplers:
        sampler.set_epoch(4)
    keys = [list(sampler) for sampler in samplers]
    assert [len(k) for k in keys] == [len(s) for s in samplers] == [len(plain)] * world  # an epoch keeps its length
    counts = Counter(index for rank_keys in keys for index, _ in rank_keys)
    assert set(counts.values()) == {repeats}  # 3 x 7 keys: 7 images, 3 times each
    for index in counts:
        ranks = [rank for rank in range(world) for i, _ in keys[rank] if i == index]
        assert sorted(ranks) == list(range(world))  # one copy per rank
        seeds = {seed for rank_keys in keys for i, seed in rank_keys if i == index}
        assert len(seeds) == repeats  # each copy its own augmentation
        assert sample_seed(5, 4, index) in seeds  # copy 0 keeps the plain seed
    sampler = samplers[1]
    sampler.set_epoch(4, start_index=5)  # mid-epoch resume: exactly the keys left
    assert list(sampler) == keys[1][5:]
    sampler.set_epoch(5)
    assert list(sampler) != keys[1]


def test_repeated_aug_loader_gives_the_copies_different_augmentations(tmp_path):
    root = make_image_folder(tmp_path / 'data', train_per_class=4, size=48)
    config = make_tiny_config(None, 'DATA.DATA_PATH', root, 'MODEL.NUM_CLASSES', 3, 'DATA.BATCH_SIZE', 6,
                              'AUG.REPEATS', 3, 'DATA.NUM_WORKERS', 1)
    _, _, loader, _, _ = build_loader(config)
    assert isinstance(loader.sampler, RepeatedAugSampler) and len(loader.sampler) == 12
    loader.sampler.set_epoch(0)
    batch = next(iter(loader))
    indices = [index for index, _ in loader.sampler.epoch_keys()[:6]]
    assert indices[0] == indices[1] == indices[2] and indices[3] == indices[4] == indices[5]  # one rank: in a row
    for start in (0, 3):
        copies = batch.images[start:start + 3]
        assert len(set(batch.targets[start:start + 3].tolist())) == 1
        assert not torch.equal(copies[0], copies[1]) and not torch.equal(copies[1], copies[2])


# ----------------------------------------------------------------------------- a run with them all
def test_training_with_lamb_bce_repeats_and_ema_warmup(tmp_path):
    data = make_image_folder(tmp_path / 'data')
    extra = ('TRAIN:\n  EPOCHS: 3\n  WARMUP_EPOCHS: 1\n  BASE_LR: 2e-3\n  LOSS: bce\n  OPTIMIZER:\n    NAME: lamb\n'
             'AUG:\n  REPEATS: 2\nMODEL_EMA: True\nMODEL_EMA_WARMUP: True\n')
    config = tiny_yaml(tmp_path / 'tiny.yaml', data, extra=extra)
    result = run_main('--cfg', config, '--output', str(tmp_path / 'out'))
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = torch.load(tmp_path / 'out' / 'tiny' / 'default' / 'last.pth', weights_only=True)
    assert 'trust_clip' in checkpoint['optimizer']['param_groups'][0]  # timm's Lamb ran the steps
    assert 'Acc@1' in result.stdout
    assert checkpoint['model_ema'].keys() == checkpoint['model'].keys()


# ----------------------------------------------------------------------------- distillation
def teacher_files(tmp_path, seed=1):
    """A tiny teacher (another width than the student) as a config file and a weights file."""
    teacher_config = make_tiny_config(None, 'MODEL.SWIN.EMBED_DIM', 12, 'MODEL.NUM_CLASSES', 10)
    torch.manual_seed(seed)
    teacher = build_model(teacher_config)
    cfg, weights = tmp_path / 'teacher.yaml', tmp_path / 'teacher.pth'
    cfg.write_text(teacher_config.dump())
    torch.save({'model': teacher.state_dict()}, weights)
    return str(cfg), str(weights), teacher.eval()


def test_distillation_losses():
    torch.manual_seed(0)
    student, teacher = torch.randn(5, 7), torch.randn(5, 7)
    tau = 2.0
    p = F.softmax(teacher / tau, 1)
    expected = (p * (p.log() - F.log_softmax(student / tau, 1))).sum(1).mean() * tau ** 2
    assert torch.allclose(distillation_loss(student, teacher, 'soft', tau), expected)
    assert torch.allclose(distillation_loss(student, teacher, 'hard', tau), F.cross_entropy(student, teacher.argmax(1)))


@pytest.mark.parametrize('kind', ['soft', 'hard'])
def test_the_teacher_sees_the_mixed_images_and_its_term_reaches_the_gradient(tmp_path, kind):
    cfg, weights, reference = teacher_files(tmp_path)
    opts = ('DISTILL.TYPE', kind, 'DISTILL.TEACHER_CFG', cfg, 'DISTILL.TEACHER_WEIGHTS', weights, 'DISTILL.ALPHA',
            0.7, 'DISTILL.TAU', 2.0, 'AUG.MIXUP', 0.8, 'AUG.CUTMIX', 1.0, 'MODEL.NUM_CLASSES', 10,
            'MODEL.DROP_PATH_RATE', 0.0)  # deterministic student: the hand-made loss must match exactly
    config = make_tiny_config(None, *opts)
    student = build_model(config)
    objects = build_training_objects(config, student, build_mixup(config), 10,
                                     resolve_precision(config, torch.device('cpu')), logging.getLogger('test'))
    teacher = objects.task.distillation.teacher
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert not any(p is q for p in teacher.parameters() for group in objects.optimizer.param_groups
                   for q in group['params'])
    seen = []
    teacher.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    torch.manual_seed(0)
    inputs = objects.task.prepare(Batch(images=torch.randn(4, 3, 32, 32), targets=torch.arange(4)),
                                  torch.device('cpu'))
    loss = objects.task.loss(student, inputs)
    assert len(seen) == 1 and torch.equal(seen[0], inputs[0])  # the mixed images, not the originals
    loss.backward()
    got = [p.grad.clone() for p in student.parameters()]

    student.zero_grad()  # by hand: (1 - alpha) * task + alpha * distillation, the teacher as loaded
    logits = student(inputs[0])
    with torch.no_grad():
        teacher_logits = reference(inputs[0])
    expected = 0.3 * objects.task.criterion(logits, inputs[1]) + 0.7 * distillation_loss(logits, teacher_logits,
                                                                                         kind, 2.0)
    assert torch.allclose(loss, expected, atol=1e-6)
    expected.backward()
    for grad, p in zip(got, student.parameters(), strict=True):
        assert torch.allclose(grad, p.grad, atol=1e-6)
    student.zero_grad()
    (0.3 * objects.task.criterion(student(inputs[0]), inputs[1])).backward()  # without the teacher's term
    assert not all(torch.allclose(grad, p.grad, atol=1e-6) for grad, p in zip(got, student.parameters(), strict=True))


def test_distillation_config_errors_are_one_line(tmp_path):
    cfg, weights, _ = teacher_files(tmp_path)
    cases = [
        (('DISTILL.TYPE', 'soft'), r"give the teacher as DISTILL.TEACHER_CFG .* or DISTILL.TEACHER_TIMM"),
        (('DISTILL.TYPE', 'soft', 'DISTILL.TEACHER_CFG', cfg, 'DISTILL.TEACHER_WEIGHTS', str(tmp_path / 'no.pth')),
         r"DISTILL.TEACHER_WEIGHTS '.*no.pth': no such file"),
        (('DISTILL.TYPE', 'soft', 'DISTILL.TEACHER_CFG', cfg, 'DISTILL.TEACHER_WEIGHTS', weights, 'DISTILL.ALPHA', 2.0),
         r"DISTILL.ALPHA must be in \[0, 1\], got 2.0"),
        (('DISTILL.TEACHER_CFG', cfg), r"DISTILL.TEACHER_\* is set but DISTILL.TYPE is 'none'"),
        (('DISTILL.TYPE', 'medium'), r"DISTILL.TYPE 'medium' is not supported \(choose one of: none, soft, hard\)"),
    ]
    for opts, message in cases:
        with pytest.raises(ConfigError, match=message) as info:
            make_tiny_config(None, *opts)
        assert '\n' not in str(info.value)
    config = make_tiny_config(None, 'DISTILL.TYPE', 'hard', 'DISTILL.TEACHER_CFG', cfg, 'DISTILL.TEACHER_WEIGHTS',
                              weights, 'MODEL.NUM_CLASSES', 3)
    with pytest.raises(ConfigError, match=r"has MODEL.NUM_CLASSES 10, the student 3: the teacher must predict"):
        build_teacher(config, torch.device('cpu'), logging.getLogger('test'))


def test_training_run_with_a_timm_teacher(tmp_path):
    """main.py with a timm teacher (a model name and a local weights file): the log names it, the run ends, and
    the student's checkpoint holds no teacher weights."""
    import timm
    torch.manual_seed(0)
    teacher = timm.create_model('resnet10t', num_classes=3)
    torch.save(teacher.state_dict(), tmp_path / 'resnet.pth')
    data = make_image_folder(tmp_path / 'data')
    extra = (f"TRAIN:\n  EPOCHS: 1\n  WARMUP_EPOCHS: 0\nDISTILL:\n  TYPE: soft\n  TAU: 2.0\n  TEACHER_TIMM: resnet10t\n"
             f"  TEACHER_WEIGHTS: {tmp_path / 'resnet.pth'}\n")
    result = run_main('--cfg', tiny_yaml(tmp_path / 'tiny.yaml', data, extra=extra), '--output', str(tmp_path / 'o'))
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'distillation (soft, DISTILL.ALPHA 0.5, DISTILL.TAU 2): teacher timm resnet10t' in result.stdout
    checkpoint = torch.load(tmp_path / 'o' / 'tiny' / 'default' / 'last.pth', weights_only=True)
    assert checkpoint['model'].keys() == build_model(make_tiny_config(None, 'MODEL.NUM_CLASSES', 3)).state_dict().keys()
