"""`data.dataset=folder` scanned once per process: the loader choice, the train and the eval loaders all
ask for the same scan, which is kept until a class folder or split folder changes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Tuple

import torch

from fasttrain.config import DataConfig
from fasttrain.data import folder
from fasttrain.data.folder import BadFiles, FolderIndex
from fasttrain.data.split import DatasetInfo, subset_indices


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
