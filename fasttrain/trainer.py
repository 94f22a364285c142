"""Build a run from a Config and fit it: the tutorial's train_model, distributed and with a run folder.

`train(cfg)` joins the process group (world size 1 included), prepares the run folder (rank 0),
builds data, model, optimizer, schedule and the step (`fasttrain.step`: eager, with DDP where there
are other ranks, or the whole step captured), puts back the checkpoint it resumes from
(resume=auto|PATH), then `fit` runs epochs of train_one_epoch + validate, writes metrics,
and keeps `checkpoints/last.pt`, `checkpoints/best.pt` (by validation accuracy) and step
checkpoints (checkpoint.every_steps). A preemption signal, or train.stop_after_steps, stops the
run at a step boundary with a checkpoint it can resume from. Rank 0 alone prints and writes
files; every rank takes part in a checkpoint (each contributes its own random states).
"""

from __future__ import annotations

import dataclasses
import gc
import inspect
import json
import logging
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import fasttrain
from fasttrain import config as config_mod
from fasttrain import dist, environment
from fasttrain.checkpoint import restore_best
from fasttrain.checkpointing import (choose_on_rank0, restore_on_every_rank, save_epoch_checkpoints, save_step_checkpoint,
                                     trim_history)
from fasttrain.config import Config
from fasttrain.data import build_loaders, resolve_loader
from fasttrain.device import seed_everything
from fasttrain.engine import Boundaries, train_one_epoch, validate
from fasttrain.errors import UserError
from fasttrain.models import build_model, summarize
from fasttrain.flops import flops_per_image, peak_flops
from fasttrain.observe import (CsvRows, JsonLines, Progress, TensorBoard, attach_run_log, close_logging,
                               epoch_line, peak_memory_mb, setup_logging)
from fasttrain.optim import Schedule, build_optimizer
from fasttrain.plots import plot_run
from fasttrain.precision import Precision, build_precision
from fasttrain.preemption import (EXIT_INTERRUPTED, EXIT_PREEMPTED, INTERRUPT, PreemptionWatch, clear_marker,
                                  write_marker)
from fasttrain.resume import RunState
from fasttrain.run_folder import RunFolder
from fasttrain.step import WARMUP_STEPS, CapturedStep, EagerStep


def _claim_on_rank0(cfg: Config, ctx: dist.Dist) -> Optional[RunFolder]:
    """Rank 0 claims output.dir (fasttrain.run_folder); every rank learns whether that failed, and
    fails with it."""
    error: Optional[str] = None
    folder: Optional[RunFolder] = None
    if ctx.is_main:
        try:
            folder = RunFolder.claim(Path(cfg.output.dir), cfg.resume, cfg.output.overwrite)
        except UserError as err:
            error = str(err)
    dist.agree_on_error(error)
    return folder


def _commit_on_rank0(cfg: Config, ctx: dist.Dist, folder: Optional[RunFolder], state: Optional[RunState],
                     resume_from: Optional[Path], logger: logging.Logger) -> None:
    """The run is accepted (data, model and the checkpoint it continues from are in place): rank 0
    writes its config and environment, trims a resumed run's history to its checkpoint, puts back a
    best.pt that a stop between two checkpoint writes left behind, and starts train.log with the
    lines logged so far. Before this, nothing in the folder was changed."""
    error: Optional[str] = None
    if folder is not None:
        try:
            header = (f"# fasttrain {fasttrain.__version__} resolved config; world size {ctx.world_size}: "
                      f"train.batch_size is per process, global batch {cfg.train.batch_size * ctx.world_size}\n")
            env = environment.describe(ctx.device, ctx.world_size, ctx.backend)
            folder.commit(cfg.resume, cfg.output.overwrite, header + config_mod.to_yaml(cfg),
                          json.dumps(env, indent=2) + "\n")
            attach_run_log(folder.path)
            for warning in folder.warnings:
                logger.info(warning)
            if state is not None:
                trim_history(folder.path, state)
                clear_marker(folder.path)
            if resume_from is not None and resume_from.parent == folder.checkpoints:
                restore_best(folder.checkpoints, logger.info)
        except UserError as err:
            error = str(err)
    dist.agree_on_error(error)


