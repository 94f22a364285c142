"""THE LOADER CONTRACT, shared by every loader: which samples a rank sees, in which order, and from where
a resumed epoch goes on.

Iterating a loader yields `(images, labels)` already on the training device; `len()` is the number of
batches of a whole epoch; `set_epoch(e, start_sample)` selects epoch e's order, and resumes it after its
first `start_sample` samples (a checkpoint's position; those samples were trained on before the stop).
Epoch e's order is a permutation drawn from (seed, e), and the augmentation of sample i in epoch e is
seeded by (seed, e, i), so the data a run sees does not depend on the loader's workers or threads.
`ShardedBatches` is that plan over the ranks: every sample once per epoch across them, each rank the
same number of steps. The loaders (fasttrain.data.loaders) only decide how the planned samples become
device batches.
"""

from __future__ import annotations

from typing import Iterator, List, Protocol, Tuple

import torch
from torch.utils.data import Sampler


class ShardedBatches(Sampler):
    """This rank's batches of (epoch, index) pairs for one epoch.

    Training (`exact=False`): epoch e's order is a permutation drawn from (seed, e) (or the natural
    order); rank r takes positions r, r+W, r+2W, ... so step k of all W ranks together covers
    positions k*B*W .. (k+1)*B*W - 1, exactly what one process with batch B*W would see. Every rank
    gets the same number of steps: the last global batch is shared out (sizes differ by at most
    one); with `drop_last`, or when fewer samples than ranks are left over, it is skipped.

    Evaluation (`exact=True`): natural order, rank r takes positions r, r+W, ...: every sample
    exactly once across ranks, no padding, ranks may differ by one sample.
    """

    def __init__(self, num_samples: int, batch_size: int, shuffle: bool, seed: int, rank: int = 0,
                 world_size: int = 1, drop_last: bool = False, exact: bool = False):
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.exact = exact
        self.epoch = 0
        self.start_sample = 0

    def set_epoch(self, epoch: int, start_sample: int = 0) -> None:
        """Epoch `epoch`'s order, from position `start_sample` of it on (0 = the whole epoch). With the
        world size the checkpoint was written with, start_sample = steps done x batch x world size, and
        each rank's remaining batches are exactly the ones it had not yet trained on."""
        if start_sample < 0:
            raise ValueError(f"start_sample must be >= 0, got {start_sample}")
        self.epoch = epoch
        self.start_sample = start_sample

    def order(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_samples)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.num_samples, generator=gen)

    @property
    def used_samples(self) -> int:
        """How many samples of each epoch are trained on, across all ranks."""
        if self.exact:
            return self.num_samples
        global_batch = self.batch_size * self.world_size
        full = (self.num_samples // global_batch) * global_batch
        leftover = self.num_samples - full
        return full if self.drop_last or leftover < self.world_size else self.num_samples

    def end_sample(self) -> int:
        """Where the current epoch's part ends in its order: every rank must get the same number of
        batches. From position 0 that is `used_samples`. A resumed epoch may start at a position that
        is not a multiple of this run's global batch (a checkpoint of another world size): the rule is
        then applied to what remains, so a leftover smaller than the number of ranks is left out there
        too, instead of giving some ranks one batch more than the others (a hang in the next collective)."""
        if self.exact:
            return self.num_samples
        remaining = max(self.num_samples - self.start_sample, 0)
        global_batch = self.batch_size * self.world_size
        full = (remaining // global_batch) * global_batch
        leftover = remaining - full
        return self.start_sample + (full if self.drop_last or leftover < self.world_size else remaining)

    def shard(self) -> torch.Tensor:
        """This rank's sample indices for the current epoch, in order (batches are consecutive slices)."""
        return self.order()[self.start_sample : self.end_sample()][self.rank :: self.world_size]

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        epoch, size = self.epoch, self.batch_size
        shard = self.shard().tolist()
        return iter([[(epoch, i) for i in shard[start : start + size]] for start in range(0, len(shard), size)])

    def __len__(self) -> int:
        """Batches in a whole epoch (what schedules are built on)."""
        shard = len(range(self.rank, self.used_samples, self.world_size))
        return -(-shard // self.batch_size)

    def batches_left(self) -> int:
        """Batches this rank yields in the current epoch, from start_sample on."""
        shard = len(range(self.start_sample + self.rank, self.end_sample(), self.world_size))
        return -(-shard // self.batch_size)


class ShardLoader:
    """The loader contract's bookkeeping, shared by every loader: a `ShardedBatches` plan decides
    which samples a rank sees; the subclass decides how they become device batches."""

    batches: ShardedBatches

    def set_epoch(self, epoch: int, start_sample: int = 0) -> None:
        self.batches.set_epoch(epoch, start_sample)

    def __len__(self) -> int:
        return len(self.batches)

    def close(self) -> None:
        """Release what the loader holds beyond memory (worker processes); a no-op where there is none."""


class Loader(Protocol):
    """What the epoch loop and a run's parts take: any loader of fasttrain.data.loaders (a ShardLoader)."""

    batches: ShardedBatches

    @property
    def num_samples(self) -> int: ...

    def set_epoch(self, epoch: int, start_sample: int = 0) -> None: ...

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]: ...

    def close(self) -> None: ...
