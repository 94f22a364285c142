"""Checkpoint files: atomic writes, and loads that check every key (validate.py) and fail with a clear
message (one process; no collectives here).

A checkpoint is serialized in memory, written to a temporary file in the same folder, flushed to
disk and renamed over the target, so a crash or a full disk mid-write leaves the previous
checkpoint intact and never a partial one. The folder holds `last.pt` (end of the latest epoch),
`best.pt` (best validation accuracy) and `step-NNNNNNNN.pt` (mid-epoch: every
checkpoint.every_steps steps, on preemption and on train.stop_after_steps; the newest
checkpoint.keep are kept). Temporary files start with '.' and are never candidates.

A checkpoint is data, never code: it is loaded with torch.load(weights_only=True) (tensors, numbers,
strings, lists, dicts; no pickled objects), and its content hash (`digest.py`) is checked before
anything in it is used. A file that needs more (written by an older fasttrain, or by anything
else) is refused with the command that converts it once, for a file the user trusts
(`fasttrain convert-checkpoint`). Files get the mode the umask allows (group-readable on a shared
cluster where the umask says so), not mkstemp's owner-only 0600.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from io import BytesIO
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

from fasttrain.checkpoint.digest import DIGEST_KEY, content_digest
from fasttrain.checkpoint.validate import checkpoint_problem
from fasttrain.errors import UserError

REQUIRED_KEYS = ("model", "optimizer", "scheduler", "epoch", "config")


def _umask() -> int:
    """The process's umask, read without changing it (os.umask sets it: racy with the writer thread)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # no /proc (macOS): at import, before any writer thread exists
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()  # what open() would give a new file: mkstemp's 0600 hides best.pt from a team


def map_leaves(value: Any, leaf: Callable[[Any], Any]) -> Any:
    """`value` with every dict, list and tuple rebuilt and `leaf` applied to everything else: the one walk
    of a checkpoint's tree that copies it (the background writer's host copy, the conversion of older files)."""
    if isinstance(value, dict):
        return {key: map_leaves(item, leaf) for key, item in value.items()}
    if isinstance(value, list):
        return [map_leaves(item, leaf) for item in value]
    if isinstance(value, tuple):
        return tuple(map_leaves(item, leaf) for item in value)
    return leaf(value)


def save_checkpoint(state: Dict[str, Any], path: Path) -> None:
    write_serialized(serialize(state), [path])


def serialize(state: Dict[str, Any]) -> BytesIO:
    """The checkpoint's bytes, in memory, with its content hash: torch's file writer hides the OSError
    of a full disk, and one serialization serves several files (last.pt and best.pt)."""
    buffer = BytesIO()
    torch.save({**state, DIGEST_KEY: content_digest(state)}, buffer)
    return buffer


def write_serialized(buffer: BytesIO, paths: List[Path]) -> None:
    """Write the bytes to each path atomically: a temporary file in the same folder, flushed and fsynced,
    then renamed over the target (and the rename itself made durable). Every OSError on the way (the folder
    made read-only or removed, a full disk) is one UserError naming the file; the previous file is kept."""
    for path in paths:
        tmp_name: Optional[str] = None
        try:
            # the checkpoints folder only, never its parents: a run folder removed while the run goes is an
            # error, not something to recreate silently (the run's lock and history went with it)
            path.parent.mkdir(exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), FILE_MODE)
                f.write(buffer.getbuffer())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp_name, path)
            tmp_name = None
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)  # make the rename itself durable
            finally:
                os.close(dir_fd)
        except OSError as err:
            _discard(tmp_name)
            reason = err.strerror or str(err)
            if not path.parent.parent.is_dir():
                raise UserError(f"could not write checkpoint {path}: its run folder {path.parent.parent} was removed "
                                f"({reason}); start again with an output.dir that stays, or continue from a copy of "
                                f"its checkpoints with resume=PATH") from None
            raise UserError(f"could not write checkpoint {path} ({reason}): free disk space or make {path.parent} "
                            f"writable again (earlier checkpoints are untouched) and continue with resume=auto, or "
                            f"set output.dir to a writable folder") from None
        except BaseException:
            _discard(tmp_name)
            raise


def _discard(tmp_name: Optional[str]) -> None:
    """Remove a temporary file a failed write left (when the folder still allows it)."""
    if tmp_name is not None:
        try:
            Path(tmp_name).unlink(missing_ok=True)
        except OSError:
            pass  # a read-only or removed folder: the next run's commit removes stale temporaries


def load_checkpoint(path: str | Path) -> Dict[str, Any]:
    """A checkpoint's dict, checked key by key (`checkpoint_problem`): every reader (eval, resume,
    resume=auto's choice) may rely on the types below. Raises UserError naming what is wrong."""
    file = Path(path)
    try:
        found = file.is_file()
    except OSError as err:  # a path too long for the file system, a folder we may not enter, ...
        raise UserError(f"checkpoint {_short(file)} cannot be read ({err.strerror or err}): give the path of a .pt "
                        f"file written by fasttrain (e.g. runs/<run>/checkpoints/last.pt)") from None
    if not found:
        raise UserError(f"checkpoint {file} not found: give the path of a .pt file written by fasttrain "
                        f"(e.g. runs/<run>/checkpoints/last.pt)")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)  # data only: no pickled code runs
    except pickle.UnpicklingError as err:
        if "weights only load failed" not in str(err).lower():
            raise UserError(f"checkpoint {file} is truncated or corrupt (UnpicklingError): use another "
                            f"checkpoint (last.pt / best.pt) or retrain") from None
        raise UserError(f"checkpoint {file} holds Python objects, not only data (written by an older fasttrain, "
                        f"or not by fasttrain), and is not loaded: if you trust where it came from, convert it once "
                        f"with: fasttrain convert-checkpoint {file}") from None
    except Exception as err:  # truncated zip, not a torch file at all, ...
        raise UserError(f"checkpoint {file} is truncated or corrupt ({type(err).__name__}): use another "
                        f"checkpoint (last.pt / best.pt) or retrain") from None
    if isinstance(state, dict) and REQUIRED_KEYS[0] in state and DIGEST_KEY not in state:
        raise UserError(f"checkpoint {file} has no content hash (written by an older fasttrain): if you trust it, "
                        f"add one with: fasttrain convert-checkpoint {file}")
    if isinstance(state, dict) and DIGEST_KEY in state:
        try:
            intact = state[DIGEST_KEY] == content_digest(state)
        except TypeError:
            intact = False
        if not intact:
            raise UserError(f"checkpoint {file} does not match its content hash: it was changed after fasttrain "
                            f"wrote it (a flipped bit, a copy gone wrong, an edit): use another checkpoint "
                            f"(last.pt / best.pt / step-*.pt) or retrain")
    missing = [k for k in REQUIRED_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise UserError(f"checkpoint {file} is not a fasttrain checkpoint (missing {', '.join(missing)})")
    problem = checkpoint_problem(state)
    if problem:
        raise UserError(f"checkpoint {file} is not a valid fasttrain checkpoint ({problem}): use a checkpoint "
                        f"written by fasttrain")
    return state


def _short(path: Path, limit: int = 80) -> str:
    text = str(path)
    return text if len(text) <= limit else f"{text[:limit // 2]}...{text[-limit // 4:]} ({len(text)} characters)"




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
