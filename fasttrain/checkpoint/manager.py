"""Checkpoints in a distributed run: which one to continue from, putting it back on every rank,
writing one from every rank's state (and pruning old step files), and trimming a resumed run's
records to its checkpoint.

Rank 0 chooses and writes; every rank contributes its own state to a checkpoint and reads the
chosen one back (a shared file system, as multi-node runs need anyway). Each step that can fail
on one rank ends in `agree_on_error`, so all ranks fail together with the same message instead
of leaving the others waiting in a collective.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Protocol, Tuple

import torch
from torch import nn

from fasttrain import dist
from fasttrain.train.averaging import Averages
from fasttrain.checkpoint.io import load_checkpoint
from fasttrain.checkpoint.folder import prune_step_checkpoints, step_checkpoint_name
from fasttrain.checkpoint.state import Resumable, RunState, capture, choose_checkpoint, restore
from fasttrain.checkpoint.writer import CheckpointWriter
from fasttrain.config import Config
from fasttrain.errors import folder_write_failed
from fasttrain.train.optim import Schedule


class _HasScaler(Protocol):
    @property
    def scaler(self) -> torch.amp.GradScaler: ...


class RunParts(Protocol):
    """What the manager reads from a run's parts (the trainer's `Parts` has it): what a checkpoint
    saves and puts back (the weight averages too), and the steps of a whole epoch, which place a
    resumed one."""
    @property
    def model(self) -> nn.Module: ...
    @property
    def optimizer(self) -> torch.optim.Optimizer: ...
    @property
    def schedule(self) -> Schedule: ...
    @property
    def precision(self) -> _HasScaler: ...
    @property
    def steps_per_epoch(self) -> int: ...
    @property
    def averages(self) -> Optional[Averages]: ...
    @property
    def classes(self) -> Tuple[str, ...]: ...


def _resumable(ctx: dist.Dist, parts: RunParts) -> Resumable:
    return Resumable(parts.model, parts.optimizer, parts.schedule, parts.precision.scaler, ctx.device,
                     parts.averages)


def trim_history(run_dir: Path, state: RunState) -> None:
    """A resumed run rewrites its records up to the checkpoint's position: steps and epochs logged
    after that checkpoint are trained again, and must not appear twice."""
    steps_file = run_dir / "steps.jsonl"
    if steps_file.is_file():
        kept = [line for line in steps_file.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= state.global_step]
        steps_file.write_text("".join(line + "\n" for line in kept))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in state.history))


def _write_on_rank0(ctx: dist.Dist, ckpt: Optional[Dict[str, Any]], paths: List[Path], writer: CheckpointWriter,
                    background: bool, after: Optional[Callable[[], None]] = None) -> None:
    """Rank 0 writes (atomically; in the background, `writer`'s thread, once the previous write ended) and
    then does `after`; the others wait, and every rank learns of a failure (of this write, of the
    background write before it, or of `after`)."""
    error: Optional[str] = None
    if ctx.is_main:
        try:
            writer.write(ckpt, paths, background)
            if after is not None:
                after()
        except Exception as err:  # any failure: the other ranks are waiting in the agreement below
            error = dist.failure_message(err, f"writing {', '.join(p.name for p in paths)}", ctx.rank)
    dist.agree_on_error(error)  # also the barrier that keeps the other ranks from running ahead


def finish_writes(ctx: dist.Dist, writer: CheckpointWriter) -> None:
    """Every rank: rank 0's background write (if one is pending) has ended, and its error is everyone's."""
    error: Optional[str] = None
    if ctx.is_main:
        try:
            writer.wait()
        except Exception as err:  # any failure: the other ranks are waiting in the agreement below
            error = dist.failure_message(err, "the background checkpoint write", ctx.rank)
    dist.agree_on_error(error)


def _capture(cfg: Config, ctx: dist.Dist, parts: RunParts, state: RunState, totals: Optional[torch.Tensor],
             extra: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    # the class names say what each output of the model means: `fasttrain eval` on other data checks them
    return capture(cfg, ctx.world_size, _resumable(ctx, parts), state, totals,
                   {"classes": list(parts.classes), **extra})


def save_step_checkpoint(cfg: Config, ctx: dist.Dist, parts: RunParts, state: RunState, totals: torch.Tensor,
                         run_dir: Path, writer: CheckpointWriter, background: bool = False) -> Path:
    """Mid-epoch: step-NNNNNNNN.pt with every rank's state; the oldest beyond checkpoint.keep go (never the
    one being written)."""
    ckpt_dir = run_dir / "checkpoints"
    path = ckpt_dir / step_checkpoint_name(state.global_step)
    _write_on_rank0(ctx, _capture(cfg, ctx, parts, state, totals, {}), [path], writer, background,
                    after=lambda: _prune(run_dir, cfg.checkpoint.keep))
    return path


def _prune(run_dir: Path, keep: int) -> None:
    try:
        prune_step_checkpoints(run_dir / "checkpoints", keep)
    except OSError as err:  # a folder made read-only or removed: the run's one line, not a traceback
        raise folder_write_failed(run_dir, "checkpoints/ (removing old step checkpoints)", err) from None


def save_epoch_checkpoints(cfg: Config, ctx: dist.Dist, parts: RunParts, state: RunState,
                           evaluated: Dict[str, float], run_dir: Path, writer: CheckpointWriter,
                           background: bool = False) -> Path:
    """End of an epoch: last.pt, with the epoch's `evaluated` {"val_acc", "val_loss"} ({} when it was not
    validated), and best.pt when this epoch is the best so far (`state.best_epoch`, which the caller has
    moved to it)."""
    ckpt = _capture(cfg, ctx, parts, state, None, evaluated)
    last = run_dir / "checkpoints" / "last.pt"
    is_best = state.best_epoch == state.epoch
    _write_on_rank0(ctx, ckpt, [last] + ([run_dir / "checkpoints" / "best.pt"] if is_best else []), writer,
                    background)
    return last


def choose_on_rank0(cfg: Config, ctx: dist.Dist, run_dir: Path, logger: logging.Logger) -> Optional[Path]:
    """Rank 0 picks the checkpoint to continue from (warning about broken ones); all ranks learn it."""
    error: Optional[str] = None
    chosen: List[Optional[str]] = [None]
    if ctx.is_main:
        try:
            path = choose_checkpoint(cfg, run_dir, logger.info)
            chosen = [str(path) if path else None]
        except Exception as err:  # any failure: the other ranks are waiting in the agreement below
            error = dist.failure_message(err, "choosing the checkpoint to resume from", ctx.rank)
    dist.agree_on_error(error)
    dist.broadcast_object(chosen)
    return Path(chosen[0]) if chosen[0] else None


def restore_on_every_rank(cfg: Config, ctx: dist.Dist, parts: RunParts, path: Path,
                          logger: logging.Logger) -> RunState:
    """Every rank reads the checkpoint (a shared file system, as multi-node runs need anyway) and
    takes its own random states from it. The last thing before training: nothing may draw random
    numbers between this and the first step."""
    error: Optional[str] = None
    state = RunState()
    steps_per_epoch = parts.steps_per_epoch
    try:
        ckpt = load_checkpoint(path)
        state = restore(ckpt, path, cfg, ctx.rank, ctx.world_size, _resumable(ctx, parts), steps_per_epoch, logger)
    except Exception as err:  # any failure, on any rank: the others are waiting in the agreement below
        error = dist.failure_message(err, f"restoring {path}", ctx.rank)
        error = error if ctx.is_main else f"[rank {ctx.rank}] {error}"
    dist.agree_on_error(error)
    where = (f"{state.step_in_epoch} of {steps_per_epoch} steps into epoch {state.epoch + 1}"
             + (f" (from its sample {state.start_sample:,})" if state.start_sample else "")
             if state.step_in_epoch or state.start_sample else f"after epoch {state.epoch}")
    best = (f"best val_acc so far {100 * state.best_val_acc:.2f}% (epoch {state.best_epoch})" if state.best_epoch
            else "no epoch finished yet")
    logger.info(f"resumed from {path}: {where} (step {state.global_step}); {best}")
    return state
