"""Checkpoint files: atomic writes, loads that fail with a clear message, and the choice of the
checkpoint that `resume=auto` continues from.

A checkpoint is serialized in memory, written to a temporary file in the same folder, flushed to
disk and renamed over the target, so a crash or a full disk mid-write leaves the previous
checkpoint intact and never a partial one. The folder holds `last.pt` (end of the latest epoch),
`best.pt` (best validation accuracy) and `step-NNNNNNNN.pt` (mid-epoch: every
checkpoint.every_steps steps, on preemption and on train.stop_after_steps; the newest
checkpoint.keep are kept). Temporary files start with '.' and are never candidates.
"""

from __future__ import annotations

import io
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from fasttrain.errors import UserError

REQUIRED_KEYS = ("model", "optimizer", "scheduler", "epoch", "config")
STEP_FILE = re.compile(r"^step-(\d+)\.pt$")


def step_checkpoint_name(global_step: int) -> str:
    return f"step-{global_step:08d}.pt"


def save_checkpoint(state: Dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(state, buffer)  # in memory first: torch's file writer hides the OSError of a full disk
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(buffer.getbuffer())
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
                        f"(e.g. runs/<run>/checkpoints/last.pt)")
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


def position(state: Dict[str, Any]) -> Tuple[int, int]:
    """Where a checkpoint stands: (optimizer steps done, 1 at an epoch's end after validation, else 0)."""
    return int(state.get("global_step", 0)), 0 if state.get("step_in_epoch") else 1


def resume_candidates(ckpt_dir: Path) -> List[Path]:
    """Checkpoints a run can continue from, newest step first (last.pt is placed by loading it)."""
    steps = sorted((p for p in ckpt_dir.glob("step-*.pt") if STEP_FILE.match(p.name)),
                   key=lambda p: int(STEP_FILE.match(p.name).group(1)), reverse=True)  # type: ignore[union-attr]
    last = ckpt_dir / "last.pt"
    return steps + ([last] if last.is_file() else [])


def find_resume_checkpoint(ckpt_dir: Path, warn: Callable[[str], None]) -> Optional[Tuple[Path, Dict[str, Any]]]:
    """The newest checkpoint in ckpt_dir that loads, or None when the folder holds none at all.

    The newest step file that loads and last.pt compete by position; a truncated or corrupt file is
    reported through `warn` and skipped. When every candidate is broken that is an error: starting
    over would discard the run."""
    candidates = resume_candidates(ckpt_dir)
    if not candidates:
        return None
    good: List[Tuple[Path, Dict[str, Any]]] = []
    broken: List[str] = []
    found_step_file = False
    for path in candidates:
        if found_step_file and path.name != "last.pt":
            continue  # an older step file: only a fallback
        try:
            good.append((path, load_checkpoint(path)))
            found_step_file = found_step_file or path.name != "last.pt"
        except UserError as err:
            broken.append(path.name)
            warn(f"warning: {err}; skipping it")
    if not good:
        raise UserError(f"no usable checkpoint in {ckpt_dir} ({', '.join(broken)} truncated or corrupt): resume "
                        f"from another file with resume=PATH, or start over with resume=none output.overwrite=true")
    return max(good, key=lambda item: position(item[1]))


def prune_step_checkpoints(ckpt_dir: Path, keep: int) -> List[Path]:
    """Delete all but the newest `keep` step checkpoints; returns the deleted paths."""
    steps = resume_candidates(ckpt_dir)
    steps = [p for p in steps if p.name != "last.pt"]
    doomed = steps[keep:]
    for path in doomed:
        path.unlink(missing_ok=True)
    return doomed


def remove_stale_temporaries(ckpt_dir: Path) -> List[Path]:
    """Temporary files of writes that a crash interrupted ('.NAME.XXXX.tmp'): never valid, safe to drop."""
    stale = list(ckpt_dir.glob(".*.pt.*.tmp"))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale
