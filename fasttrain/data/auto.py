"""data.loader=auto: the fastest loader that applies to this device and dataset, and why (logged, and
recorded in the run folder's config.yaml). Rank 0 decides for every rank (fasttrain.train.lifecycle).
"""

from __future__ import annotations

import os
from typing import Tuple

import torch

from fasttrain.config import Config
from fasttrain.data.datasets import load_split
from fasttrain.data.folder_scan import folder_splits
from fasttrain.data.loaders.dali import dali_available


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