@dataclass
class Parts:
    """What a run is built from. `model` is the plain module (checkpoints, weight digests);
    `step` runs one optimizer step on it (`fasttrain.step`: eager, with the model compiled and
    DDP-wrapped as configured, or captured); `eval_model` is what validation calls (compiled when
    compiling, never DDP: ranks may run different numbers of eval batches)."""
    model: nn.Module
    step: Any  # EagerStep | CapturedStep
    eval_model: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    precision: Precision
    train_loader: Any
    val_loader: Any
    flops_per_image: float = 0.0  # forward + backward, counted on the model
    peak_flops: Optional[float] = None  # the device's, for this precision; None when unknown
    steps_per_epoch: int = 0  # optimizer steps in a whole epoch (train.limit_train_batches applied)


EPOCH_COLUMNS = ["epoch", "step", "train_loss", "val_loss", "val_acc", "val_correct", "val_total", "lr",
                 "images_per_sec", "mfu", "epoch_seconds", "data_wait_seconds", "compute_seconds", "val_seconds",
                 "peak_memory_mb", "skipped_steps", "world_size", "is_best", "compiled_graphs", "cudagraph_skips"]


def fit(cfg: Config, ctx: dist.Dist, parts: Parts, run_dir: Path, logger: logging.Logger,
        state: Optional[RunState] = None) -> RunState:
    """Train the remaining epochs. Returns the final state; `stopped_by` says when it stopped early
    (a signal's name, or "stop_after_steps"), `last_checkpoint` what it wrote last."""
    state = state or RunState()
    metrics = JsonLines(run_dir / "metrics.jsonl")
    steps = JsonLines(run_dir / "steps.jsonl")
    compiling = cfg.train.compile != "off"
    saving = cfg.output.save_checkpoints

    table = CsvRows(run_dir / "metrics.csv", EPOCH_COLUMNS, state.history) if ctx.is_main else None
    board = TensorBoard(run_dir / "tensorboard") if cfg.output.tensorboard and ctx.is_main else None
    progress = Progress(enabled=ctx.is_main, log=logger.info)
    steps_per_epoch = parts.steps_per_epoch
    watch = PreemptionWatch(cfg.checkpoint.signals, cfg.checkpoint.signal_check_every, ctx.backend,
                            graceful_interrupt=True, announce=_console if ctx.is_main else lambda _line: None)
    # compiled steps are timed apart: the first (eager compiled), or the warm-up and capture (captured)
    compile_steps = (WARMUP_STEPS + 1) if cfg.train.capture else (1 if compiling else 0)

    def mfu(images_per_sec: float) -> Optional[float]:
        if not parts.peak_flops:
            return None
        return images_per_sec * parts.flops_per_image / (parts.peak_flops * ctx.world_size)

    def log_step(step: int, epoch: int, loss: float, lr: float, ips: float) -> None:
        interval = {"step": step, "epoch": epoch, "loss": loss, "lr": lr, "images_per_sec": ips, "mfu": mfu(ips)}
        steps.write(interval)
        progress.interval(step, loss, lr, ips)
        if board is not None:
            board.scalars("step", interval, step)

    def at_boundary(global_step: int, step_in_epoch: int, totals, signal_name: Optional[str]) -> bool:
        """Every rank, at the same boundaries (see engine.Boundaries): periodic checkpoints, and the
        agreed stops (preemption, stop_after_steps)."""
        stop = signal_name or ("stop_after_steps" if global_step == cfg.train.stop_after_steps else None)
        periodic = cfg.checkpoint.every_steps and global_step % cfg.checkpoint.every_steps == 0
        # the epoch's last step is followed by the epoch-end checkpoint (last.pt): no step file for it
        if saving and (stop or periodic) and step_in_epoch < steps_per_epoch:
            here = dataclasses.replace(state, global_step=global_step, step_in_epoch=step_in_epoch)
            state.last_checkpoint = save_step_checkpoint(cfg, ctx, parts, here, totals(), run_dir)
        if stop:
            state.stopped_by = stop
        return bool(stop)

    boundaries = Boundaries(log_every=cfg.train.log_every, every=cfg.checkpoint.every_steps,
                            stop_at=cfg.train.stop_after_steps, signal_every=cfg.checkpoint.signal_check_every,
                            at_boundary=at_boundary, signal_flag=watch.flag, signal_agreed=watch.agreed_elsewhere,
                            agree_on_signal=watch.agreed)

    try:
        # a signal that came while the run was being built (recorded since the entry point's first line):
        # the ranks agree on it once, and stop before the first step (nothing new to save)
        before_start = dist.all_reduce_sum_tensor(torch.tensor([watch.flag()], dtype=torch.float64,
                                                               device=ctx.device)).item()  # host sync, once
        if before_start > 0:
            state.stopped_by = watch.agreed_elsewhere(before_start)
            return state
        if cfg.train.stop_after_steps and state.global_step >= cfg.train.stop_after_steps:
            state.stopped_by = "stop_after_steps"  # nothing left to do before the requested stop
            return state
        first_epoch = state.epoch + 1
        for epoch in range(first_epoch, cfg.train.epochs + 1):
            start_step, carried = state.step_in_epoch, state.carried
            parts.train_loader.set_epoch(epoch - 1, state.start_sample)
            state.step_in_epoch, state.carried, state.start_sample = 0, None, 0
            if ctx.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(ctx.device)
            progress.start_epoch(epoch, cfg.train.epochs, steps_per_epoch, done=start_step)
            parts.model.train()
            stats = train_one_epoch(parts.step, parts.train_loader, parts.schedule, ctx.device, epoch=epoch,
                                    global_step=state.global_step, boundaries=boundaries,
                                    max_batches=cfg.train.limit_train_batches,
                                    log_step=log_step if ctx.is_main else None,
                                    time_first_steps=compile_steps if epoch == first_epoch else 0,
                                    tick=progress.tick if ctx.is_main else None, start_step=start_step,
                                    carried=carried)
            progress.end_epoch()
            state.global_step += stats.timed_steps
            if stats.stopped_early and stats.steps < steps_per_epoch:
                state.step_in_epoch = stats.steps
                return state  # stopped mid-epoch: the step checkpoint holds everything
            if stats.first_step_seconds:
                what = (f"the first {stats.first_steps} training steps (compilation, warm-up"
                        + (" and CUDA graph capture)" if ctx.device.type == "cuda" else ")")
                        if stats.first_steps > 1 else "the first training step (compilation included)")
                logger.info(f"compile: {what} took {stats.first_step_seconds:.1f}s; epoch {epoch} images/s leave "
                            f"{'them' if stats.first_steps > 1 else 'it'} out")
            dist.average_buffers(parts.model)  # the same BN statistics on every rank, before evaluating and saving
            val_start = time.perf_counter()
            evaluation = validate(parts.eval_model, parts.val_loader, parts.precision)
            val_seconds = time.perf_counter() - val_start  # validate ended with a host sync
            parts.schedule.after_epoch(evaluation.loss)
            state.epoch = epoch
            is_best = evaluation.accuracy > state.best_val_acc
            if is_best:
                state.best_val_acc, state.best_epoch = evaluation.accuracy, epoch
            record = {"epoch": epoch, "step": state.global_step, "train_loss": stats.loss,
                      "val_loss": evaluation.loss, "val_acc": evaluation.accuracy, "val_correct": evaluation.correct,
                      "val_total": evaluation.total, "lr": stats.last_lr, "images_per_sec": stats.images_per_sec,
                      "mfu": mfu(stats.images_per_sec), "epoch_seconds": stats.seconds,
                      "data_wait_seconds": stats.data_wait_seconds,
                      "compute_seconds": stats.seconds - stats.data_wait_seconds, "val_seconds": val_seconds,
                      "peak_memory_mb": peak_memory_mb(ctx.device), "skipped_steps": stats.skipped_steps,
                      "world_size": ctx.world_size, "is_best": is_best}
            if compiling:
                record["compiled_graphs"] = compiled_graph_count()
                record["cudagraph_skips"] = cudagraph_skip_count()
                if record["cudagraph_skips"] and ctx.is_main and epoch == first_epoch:
                    logger.info(f"warning: torch.compile skipped CUDA graphs {record['cudagraph_skips']} time(s) "
                                f"(its reasons are in the 'skipping cudagraphs due to' lines above; BatchNorm under "
                                f"DDP is a known one, pytorch#139207): train.capture=true records the whole step "
                                f"as one graph instead")
            state.history.append(record)
            if ctx.is_main:
                metrics.write(record)
                table.write(record)
                if board is not None:
                    board.scalars("epoch", record, epoch)
                logger.info(epoch_line(record, cfg.train.epochs))
            if saving:
                state.last_checkpoint = save_epoch_checkpoints(cfg, ctx, parts, state, evaluation.accuracy,
                                                             evaluation.loss, is_best, run_dir)
            if stats.signal_at_end and not stats.stopped_early:
                state.stopped_by = stats.signal_at_end  # agreed in the epoch-end reduction
            if stats.stopped_early or stats.signal_at_end:
                if epoch == cfg.train.epochs:
                    state.stopped_by = None  # the stop came with the last step: the run is complete
                return state  # stopped at the epoch's last step: the epoch-end checkpoint holds everything
    finally:
        watch.close()
        if board is not None:
            board.close()
    return state


