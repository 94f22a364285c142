"""The loaders of a run, built from its config: this rank's training loader and its exact share of the test
split, of the kind data.loader names (or data.loader=auto chose, fasttrain.data.auto), each following the
contract of fasttrain.data.sharding.

Array datasets reach every loader as uint8 arrays (fasttrain.data.datasets); folder data reaches the gpu
loader decoded once, and the plain and dali loaders as its file index, decoded batch by batch.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Tuple, Union

import numpy as np
import torch

from fasttrain.config import Config
from fasttrain.data.auto import resolve_loader
from fasttrain.data.datasets import load_split
from fasttrain.data.folder import FolderIndex
from fasttrain.data.folder_scan import folder_splits, scan_decoder
from fasttrain.data.loaders.dali import DaliLoader
from fasttrain.data.loaders.gpu import BatchFormat, CropFlip, GpuLoader
from fasttrain.data.loaders.plain import CustomDataset, FolderDataset, FolderPlainLoader, PlainLoader
from fasttrain.data.sharding import Loader, ShardedBatches
from fasttrain.data.split import DatasetInfo
from fasttrain.data.transforms import eval_transform, per_channel, train_transform
from fasttrain.errors import ConfigError
from fasttrain.observe.logs import LOGGER_NAME

AUTO_WORKERS_MAX = 4  # the tutorial's DataLoader(num_workers=4)


def resolve_workers(num_workers: int) -> int:
    """data.num_workers, with -1 (auto) as min(4, the CPUs this process may run on / the processes on this
    node): more workers than CPUs only add switching (and torch warns about it for every loader). Neither
    the data order nor the augmentation depends on the count (fasttrain.data.sharding), so auto is as
    reproducible as a fixed number."""
    if num_workers >= 0:
        return num_workers
    try:
        cpus = len(os.sched_getaffinity(0))  # a container's or taskset's share, not the host's count
    except AttributeError:  # macOS, Windows
        cpus = os.cpu_count() or 1
    local = os.environ.get("LOCAL_WORLD_SIZE", "1")  # torchrun's (and accelerate's) processes on this node
    return min(AUTO_WORKERS_MAX, cpus // max(1, int(local) if local.isdigit() else 1))


@dataclass(frozen=True)
class SplitData:
    """One split as its loader takes it: `images` a uint8 array, or for folder data read by the plain or
    dali loader, the file index (decoded batch by batch)."""
    images: Union[np.ndarray, FolderIndex]
    labels: np.ndarray
    info: DatasetInfo


def _split(cfg: Config, loader: str, train: bool, device: torch.device) -> SplitData:
    if cfg.data.dataset == "folder" and loader in ("plain", "dali"):
        splits = folder_splits(cfg.data, scan_decoder(loader, device))
        index = splits.train if train else splits.val
        return SplitData(index, index.labels, splits.info)
    return SplitData(*load_split(cfg.data, train))


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
    split = _split(cfg, name, train=False, device=device)
    batches = ShardedBatches(len(split.labels), cfg.train.eval_batch_size or cfg.train.batch_size, shuffle=False,
                             seed=cfg.train.seed, rank=rank, world_size=world_size, exact=True)
    _report_skipped(cfg, name, device)
    return _loader(cfg, name, split, batches, device, dtype, train=False), split.info


def build_loaders(cfg: Config, device: torch.device, rank: int = 0, world_size: int = 1,
                  dtype: torch.dtype = torch.float32) -> Tuple[Loader, Loader, DatasetInfo]:
    """(this rank's train loader, its share of the test split, dataset info), of the configured kind.

    train.batch_size is per process: one optimizer step consumes batch_size x world_size images.
    Batches arrive on `device` in `dtype`, channels_last when train.channels_last is set.
    """
    name, _ = resolve_loader(cfg, device)
    split = _split(cfg, name, train=True, device=device)
    batches = ShardedBatches(len(split.labels), cfg.train.batch_size, cfg.data.shuffle, cfg.train.seed, rank,
                             world_size, drop_last=cfg.data.drop_last)
    if len(batches) == 0:
        raise ConfigError(f"config error: train.batch_size={cfg.train.batch_size} x {world_size} process(es) leaves no "
                          f"training batch from {len(split.labels)} images: lower the batch size or set "
                          f"data.drop_last=false")
    val_loader, _ = build_eval_loader(cfg, device, rank, world_size, dtype)
    return _loader(cfg, name, split, batches, device, dtype, train=True), val_loader, split.info


def _loader(cfg: Config, name: str, split: SplitData, batches: ShardedBatches, device: torch.device,
            dtype: torch.dtype, train: bool) -> Loader:
    channels = split.info.in_channels
    if name in ("gpu", "dali") and train and (cfg.aug.rotation > 0 or any(v > 0 for v in cfg.aug.color_jitter)):
        raise ConfigError(f"config error: data.loader={name} does random crop and flip only; aug.rotation and "
                          f"aug.color_jitter need data.loader=plain")
    if name == "plain" and train and cfg.aug.flip_alternate:  # (the config refuses it without aug.hflip)
        raise ConfigError("config error: aug.flip_alternate=true needs data.loader=gpu or dali (the plain loader's "
                          "torchvision RandomHorizontalFlip tosses a coin per image and epoch)")
    if train and cfg.aug.crop_padding_mode == "reflect" and cfg.aug.crop_padding > 0:
        _check_reflect(cfg, name, split)
    fmt = BatchFormat(device, per_channel(cfg.data.mean, channels, "data.mean"),
                      per_channel(cfg.data.std, channels, "data.std"), dtype, cfg.train.channels_last)
    # the gpu and dali loaders' own augmentation (evaluation: none, but the seed of a DALI pipeline)
    aug = (CropFlip(cfg.aug.crop_padding, cfg.aug.hflip, cfg.train.seed, cfg.aug.flip_alternate,
                    str(cfg.aug.crop_padding_mode)) if train else CropFlip(seed=cfg.train.seed))
    if isinstance(split.images, FolderIndex):
        return _folder_file_loader(cfg, name, split, batches, fmt, aug, train)
    if name in ("gpu", "dali"):
        kind = GpuLoader if name == "gpu" else DaliLoader
        extra = {"num_threads": max(1, resolve_workers(cfg.data.num_workers))} if name == "dali" else {}
        return kind(split.images, split.labels, batches, fmt, aug, **extra)
    transform = (train_transform(cfg.data, cfg.aug, split.info.image_size, channels) if train
                 else eval_transform(cfg.data, channels))
    dataset = CustomDataset(split.images, split.labels, transform, cfg.train.seed)
    return PlainLoader(dataset, batches, resolve_workers(cfg.data.num_workers), _pin_memory(cfg, device),
                       cfg.data.persistent_workers, device, dtype, cfg.train.channels_last)


def _check_reflect(cfg: Config, name: str, split: SplitData) -> None:
    """What the config cannot check before the images are read: a folder's side (known once scanned), and
    the DALI folder loader, whose decoded images DALI pads with a constant only (`fn.slice`)."""
    side = split.info.image_size
    if cfg.aug.crop_padding >= side:
        raise ConfigError(f"config error: aug.crop_padding={cfg.aug.crop_padding} is not valid: expected an integer "
                          f"in [0, {side - 1}] with aug.crop_padding_mode=reflect (images of {side} px): set a "
                          f"smaller aug.crop_padding, or crop_padding_mode=zeros")
    if name == "dali" and isinstance(split.images, FolderIndex):
        raise ConfigError("config error: aug.crop_padding_mode=reflect needs data.loader=plain or gpu with "
                          "data.dataset=folder (the dali loader decodes the files in its pipeline, whose slice pads "
                          "with zeros only), or aug.crop_padding_mode=zeros")


def _folder_file_loader(cfg: Config, name: str, split: SplitData, batches: ShardedBatches, fmt: BatchFormat,
                        aug: CropFlip, train: bool) -> Loader:
    """Folder data decoded batch by batch: by DataLoader workers (plain) or a DALI pipeline (dali). Both
    crop as the resident gpu loader does when aug.crop_padding > 0 (the fitted image, padded and cropped
    back), and take a random resized crop when it is 0."""
    index, image_size = split.images, split.info.image_size
    if name == "dali":
        from fasttrain.data.loaders.dali_folder import DaliFolderLoader  # imports no DALI until it is built

        return DaliFolderLoader(index, batches, fmt, image_size, train, aug,
                                max(1, resolve_workers(cfg.data.num_workers)))
    transform = (train_transform(cfg.data, cfg.aug, image_size, 3, from_files=True) if train
                 else eval_transform(cfg.data, 3, image_size))
    return FolderPlainLoader(FolderDataset(index, transform, cfg.train.seed), batches,
                             resolve_workers(cfg.data.num_workers), _pin_memory(cfg, fmt.device),
                             cfg.data.persistent_workers, fmt.device, fmt.dtype, fmt.channels_last)


def _pin_memory(cfg: Config, device: torch.device) -> bool:
    return cfg.data.pin_memory if cfg.data.pin_memory is not None else device.type == "cuda"
