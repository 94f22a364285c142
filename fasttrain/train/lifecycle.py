"""A run's lifecycle, from a Config to its last line: the tutorial's train_model, distributed and with a
run folder.

`train(cfg)` joins the process group (world size 1 included), resolves what the run derives from the
config and the machine, claims the run folder (rank 0), builds data, model, optimizer, schedule and the
step (fasttrain.train.build), puts back the checkpoint it resumes from (resume=auto|PATH), commits the
run folder, then hands the epochs to a `TrainingSession` (fasttrain.train.session), which keeps
`checkpoints/last.pt`, `checkpoints/best.pt` (by validation accuracy) and step checkpoints. A preemption
signal, or train.stop_after_steps, stops the run at a step boundary with a checkpoint it can resume
from; `_report_stop` says where it can be continued from. Rank 0 alone prints and writes files; every
rank takes part in a checkpoint (each contributes its own random states).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

import fasttrain
from fasttrain import config as config_mod
from fasttrain import dist
from fasttrain.checkpoint import (RunFolder, RunState, choose_on_rank0, restore_best, restore_on_every_rank,
                                  trim_history)
from fasttrain.config import Config, LoaderName
from fasttrain.data import resolve_loader
from fasttrain.dist import preemption
from fasttrain.dist.preemption import EXIT_INTERRUPTED, EXIT_PREEMPTED, INTERRUPT, clear_marker, write_marker
from fasttrain.errors import UserError, folder_write_failed
from fasttrain.models.imported import check_importable
from fasttrain.observe import environment, timing
from fasttrain.observe.logs import attach_run_log, close_logging, run_log_failure, setup_logging, silent_logger
from fasttrain.observe.plots import plot_run, plot_time_split
from fasttrain.train.build import Parts, build_parts
from fasttrain.train.compile_cache import cache_counts, compile_cache
from fasttrain.train.session import TrainingSession


def _claim_on_rank0(cfg: Config, ctx: dist.Dist) -> Optional[RunFolder]:
    """Rank 0 claims output.dir (fasttrain.checkpoint.run_folder); every rank learns whether that failed, and
    fails with it."""
    error: Optional[str] = None
    folder: Optional[RunFolder] = None
    if ctx.is_main:
        try:
            folder = RunFolder.claim(Path(cfg.output.dir), cfg.resume, cfg.output.overwrite)
        except Exception as err:  # any failure: the other ranks are waiting in the agreement below
            error = dist.failure_message(err, f"claiming the run folder {cfg.output.dir}", ctx.rank)
    dist.agree_on_error(error)
    return folder


def _commit_on_rank0(cfg: Config, ctx: dist.Dist, folder: Optional[RunFolder], state: Optional[RunState],
                     resume_from: Optional[Path], model: torch.nn.Module, logger: logging.Logger) -> None:
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
            env["model"] = {"name": cfg.model.name, "parameters": sum(p.numel() for p in model.parameters()),
                            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}
            if state is not None and resume_from is not None:
                # where this start continued from, as a value (the log says it in words)
                env["resumed_from"] = {"checkpoint": str(resume_from), "epoch": state.epoch,
                                       "global_step": state.global_step, "step_in_epoch": state.step_in_epoch,
                                       "start_sample": state.start_sample}
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
        except Exception as err:  # any failure: the other ranks are waiting in the agreement below
            error = dist.failure_message(err, f"writing the run folder {folder.path} (config.yaml, env.json, train.log"
                                              f"{', the records trimmed to the checkpoint' if state else ''})", ctx.rank)
    dist.agree_on_error(error)


def resolve(cfg: Config, ctx: dist.Dist) -> Tuple[Config, List[str]]:
    """The config this run trains with: `cfg` (left as validated) with what the run derives from it and
    the machine: data.drop_last under compile (one training batch shape: no recompilation or re-capture
    per epoch) and the loader that data.loader=auto picks. Returns it with one note per derived value;
    the run folder's config.yaml records the resolved config."""
    notes: List[str] = []
    data = cfg.data
    if cfg.train.compile != "off" and not data.drop_last:
        data = dataclasses.replace(data, drop_last=True)
        notes.append("compile: data.drop_last set to true so that every training batch has the same shape")
    if data.loader == "auto":
        loader, reason = _auto_loader_on_rank0(cfg, ctx)
        data = dataclasses.replace(data, loader=LoaderName(loader))
        shared = f" (rank 0's choice, used by all {ctx.world_size} ranks)" if ctx.world_size > 1 else ""
        notes.append(f"data.loader=auto chose {loader}{shared}: {reason}")
    return (cfg if data is cfg.data else dataclasses.replace(cfg, data=data)), notes