def compiled_graph_count() -> int:
    """Graphs torch.compile has produced so far in this process: flat after epoch 1 = no recompiles."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def cudagraph_skip_count() -> int:
    """Times torch.compile's CUDA graphs (mode reduce-overhead) were skipped in this process: each
    such skip also logs "skipping cudagraphs due to <reason>". Zero on the CPU, and under
    train.capture=true, which records its own graph (a failed capture raises)."""
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["cudagraph_skips"])


def _silent_logger() -> logging.Logger:
    logger = logging.getLogger("fasttrain.nonzero_rank")
    logger.handlers = [logging.NullHandler()]
    logger.propagate = False
    return logger


def build_parts(cfg: Config, ctx: dist.Dist, logger: logging.Logger) -> Parts:
    device = ctx.device
    precision = build_precision(cfg.train.precision, device, cfg.train.tf32, cfg.train.deterministic)
    seed_everything(cfg.train.seed)  # same seed on every rank: identical initial weights
    train_loader, val_loader, info = build_loaders(cfg, device, ctx.rank, ctx.world_size, precision.input_dtype)
    skipped = train_loader.num_samples - train_loader.batches.used_samples
    logger.info(f"data {info.name}: {train_loader.num_samples:,} train / {val_loader.num_samples:,} test images of "
                f"{info.in_channels}x{info.image_size}x{info.image_size}, {info.num_classes} classes | loader "
                f"{cfg.data.loader}" + (f", {train_loader.num_workers} workers" if cfg.data.loader == "plain" else "")
                + f" | batch {cfg.train.batch_size} per process x {ctx.world_size} = "
                f"{cfg.train.batch_size * ctx.world_size} per step"
                + (f" | {skipped} images per epoch left out (drop_last, or fewer than one per rank)" if skipped else ""))
    model = build_model(cfg.model, info.in_channels, info.image_size, info.num_classes).to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    logger.info(summarize(model, cfg.model.name))
    compile_mode = None if cfg.train.compile == "default" else cfg.train.compile
    # train batches have one shape (drop_last), so the compiled model does not recompile per epoch
    eval_model: nn.Module = torch.compile(model, mode=compile_mode) if cfg.train.compile != "off" else model
    torch.manual_seed(cfg.train.seed + ctx.rank)  # per-rank streams for dropout; data randomness is seeded apart
    optimizer = build_optimizer(cfg.optim, model, device, capture=cfg.train.capture)
    step: Any
    if cfg.train.capture:
        step = CapturedStep(model, optimizer, precision, cfg.train.grad_clip, compile_mode, ctx.world_size)
    else:
        train_model = eval_model
        if ctx.world_size > 1:
            # only where there are gradients to average: world size 1 pays nothing for a wrapper
            train_model = wrap_ddp(train_model, model, device, cfg.train.compile != "off")
        step = EagerStep(train_model, optimizer, precision, cfg.train.grad_clip)
    steps_per_epoch = min(len(train_loader), cfg.train.limit_train_batches or len(train_loader))
    schedule = Schedule(cfg.sched, optimizer, cfg.train.epochs, steps_per_epoch)
    logger.info(f"optim {cfg.optim.name} lr {cfg.optim.lr:g} wd {cfg.optim.weight_decay:g} | sched {cfg.sched.name} "
                f"({'per batch' if schedule.per_batch else 'per epoch'}) | {cfg.train.epochs} epochs x "
                f"{steps_per_epoch} steps")
    logger.info(f"speed: precision {cfg.train.precision}, channels_last {str(cfg.train.channels_last).lower()}, "
                f"compile {cfg.train.compile}, capture {str(cfg.train.capture).lower()}"
                + (", deterministic algorithms" if cfg.train.deterministic else "")
                + (" (whole step as one CUDA graph)" if cfg.train.capture and device.type == "cuda" else
                   " (whole step compiled)" if cfg.train.capture else "")
                + (f", tf32 {str(cfg.train.tf32).lower()}" if device.type == "cuda" else "")
                + (f" | DDP over {ctx.world_size} ranks" if ctx.world_size > 1 and not cfg.train.capture else ""))
    flops = flops_per_image(model, (info.in_channels, info.image_size, info.image_size))
    peak = peak_flops(device, cfg.train.precision, cfg.train.tf32, cfg.train.peak_tflops or None)
    logger.info(f"model cost: {flops / 1e6:,.1f} MFLOP per image (forward + backward); MFU "
                + (f"against {peak / 1e12:,.1f} TFLOP/s per device" if peak else "not reported (peak FLOP/s of "
                   "this device unknown: set train.peak_tflops)"))
    return Parts(model, step, eval_model, optimizer, schedule, precision, train_loader, val_loader, flops, peak,
                 steps_per_epoch)


DDP_BUCKET_MB = 25  # DDP's default bucket_cap_mb


def wrap_ddp(train_model: nn.Module, model: nn.Module, device: torch.device, compiled: bool) -> nn.Module:
    """DDP without per-forward buffer broadcasts (BatchNorm buffers are averaged at every epoch's
    end), with gradients as views of its buckets (no copy in or out per step).

    Compiled models: `torch._dynamo.config.optimize_ddp` splits the graph at bucket boundaries so
    that an all-reduce can overlap the rest of the backward. When all gradients fit in one bucket
    there is nothing to overlap and the split only adds graphs (CIFAR10_CNN: 2 forward + 2 backward
    instead of 1 + 1) and launches; measured on 2 gloo ranks (benchmarks/ddp_graphs.py,
    benchmarks/RESULTS.md), one graph was as fast or faster. So: off for models whose gradients
    fit in one bucket, PyTorch's default (on) for larger ones."""
    if compiled:
        grad_mb = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad) / 2**20
        torch._dynamo.config.optimize_ddp = grad_mb > DDP_BUCKET_MB
    kwargs: dict = {"gradient_as_bucket_view": True}
    if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters:
        kwargs["forward_sync_buffers"] = False  # torch >= 2.14's name (it still syncs once, at construction)
    else:
        kwargs["broadcast_buffers"] = False
    return DDP(train_model, device_ids=[device.index] if device.type == "cuda" else None, **kwargs)


