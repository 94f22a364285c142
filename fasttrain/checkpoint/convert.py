"""`fasttrain convert-checkpoint FILE`: an older checkpoint, which only full pickle can read, made data only.

The one place fasttrain unpickles with weights_only=False, and only on a command the user types
for a file they trust: fasttrain never does it on its own (eval, resume and resume=auto refuse such
a file and name this command). NumPy values (an older fasttrain's NumPy RNG state) become tensors
and Python numbers; anything else that is not data is refused. The result gets a content hash and
is written atomically in the file's place; the original is kept beside it as FILE.orig (not a
name any run reads), so nothing is lost.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from fasttrain.checkpoint.digest import DIGEST_KEY, content_digest
from fasttrain.checkpoint.io import REQUIRED_KEYS, load_checkpoint, map_leaves, serialize, write_serialized
from fasttrain.errors import UserError


def _as_data(value: Any) -> Any:
    """A leaf of an older checkpoint as fasttrain writes it now: a NumPy array as a tensor, a NumPy scalar as a
    Python number, a str subclass as a str."""
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value.astype(np.int64) if value.dtype == np.uint32 else value.copy())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, str) and type(value) is not str:  # torch.__version__ (a TorchVersion) in older ones
        return str(value)
    return value


def _numpy_rng(state: Any) -> Any:
    """np.random.get_state()'s legacy tuple ('MT19937', keys, pos, has_gauss, gauss) as a dict."""
    if isinstance(state, tuple) and len(state) == 5 and state[0] == "MT19937":
        return {"bit_generator": "MT19937", "key": torch.as_tensor(np.asarray(state[1], dtype=np.int64)),
                "pos": int(state[2]), "has_gauss": int(state[3]), "gauss": float(state[4])}
    return state


def convert_checkpoint(path: str | Path, out: Optional[str | Path] = None) -> Path:
    """Convert `path` (trusted by the caller) into a data-only checkpoint with a content hash, at `out`
    (default: in its place, the original kept as PATH.orig). Returns the path written."""
    source = Path(path)
    if not source.is_file():
        raise UserError(f"checkpoint {source} not found: give the path of a .pt file written by fasttrain")
    try:
        state = torch.load(source, map_location="cpu", weights_only=False)  # the user vouched for this file
    except Exception as err:  # noqa: BLE001 - truncated, not a torch file, a class that no longer exists
        raise UserError(f"checkpoint {source} cannot be read ({type(err).__name__}: {str(err).splitlines()[0]}): "
                        f"it is truncated, corrupt or not a checkpoint") from None
    missing = [key for key in REQUIRED_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise UserError(f"checkpoint {source} is not a fasttrain checkpoint (missing {', '.join(missing)})")
    state = {key: value for key, value in state.items() if key != DIGEST_KEY}
    for rank in state.get("ranks") or []:
        if isinstance(rank, dict) and isinstance(rank.get("rng"), dict):
            rank["rng"]["numpy"] = _numpy_rng(rank["rng"].get("numpy"))
    state = map_leaves(state, _as_data)
    try:
        content_digest(state)
    except TypeError as err:
        raise UserError(f"checkpoint {source} cannot be converted: {err}") from None
    target = Path(out) if out is not None else source
    if target == source:
        backup = source.with_name(source.name + ".orig")
        if backup.exists():
            raise UserError(f"{backup} exists already (an earlier conversion): move it away, or pass --out")
        os.link(source, backup)  # the original stays, under a name no run reads
    write_serialized(serialize(state), [target])
    load_checkpoint(target)  # the result loads as every checkpoint does: data only, hash checked
    return target
