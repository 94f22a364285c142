"""The checkpoints/ folder of a run: step files' names, the newest valid checkpoint that `resume=auto`
continues from, the step files pruned to checkpoint.keep, temporaries a crash left behind, and best.pt put
back when a stop between two writes left it behind (one process; no collectives here).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from fasttrain.checkpoint.io import load_checkpoint, save_checkpoint
from fasttrain.errors import UserError

STEP_FILE = re.compile(r"^step-(\d+)\.pt$")


def step_checkpoint_name(global_step: int) -> str:
    return f"step-{global_step:08d}.pt"


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
        raise UserError(f"no usable checkpoint in {ckpt_dir} ({', '.join(broken)}: truncated, corrupt or not "
                        f"written by fasttrain): resume "
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


def restore_best(ckpt_dir: Path, say: Callable[[str], None]) -> Optional[Path]:
    """Put back best.pt when a stop between two writes left it behind: an epoch's end writes last.pt,
    then best.pt (the same checkpoint) when validation improved; a kill or a full disk in between
    leaves best.pt older than the best that last.pt records (or missing). When last.pt is that best
    epoch, best.pt is rewritten from it; otherwise the best weights are in best.pt already (written
    before any later epoch ran). Returns the path written, or None."""
    last, best = ckpt_dir / "last.pt", ckpt_dir / "best.pt"
    try:
        last_ckpt = load_checkpoint(last) if last.is_file() else None
    except UserError:
        return None  # a broken last.pt was reported when the run chose its checkpoint
    if not last_ckpt or last_ckpt.get("step_in_epoch") or not last_ckpt.get("best_epoch"):
        return None
    best_epoch = int(last_ckpt["best_epoch"])
    if int(last_ckpt["epoch"]) != best_epoch:
        if not best.is_file():
            say(f"warning: {best} is missing and the best epoch ({best_epoch}) is in no other checkpoint: it is "
                f"written again when validation accuracy improves")
        return None
    try:
        found = load_checkpoint(best).get("epoch") if best.is_file() else None
    except UserError:
        found = "broken"
    if found == best_epoch:
        return None
    save_checkpoint(last_ckpt, best)
    say(f"{best} put back from last.pt (epoch {best_epoch}, the best so far): it was "
        + ("missing" if found is None else "truncated or corrupt" if found == "broken" else f"of epoch {found}")
        + " (a stop between writing last.pt and best.pt)")
    return best