def _auto_loader_on_rank0(cfg: Config, ctx: dist.Dist) -> Tuple[str, str]:
    """data.loader=auto decided once, by rank 0, and used by every rank. Each rank deciding for itself (from
    its own free memory) could pick loaders that disagree: different epochs, or a DALI pipeline on one
    rank only."""
    choice: List[Optional[str]] = [None, None]
    error: Optional[str] = None
    if ctx.is_main:
        try:
            choice = list(resolve_loader(cfg, ctx.device))
        except Exception as err:  # any failure: the other ranks are waiting in the agreement below
            error = dist.failure_message(err, "choosing the loader for data.loader=auto", ctx.rank)
    dist.agree_on_error(error)
    dist.broadcast_object(choice)
    return choice[0], choice[1]


def _run(cfg: Config, ctx: dist.Dist, model: Optional[torch.nn.Module] = None) -> Tuple[RunState, Callable[[], None]]:
    """The run, and what ends it once the process group is gone (`_finish`: the time split's line and record,
    then the folder's lock released). On an error the folder is released (or abandoned) here."""
    if model is None:
        check_importable(cfg.model.name)  # before the data: a wrong import path costs no decoding
    cfg, notes = resolve(cfg, ctx)
    folder = _claim_on_rank0(cfg, ctx)
    committed = finished = False
    parts: Optional[Parts] = None
    clock = timing.clock()
    try:
        logger = setup_logging(None, hold=True) if ctx.is_main else silent_logger()
        resume_from = _announce_and_choose(cfg, ctx, logger, notes)
        clock.startup_done("setup")
        with compile_cache(cfg.train.compile_cache, enabled=cfg.train.compile != "off") as cache_said:
            if cfg.train.compile != "off":
                logger.info(f"compile cache: {cache_said}")
            parts = build_parts(cfg, ctx, logger, model)
            state = restore_on_every_rank(cfg, ctx, parts, resume_from, logger) if resume_from else None
            # accepted: data, model and the checkpoint it continues from are in place
            _commit_on_rank0(cfg, ctx, folder, state, resume_from, parts.model, logger)
            committed = True
            clock.startup_done("restore")
            try:
                state = _train_and_finish(cfg, ctx, parts, state, logger)
                finished = True
                return state, lambda: _finish(cfg, folder, logger, clock)
            except Exception as err:
                # the run folder's log keeps why the run ended (the console gets the one line from run.main)
                logger.info(f"error: {err}" if isinstance(err, UserError) else f"error: {type(err).__name__}: {err}")
                raise
    finally:
        if parts is not None:  # worker processes end here, in order, not whenever a collection finds them
            parts.train_loader.close()
            parts.val_loader.close()
        if folder is not None and not finished:
            folder.release() if committed else folder.abandon()


