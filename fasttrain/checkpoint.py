"""Checkpoints: atomic writes, and loads that fail with a clear message.

A checkpoint is written to a temporary file in the same folder, flushed to disk and renamed over
the target, so a crash mid-write leaves the previous checkpoint intact and never a partial one.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Dict

import torch
from torch import nn

from fasttrain.errors import UserError

REQUIRED_KEYS = ("model", "optimizer", "scheduler", "epoch", "config")


def save_checkpoint(state: Dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except OSError as err:
        Path(tmp_name).unlink(missing_ok=True)
        raise UserError(f"could not write checkpoint {path} ({err.strerror or err}); free disk space or set "
                        f"output.dir to a writable folder (earlier checkpoints are untouched)") from None
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def load_checkpoint(path: str | Path) -> Dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise UserError(f"checkpoint {file} not found: give the path of a .pt file written by fasttrain "
                        f"(e.g. runs/<run>/checkpoints/best.pt)")
    try:
        state = torch.load(file, map_location="cpu", weights_only=False)
    except Exception as err:  # truncated zip, bad pickle, not a torch file at all, ...
        raise UserError(f"checkpoint {file} is truncated or corrupt ({type(err).__name__}): use another "
                        f"checkpoint (last.pt / best.pt) or retrain") from None
    missing = [k for k in REQUIRED_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise UserError(f"checkpoint {file} is not a fasttrain checkpoint (missing {', '.join(missing)})")
    return state


def load_model_state(model: nn.Module, state: Dict[str, torch.Tensor], source: str) -> None:
    """Load weights, naming the parameters whose shapes or names differ when they don't fit."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        parts = []
        if mismatched:
            parts.append("shapes differ: " + "; ".join(mismatched[:3]) + (" ..." if len(mismatched) > 3 else ""))
        if missing:
            parts.append(f"missing {', '.join(missing[:3])}" + (" ..." if len(missing) > 3 else ""))
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:3])}" + (" ..." if len(unexpected) > 3 else ""))
        raise UserError(f"checkpoint {source} does not fit this model ({'; '.join(parts)}): use the model.name and "
                        f"dataset it was trained with")
    model.load_state_dict(state)
