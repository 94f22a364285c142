"""What a checkpoint must hold to continue a run exactly, and putting it back.

Beyond weights, optimizer, schedule and scaler, a resumable checkpoint carries each rank's
own state: its RNG states (dropout draws from them), its buffers (BatchNorm statistics differ
per rank until they are averaged at the epoch's end) and its running loss sums of the epoch in
progress; and the position: completed epochs, optimizer steps, and steps done in the current
epoch. Loaders are pure functions of (seed, epoch), so the position is all they need: the
resumed epoch starts `sample_in_epoch` samples into the epoch's order (the exact sample: after a
resume with another world size, an epoch's steps no longer start at a multiple of the batch).
Same world size: training N steps straight or k steps, stopping and resuming, gives the same
weights bit for bit (on CPU). Another world size: allowed, with a warning that the data order
(and the per-rank random streams) change from there on.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as torch_dist
from torch import nn

import fasttrain
from fasttrain import config as config_mod
from fasttrain.train.averaging import Averages
from fasttrain.checkpoint.folder import find_resume_checkpoint
from fasttrain.checkpoint.io import load_checkpoint, load_model_state
from fasttrain.config import Config
from fasttrain.config.schema import total_steps
from fasttrain.dist.device import rng_state, set_rng_state
from fasttrain.errors import TrainingDiverged, UserError
from fasttrain.train.optim import Schedule, load_optimizer_state

# config keys that may change between a run and its resumption without changing what is computed
NEUTRAL_KEYS = ("resume", "output.", "checkpoint.", "train.stop_after_steps", "train.log_every", "train.device",
                "train.peak_tflops", "train.deterministic", "train.tta", "train.eval_every", "train.target_acc",
                "train.compile_cache", "data.root", "data.download", "data.num_workers", "data.pin_memory",
                "data.persistent_workers", "data.cache_dir", "dist.")


@dataclass
class RunState:
    """Where a run stands (what fit carries from epoch to epoch, and checkpoints hold)."""
    epoch: int = 0  # completed epochs
    global_step: int = 0  # optimizer steps done
    best_val_acc: float = -1.0
    best_epoch: int = 0
    history: List[Dict[str, Any]] = field(default_factory=list)
    step_in_epoch: int = 0  # steps done in epoch `epoch + 1` (0 at an epoch's end)
    carried: Optional[torch.Tensor] = None  # this rank's running sums of that epoch before the stop
    start_sample: int = 0  # where epoch `epoch + 1` resumes in its sample order
    # (step_in_epoch, sample) where this process began the epoch in progress: (0, 0), or a resumed position
    epoch_origin: Tuple[int, int] = (0, 0)
    stopped_by: Optional[str] = None  # when fit stopped early: a signal's name, or "stop_after_steps"
    finished_by: Optional[str] = None  # when fit finished before its last epoch: "target_acc" (a complete run)
    last_checkpoint: Optional[Path] = None  # the checkpoint fit wrote last


@dataclass
class Resumable:
    """This rank's live objects that a checkpoint saves and puts back, and the device whose random
    state it holds."""
    model: nn.Module  # the plain module (not compiled, not DDP-wrapped): weights and buffers
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    scaler: torch.amp.GradScaler
    device: torch.device
    averages: Optional[Averages] = None  # the weight averages the run keeps (EMA, lookahead), if any


def choose_checkpoint(cfg: Config, run_dir: Path, warn: Callable[[str], None]) -> Optional[Path]:
    """The checkpoint this run continues from (rank 0 decides): None for resume=none, or for
    resume=auto in a folder without checkpoints."""
    if cfg.resume == "none":
        return None
    if cfg.resume == "auto":
        found = find_resume_checkpoint(run_dir / "checkpoints", warn)
        return found[0] if found else None
    load_checkpoint(cfg.resume)  # fails here, clearly, when missing or broken
    return Path(cfg.resume)


def capture(cfg: Config, world_size: int, parts: Resumable, state: RunState, totals: Optional[torch.Tensor],
            extra: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """Collective (every rank calls it at the same step): the checkpoint dict on rank 0, None elsewhere.
    Refuses (TrainingDiverged, on every rank) to capture weights that are no longer finite."""
    model = parts.model
    finite = bool(torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all())  # host sync, per save
    mine = {"rng": rng_state(parts.device), "finite": finite,
            "buffers": {name: buf.detach().cpu().clone() for name, buf in model.named_buffers()},
            "epoch_totals": None if totals is None else totals.detach().double().cpu()}
    lookahead = parts.averages.lookahead if parts.averages else None
    if lookahead is not None:  # its slow statistics are this rank's until the epoch's end averages them
        mine["lookahead_buffers"] = {name: t.detach().cpu().clone()
                                     for name, t in zip(lookahead.names[lookahead.trainable:], lookahead.slow_buffers)}
    ranks: List[Any] = [None] * world_size
    torch_dist.all_gather_object(ranks, mine)
    if not all(r["finite"] for r in ranks):
        raise TrainingDiverged(f"training diverged: the weights hold nan/inf at step {state.global_step}; no "
                               f"checkpoint was written over the last good one: lower optim.lr or sched.max_lr, "
                               f"set train.grad_clip, then continue with resume=auto")
    if torch_dist.get_rank() != 0:
        return None
    return {"model": model.state_dict(), "optimizer": parts.optimizer.state_dict(),
            "scheduler": parts.schedule.state_dict(), "scaler": parts.scaler.state_dict(), "epoch": state.epoch,
            "global_step": state.global_step, "step_in_epoch": state.step_in_epoch,
            "sample_in_epoch": sample_in_epoch(state, cfg.train.batch_size * world_size),
            "best_val_acc": state.best_val_acc,
            "best_epoch": state.best_epoch, "world_size": world_size, "batch_size": cfg.train.batch_size,
            "config": config_mod.to_dict(cfg), "history": state.history, "ranks": ranks,
            "versions": {"fasttrain": fasttrain.__version__, "torch": str(torch.__version__)},
            **(parts.averages.state_dict() if parts.averages else {}), **extra}


def sample_in_epoch(state: RunState, global_batch: int) -> int:
    """The exact sample of its epoch's order that a run stopped at: the steps since this process began
    the epoch, counted from where it began (a resumed position need not be a multiple of the batch)."""
    if not state.step_in_epoch:
        return 0
    origin_step, origin_sample = state.epoch_origin
    return origin_sample + (state.step_in_epoch - origin_step) * global_batch


def _flatten(tree: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    flat: Dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_changes(saved: Dict[str, Any], cfg: Config) -> List[str]:
    """'key: old -> new' for the keys that change what is computed."""
    old, new = _flatten(saved), _flatten(config_mod.to_dict(cfg))
    return [f"{key}: {old.get(key)!r} -> {new.get(key)!r}" for key in sorted(set(old) | set(new))
            if old.get(key) != new.get(key) and not key.startswith(NEUTRAL_KEYS)]


def restore(ckpt: Dict[str, Any], source: Path, cfg: Config, rank: int, world_size: int, parts: Resumable,
            steps_per_epoch: int, logger: logging.Logger) -> RunState:
    """Put a checkpoint back into freshly built parts; call it last before training (RNG states)."""
    model, optimizer, schedule, scaler = parts.model, parts.optimizer, parts.schedule, parts.scaler
    saved_cfg = ckpt["config"]
    saved_optim = saved_cfg.get("optim", {}).get("name")
    if saved_optim and saved_optim != cfg.optim.name:
        raise UserError(f"checkpoint {source} was trained with optim.name={saved_optim} but this run has "
                        f"optim.name={cfg.optim.name}: resume with the same optimizer, or start a new run")
    load_model_state(model, ckpt["model"], str(source))
    try:
        load_optimizer_state(optimizer, ckpt["optimizer"])
        schedule.load_state_dict(ckpt["scheduler"])
    except (ValueError, KeyError) as err:
        raise UserError(f"checkpoint {source}: its optimizer or schedule state does not fit this config "
                        f"({str(err).splitlines()[0]}): resume with the optim and sched settings it was "
                        f"trained with") from None
    if scaler.is_enabled() and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    if parts.averages:
        try:
            missing = parts.averages.load(ckpt)
        except (KeyError, RuntimeError) as err:
            raise UserError(f"checkpoint {source}: its weight averages do not fit this model ({type(err).__name__}: "
                            f"{str(err).splitlines()[0]}): resume with the model.name it was trained with") from None
        for key in missing:
            logger.info(f"warning: checkpoint {source} holds no {key} weights (it was trained without "
                        f"{'train.ema_decay' if key == 'ema' else 'train.lookahead_k'}): they start from its weights")
    changes = config_changes(saved_cfg, cfg)
    if changes:
        logger.info(f"warning: resuming with a changed config ({'; '.join(changes[:6])}"
                    + (" ..." if len(changes) > 6 else "") + "): the run will not match an uninterrupted one")
    state = RunState(epoch=int(ckpt["epoch"]), global_step=int(ckpt.get("global_step", 0)),
                     best_val_acc=float(ckpt.get("best_val_acc", -1.0)), best_epoch=int(ckpt.get("best_epoch", 0)),
                     history=list(ckpt.get("history", [])), step_in_epoch=int(ckpt.get("step_in_epoch", 0)))
    saved_world = int(ckpt.get("world_size", world_size))
    saved_batch = int(ckpt.get("batch_size", saved_cfg.get("train", {}).get("batch_size", cfg.train.batch_size)))
    state.start_sample = int(ckpt.get("sample_in_epoch", state.step_in_epoch * saved_batch * saved_world))
    epoch_samples = steps_per_epoch * cfg.train.batch_size * world_size  # at least the epoch's sample count
    if state.start_sample >= epoch_samples or (state.step_in_epoch == 0) != (state.start_sample == 0):
        raise UserError(f"checkpoint {source} stands at sample {state.start_sample:,} (step {state.step_in_epoch}) of "
                        f"epoch {state.epoch + 1}, which does not fit this run's epoch of {steps_per_epoch} steps: "
                        f"resume with the dataset it was trained on, or use another checkpoint")
    ranks = ckpt.get("ranks")
    if saved_world == world_size and ranks and len(ranks) == world_size:
        mine = ranks[rank]
        buffers = dict(model.named_buffers())
        unknown = sorted(set(mine["buffers"]) - set(buffers))
        if unknown:
            raise UserError(f"checkpoint {source} holds buffers this model does not have ({', '.join(unknown[:3])}): "
                            f"use the model.name and dataset it was trained with")
        lookahead = parts.averages.lookahead if parts.averages else None
        with torch.no_grad():
            for name, value in mine["buffers"].items():
                buffers[name].copy_(value)
            if lookahead is not None and "lookahead_buffers" in mine:
                slow = dict(zip(lookahead.names[lookahead.trainable:], lookahead.slow_buffers))
                for name, value in mine["lookahead_buffers"].items():
                    slow[name].copy_(value)
        state.carried = mine["epoch_totals"]
        set_rng_state(mine["rng"], parts.device)
    else:
        reason = (f"it was written by {saved_world} process(es) and this run has {world_size}"
                  if saved_world != world_size else "it holds no per-rank random states (an older fasttrain)")
        logger.info(f"warning: resuming {source} with a different data order: {reason}; the epoch in progress "
                    f"continues from sample {state.start_sample} resharded over {world_size} rank(s), random "
                    f"streams restart, and the result will not match an uninterrupted run bit for bit")
        torch.manual_seed(cfg.train.seed + rank + 1_000_003 * state.global_step)
    if saved_batch * saved_world != cfg.train.batch_size * world_size:
        state.step_in_epoch = state.start_sample // (cfg.train.batch_size * world_size)  # in this run's steps
    _rescale_per_batch_schedule(schedule, optimizer, state, steps_per_epoch, cfg.train.epochs)
    # where training stands in this run's steps (global_step counts another world size's steps after such a
    # resume): the parameters a model trains for its first epochs only are frozen at the same point of training
    schedule.position(state.epoch * steps_per_epoch + state.step_in_epoch)
    return state


def _rescale_per_batch_schedule(schedule: Schedule, optimizer: torch.optim.Optimizer, state: RunState,
                                steps_per_epoch: int, epochs: float) -> None:
    """More epochs (train.epochs raised to train longer), or another world size (other steps per
    epoch), change a per-batch schedule's total: OneCycleLR continues at the same point of training
    (epochs done, in this run's steps) on the curve of the new total, instead of stepping past its
    old end. A no-op when nothing changed."""
    scheduler = getattr(schedule, "scheduler", None)
    if not schedule.per_batch or scheduler is None or not hasattr(scheduler, "total_steps"):
        return
    total = total_steps(epochs, steps_per_epoch)
    # where training stands, in this run's steps (exact integers: the same run resumes bit for bit)
    position = min(total - 1, state.epoch * steps_per_epoch + state.step_in_epoch)
    if total == scheduler.total_steps and position == scheduler.last_epoch:
        return  # nothing changed (equal totals alone are not enough: another steps-per-epoch can give them)
    scheduler.total_steps = total
    scheduler.last_epoch = position
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # get_lr() outside step() warns; this is the closed form we want
        for group, lr in zip(optimizer.param_groups, scheduler.get_lr()):
            group["lr"] = lr
