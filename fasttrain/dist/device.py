"""Device choice, seeding, and the RNG states a checkpoint carries."""

from __future__ import annotations

import logging
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


class _NoCudaRuntimeNote(logging.Filter):
    """torch.utils.cpp_extension's "No CUDA runtime is found, using CUDA_HOME=..." (logged when torch.compile builds
    a CPU kernel on a machine with a CUDA toolkit and no GPU): on a run that chose the CPU it says nothing new."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No CUDA runtime is found")


def quiet_on_cpu(device: torch.device) -> None:
    """A run on the CPU: drop torch's note that there is no CUDA runtime (once per process)."""
    cpp_logger = logging.getLogger("torch.utils.cpp_extension")
    if device.type == "cpu" and not any(isinstance(f, _NoCudaRuntimeNote) for f in cpp_logger.filters):
        cpp_logger.addFilter(_NoCudaRuntimeNote())


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
