"""Build a run from a Config and fit it: the tutorial's train_model, with a run folder.

`train(cfg)` prepares the run folder, builds data, model, optimizer and schedule, then `fit`
runs epochs of train_one_epoch + validate, writes metrics, and keeps `checkpoints/last.pt` and
`checkpoints/best.pt` (by validation accuracy).
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List

import torch
from torch import nn

import fasttrain
from fasttrain import config as config_mod
from fasttrain.checkpoint import save_checkpoint
from fasttrain.config import Config
from fasttrain.data import build_loaders
from fasttrain.device import resolve_device, seed_everything
from fasttrain.engine import train_one_epoch, validate
from fasttrain.errors import UserError
from fasttrain.models import build_model, summarize
from fasttrain.observe import JsonLines, close_logging, epoch_line, setup_logging
from fasttrain.optim import Schedule, build_optimizer


def prepare_run_dir(cfg: Config) -> Path:
    """Create output.dir; refuse to overwrite an earlier run's checkpoints unless told to."""
    run_dir = Path(cfg.output.dir)
    ckpt_dir = run_dir / "checkpoints"
    if ckpt_dir.is_dir() and any(ckpt_dir.glob("*.pt")) and not cfg.output.overwrite:
        raise UserError(f"output.dir {run_dir} already holds checkpoints of an earlier run: choose another "
                        f"output.dir, or set output.overwrite=true to replace them")
    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise UserError(f"output.dir {run_dir} is not writable ({err.strerror or err}): set output.dir to a "
                        f"folder you can write") from None
    for name in ("metrics.jsonl", "steps.jsonl"):
        (run_dir / name).unlink(missing_ok=True)  # overwrite=true: start the history afresh
    return run_dir


@dataclass
class RunState:
    """What fit carries from epoch to epoch (and into checkpoints)."""
    epoch: int = 0  # completed epochs
    global_step: int = 0
    best_val_acc: float = -1.0
    best_epoch: int = 0
    history: List[Dict[str, Any]] = field(default_factory=list)


def fit(cfg: Config, model: nn.Module, train_loader, val_loader, optimizer: torch.optim.Optimizer,
        schedule: Schedule, device: torch.device, run_dir: Path, logger) -> RunState:
    state = RunState()
    metrics = JsonLines(run_dir / "metrics.jsonl")
    steps = JsonLines(run_dir / "steps.jsonl")

    def log_step(step: int, epoch: int, loss: float, lr: float, ips: float) -> None:
        steps.write({"step": step, "epoch": epoch, "loss": loss, "lr": lr, "images_per_sec": ips})

    for epoch in range(state.epoch + 1, cfg.train.epochs + 1):
        train_loader.set_epoch(epoch - 1)
        stats = train_one_epoch(model, train_loader, optimizer, schedule, device, epoch=epoch,
                                global_step=state.global_step, max_batches=cfg.train.limit_train_batches,
                                grad_clip=cfg.train.grad_clip, log_every=cfg.train.log_every, log_step=log_step)
        evaluation = validate(model, val_loader, device)
        schedule.after_epoch(evaluation.loss)
        state.epoch, state.global_step = epoch, state.global_step + stats.steps
        is_best = evaluation.accuracy > state.best_val_acc
        if is_best:
            state.best_val_acc, state.best_epoch = evaluation.accuracy, epoch
        record = {"epoch": epoch, "step": state.global_step, "train_loss": stats.loss, "val_loss": evaluation.loss,
                  "val_acc": evaluation.accuracy, "val_correct": evaluation.correct, "val_total": evaluation.total,
                  "lr": stats.last_lr, "images_per_sec": stats.images_per_sec, "epoch_seconds": stats.seconds,
                  "is_best": is_best}
        state.history.append(record)
        metrics.write(record)
        logger.info(epoch_line(record, cfg.train.epochs))
        if cfg.output.save_checkpoints:
            ckpt = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": schedule.state_dict(), "epoch": epoch, "global_step": state.global_step,
                    "val_acc": evaluation.accuracy, "val_loss": evaluation.loss, "best_val_acc": state.best_val_acc,
                    "config": config_mod.to_dict(cfg), "history": state.history,
                    "versions": {"fasttrain": fasttrain.__version__, "torch": torch.__version__}}
            save_checkpoint(ckpt, run_dir / "checkpoints" / "last.pt")
            if is_best:
                save_checkpoint(ckpt, run_dir / "checkpoints" / "best.pt")
    return state


def train(cfg: Config) -> RunState:
    device = resolve_device(cfg.train.device)
    run_dir = prepare_run_dir(cfg)
    (run_dir / "config.yaml").write_text(config_mod.to_yaml(cfg))
    logger = setup_logging(run_dir)
    try:
        started = time.perf_counter()
        logger.info(f"fasttrain {fasttrain.__version__} | torch {torch.__version__} | python {platform.python_version()}"
                    f" | device {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
        logger.info(f"run folder {run_dir}")
        seed_everything(cfg.train.seed)
        train_loader, val_loader, info = build_loaders(cfg, device)
        logger.info(f"data {info.name}: {train_loader.num_samples:,} train / {val_loader.num_samples:,} test images "
                    f"of {info.in_channels}x{info.image_size}x{info.image_size}, {info.num_classes} classes | "
                    f"loader {cfg.data.loader}, batch {cfg.train.batch_size}, {cfg.data.num_workers} workers")
        model = build_model(cfg.model, info.in_channels, info.image_size, info.num_classes).to(device)
        logger.info(summarize(model, cfg.model.name))
        optimizer = build_optimizer(cfg.optim, model)
        steps_per_epoch = min(len(train_loader), cfg.train.limit_train_batches or len(train_loader))
        schedule = Schedule(cfg.sched, optimizer, cfg.train.epochs, steps_per_epoch)
        logger.info(f"optim {cfg.optim.name} lr {cfg.optim.lr:g} wd {cfg.optim.weight_decay:g} | sched {cfg.sched.name}"
                    f" ({'per batch' if schedule.per_batch else 'per epoch'}) | {cfg.train.epochs} epochs x "
                    f"{steps_per_epoch} steps")
        state = fit(cfg, model, train_loader, val_loader, optimizer, schedule, device, run_dir, logger)
        elapsed = time.perf_counter() - started
        logger.info(f"done: best val_acc {100 * state.best_val_acc:.2f}% at epoch {state.best_epoch} | "
                    f"{state.epoch} epochs in {elapsed:.1f}s | outputs in {run_dir} (config.yaml, metrics.jsonl, "
                    f"steps.jsonl, train.log, checkpoints/)")
        return state
    finally:
        close_logging()
