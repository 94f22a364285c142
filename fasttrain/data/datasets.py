"""The registered datasets (`data.dataset`, fasttrain.config.registry.DATASETS), each read as one split of
(N, H, W, C) uint8 images and int64 labels; `load_split` cuts it to its seeded subset and describes it;
`training_sample` gives a model's data hook normalized training images.

A new dataset is one decorated function: (data config, train split?) -> (images, labels, class names).
`data.dataset=folder` is decoded here into such arrays for the resident gpu loader; the plain and dali
loaders read its files instead (fasttrain.data.build).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence, Tuple

import numpy as np

from fasttrain.config import DATASETS, DataConfig
from fasttrain.data import cifar, folder, mnist, synthetic
from fasttrain.data.array_cache import resolve_cache_dir
from fasttrain.data.folder_scan import folder_splits
from fasttrain.data.split import DatasetInfo, subset_indices
from fasttrain.data.transforms import fit_to_size
from fasttrain.errors import ConfigError

if TYPE_CHECKING:
    import torch

SYNTHETIC_SIZES = {True: 5000, False: 1000}  # default train / test sizes of the synthetic dataset
SYNTHETIC_SIDE = 32  # its default (and largest) image side


def _subset(images: np.ndarray, labels: np.ndarray, size: int, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    if size == 0 or size >= len(labels):
        return images, labels
    keep = subset_indices(len(labels), size, seed)
    return images[keep], labels[keep]


# --------------------------------------------------------------------------- the registered datasets
# each: (data config, train split?) -> (images (N, H, W, C) uint8, labels int64, class names); the
# subset of data.train_size / data.val_size is taken by load_split afterwards

Split = Tuple[np.ndarray, np.ndarray, Sequence[str]]


@DATASETS.register("cifar10")
def cifar10_split(data: DataConfig, train: bool) -> Split:
    return (*cifar.load_cifar10(data.root, train, data.download, resolve_cache_dir(data.cache_dir)), cifar.CLASSES)


@DATASETS.register("mnist")
def mnist_split(data: DataConfig, train: bool) -> Split:
    return (*mnist.load_mnist(data.root, train, data.download), mnist.CLASSES)


@DATASETS.register("synthetic")
def synthetic_split(data: DataConfig, train: bool) -> Split:
    size = (data.train_size if train else data.val_size) or SYNTHETIC_SIZES[train]
    # generated at data.image_size up to CIFAR's 32 px (smaller: quicker CPU runs; the host-memory bound on
    # data.train_size is for 32 px); a larger side is refused by load_split, which sees 32 px images
    side = data.image_size if 0 < data.image_size <= SYNTHETIC_SIDE else SYNTHETIC_SIDE
    # distinct seeds so the synthetic test split is not a copy of the training split
    return (*synthetic.make_synthetic(size, seed=data.subset_seed * 2 + int(train), image_size=side),
            synthetic.CLASSES)


@DATASETS.register("folder")
def folder_split(data: DataConfig, train: bool) -> Split:
    """The split's images decoded once, fitted to image_size (the resident form; already its subset)."""
    splits = folder_splits(data)
    index = splits.train if train else splits.val
    return folder.decode_split(index, fit_to_size(splits.info.image_size), folder.THREADS), index.labels, index.classes


def load_split(data: DataConfig, train: bool) -> Tuple[np.ndarray, np.ndarray, DatasetInfo]:
    """One split of the registered dataset data.dataset, cut to its seeded subset."""
    size = data.train_size if train else data.val_size
    images, labels, classes = DATASETS.get(data.dataset)(data, train)
    images, labels = _subset(images, labels, size, data.subset_seed + int(train))
    if data.image_size and images.shape[1] != data.image_size:
        smaller = f" or at most {SYNTHETIC_SIDE}" if data.dataset == "synthetic" else ""
        raise ConfigError(f"config error: data.image_size={data.image_size} but the {data.dataset} images are "
                          f"{images.shape[1]} px: only data.dataset=folder resizes; set data.image_size=0 (the "
                          f"dataset's own size){smaller}")
    skipped = folder_splits(data).info.skipped_files if data.dataset == "folder" else 0
    info = DatasetInfo(data.dataset, images.shape[-1], images.shape[1], tuple(classes), skipped)
    return images, labels, info


def training_sample(data: DataConfig, count: int, seed: int) -> "torch.Tensor":
    """Up to `count` training images, a seeded random choice, as float32 (N, C, H, W) normalized with
    data.mean and data.std as the loaders normalize them (no augmentation): what a model's `init_from_data`
    hook sees (fasttrain.train.build). The same on every rank and every call with the same seed."""
    import torch

    from fasttrain.data.transforms import per_channel

    images, _, info = load_split(data, train=True)
    chosen = np.sort(np.random.default_rng(seed).permutation(len(images))[:count])
    pixels = torch.from_numpy(images[chosen]).permute(0, 3, 1, 2).float().div_(255)
    mean = torch.tensor(per_channel(data.mean, info.in_channels, "data.mean")).view(1, -1, 1, 1)
    std = torch.tensor(per_channel(data.std, info.in_channels, "data.std")).view(1, -1, 1, 1)
    return pixels.sub_(mean).div_(std)
