"""MNIST through torchvision (for the tutorial's MLP examples), as uint8 arrays like CIFAR-10."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Tuple

import numpy as np

from fasttrain.data.download import leaves_no_folders
from fasttrain.errors import UserError, broken_torchvision

CLASSES = tuple(str(i) for i in range(10))


@functools.lru_cache(maxsize=4)
def load_mnist(root: str, train: bool, download: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """(N, 28, 28, 1) uint8 images and (N,) int64 labels of one split."""
    folder = Path(root) / "MNIST" / "raw"
    try:
        from torchvision.datasets import MNIST

        with leaves_no_folders(folder):
            dataset = MNIST(root, train=train, download=download)
    except Exception as err:  # torchvision raises RuntimeError when missing, URLError/OSError on download, ...
        broken = broken_torchvision(err)
        if broken is not None:
            raise broken from None
        reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        hint = "or data.download=true to fetch it" if not download else "or delete the folder to download again"
        raise UserError(f"MNIST not found or unreadable in {folder.resolve()} ({reason}); set data.root to the "
                        f"folder that contains MNIST/, {hint}") from None
    images = dataset.data.numpy()
    labels = dataset.targets.numpy().astype(np.int64)
    if images.ndim != 3 or images.shape[1:] != (28, 28) or len(images) != len(labels):
        raise UserError(f"MNIST files in {folder.resolve()} hold images of shape {images.shape}, expected (N, 28, 28): "
                        f"delete them and download again")
    return np.ascontiguousarray(images[..., None]), labels
