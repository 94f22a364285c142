"""The `plain` loader: the tutorial's Dataset + torchvision transforms + DataLoader.

Loader contract (shared by every loader): iterating yields `(images, labels)` already on the
training device; `len()` is the number of batches of a whole epoch; `set_epoch(e, start_sample)`
selects epoch e's order, and resumes it after its first `start_sample` samples (a checkpoint's
position; those samples were trained on before the stop). Epoch e's order is a permutation drawn from (seed, e), and the augmentation of sample i in
epoch e is seeded by (seed, e, i), so the data a run sees does not depend on num_workers.
"""

from __future__ import annotations

import atexit
import sys
import time
import weakref
from typing import Callable, Iterator, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from fasttrain.dist.preemption import ignore_in_worker, signals_held


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    return ((seed * 1_000_003 + epoch) * 100_000_007 + index) % (2**63)


class CustomDataset(Dataset):
    """The tutorial's CustomDataset: in-memory images and labels with an optional transform.

    Indexed by `(epoch, index)` pairs from `ShardedBatches` (or a plain int), so each sample's
    random augmentation is reproducible whichever worker process draws it.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Optional[Callable] = None, seed: int = 0):
        self.images = images  # (N, H, W, C) uint8
        self.labels = labels
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.labels)

    def load_image(self, index: int) -> Image.Image:
        """Sample `index` as a PIL image (a subclass may read it from elsewhere: fasttrain.data.folder)."""
        array = self.images[index]
        return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)

    def __getitem__(self, key) -> Tuple[torch.Tensor, int]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        image = self.load_image(index)
        label = int(self.labels[index])
        if self.transform is None:
            return image, label
        # torchvision's random transforms draw from the default CPU generator; seeding only that one
        # costs ~2 us (torch.manual_seed also seeds every device backend: ~200 us per sample)
        if torch.utils.data.get_worker_info() is None:
            # in the main process: do not disturb the global RNG that dropout and init use
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(_sample_seed(self.seed, epoch, index))
                return self.transform(image), label
        torch.default_generator.manual_seed(_sample_seed(self.seed, epoch, index))
        return self.transform(image), label


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


_live_loaders: "weakref.WeakSet[PlainLoader]" = weakref.WeakSet()
# CPython 3.11 (3.11.7 here; fixed upstream by gh-112275's backports, and in 3.12) can fork a child that
# deadlocks at once in PyOS_AfterFork_Child on the runtime's HEAD_LOCK when another thread held it then.
# gloo's threads do, briefly, right after a collective: measured here with 2 gloo ranks on Python 3.11.7,
# 6 of 600 forks right after all_reduces hung forever (a DataLoader worker that never starts: validation
# waits on it until the job is killed), none of 600 with this pause first. Workers start once per loader
# (persistent) or once per epoch, so the pause costs nothing a run would notice.
FORK_QUIESCE_SECONDS = 0.02


def quiesce_before_fork() -> None:
    """Let other threads finish what they started after the last collective before workers are forked."""
    if sys.version_info < (3, 12) and torch.distributed.is_available() and torch.distributed.is_initialized():
        time.sleep(FORK_QUIESCE_SECONDS)


@atexit.register  # after multiprocessing's own exit hook is registered, so it runs before it
def _end_workers_at_exit() -> None:
    """A program that exits while it still holds a loader: its workers ignore SIGTERM (they must survive
    a process group's), which is how multiprocessing ends daemonic children at exit; end them the
    DataLoader's own way first."""
    for loader in list(_live_loaders):
        loader.close()


class PlainLoader(ShardLoader):
    """DataLoader over a CustomDataset with this rank's batches, moving each batch to the device."""

    def __init__(self, dataset: CustomDataset, batches: ShardedBatches, num_workers: int, pin_memory: bool,
                 persistent_workers: bool, device: torch.device, dtype: torch.dtype = torch.float32,
                 channels_last: bool = False):
        self.dataset = dataset
        self.batches = batches
        self.num_workers = num_workers  # as resolved (data.num_workers=-1 is auto): the run's log states it
        self.device = device
        self.dtype = dtype
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        # its own generator: a DataLoader otherwise draws its workers' base seed from the global RNG
        # each epoch, shifting the dropout stream (and breaking exact resume); samples seed themselves
        # workers ignore the signals this process handles (a preemption or Ctrl-C reaches the whole process
        # group): this process stops at a step boundary with a checkpoint, then ends them
        self.loader = DataLoader(dataset, batch_sampler=batches, num_workers=num_workers, pin_memory=pin_memory,
                                 persistent_workers=persistent_workers and num_workers > 0,
                                 generator=torch.Generator().manual_seed(batches.seed),
                                 worker_init_fn=ignore_in_worker if num_workers > 0 else None)

    @property
    def num_samples(self) -> int:
        return len(self.dataset)

    def close(self) -> None:
        """End the worker processes (a persistent iterator's included)."""
        iterator = getattr(self.loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
            self.loader._iterator = None  # a later iteration starts new workers

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        if self.num_workers > 0:
            _live_loaders.add(self)
            if getattr(self.loader, "_iterator", None) is None:
                quiesce_before_fork()
        with signals_held():  # workers start here: none may die of a signal before it ignores it
            batches = iter(self.loader)
        for images, labels in batches:
            # async host->device copies from pinned memory, then dtype and layout on the device
            images = images.to(self.device, non_blocking=True).to(self.dtype, memory_format=self.memory_format)
            yield images, labels.to(self.device, non_blocking=True)
