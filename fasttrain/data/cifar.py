"""Read CIFAR-10 from the standard `cifar-10-batches-py` layout into one uint8 array per split.

The pickles are read directly (no torchvision md5 check, which rejects lossless rebuilds of the
data) once per process and cached; every loader starts from these arrays. The decoded arrays are
also kept as .npy files in data.cache_dir (`array_cache`), so that the next run maps them in
milliseconds instead of unpickling for seconds. When the folder is missing and `data.download` is
on, torchvision downloads the official archive into `data.root`.
"""

from __future__ import annotations

import functools
import pickle
from pathlib import Path
from typing import Optional, Tuple

import numpy as np

from fasttrain.data.array_cache import cached_arrays
from fasttrain.data.download import leaves_no_folders
from fasttrain.errors import UserError, broken_torchvision

FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILES = ("test_batch",)
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMAGE_BYTES = 3 * 32 * 32


def _read_batch(path: Path) -> Tuple[np.ndarray, np.ndarray]:
    """One batch file -> (N, 32, 32, 3) uint8 HWC images and (N,) int64 labels."""
    fix = f"delete {path.parent} and download it again, or point data.root at a good copy"
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="bytes")
    except FileNotFoundError:
        raise UserError(f"CIFAR-10 file {path} is missing: {fix}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError, IndexError, KeyError) as err:
        raise UserError(f"CIFAR-10 file {path} is truncated or corrupt ({type(err).__name__}: {err}): {fix}") from None
    if not isinstance(entry, dict) or b"data" not in entry or b"labels" not in entry:
        raise UserError(f"CIFAR-10 file {path} has no 'data'/'labels' entries (not a CIFAR-10 batch): {fix}")
    data = np.asarray(entry[b"data"])
    labels = np.asarray(entry[b"labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != IMAGE_BYTES or len(labels) != len(data):
        raise UserError(f"CIFAR-10 file {path} holds data of shape {data.shape} ({data.dtype}) and "
                        f"{len(labels)} labels, expected (N, {IMAGE_BYTES}) uint8 and N labels: {fix}")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(CLASSES)):
        raise UserError(f"CIFAR-10 file {path} has labels outside 0..9: {fix}")
    # rows are R plane, G plane, B plane (1024 each), row-major: -> NCHW -> NHWC
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def _ensure_present(root: Path, download: bool) -> Path:
    folder = root / FOLDER
    if folder.is_dir():
        return folder
    where = f"looked for {folder.resolve()}"
    if not download:
        raise UserError(f"CIFAR-10 not found ({where}); set data.root to the folder that contains "
                        f"{FOLDER}/, or data.download=true to fetch it")
    try:
        from torchvision.datasets import CIFAR10

        with leaves_no_folders(folder):
            CIFAR10(str(root), train=True, download=True)
    except Exception as err:  # network errors come in many types (URLError, OSError, ...)
        broken = broken_torchvision(err)
        if broken is not None:
            raise broken from None
        raise UserError(f"CIFAR-10 not found ({where}) and the download failed ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''}); set data.root to the folder "
                        f"that contains {FOLDER}/") from None
    return folder


@functools.lru_cache(maxsize=4)
def load_cifar10(root: str, train: bool, download: bool = False,
                 cache_dir: Optional[Path] = None) -> Tuple[np.ndarray, np.ndarray]:
    """(N, 32, 32, 3) uint8 images and (N,) int64 labels of one split, read once per process (and kept
    in `cache_dir` across processes; None = no cache)."""
    folder = _ensure_present(Path(root), download)
    files = [folder / name for name in (TRAIN_FILES if train else TEST_FILES)]

    def decode() -> Tuple[np.ndarray, np.ndarray]:
        parts = [_read_batch(file) for file in files]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    images, labels = cached_arrays(cache_dir, f"cifar10-{'train' if train else 'test'}", files, decode)
    images.setflags(write=False)  # shared by every loader of this process: never mutate
    labels.setflags(write=False)
    return images, labels


def write_cifar10_layout(folder: Path, images: np.ndarray, labels: np.ndarray, name: str) -> None:
    """Write one batch file in the standard layout (used by tests and tools to make small data)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = np.ascontiguousarray(images.transpose(0, 3, 1, 2)).reshape(len(images), IMAGE_BYTES)
    entry = {b"batch_label": name.encode(), b"labels": [int(v) for v in labels], b"data": data,
             b"filenames": [f"{name}_{i}.png".encode() for i in range(len(images))]}
    with open(folder / name, "wb") as f:
        pickle.dump(entry, f, protocol=2)
