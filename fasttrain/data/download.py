"""A dataset download that fails leaves nothing behind: the folders the attempt made (torchvision makes
data/MNIST/raw before it fetches a byte) are removed again, each only while empty."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def leaves_no_folders(target: Path) -> Iterator[None]:
    """Around a download into `target`: on an exception, the missing folders of `target` and its parents that
    the attempt created are removed, deepest first, while empty; the exception goes on."""
    missing = [folder for folder in (target, *target.parents) if not folder.exists()]
    try:
        yield
    except BaseException:
        for folder in missing:
            if not folder.exists():
                continue  # never made (the attempt stopped above it)
            try:
                folder.rmdir()
            except OSError:
                break  # not empty: nothing above it is either
        raise
