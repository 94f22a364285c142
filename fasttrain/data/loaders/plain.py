"""The `plain` loader: the tutorial's Dataset + torchvision transforms + DataLoader, over arrays
(`CustomDataset`) or image files (`FolderDataset`, decoded in the workers).

It follows the loader contract of fasttrain.data.sharding: each sample's augmentation is seeded by
(seed, epoch, index) wherever it is drawn, so the data a run sees does not depend on num_workers.
"""

from __future__ import annotations

import atexit
import sys
import time
import weakref
from typing import Callable, Iterator, Optional, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from fasttrain.data.folder import FolderIndex, UnreadableImage, decode_rgb
from fasttrain.data.sharding import ShardedBatches, ShardLoader
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


class FolderDataset(CustomDataset):
    """CustomDataset over files: each image is decoded (RGB) where it is drawn, in a DataLoader worker;
    seeding and transforms are CustomDataset's."""

    def __init__(self, index: FolderIndex, transform: Optional[Callable] = None, seed: int = 0):
        super().__init__(None, index.labels, transform, seed)
        self.paths = index.paths

    def load_image(self, index: int) -> Image.Image:
        return decode_rgb(self.paths[index])


class FolderPlainLoader(PlainLoader):
    """PlainLoader over a FolderDataset: a file that fails to decode in a worker stops the epoch with
    its one line (torch re-raises a worker's exception with the worker's traceback as its text)."""

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        try:
            yield from super().__iter__()
        except UnreadableImage as err:
            raise UnreadableImage(err.one_line()) from None
