"""Datasets as uint8 arrays or image files, and the loaders built on them.

`load_split` reads one split of the configured dataset (an entry of the `data.dataset` registry,
fasttrain.config.registry.DATASETS) as (N, H, W, C) uint8 images and int64 labels (optionally a seeded
subset); `build_loaders` wraps the two splits in the configured loader. Every loader follows the
contract described in `fasttrain.data.loaders.plain`.

`data.dataset=folder` (the user's own images, fasttrain.data.folder) is scanned once per process
(`folder_splits`); the gpu loader gets its images decoded into a uint8 array like the others'
(`load_split`), while the plain and dali loaders get the file index and decode every batch.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Tuple, Union

import numpy as np
import torch

from fasttrain.config import Config, DataConfig
from fasttrain.data import cifar, folder, mnist, synthetic
from fasttrain.data.array_cache import resolve_cache_dir
from fasttrain.data.loaders.plain import CustomDataset, PlainLoader, ShardedBatches, ShardLoader
from fasttrain.data.loaders.dali import DaliLoader, dali_available
from fasttrain.data.loaders.gpu import BatchFormat, CropFlip, GpuLoader
from fasttrain.data.folder import BadFiles, FolderIndex
from fasttrain.data.transforms import eval_transform, fit_to_size, per_channel, train_transform
from fasttrain.errors import ConfigError
from fasttrain.observe.logs import LOGGER_NAME
from fasttrain.config.registry import DATASETS

SYNTHETIC_SIZES = {True: 5000, False: 1000}  # default train / test sizes of the synthetic dataset


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
    # distinct seeds so the synthetic test split is not a copy of the training split
    return (*synthetic.make_synthetic(size, seed=data.subset_seed * 2 + int(train)), synthetic.CLASSES)


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
        raise ConfigError(f"config error: data.image_size={data.image_size} but the {data.dataset} images are "
                          f"{images.shape[1]} px: only data.dataset=folder resizes; set data.image_size=0 (the "
                          f"dataset's own size)")
    skipped = folder_splits(data).info.skipped_files if data.dataset == "folder" else 0
    info = DatasetInfo(data.dataset, images.shape[-1], images.shape[1], tuple(classes), skipped)
    return images, labels, info


# --------------------------------------------------------------------------- the folder dataset's files


@dataclass(frozen=True)
class FolderSplits:
    """data.dataset=folder, scanned: each split's files (its seeded subset), the dataset's info, and the
    unreadable files data.skip_bad_images left out."""
    train: FolderIndex
    val: FolderIndex
    info: DatasetInfo
    bad: Tuple[BadFiles, ...]


def folder_splits(data: DataConfig, decoder: str = "pil") -> FolderSplits:
    """data.root scanned (train/ and val/), checked and cut to the configured subsets. Kept per process
    (loader choice, train and eval loaders all ask) until a class folder or split folder changes.
    `decoder` (`scan_decoder`): which decoder data.skip_bad_images asks whether a file decodes."""
    decoder = decoder if data.skip_bad_images else "pil"  # without skip_bad_images no file is decoded
    return _scan_folder(data.root, data.skip_bad_images, data.image_size, data.train_size, data.val_size,
                        data.subset_seed, _folder_stamp(data.root), decoder)


def scan_decoder(loader: str, device: torch.device) -> str:
    """The decoder that will decode the folder's files: "dali:<device>" for the dali loader (it refuses
    files PIL reads, such as a GIF named .png, and reads some PIL refuses), else "pil"."""
    return f"dali:{device}" if loader == "dali" else "pil"


def _folder_stamp(root: str) -> Tuple[Tuple[str, int], ...]:
    """When the split folders and class folders were last changed: adding, removing or renaming a
    file changes its folder's stamp (and so the scan is done again)."""
    stamp = []
    for split in folder.SPLITS:
        split_dir = Path(root) / split
        if split_dir.is_dir():
            folders = [split_dir, *(entry for entry in split_dir.iterdir() if entry.is_dir())]
            stamp.extend((str(entry), entry.stat().st_mtime_ns) for entry in folders)
    return tuple(sorted(stamp))


