"""`data.dataset=folder`: the user's own images, in torchvision's ImageFolder layout.

    <data.root>/train/<class>/*.jpg|*.jpeg|*.png
    <data.root>/val/<class>/*.jpg|*.jpeg|*.png

`scan_split` lists one split: classes in sorted order (class i = label i), files sorted within
each class, so every rank and every run sees the same index. While scanning, each file's header
is read (and a PNG's checksums checked): files that are not images stop the run before training
with one line naming how many there are and the first. With `skip_bad` (data.skip_bad_images)
every file is decoded once instead, and those that fail are left out and counted: by PIL, or by
the decoder the loader will use when the caller gives one (`decode_check`: the dali loader's, which
refuses files PIL reads, such as a GIF named .png). A file whose
header is sound but whose pixels are not (a truncated JPEG) is otherwise found when it is decoded:
`decode_rgb` raises one `UnreadableImage` line naming it, in a DataLoader worker too.

Every image is decoded as RGB (grayscale, palette and RGBA files included; alpha is dropped).

Two ways of loading, chosen by the loader (fasttrain.data):
- by file: `FolderDataset` (fasttrain.data.loaders.plain) decodes and transforms in the DataLoader
  workers, `DaliFolderLoader` (fasttrain.data.loaders.dali_folder) in a DALI pipeline;
- resident: `decode_split` decodes every image once, fitted to image_size (shorter side resized,
  centre cropped), into one (N, S, S, 3) uint8 array that the gpu loader keeps on its device.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from fasttrain.errors import ConfigError, UserError

SPLITS = ("train", "val")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")  # compared lower-cased: IMG_001.JPG counts
THREADS = min(8, os.cpu_count() or 1)  # for scanning and for decoding a split once


class UnreadableImage(UserError):
    """An image file that cannot be decoded. Raised inside a DataLoader worker, it reaches the main
    process re-created from torch's text of the worker's traceback; `one_line` recovers the message."""

    def one_line(self) -> str:
        text = str(self).strip().splitlines()[-1] if str(self).strip() else ""
        # in a worker's re-raise the last line is "fasttrain.data.folder.UnreadableImage: <message>"
        _, marker, message = text.partition(f"{type(self).__name__}: ")
        return message if marker else text


@dataclass(frozen=True)
class FolderIndex:
    """One split of an image folder: files in a fixed order and their labels."""
    paths: Tuple[str, ...]
    labels: np.ndarray  # int64, aligned with paths: the index of the file's class in `classes`
    classes: Tuple[str, ...]  # the class folders' names, sorted


@dataclass(frozen=True)
class BadFiles:
    """Image files a scan could not read: how many, the first one and why."""
    count: int
    first: str
    reason: str


@dataclass(frozen=True)
class Scan:
    """What scanning one split finds: its index, the (width, height) of each file in it, the files left out."""
    index: FolderIndex
    sizes: Tuple[Tuple[int, int], ...]
    bad: Optional[BadFiles]


def _short(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}".splitlines()[0]


def _probe(path: str, decode: bool) -> Tuple[Optional[Tuple[int, int]], Optional[str]]:
    """((width, height), None) for a readable image, (None, why) for one that is not. Without `decode`
    the header is read (and a PNG's chunk checksums checked); with it, every pixel is decoded too,
    which also finds a truncated JPEG."""
    try:
        with Image.open(path) as image:
            size = image.size
            if decode:
                image.load()
            else:
                image.verify()  # PNG: reads every chunk and checks its CRC; JPEG: the header only
        return size, None
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, struct.error... for bad files
        return None, _short(err)


def _class_folders(split_dir: Path, root: str) -> List[Path]:
    if not Path(root).is_dir():
        raise UserError(f"data error: data.root={root!r} is not a folder: point it at a folder with train/ and val/ "
                        f"subfolders of class folders (data.dataset=folder)")
    if not split_dir.is_dir():
        raise UserError(f"data error: {split_dir} is missing: data.dataset=folder needs {root}/train/<class>/ and "
                        f"{root}/val/<class>/ folders of .jpg/.jpeg/.png images")
    classes = sorted((entry for entry in split_dir.iterdir() if entry.is_dir() and not entry.name.startswith(".")),
                     key=lambda entry: entry.name)
    if not classes:
        raise UserError(f"data error: {split_dir} holds no class folders: put each class's images in "
                        f"{split_dir}/<class>/")
    return classes


def scan_split(root: str, split: str, skip_bad: bool = False) -> FolderIndex:
    """The files and labels of `root/split` (split: "train" or "val"), in a deterministic order:
    classes sorted by name (label = position), files sorted within each class.

    Raises UserError (one line) for a missing folder, a class folder without images, or files that
    cannot be read (how many, and the first). With `skip_bad`, every file is decoded once while
    scanning and those that fail are left out instead (`scan_images(...).bad` counts them)."""
    return scan_images(root, split, skip_bad).index


DecodeCheck = Callable[[Sequence[str]], List[Optional[str]]]  # per file: None when it decodes, else why not


def scan_images(root: str, split: str, skip_bad: bool = False, decode_check: Optional[DecodeCheck] = None) -> Scan:
    """scan_split, with each file's size and the files left out. `decode_check`, with `skip_bad`: the
    loader's own decoder decides which files decode (PIL then reads only the headers, for the sizes)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    split_dir = Path(root) / split
    classes = _class_folders(split_dir, root)
    candidates: List[Tuple[str, int]] = []
    for label, class_dir in enumerate(classes):
        # hidden files are skipped: macOS leaves "._name.jpg" metadata files beside copied images
        files = sorted(entry.name for entry in class_dir.iterdir()
                       if entry.suffix.lower() in IMAGE_SUFFIXES and not entry.name.startswith(".") and entry.is_file())
        if not files:
            raise UserError(f"data error: class folder {class_dir} holds no .jpg/.jpeg/.png images: add some or "
                            f"remove the folder")
        candidates.extend((str(class_dir / name), label) for name in files)
    # file I/O and PIL's decoders release the GIL: threads overlap them (map keeps the files' order)
    with ThreadPoolExecutor(max_workers=THREADS) as pool:
        decode = skip_bad and decode_check is None
        probes = list(pool.map(_probe, [path for path, _ in candidates], [decode] * len(candidates)))
    if skip_bad and decode_check is not None:
        readable = [i for i, (size, _) in enumerate(probes) if size is not None]
        for i, why in zip(readable, decode_check([candidates[i][0] for i in readable])):
            if why is not None:
                probes[i] = (None, why)
    bad = [(path, why) for (path, _), (_, why) in zip(candidates, probes) if why is not None]
    bad_files = BadFiles(len(bad), bad[0][0], bad[0][1]) if bad else None
    if bad_files and not skip_bad:
        raise UserError(f"data error: {bad_files.count} file(s) in {split_dir} cannot be read as images, the first: "
                        f"{bad_files.first} ({bad_files.reason}); fix or remove them, or set "
                        f"data.skip_bad_images=true to leave them out")
    kept = [(path, label, size) for (path, label), (size, why) in zip(candidates, probes) if why is None]
    for label, class_dir in enumerate(classes):
        if not any(file_label == label for _, file_label, _ in kept):
            raise UserError(f"data error: no image in class folder {class_dir} can be read: fix them or remove the "
                            f"folder")
    index = FolderIndex(tuple(path for path, _, _ in kept), np.array([label for _, label, _ in kept], dtype=np.int64),
                        tuple(entry.name for entry in classes))
    return Scan(index, tuple(size for _, _, size in kept), bad_files)


def check_same_classes(train: FolderIndex, val: FolderIndex, root: str) -> None:
    """Labels mean the same in both splits only when their class folders have the same names."""
    if train.classes == val.classes:
        return
    only_train = sorted(set(train.classes) - set(val.classes))
    only_val = sorted(set(val.classes) - set(train.classes))
    differ = "; ".join(part for part in (f"only in train/: {', '.join(only_train)}" if only_train else "",
                                         f"only in val/: {', '.join(only_val)}" if only_val else "") if part)
    raise UserError(f"data error: the class folders of {root}/train and {root}/val differ ({differ}): both splits "
                    f"need the same classes")


def common_size(scans: Sequence[Scan]) -> int:
    """data.image_size=0: the side every image shares, when all are square and of one size."""
    first = scans[0].sizes[0]
    for scan in scans:
        for path, size in zip(scan.index.paths, scan.sizes):
            if size != first or size[0] != size[1]:
                raise ConfigError(f"config error: data.image_size=0 needs every image square and of one size, but "
                                  f"{scans[0].index.paths[0]} is {first[0]}x{first[1]} and {path} is "
                                  f"{size[0]}x{size[1]}: set data.image_size (e.g. data.image_size=64)")
    return first[0]


# --------------------------------------------------------------------------- decoding


def decode_rgb(path: str) -> Image.Image:
    """The image at `path` as RGB pixels; UnreadableImage (one line naming the file) when it cannot be decoded."""
    try:
        with Image.open(path) as image:
            # RGBA and palette images with transparency go through RGBA: PIL warns on P -> RGB directly
            if image.mode == "P" and "transparency" in image.info:
                image = image.convert("RGBA")
            return image.convert("RGB")  # convert() decodes: a truncated file fails here
    except Exception as err:
        raise UnreadableImage(undecodable_line(path, _short(err))) from None


def undecodable_line(path: str, reason: str) -> str:
    """The one line every loader stops with for a file its decoder cannot decode."""
    return (f"data error: cannot decode image file {path} ({reason}): fix or remove it, or set "
            f"data.skip_bad_images=true (each file is then decoded once when the folder is scanned, by the decoder "
            f"the loader uses, and those that fail are left out)")


def decode_split(index: FolderIndex, fit: Callable[[Image.Image], Image.Image], threads: int) -> np.ndarray:
    """Every image of `index` decoded once and passed through `fit` (resize + centre crop to S x S):
    (N, S, S, 3) uint8, the resident form the gpu loader keeps."""
    def decode(path: str) -> np.ndarray:
        return np.asarray(fit(decode_rgb(path)), dtype=np.uint8)

    images: Optional[np.ndarray] = None
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        # filled in place as images arrive: a list then np.stack would hold the split twice
        for i, pixels in enumerate(pool.map(decode, index.paths)):
            if images is None:
                images = np.empty((len(index.paths), *pixels.shape), dtype=np.uint8)
            images[i] = pixels
    assert images is not None  # a scanned split holds at least one image per class
    return images
