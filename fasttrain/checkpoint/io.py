"""Checkpoint files: atomic writes, loads that check every key and fail with a clear message, and
the choice of the file that `resume=auto` continues from (one process; no collectives here).

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

import dataclasses
import os
import pickle
import re
import tempfile
from io import BytesIO
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from fasttrain.checkpoint.digest import DIGEST_KEY, content_digest
from fasttrain.config import WORKERS_PER_CPU, Config, from_dict
from fasttrain.errors import UserError

REQUIRED_KEYS = ("model", "optimizer", "scheduler", "epoch", "config")
CONFIG_SECTIONS = tuple(f.name for f in dataclasses.fields(Config) if dataclasses.is_dataclass(f.default_factory))
STEP_FILE = re.compile(r"^step-(\d+)\.pt$")


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


def step_checkpoint_name(global_step: int) -> str:
    return f"step-{global_step:08d}.pt"


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


def _shown(value: Any) -> str:
    """A value as an error message shows it: short, one line."""
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, (dict, list, tuple)) and len(repr(value)) > 40:
        return f"a {type(value).__name__} of {len(value)} items"
    text = repr(value).replace("\n", " ")
    return text if len(text) <= 40 else text[:37] + "..."


def _is_int(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_tensor_dict(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())


def _is_rank_state(value: Any) -> bool:
    """One rank's entry of `ranks`, as state.capture writes it and state.restore reads it."""
    if not isinstance(value, dict) or not {"rng", "buffers", "epoch_totals"} <= value.keys():
        return False
    rng = value["rng"]
    numpy_rng = rng.get("numpy") if isinstance(rng, dict) else None
    return (isinstance(rng, dict) and isinstance(rng.get("python"), tuple) and isinstance(numpy_rng, dict)
            and isinstance(numpy_rng.get("key"), torch.Tensor) and _is_int(numpy_rng.get("pos"), 0)
            and isinstance(rng.get("torch"), torch.Tensor) and _is_tensor_dict(value["buffers"])
            and (value["epoch_totals"] is None or isinstance(value["epoch_totals"], torch.Tensor)))


# key -> (the check, what it must be); the optional keys are checked when present
_CHECKS: Dict[str, Tuple[Callable[[Any], bool], str]] = {
    "model": (_is_tensor_dict, "a state dict of named tensors"),
    "optimizer": (lambda v: isinstance(v, dict) and isinstance(v.get("state"), dict)
                  and isinstance(v.get("param_groups"), list) and all(isinstance(g, dict) for g in v["param_groups"]),
                  "an optimizer state dict (state, param_groups)"),
    "scheduler": (lambda v: isinstance(v, dict), "a scheduler state dict"),
    "epoch": (lambda v: _is_int(v, 0), "an integer >= 0"),
    "config": (lambda v: isinstance(v, dict) and all(isinstance(k, str) for k in v)
               and all(isinstance(v[k], dict) for k in CONFIG_SECTIONS if k in v),
               "a dict of config sections (data, model, optim, train, ...)"),
    "global_step": (lambda v: _is_int(v, 0), "an integer >= 0"),
    "step_in_epoch": (lambda v: _is_int(v, 0), "an integer >= 0"),
    "sample_in_epoch": (lambda v: _is_int(v, 0), "an integer >= 0"),
    "best_epoch": (lambda v: _is_int(v, 0), "an integer >= 0"),
    "best_val_acc": (_is_number, "a number"),
    "val_acc": (_is_number, "a number"),
    "val_loss": (_is_number, "a number"),
    "world_size": (lambda v: _is_int(v, 1), "an integer >= 1"),
    "batch_size": (lambda v: _is_int(v, 1), "an integer >= 1"),
    "history": (lambda v: isinstance(v, list) and all(isinstance(r, dict) for r in v), "a list of dicts"),
    "classes": (lambda v: isinstance(v, list) and all(isinstance(c, str) for c in v), "a list of class names"),
    "ranks": (lambda v: v is None or (isinstance(v, list) and all(_is_rank_state(r) for r in v)),
              "a list of per-rank states (rng, buffers, epoch_totals) or None"),
    "scaler": (lambda v: v is None or isinstance(v, dict), "a GradScaler state dict or None"),
    "ema": (lambda v: isinstance(v, dict) and _is_int(v.get("updates"), 0) and _is_tensor_dict(v.get("weights")),
            "the EMA's updates and weights"),
    "lookahead": (lambda v: isinstance(v, dict) and _is_tensor_dict(v.get("weights")), "lookahead's slow weights"),
}


def checkpoint_problem(state: Dict[str, Any]) -> Optional[str]:
    """What is wrong with a checkpoint dict, in words ("epoch is 'abc', expected an integer >= 0"), or
    None when every key present has the type fasttrain writes and its config is one fasttrain accepts."""
    for key, (ok, expected) in _CHECKS.items():
        if key in state and not ok(state[key]):
            return f"{key} is {_shown(state[key])}, expected {expected}"
    broken = next((name for name, tensor in state["model"].items()
                   if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())), None)
    if broken:
        return f"its weight {broken} holds nan/inf (saved from a diverged run)"
    try:
        from_dict(portable_config(state["config"]))  # the saved config itself: known keys, accepted values
    except UserError as err:
        return f"its config: {str(err).removeprefix('config error: ')}"
    except Exception as err:  # noqa: BLE001 - untrusted data: OmegaConf may refuse it in other ways
        return f"its config cannot be read ({type(err).__name__})"
    return None


def portable_config(saved: Dict[str, Any]) -> Dict[str, Any]:
    """A checkpoint's config as this machine can use it: a worker count above this machine's bound (the
    file came from a larger machine; a key that never changes what is computed) becomes -1, auto."""
    data = saved.get("data")
    workers = data.get("num_workers") if isinstance(data, dict) else None
    if isinstance(workers, int) and workers > WORKERS_PER_CPU * (os.cpu_count() or 1):
        return {**saved, "data": {**data, "num_workers": -1}}
    return saved


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