@functools.lru_cache(maxsize=4)
def _scan_folder(root: str, skip_bad: bool, image_size: int, train_size: int, val_size: int, subset_seed: int,
                 stamp: Tuple[Tuple[str, int], ...], decoder: str = "pil") -> FolderSplits:
    check = None
    if decoder.startswith("dali:"):
        from fasttrain.data.loaders.dali_folder import undecodable  # imports DALI

        device = torch.device(decoder.removeprefix("dali:"))
        check = functools.partial(undecodable, device=device, num_threads=folder.THREADS)
    train, val = (folder.scan_images(root, split, skip_bad, check) for split in ("train", "val"))
    folder.check_same_classes(train.index, val.index, root)
    side = image_size or folder.common_size([train, val])
    bad = tuple(scan.bad for scan in (train, val) if scan.bad is not None)

    def cut(index: FolderIndex, size: int, seed: int) -> FolderIndex:
        keep = subset_indices(len(index.paths), size, seed)  # the seeds load_split uses for array datasets
        return FolderIndex(tuple(index.paths[i] for i in keep), index.labels[keep], index.classes)

    info = DatasetInfo("folder", 3, side, train.index.classes, sum(b.count for b in bad))
    return FolderSplits(cut(train.index, train_size, subset_seed + 1), cut(val.index, val_size, subset_seed), info,
                        bad)


Loader = ShardLoader  # PlainLoader, GpuLoader, DaliLoader, or for folder data FolderPlainLoader, DaliFolderLoader
AUTO_WORKERS_MAX = 4  # the tutorial's DataLoader(num_workers=4)


def resolve_workers(num_workers: int) -> int:
    """data.num_workers, with -1 (auto) as min(4, the CPUs this process may run on / the processes on this
    node): more workers than CPUs only add switching (and torch warns about it for every loader). Neither
    the data order nor the augmentation depends on the count (fasttrain.data.loaders.plain), so auto is as
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
    if cfg.data.dataset == "folder":
        return _resolve_folder_loader(cfg, device)
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


def _free_memory(device: torch.device) -> Tuple[int, str]:
    """(bytes free, where) on the device the gpu loader would keep a split on."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0], "GPU"
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "host"


def _resolve_folder_loader(cfg: Config, device: torch.device) -> Tuple[str, str]:
    """data.dataset=folder with data.loader=auto: gpu (each file decoded once, kept resident) when that
    fits in a quarter of the free memory where it would live, else dali (decodes every batch from the
    files, on the GPU where there is one), else plain (DataLoader workers decode every batch)."""
    splits = folder_splits(cfg.data)
    pixels = splits.info.image_size ** 2 * 3
    input_bytes = 4 if cfg.train.precision == "fp32" else 2
    # both splits decoded as uint8, plus one augmented epoch of the training split in the input dtype
    needed = (len(splits.train.paths) + len(splits.val.paths)) * pixels + len(splits.train.paths) * pixels * input_bytes
    free, where = _free_memory(device)
    size = f"the decoded folder ({needed / 2**20:,.1f} MiB at {splits.info.image_size} px)"
    if needed <= 0.25 * free:
        return "gpu", f"{size} fits in a quarter of the free {where} memory: every file is decoded once"
    if dali_available():
        return "dali", f"{size} is too large to keep in {where} memory; DALI decodes the files every epoch"
    return "plain", (f"{size} is too large to keep in {where} memory and DALI is not installed: DataLoader workers "
                     f"decode the files every epoch")


def _split(cfg: Config, loader: str, train: bool,
           device: torch.device) -> Tuple[Union[np.ndarray, FolderIndex], np.ndarray, DatasetInfo]:
    """(images, labels, info) of one split as `loader` takes it: a uint8 array, or for folder data read
    by the plain or dali loader, the file index (decoded batch by batch)."""
    if cfg.data.dataset == "folder" and loader in ("plain", "dali"):
        splits = folder_splits(cfg.data, scan_decoder(loader, device))
        index = splits.train if train else splits.val
        return index, index.labels, splits.info
    return load_split(cfg.data, train)


def _report_skipped(cfg: Config, loader: str, device: torch.device) -> None:
    """The files data.skip_bad_images left out, in the run's log (rank 0's: other ranks' is silent)."""
    if cfg.data.dataset != "folder":
        return
    for bad in folder_splits(cfg.data, scan_decoder(loader, device)).bad:
        logging.getLogger(LOGGER_NAME).info(
            f"data folder: {bad.count} unreadable image file(s) left out (data.skip_bad_images=true), the first: "
            f"{bad.first} ({bad.reason})")


def build_eval_loader(cfg: Config, device: torch.device, rank: int = 0, world_size: int = 1,
                      dtype: torch.dtype = torch.float32) -> Tuple[Loader, DatasetInfo]:
    """The test split, sharded exactly: every image once across ranks, nothing padded."""
    name, _ = resolve_loader(cfg, device)
    images, labels, info = _split(cfg, name, train=False, device=device)
    batches = ShardedBatches(len(labels), cfg.train.eval_batch_size or cfg.train.batch_size, shuffle=False,
                             seed=cfg.train.seed, rank=rank, world_size=world_size, exact=True)
    _report_skipped(cfg, name, device)
    return _loader(cfg, name, images, labels, info, batches, device, dtype, train=False), info


