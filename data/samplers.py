"""Samplers. Train samplers yield ``(index, seed)`` keys: the dataset seeds the augmentation of that sample
from ``seed`` (a hash of SEED, epoch and index), so augmentation does not depend on worker count, worker
scheduling or the resume point. Validation samplers yield plain indices and shard exactly.
"""
import math

import torch
from torch.utils.data import Sampler

_MASK64 = (1 << 64) - 1


def _mix64(x):
    """splitmix64 finalizer: a cheap, well-mixed 64-bit hash."""
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _MASK64
    return x ^ (x >> 31)


def sample_seed(seed: int, epoch: int, index: int, repeat: int = 0) -> int:
    """The augmentation seed (63 bits) of dataset sample ``index`` in ``epoch`` of a run seeded ``seed``; the
    ``repeat``-th copy of a sample in an epoch (repeated augmentation) gets a seed of its own."""
    x = _mix64((seed & _MASK64) + 0x9E3779B97F4A7C15)
    x = _mix64(x ^ (epoch & _MASK64))
    x = _mix64(x ^ index)
    return (_mix64(x ^ repeat) if repeat else x) >> 1


class EpochSampler(Sampler):
    """Base of the train samplers: this rank's keys of one epoch, in an order fixed by (SEED, epoch).
    Subclasses define ``epoch_indices()``."""

    def __init__(self, num_samples: int, seed: int):
        self.num_samples, self.seed = num_samples, seed
        self.epoch, self.start_index = 0, 0

    def set_epoch(self, epoch: int, start_index: int = 0) -> None:
        """Select the epoch to iterate next; call it before every epoch. This is the one description of
        the contract; the rest of the project refers here.

        ``epoch`` fixes both the order of the samples (a permutation drawn from SEED + epoch) and each
        sample's augmentation seed (from SEED, epoch and index): an epoch's batches depend on nothing else,
        not on the worker count, earlier epochs or how the run got here. ``start_index`` skips this rank's
        first ``start_index`` samples of that order, so a run resumed mid-epoch (``start_index`` =
        micro-batches done x DATA.BATCH_SIZE) sees exactly the batches the interrupted run had left.
        ``len()`` stays the full epoch of this rank (step counts and schedules do not change on resume);
        ``num_remaining`` is what the next iteration yields. Both hold until the next ``set_epoch``.
        """
        if not 0 <= start_index <= self.num_samples:
            raise ValueError(f"start_index {start_index} is outside this rank's epoch of {self.num_samples}")
        self.epoch, self.start_index = epoch, start_index

    @property
    def num_remaining(self) -> int:
        return self.num_samples - self.start_index

    def _generator(self):
        return torch.Generator().manual_seed(self.seed + self.epoch)

    def epoch_indices(self):
        raise NotImplementedError

    def __iter__(self):
        indices = self.epoch_indices()
        for index in indices[self.start_index:]:
            yield index, sample_seed(self.seed, self.epoch, index)

    def __len__(self):
        return self.num_samples


class DistributedEpochSampler(EpochSampler):
    """torch DistributedSampler semantics (also for one process): one permutation per epoch shared by all
    ranks, padded by repetition to a multiple of the world size; rank r takes every world-th index from r."""

    def __init__(self, dataset_len: int, rank: int, world_size: int, seed: int, shuffle: bool = True):
        super().__init__(math.ceil(dataset_len / world_size), seed)
        self.dataset_len, self.rank, self.world_size, self.shuffle = dataset_len, rank, world_size, shuffle

    def epoch_indices(self):
        if self.shuffle:
            order = torch.randperm(self.dataset_len, generator=self._generator()).tolist()
        else:
            order = list(range(self.dataset_len))
        total = self.num_samples * self.world_size
        order = (order * math.ceil(total / len(order)))[:total]
        return order[self.rank:total:self.world_size]


class RepeatedAugSampler(EpochSampler):
    """Repeated augmentation (DeiT's RASampler, timm's RepeatAugSampler): the epoch's permutation with every
    index repeated ``repeats`` times in a row, each copy with its own augmentation seed, dealt to the ranks in
    turn (rank r takes every world-th key from r), so the copies of one image go to different ranks. Each rank's
    epoch keeps the plain sampler's length (ceil(dataset / world)): an epoch sees about 1/repeats of the images,
    each ``repeats`` times, and step counts, schedules and mid-epoch resume are those of a plain epoch."""

    def __init__(self, dataset_len: int, rank: int, world_size: int, seed: int, repeats: int):
        super().__init__(math.ceil(dataset_len / world_size), seed)
        self.dataset_len, self.rank, self.world_size, self.repeats = dataset_len, rank, world_size, repeats

    def epoch_keys(self):
        """This rank's (index, repeat) pairs of the epoch, in order."""
        order = torch.randperm(self.dataset_len, generator=self._generator()).tolist()
        keys = [(index, repeat) for index in order for repeat in range(self.repeats)]
        total = self.num_samples * self.world_size
        keys = (keys * math.ceil(total / len(keys)))[:total]  # padded only where the dataset is tinier than the world
        return keys[self.rank:total:self.world_size]

    def epoch_indices(self):
        return [index for index, _ in self.epoch_keys()]

    def __iter__(self):
        for index, repeat in self.epoch_keys()[self.start_index:]:
            yield index, sample_seed(self.seed, self.epoch, index, repeat)


class ShardSampler(EpochSampler):
    """For DATA.CACHE_MODE part: rank r always reads its own shard ``indices[r::world]`` (the images it
    cached), reshuffled each epoch. Shards are padded with their own first indices to equal length so every
    rank runs the same number of steps."""

    def __init__(self, dataset_len: int, rank: int, world_size: int, seed: int):
        self.shard = list(range(rank, dataset_len, world_size))
        if not self.shard:
            raise ValueError(f"rank {rank} of {world_size} gets no samples from a dataset of {dataset_len}")
        super().__init__(math.ceil(dataset_len / world_size), seed)

    def epoch_indices(self):
        order = torch.randperm(len(self.shard), generator=self._generator()).tolist()
        shuffled = [self.shard[i] for i in order]
        return (shuffled * 2)[:self.num_samples]  # a shard is at most one shorter than num_samples


class ValSampler(Sampler):
    """Exact validation: rank r gets ``order[r::world]`` with no padding, so each image is counted once and
    N ranks give the accuracy of one. ``sequential``: rank 0 gets every image, the other ranks none.
    ``shuffle`` fixes one permutation from ``seed`` (only the order of logged batches changes)."""

    def __init__(self, dataset_len: int, rank: int, world_size: int, sequential: bool = False,
                 shuffle: bool = False, seed: int = 0):
        order = list(range(dataset_len))
        if shuffle:
            order = torch.randperm(dataset_len, generator=torch.Generator().manual_seed(seed)).tolist()
        if sequential:
            self.indices = order if rank == 0 else []
        else:
            self.indices = order[rank::world_size]

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)
