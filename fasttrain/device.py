"""Device choice and seeding."""

from __future__ import annotations

import random

import numpy as np
import torch

from fasttrain.errors import UserError


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; an explicit cuda request must be satisfiable."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"train.device={name} but CUDA is not available on this machine: use train.device=cpu "
                            f"or train.device=auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"train.device={name} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def seed_everything(seed: int) -> None:
    """Seed every RNG that affects training: Python, NumPy, torch (CPU and all CUDA devices)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
