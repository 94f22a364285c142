"""One split of a dataset as the loaders see it: described (`DatasetInfo`) and cut to its seeded subset
(`subset_indices`, data.train_size / data.val_size). Shared by the array datasets (datasets.py) and the
scanned image folders (folder_scan.py), so that both cut with the same seeds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import numpy as np


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    in_channels: int
    image_size: int
    classes: Tuple[str, ...]
    skipped_files: int = 0  # folder: unreadable image files left out (data.skip_bad_images), both splits

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def subset_indices(num_samples: int, size: int, seed: int) -> np.ndarray:
    """The indices of a seeded random subset of `size` samples, in the original order; 0 or >= N keeps all."""
    if size == 0 or size >= num_samples:
        return np.arange(num_samples)
    return np.sort(np.random.default_rng(seed).permutation(num_samples)[:size])
