"""Device choice, seeding, and the RNG states a checkpoint carries."""

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


def rng_state(device: torch.device) -> dict:
    """Every RNG state that affects this process's training (dropout draws from torch's; Python's and
    NumPy's are saved too, for user code and transforms that use them). Data only: tensors, numbers,
    strings and tuples, so that a checkpoint holding it loads with torch.load(weights_only=True)."""
    numpy_state = np.random.get_state(legacy=False)
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"bit_generator": str(numpy_state["bit_generator"]),
                       "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
                       "pos": int(numpy_state["state"]["pos"]), "has_gauss": int(numpy_state["has_gauss"]),
                       "gauss": float(numpy_state["gauss"])}}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    random.setstate(state["python"])
    saved = state["numpy"]
    np.random.set_state({"bit_generator": saved["bit_generator"],
                         "state": {"key": saved["key"].numpy().astype(np.uint32), "pos": saved["pos"]},
                         "has_gauss": saved["has_gauss"], "gauss": saved["gauss"]})
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