def _announce_and_choose(cfg: Config, ctx: dist.Dist, logger: logging.Logger, notes: List[str]) -> Optional[Path]:
    """The run's header lines, then the checkpoint it continues from (None: it starts fresh). Nothing
    in the run folder changes before the run is accepted."""
    run_dir = Path(cfg.output.dir)
    device = ctx.device
    logger.info(f"fasttrain {fasttrain.__version__} | torch {torch.__version__} | python {platform.python_version()}"
                f" | device {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    logger.info(f"distributed: world size {ctx.world_size}, backend {ctx.backend} | run folder {run_dir}")
    for note in notes:
        logger.info(note)
    resume_from = choose_on_rank0(cfg, ctx, run_dir, logger)
    if resume_from is None and cfg.resume == "auto":
        logger.info(f"resume=auto: no checkpoint in {run_dir / 'checkpoints'} yet: starting fresh")
    return resume_from


def _finish(cfg: Config, folder: Optional[RunFolder], logger: logging.Logger, clock: timing.TimeSplit) -> None:
    """The run's last line, once its process group is gone: where its wall time went; rank 0 also records
    it in env.json and draws time.png (drawn from the split before its own drawing: the line and env.json
    count that too), then releases the run folder."""
    try:
        if folder is not None:
            try:
                folder.record_env("time_split", _time_split(cfg, clock))
                if cfg.output.plots:
                    plot_time_split(folder.path)
            except UserError as err:  # a record lost, not the finished run
                logger.info(f"warning: {err}: the time split is in train.log only")
            except Exception as err:  # a plot must never cost a finished run
                logger.info(f"warning: time.png not written ({type(err).__name__}: {err}); try `fasttrain plot "
                            f"{folder.path}`")
        summary = _time_split(cfg, clock)
        if folder is not None:
            try:
                folder.record_env("time_split", summary)
            except UserError:
                pass  # said above
        logged = run_log_failure()
        if logged is not None:  # after the ranks' last agreement (a complete run): said, not an error
            logger.info(f"warning: {logged[0] / 'train.log'} could not be written ({logged[1].strerror or logged[1]}): "
                        f"its last lines are missing")
        late = preemption.signal_after_end()
        if late:
            logger.info(preemption.after_end_line(late))
        logger.info(timing.describe(summary))
    finally:
        if folder is not None:
            folder.release()


def _time_split(cfg: Config, clock: timing.TimeSplit) -> Dict[str, Any]:
    summary = clock.summary()
    if cfg.train.compile != "off":
        summary["compile_cache"] = cache_counts()
    return summary


def _train_and_finish(cfg: Config, ctx: dist.Dist, parts: Parts, state: Optional[RunState],
                      logger: logging.Logger) -> RunState:
    run_dir = Path(cfg.output.dir)
    started = time.perf_counter()
    state = TrainingSession(cfg, ctx, parts, run_dir, logger, state).fit()
    timing.clock().switch("end")
    if state.stopped_by:
        return _report_stop(cfg, ctx, state, run_dir, logger)
    in_sync, digests = dist.digests_match(parts.model)
    if not in_sync:
        raise RuntimeError(f"weights differ across ranks at the end of training (sha256 per rank: {digests})")
    logger.info(f"final weights: sha256 {digests[0][:16]}" + (f", identical on all {ctx.world_size} ranks"
                                                             if ctx.world_size > 1 else ""))
    plotted = ""
    if ctx.is_main and cfg.output.plots:
        try:
            plotted = ", " + ", ".join(p.name for p in plot_run(run_dir, time_split=False)) + ", time.png"
        except Exception as err:  # a plot must never cost a finished run
            logger.info(f"warning: plots not written ({type(err).__name__}: {err}); try `fasttrain plot {run_dir}`")
    elapsed = time.perf_counter() - started
    target = (f" | train.target_acc {100 * cfg.train.target_acc:.2f}% reached in {timing.clock().target['seconds']:.1f}s, "
              f"{timing.clock().target['steps']} steps" if state.finished_by and timing.clock().target else "")
    # a fractional train.epochs counts its last, short epoch as the fraction it is
    done = cfg.train.epochs if state.epoch == cfg.train.epoch_count() else state.epoch
    logger.info(f"done: best val_acc {100 * state.best_val_acc:.2f}% at epoch {state.best_epoch} | {done:g} "
                f"epoch{'' if done == 1 else 's'} in {elapsed:.1f}s{target} | outputs in {run_dir} (config.yaml, env.json, metrics.jsonl, "
                f"metrics.csv, steps.jsonl, train.log{plotted}, " + ("tensorboard/, " if cfg.output.tensorboard else "")
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
    error: Optional[str] = None
    if ctx.is_main:
        try:
            write_marker(run_dir, state.stopped_by or "", state.global_step, state.last_checkpoint)
        except OSError as err:  # no marker: a job script would not requeue; every rank stops with the line
            error = str(folder_write_failed(run_dir, "preempted.json", err))
    dist.agree_on_error(error)
    logger.info(f"preempted ({state.stopped_by}): every rank stopped after step {state.global_step}; {saved}; "
                f"exiting with code {EXIT_PREEMPTED} so that a job script can requeue; {resume}")
    return state


def use_deterministic_algorithms(on: bool) -> None:
    """train.deterministic: kernels that give the same bits every run, or an error naming the op that
    has none. cuBLAS needs its workspace fixed before its first call (so: before anything runs)."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # only on a change: setting the current value again still imports torch._inductor and torch._dynamo (a
    # second on a 2-core machine; torch's optimizers import dynamo later anyway, so a run saves little)
    if on != torch.are_deterministic_algorithms_enabled():
        torch.use_deterministic_algorithms(on)


def train(cfg: Config, model: Optional[torch.nn.Module] = None) -> RunState:
    """Join the process group, train, and leave it on every exit path. `model`: a module built by the
    caller (fasttrain.fit) to train in place of the config's, which cfg.model.name names."""
    use_deterministic_algorithms(cfg.train.deterministic)
    ctx = dist.setup(cfg.train.device, cfg.dist.backend, cfg.dist.timeout_s, cfg.train.precision, cfg.train.compile,
                     stop_requested=preemption.held_signal)
    timing.clock().startup_done("setup")
    finish: Optional[Callable[[], None]] = None
    try:
        state, finish = _run(cfg, ctx, model)
        return state
    finally:
        try:
            gc.collect()  # loaders and the DDP wrapper in reference cycles end now (DataLoader workers, gloo handles)
            dist.teardown()
            if finish is not None:
                finish()  # the time split's line is the run's last, counting all of the above
        finally:
            close_logging()
