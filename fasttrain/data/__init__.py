"""Datasets as uint8 arrays, and the loaders built on them.

`load_split` reads one split of the configured dataset (an entry of the `data.dataset` registry,
fasttrain.registry.DATASETS) as (N, H, W, C) uint8 images and int64 labels (optionally a seeded
subset); `build_loaders` wraps the two splits in the configured
loader. Every loader follows the contract described in `fasttrain.data.plain`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence, Tuple, Union

import numpy as np
import torch

from fasttrain.config import Config, DataConfig
from fasttrain.data import cifar, mnist, synthetic
from fasttrain.data.plain import CustomDataset, PlainLoader, ShardedBatches
from fasttrain.data.dali import DaliLoader, dali_available
from fasttrain.data.gpu import BatchFormat, CropFlip, GpuLoader
from fasttrain.data.transforms import eval_transform, per_channel, train_transform
from fasttrain.errors import ConfigError
from fasttrain.registry import DATASETS

SYNTHETIC_SIZES = {True: 5000, False: 1000}  # default train / test sizes of the synthetic dataset


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    in_channels: int
    image_size: int
    classes: Tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _subset(images: np.ndarray, labels: np.ndarray, size: int, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """A seeded random subset (in the original order) of `size` samples; 0 or >= N keeps all."""
    if size == 0 or size >= len(labels):
        return images, labels
    keep = np.sort(np.random.default_rng(seed).permutation(len(labels))[:size])
    return images[keep], labels[keep]


# --------------------------------------------------------------------------- the registered datasets
# each: (data config, train split?) -> (images (N, H, W, C) uint8, labels int64, class names); the
# subset of data.train_size / data.val_size is taken by load_split afterwards

Split = Tuple[np.ndarray, np.ndarray, Sequence[str]]


@DATASETS.register("cifar10")
def cifar10_split(data: DataConfig, train: bool) -> Split:
    return (*cifar.load_cifar10(data.root, train, data.download), cifar.CLASSES)


@DATASETS.register("mnist")
def mnist_split(data: DataConfig, train: bool) -> Split:
    return (*mnist.load_mnist(data.root, train, data.download), mnist.CLASSES)


@DATASETS.register("synthetic")
def synthetic_split(data: DataConfig, train: bool) -> Split:
    size = (data.train_size if train else data.val_size) or SYNTHETIC_SIZES[train]
    # distinct seeds so the synthetic test split is not a copy of the training split
    return (*synthetic.make_synthetic(size, seed=data.subset_seed * 2 + int(train)), synthetic.CLASSES)


def load_split(data: DataConfig, train: bool) -> Tuple[np.ndarray, np.ndarray, DatasetInfo]:
    """One split of the registered dataset data.dataset, cut to its seeded subset."""
    size = data.train_size if train else data.val_size
    images, labels, classes = DATASETS.get(data.dataset)(data, train)
    images, labels = _subset(images, labels, size, data.subset_seed + int(train))
    info = DatasetInfo(data.dataset, images.shape[-1], images.shape[1], tuple(classes))
    return images, labels, info


Loader = Union[PlainLoader, GpuLoader, DaliLoader]
AUTO_WORKERS_MAX = 4  # the tutorial's DataLoader(num_workers=4)


def resolve_workers(num_workers: int) -> int:
    """data.num_workers, with -1 (auto) as min(4, the CPUs this process may run on / the processes on this
    node): more workers than CPUs only add switching (and torch warns about it for every loader). Neither
    the data order nor the augmentation depends on the count (fasttrain.data.plain), so auto is as
    reproducible as a fixed number."""
    if num_workers >= 0:
        return num_workers
    try:
        cpus = len(os.sched_getaffinity(0))  # a container's or taskset's share, not the host's count
    except AttributeError:  # macOS, Windows
        cpus = os.cpu_count() or 1
    local = os.environ.get("LOCAL_WORLD_SIZE", "1")  # torchrun's (and accelerate's) processes on this node
    return min(AUTO_WORKERS_MAX, cpus // max(1, int(local) if local.isdigit() else 1))


def resolve_loader(cfg: Config, device: torch.device) -> Tuple[str, str]:
    """(loader name, why): data.loader itself, or what `auto` picks for this device and dataset."""
    if cfg.data.loader != "auto":
        return cfg.data.loader, "as configured"
    if cfg.aug.rotation > 0 or any(v > 0 for v in cfg.aug.color_jitter):
        return "plain", "aug.rotation / aug.color_jitter are only implemented by the plain loader"
    if device.type != "cuda":
        if dali_available():
            return "dali", "on the CPU, DALI's threaded pipeline is the fastest loader (benchmarks/RESULTS.md)"
        return "gpu", "on the CPU without DALI, the resident loader's batched augmentation beats per-image PIL"
    train_images, _, _ = load_split(cfg.data, train=True)
    test_images, _, _ = load_split(cfg.data, train=False)
    # both splits as uint8, plus one epoch of the training split augmented in the input dtype (at most
    # the whole split, on one rank)
    input_bytes = 4 if cfg.train.precision == "fp32" else 2
    needed = train_images.nbytes + test_images.nbytes + train_images.nbytes * input_bytes
    free, _ = torch.cuda.mem_get_info(device)
    if needed <= 0.25 * free:
        return "gpu", (f"the dataset ({needed / 2**20:,.0f} MiB: uint8 splits and one augmented epoch) fits in a "
                       f"quarter of the free GPU memory")
    if dali_available():
        return "dali", f"the dataset ({needed / 2**20:,.0f} MiB) is too large to keep on the GPU; DALI is installed"
    return "plain", f"the dataset ({needed / 2**20:,.0f} MiB) is too large to keep on the GPU and DALI is not installed"


def build_eval_loader(cfg: Config, device: torch.device, rank: int = 0, world_size: int = 1,
                      dtype: torch.dtype = torch.float32) -> Tuple[Loader, DatasetInfo]:
    """The test split, sharded exactly: every image once across ranks, nothing padded."""
    images, labels, info = load_split(cfg.data, train=False)
    batches = ShardedBatches(len(labels), cfg.train.eval_batch_size or cfg.train.batch_size, shuffle=False,
                             seed=cfg.train.seed, rank=rank, world_size=world_size, exact=True)
    return _loader(cfg, images, labels, info, batches, device, dtype, train=False), info


def build_loaders(cfg: Config, device: torch.device, rank: int = 0, world_size: int = 1,
                  dtype: torch.dtype = torch.float32) -> Tuple[Loader, Loader, DatasetInfo]:
    """(this rank's train loader, its share of the test split, dataset info), of the configured kind.

    train.batch_size is per process: one optimizer step consumes batch_size x world_size images.
    Batches arrive on `device` in `dtype`, channels_last when train.channels_last is set.
    """
    images, labels, info = load_split(cfg.data, train=True)
    batches = ShardedBatches(len(labels), cfg.train.batch_size, cfg.data.shuffle, cfg.train.seed, rank, world_size,
                             drop_last=cfg.data.drop_last)
    if len(batches) == 0:
        raise ConfigError(f"config error: train.batch_size={cfg.train.batch_size} x {world_size} process(es) leaves no "
                          f"training batch from {len(labels)} images: lower the batch size or set data.drop_last=false")
    val_loader, _ = build_eval_loader(cfg, device, rank, world_size, dtype)
    return _loader(cfg, images, labels, info, batches, device, dtype, train=True), val_loader, info


def _loader(cfg: Config, images: np.ndarray, labels: np.ndarray, info: DatasetInfo, batches: ShardedBatches,
            device: torch.device, dtype: torch.dtype, train: bool) -> Loader:
    channels = info.in_channels
    name, _ = resolve_loader(cfg, device)
    if name in ("gpu", "dali"):
        mean, std = per_channel(cfg.data.mean, channels, "data.mean"), per_channel(cfg.data.std, channels, "data.std")
        augment = train and (cfg.aug.rotation > 0 or any(v > 0 for v in cfg.aug.color_jitter))
        if augment:
            raise ConfigError(f"config error: data.loader={name} does random crop and flip only; aug.rotation and "
                              f"aug.color_jitter need data.loader=plain")
        kind = GpuLoader if name == "gpu" else DaliLoader
        extra = {"num_threads": max(1, resolve_workers(cfg.data.num_workers))} if name == "dali" else {}
        fmt = BatchFormat(device, mean, std, dtype, cfg.train.channels_last)
        aug = CropFlip(cfg.aug.crop_padding, cfg.aug.hflip, cfg.train.seed) if train else CropFlip(seed=cfg.train.seed)
        return kind(images, labels, batches, fmt, aug, **extra)
    transform = (train_transform(cfg.data, cfg.aug, info.image_size, channels) if train
                 else eval_transform(cfg.data, channels))
    dataset = CustomDataset(images, labels, transform, cfg.train.seed)
    pin = cfg.data.pin_memory if cfg.data.pin_memory is not None else device.type == "cuda"
    return PlainLoader(dataset, batches, resolve_workers(cfg.data.num_workers), pin, cfg.data.persistent_workers,
                       device, dtype, cfg.train.channels_last)