def build_loaders(cfg: Config, device: torch.device, rank: int = 0, world_size: int = 1,
                  dtype: torch.dtype = torch.float32) -> Tuple[Loader, Loader, DatasetInfo]:
    """(this rank's train loader, its share of the test split, dataset info), of the configured kind.

    train.batch_size is per process: one optimizer step consumes batch_size x world_size images.
    Batches arrive on `device` in `dtype`, channels_last when train.channels_last is set.
    """
    name, _ = resolve_loader(cfg, device)
    images, labels, info = _split(cfg, name, train=True, device=device)
    batches = ShardedBatches(len(labels), cfg.train.batch_size, cfg.data.shuffle, cfg.train.seed, rank, world_size,
                             drop_last=cfg.data.drop_last)
    if len(batches) == 0:
        raise ConfigError(f"config error: train.batch_size={cfg.train.batch_size} x {world_size} process(es) leaves no "
                          f"training batch from {len(labels)} images: lower the batch size or set data.drop_last=false")
    val_loader, _ = build_eval_loader(cfg, device, rank, world_size, dtype)
    return _loader(cfg, name, images, labels, info, batches, device, dtype, train=True), val_loader, info


def _loader(cfg: Config, name: str, images: Union[np.ndarray, FolderIndex], labels: np.ndarray, info: DatasetInfo,
            batches: ShardedBatches, device: torch.device, dtype: torch.dtype, train: bool) -> Loader:
    channels = info.in_channels
    if name in ("gpu", "dali") and train and (cfg.aug.rotation > 0 or any(v > 0 for v in cfg.aug.color_jitter)):
        raise ConfigError(f"config error: data.loader={name} does random crop and flip only; aug.rotation and "
                          f"aug.color_jitter need data.loader=plain")
    pin = cfg.data.pin_memory if cfg.data.pin_memory is not None else device.type == "cuda"
    fmt = BatchFormat(device, per_channel(cfg.data.mean, channels, "data.mean"),
                      per_channel(cfg.data.std, channels, "data.std"), dtype, cfg.train.channels_last)
    if isinstance(images, FolderIndex):
        return _folder_file_loader(cfg, name, images, info, batches, fmt, train, pin)
    if name in ("gpu", "dali"):
        kind = GpuLoader if name == "gpu" else DaliLoader
        extra = {"num_threads": max(1, resolve_workers(cfg.data.num_workers))} if name == "dali" else {}
        aug = CropFlip(cfg.aug.crop_padding, cfg.aug.hflip, cfg.train.seed) if train else CropFlip(seed=cfg.train.seed)
        return kind(images, labels, batches, fmt, aug, **extra)
    transform = (train_transform(cfg.data, cfg.aug, info.image_size, channels) if train
                 else eval_transform(cfg.data, channels))
    dataset = CustomDataset(images, labels, transform, cfg.train.seed)
    return PlainLoader(dataset, batches, resolve_workers(cfg.data.num_workers), pin, cfg.data.persistent_workers,
                       device, dtype, cfg.train.channels_last)


def _folder_file_loader(cfg: Config, name: str, index: FolderIndex, info: DatasetInfo, batches: ShardedBatches,
                        fmt: BatchFormat, train: bool, pin: bool) -> Loader:
    """Folder data decoded batch by batch: by DataLoader workers (plain) or a DALI pipeline (dali). Both
    crop as the resident gpu loader does when aug.crop_padding > 0 (the fitted image, padded and cropped
    back), and take a random resized crop when it is 0."""
    if name == "dali":
        from fasttrain.data.loaders.dali_folder import DaliFolderLoader  # imports no DALI until it is built

        return DaliFolderLoader(index, batches, fmt, info.image_size, train, cfg.aug.hflip, cfg.train.seed,
                                max(1, resolve_workers(cfg.data.num_workers)),
                                crop_padding=cfg.aug.crop_padding if train else 0)
    transform = (train_transform(cfg.data, cfg.aug, info.image_size, 3, from_files=True) if train
                 else eval_transform(cfg.data, 3, info.image_size))
    return folder.FolderPlainLoader(folder.FolderDataset(index, transform, cfg.train.seed), batches,
                                    resolve_workers(cfg.data.num_workers), pin, cfg.data.persistent_workers,
                                    fmt.device, fmt.dtype, fmt.channels_last)
