"""The `plain` loader: the tutorial's Dataset + torchvision transforms + DataLoader.

Loader contract (shared by every loader): iterating yields `(images, labels)` already on the
training device; `len()` is the number of batches; `set_epoch(e)` selects epoch e's order.
Epoch e's order is a permutation drawn from (seed, e), and the augmentation of sample i in
epoch e is seeded by (seed, e, i), so the data a run sees does not depend on num_workers.
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    return ((seed * 1_000_003 + epoch) * 100_000_007 + index) % (2**63)


class CustomDataset(Dataset):
    """The tutorial's CustomDataset: in-memory images and labels with an optional transform.

    Indexed by `(epoch, index)` pairs from `EpochSampler` (or a plain int), so each sample's
    random augmentation is reproducible whichever worker process draws it.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Optional[Callable] = None, seed: int = 0):
        self.images = images  # (N, H, W, C) uint8
        self.labels = labels
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key) -> Tuple[torch.Tensor, int]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        array = self.images[index]
        image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
        label = int(self.labels[index])
        if self.transform is None:
            return image, label
        if torch.utils.data.get_worker_info() is None:
            # in the main process: do not disturb the global RNG that dropout and init use
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(_sample_seed(self.seed, epoch, index))
                return self.transform(image), label
        torch.manual_seed(_sample_seed(self.seed, epoch, index))
        return self.transform(image), label


class EpochSampler(Sampler):
    """Yields (epoch, index): a fresh seeded permutation each epoch, or the natural order."""

    def __init__(self, num_samples: int, shuffle: bool, seed: int):
        self.num_samples = num_samples
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def indices(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_samples)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.num_samples, generator=gen)

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        epoch = self.epoch
        return iter([(epoch, int(i)) for i in self.indices()])

    def __len__(self) -> int:
        return self.num_samples


class PlainLoader:
    """DataLoader over a CustomDataset, moving each batch to the device."""

    def __init__(self, dataset: CustomDataset, batch_size: int, shuffle: bool, drop_last: bool, num_workers: int,
                 pin_memory: bool, persistent_workers: bool, seed: int, device: torch.device):
        self.dataset = dataset
        self.sampler = EpochSampler(len(dataset), shuffle, seed)
        self.device = device
        self.loader = DataLoader(
            dataset, batch_size=batch_size, sampler=self.sampler, num_workers=num_workers,
            pin_memory=pin_memory, drop_last=drop_last,
            persistent_workers=persistent_workers and num_workers > 0,
        )

    @property
    def num_samples(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        for images, labels in self.loader:
            # async host->device copies from pinned memory; no-ops on CPU
            yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
