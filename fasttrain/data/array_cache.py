"""Decoded datasets kept as .npy files (data.cache_dir), so that the next run maps them instead of
unpickling and reshaping the dataset again (CIFAR-10: seconds of start-up per run, per rank).

An entry is named by a digest of the source files (absolute path, size, modification time) and of this
module's FORMAT: a changed or replaced source file, or a change to how fasttrain decodes it, makes a new
entry. Entries are written atomically (a temporary file renamed into place), read with NumPy's pickle-free
loader (a cache file is data: it cannot run code) and memory-mapped read-only (ranks on a node share the
pages). An entry that does not load or has the wrong shape is decoded again and replaced, with a warning;
a cache folder that cannot be written costs the cache, with a warning, never the run.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Callable, Optional, Sequence, Tuple

import numpy as np

from fasttrain.observe.logs import LOGGER_NAME

FORMAT = "fasttrain-arrays-1"  # bump when the decoded layout changes
Arrays = Tuple[np.ndarray, np.ndarray]


def default_cache_dir() -> Path:
    """$FASTTRAIN_CACHE_DIR/data, else $XDG_CACHE_HOME/fasttrain/data, else ~/.cache/fasttrain/data."""
    if os.environ.get("FASTTRAIN_CACHE_DIR"):
        return Path(os.environ["FASTTRAIN_CACHE_DIR"]) / "data"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fasttrain" / "data"


def resolve_cache_dir(setting: str) -> Optional[Path]:
    """data.cache_dir as a folder, or None for off."""
    if setting == "off":
        return None
    return Path(setting).expanduser().absolute() if setting else default_cache_dir()


def _key(name: str, sources: Sequence[Path]) -> str:
    digest = hashlib.sha256(FORMAT.encode())
    for source in sources:
        stat = source.stat()
        digest.update(f"{source.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return f"{name}-{digest.hexdigest()[:20]}"


def cached_arrays(cache_dir: Optional[Path], name: str, sources: Sequence[Path], decode: Callable[[], Arrays]) -> Arrays:
    """(images, labels) of a dataset split: from the cache when an entry for these source files exists,
    else `decode()`d and stored. Returns read-only arrays."""
    if cache_dir is None:
        return decode()
    log = logging.getLogger(LOGGER_NAME).info
    try:
        key = _key(name, sources)
    except OSError:
        return decode()  # a missing source file: decode() names it in its own error
    images_file, labels_file = cache_dir / f"{key}-images.npy", cache_dir / f"{key}-labels.npy"
    if images_file.is_file() and labels_file.is_file():
        try:
            images = np.load(images_file, mmap_mode="r", allow_pickle=False)
            labels = np.load(labels_file, allow_pickle=False)
            if images.dtype == np.uint8 and images.ndim == 4 and labels.ndim == 1 and len(labels) == len(images):
                labels.setflags(write=False)
                return images, labels
            log(f"warning: data cache entry {images_file} has the wrong shape: decoding again")
        except (OSError, ValueError, EOFError) as err:
            log(f"warning: data cache entry {images_file} cannot be read ({type(err).__name__}): decoding again")
    images, labels = decode()
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        _save_atomically(labels_file, labels)
        _save_atomically(images_file, images)  # written last: its presence means the entry is complete
    except OSError as err:
        log(f"warning: data cache {cache_dir} cannot be written ({err.strerror or err}): the next run decodes the "
            f"dataset again (set data.cache_dir to a writable folder, or off)")
    return images, labels


def _save_atomically(path: Path, array: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, np.ascontiguousarray(array), allow_pickle=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