def _run(cfg: Config, ctx: dist.Dist) -> RunState:
    if cfg.train.compile != "off" and not cfg.data.drop_last:
        cfg.data.drop_last = True  # one training batch shape: no recompilation (or re-capture) per epoch
        drop_note = "compile: data.drop_last set to true so that every training batch has the same shape"
    else:
        drop_note = ""
    loader, loader_reason = resolve_loader(cfg, ctx.device)
    if cfg.data.loader == "auto":
        cfg.data.loader = loader  # the resolved config records what ran
    folder = _claim_on_rank0(cfg, ctx)
    committed = False
    try:
        logger = setup_logging(None, hold=True) if ctx.is_main else _silent_logger()
        parts, state, resume_from = _build(cfg, ctx, logger, drop_note, loader, loader_reason)
        _commit_on_rank0(cfg, ctx, folder, state, resume_from, logger)
        committed = True
        try:
            return _train_and_finish(cfg, ctx, parts, state, logger)
        except Exception as err:
            # the run folder's log keeps why the run ended (the console gets the one line from run.main)
            logger.info(f"error: {err}" if isinstance(err, UserError) else f"error: {type(err).__name__}: {err}")
            raise
    finally:
        if folder is not None:
            folder.release() if committed else folder.abandon()


def _build(cfg: Config, ctx: dist.Dist, logger: logging.Logger, drop_note: str, loader: str,
           loader_reason: str) -> tuple:
    """Everything a run needs before it may change its folder: (parts, restored state or None, the
    checkpoint it continues from or None)."""
    run_dir = Path(cfg.output.dir)
    device = ctx.device
    logger.info(f"fasttrain {fasttrain.__version__} | torch {torch.__version__} | python {platform.python_version()}"
                f" | device {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    logger.info(f"distributed: world size {ctx.world_size}, backend {ctx.backend} | run folder {run_dir}")
    if drop_note:
        logger.info(drop_note)
    if loader_reason != "as configured":
        logger.info(f"data.loader=auto chose {loader}: {loader_reason}")
    resume_from = choose_on_rank0(cfg, ctx, run_dir, logger)
    parts = build_parts(cfg, ctx, logger)
    state = restore_on_every_rank(cfg, ctx, parts, resume_from, logger) if resume_from else None
    if resume_from is None and cfg.resume == "auto":
        logger.info(f"resume=auto: no checkpoint in {run_dir / 'checkpoints'} yet: starting fresh")
    return parts, state, resume_from


def _train_and_finish(cfg: Config, ctx: dist.Dist, parts: Parts, state: Optional[RunState],
                      logger: logging.Logger) -> RunState:
    run_dir = Path(cfg.output.dir)
    started = time.perf_counter()
    state = fit(cfg, ctx, parts, run_dir, logger, state)
    if state.stopped_by:
        return _report_stop(cfg, ctx, state, run_dir, logger)
    in_sync, digests = dist.digests_match(parts.model)
    if not in_sync:
        raise RuntimeError(f"weights differ across ranks at the end of training (sha256 per rank: {digests})")
    logger.info(f"weights identical on all {ctx.world_size} rank(s) (sha256 {digests[0][:16]})")
    plotted = ""
    if ctx.is_main:
        try:
            plotted = ", " + ", ".join(p.name for p in plot_run(run_dir))
        except Exception as err:  # a plot must never cost a finished run
            logger.info(f"warning: plots not written ({type(err).__name__}: {err}); try `fasttrain plot {run_dir}`")
    elapsed = time.perf_counter() - started
    logger.info(f"done: best val_acc {100 * state.best_val_acc:.2f}% at epoch {state.best_epoch} | {state.epoch} "
                f"epochs in {elapsed:.1f}s | outputs in {run_dir} (config.yaml, env.json, metrics.jsonl, metrics.csv, "
                f"steps.jsonl, train.log{plotted}, " + ("tensorboard/, " if cfg.output.tensorboard else "")
                + "checkpoints/)")
    return state


def _report_stop(cfg: Config, ctx: dist.Dist, state: RunState, run_dir: Path, logger: logging.Logger) -> RunState:
    """A stop before the last epoch: say where the run can be continued from (and, when preempted,
    leave the marker a job script requeues on; a Ctrl-C is the user's stop: no marker)."""
    if not cfg.output.save_checkpoints:
        saved = "no checkpoint (output.save_checkpoints=false)"
    elif state.last_checkpoint:
        saved = f"checkpoint {state.last_checkpoint}"
    else:
        saved = "nothing new to save (stopped before its first step)"
    resume = f"continue with resume=auto output.dir={run_dir}"
    if state.stopped_by == "stop_after_steps":
        logger.info(f"stopped after step {state.global_step} as train.stop_after_steps asks; {saved}; {resume}")
        return state
    if state.stopped_by == INTERRUPT:
        logger.info(f"interrupted (Ctrl-C): every rank stopped after step {state.global_step}; {saved}; exiting "
                    f"with code {EXIT_INTERRUPTED}; {resume}")
        return state
    if ctx.is_main:
        write_marker(run_dir, state.stopped_by or "", state.global_step, state.last_checkpoint)
    logger.info(f"preempted ({state.stopped_by}): every rank stopped after step {state.global_step}; {saved}; "
                f"exiting with code {EXIT_PREEMPTED} so that a job script can requeue; {resume}")
    return state


def _console(line: str) -> None:
    """One line on stderr, from a signal handler (no logging locks)."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def use_deterministic_algorithms(on: bool) -> None:
    """train.deterministic: kernels that give the same bits every run, or an error naming the op that
    has none. cuBLAS needs its workspace fixed before its first call (so: before anything runs)."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(on)


def train(cfg: Config) -> RunState:
    """Join the process group, train, and leave it on every exit path."""
    use_deterministic_algorithms(cfg.train.deterministic)
    ctx = dist.setup(cfg.train.device, cfg.dist.backend, cfg.dist.timeout_s, cfg.train.precision, cfg.train.compile)
    try:
        return _run(cfg, ctx)
    finally:
        close_logging()
        gc.collect()  # loaders and the DDP wrapper in reference cycles end now (DataLoader workers, gloo handles)
        dist.teardown()
