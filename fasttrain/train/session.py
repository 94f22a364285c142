"""A training session: one run's parts and the order of events, from its first epoch to its last.

`TrainingSession.fit()` runs the remaining epochs of steps (fasttrain.train.loop), validates, records
each epoch, writes the checkpoints, and calls its callbacks around the steps (preemption, planned stops,
periodic checkpoints, metric sinks, progress). Everything before (joining the ranks, the run folder,
building the parts, the checkpoint it resumes from) and after (the report, the time split) is the run's
lifecycle, fasttrain.train.lifecycle.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from fasttrain import dist
from fasttrain.checkpoint import (CheckpointWriter, RunState, finish_writes, save_epoch_checkpoints,
                                  save_step_checkpoint)
from fasttrain.config import Config
from fasttrain.dist.preemption import PreemptionWatch
from fasttrain.errors import UserError, folder_write_failed
from fasttrain.observe import timing
from fasttrain.observe.logs import run_log_failure
from fasttrain.observe.metrics import peak_memory_mb
from fasttrain.train.build import Parts
from fasttrain.train.callbacks import (Boundary, Callback, Interval, MetricSinks, PeriodicCheckpoints, Preemption,
                                       ProgressDisplay, StopAfterSteps)
from fasttrain.train.compile_cache import cache_counts, compiled_graph_count, cudagraph_skip_count
from fasttrain.train.loop import Boundaries, EpochPlan, EpochStats, train_one_epoch
from fasttrain.train.step import WARMUP_STEPS
from fasttrain.train.validation import EvalStats

EPOCH_COLUMNS = ["epoch", "step", "train_loss", "val_loss", "val_acc", "val_correct", "val_total", "lr",
                 "images_per_sec", "mfu", "epoch_seconds", "data_wait_seconds", "compute_seconds", "val_seconds",
                 "checkpoint_seconds", "peak_memory_mb", "skipped_steps", "world_size", "is_best", "compiled_graphs",
                 "cudagraph_skips", "time_to_target_seconds", "steps_to_target"]
TARGET_REACHED = "target_acc"  # RunState.finished_by: train.target_acc was reached (a complete run, exit 0)


class TrainingSession:
    """Owns a run's parts and the order of events: epochs of steps (`fasttrain.train.loop`), validation
    (`fasttrain.train.validation`, every train.eval_every epochs and at the last), the epoch's record,
    checkpoints (every checkpoint.every_epochs epochs and at the last, written in the background). What
    happens around the steps is in its callbacks (`fasttrain.train.callbacks`: preemption, planned stops,
    periodic checkpoints, metric sinks, progress). The run's clock (`fasttrain.observe.timing`) is switched
    at each of these phases.

    `fit()` trains the remaining epochs and returns the final state; `state.stopped_by` says when
    it stopped early (a signal's name, preemption.INTERRUPT, "stop_after_steps"), `state.finished_by`
    when it finished before its last epoch because train.target_acc was reached, and
    `state.last_checkpoint` what it wrote last. Every rank runs the same calls in the same order;
    rank 0's callbacks also write files and print."""

    def __init__(self, cfg: Config, ctx: dist.Dist, parts: Parts, run_dir: Path, logger: logging.Logger,
                 state: Optional[RunState] = None):
        self.cfg, self.ctx, self.parts, self.run_dir, self.logger = cfg, ctx, parts, run_dir, logger
        self.state = state or RunState()
        self.clock = timing.clock()
        self.writer = CheckpointWriter()
        watch = PreemptionWatch(cfg.checkpoint.signals, cfg.checkpoint.signal_check_every, ctx.backend,
                                graceful_interrupt=True, announce=_console if ctx.is_main else lambda _line: None)
        self.preemption = Preemption(watch)
        self.callbacks: List[Callback] = [self.preemption]
        # the first failure of a callback on this rank (rank 0: a run folder file it could not write), kept
        # until the ranks agree on it at the next reduction (see _stop_on_failure)
        self._failure: Optional[str] = None
        try:  # the handlers are in place: a failure from here on closes what was made (fit's finally is not reached)
            self.callbacks += [StopAfterSteps(cfg.train.stop_after_steps), PeriodicCheckpoints(cfg.checkpoint.every_steps)]
            tick = None
            error: Optional[str] = None
            if ctx.is_main:
                # without a GPU a recipe's full run can take hours: the estimate then says how to run a short one
                short = ("for a short run: train.epochs=N (make train ARGS=\"train.epochs=N\"), or --config "
                         "configs/smoke.yaml" if ctx.device.type == "cpu" else "")
                display = ProgressDisplay(logger.info, cfg.train.total_steps(parts.steps_per_epoch), short)
                try:
                    self.callbacks.append(MetricSinks(run_dir, EPOCH_COLUMNS, self.state.history, cfg.train.epochs,
                                                      cfg.output.tensorboard, logger.info))
                except Exception as err:  # any failure: the other ranks are waiting in the agreement below
                    error = dist.failure_message(err, f"starting the records in {run_dir}", ctx.rank)
                self.callbacks.append(display)
                tick = display.tick
            dist.agree_on_error(error)
            self.boundaries = Boundaries(log_every=cfg.train.log_every, every=cfg.checkpoint.every_steps,
                                         stop_at=cfg.train.stop_after_steps,
                                         signal_every=cfg.checkpoint.signal_check_every, at_boundary=self._at_boundary,
                                         signal_flag=watch.flag, signal_agreed=watch.agreed_elsewhere,
                                         agree_on_signal=watch.agreed, log_step=self._log_interval, tick=tick,
                                         after_step=parts.averages.after_step if parts.averages else None,
                                         write_failed=self._write_failed, stop_on_failure=self._stop_on_failure,
                                         solo=ctx.world_size == 1)
        except BaseException:
            for callback in reversed(self.callbacks):
                callback.close()
            raise

    # ---------------------------------------------------------------- the run

    def fit(self) -> RunState:
        try:
            state = self._epochs()
            self._stop_on_failure()  # every rank: a record or log line of the last epoch that failed to write
            if state.stopped_by in (None, "stop_after_steps"):
                # nothing is left to save: a preemption signal from now on is noted and ignored, not a kill
                self.preemption.watch.training_ended()
            return state
        finally:
            if self.writer.pending:  # an error is on its way out: let the write end, keep the error raised
                try:
                    self.writer.wait()
                except UserError as err:
                    self.logger.info(f"warning: {err}")
            for callback in self.callbacks:
                callback.close()

    def _epochs(self) -> RunState:
        state = self.state
        if self._stopped_before_start():
            return state
        first_epoch = state.epoch + 1
        last_epoch = self.cfg.train.epoch_count()  # 9.9 epochs: 10, the 10th cut short (train_epoch)
        for epoch in range(first_epoch, last_epoch + 1):
            stats = self.train_epoch(epoch, first=epoch == first_epoch)
            if stats.stopped_early and stats.steps < self.cfg.train.steps_in_epoch(epoch, self.parts.steps_per_epoch):
                state.step_in_epoch = stats.steps
                return state  # stopped mid-epoch: the step checkpoint holds everything
            stops = stats.stopped_early or stats.signal_at_end is not None
            self._end_epoch(epoch, stats, first=epoch == first_epoch,
                            last=epoch == last_epoch or stops)
            if state.finished_by:
                return state  # train.target_acc reached: a complete run
            if stats.signal_at_end and not stats.stopped_early:
                state.stopped_by = stats.signal_at_end  # agreed in the epoch-end reduction
            if stops:
                if epoch == last_epoch:
                    state.stopped_by = None  # the stop came with the last step: the run is complete
                return state  # stopped at the epoch's last step: the epoch-end checkpoint holds everything
        finish_writes(self.ctx, self.writer)  # every rank: the last background write ended well
        return state

    def _stopped_before_start(self) -> bool:
        """A signal that came while the run was being built (recorded since the entry point's first
        line): the ranks agree on it once, and stop before the first step (nothing new to save). Or a
        planned stop, or train.target_acc, that the run has already reached."""
        flag = torch.tensor([self.preemption.watch.flag()], dtype=torch.float64, device=self.ctx.device)
        before_start = dist.all_reduce_sum_tensor(flag).item()  # host sync, once
        target = self.cfg.train.target_acc
        if before_start > 0:
            self.state.stopped_by = self.preemption.watch.agreed_elsewhere(before_start)
        elif self.cfg.train.stop_after_steps and self.state.global_step >= self.cfg.train.stop_after_steps:
            self.state.stopped_by = "stop_after_steps"
        elif target and self.state.best_epoch and self.state.best_val_acc >= target:
            self.logger.info(f"train.target_acc={target:g} was reached at epoch {self.state.best_epoch} (val_acc "
                             f"{100 * self.state.best_val_acc:.2f}%) before this start: nothing left to train")
            self.state.finished_by = TARGET_REACHED
        return self.state.stopped_by is not None or self.state.finished_by is not None

    def train_epoch(self, epoch: int, first: bool) -> EpochStats:
        """One epoch's steps (a resumed one from where it stopped)."""
        state, parts, cfg = self.state, self.parts, self.cfg
        self.clock.switch("steps")
        steps = cfg.train.steps_in_epoch(epoch, parts.steps_per_epoch)  # fewer in the last of 9.9 epochs
        plan = EpochPlan(self.ctx.device, epoch, state.global_step, start_step=state.step_in_epoch,
                         carried=state.carried, max_batches=steps if steps < parts.steps_per_epoch else
                         cfg.train.limit_train_batches,
                         # compiled steps are timed apart: the first (eager compiled), or warm-up and capture
                         time_first_steps=(WARMUP_STEPS + 1 if cfg.train.capture else int(cfg.train.compile != "off"))
                         if first else 0)
        parts.train_loader.set_epoch(epoch - 1, state.start_sample)
        state.epoch_origin = (plan.start_step, state.start_sample)  # a checkpoint counts its exact sample from here
        state.step_in_epoch, state.carried, state.start_sample = 0, None, 0
        if self.ctx.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.ctx.device)
        for callback in self.callbacks:
            callback.start_epoch(epoch, cfg.train.epochs, steps, plan.start_step)
        parts.model.train()
        stats = train_one_epoch(parts.step, parts.train_loader, parts.schedule, plan, self.boundaries)
        for callback in self.callbacks:
            callback.end_steps()
        state.global_step += stats.timed_steps
        self.clock.move(stats.first_step_seconds, "steps", "compile")
        return stats

    def validate(self) -> Tuple[EvalStats, float]:
        """The test split over all ranks, with BatchNorm statistics averaged first (and given to the EMA's
        copy); and its seconds."""
        dist.average_buffers(self.parts.model)  # the same BN statistics on every rank, before evaluating and saving
        if self.parts.averages.lookahead is not None:
            dist.average_floating(self.parts.averages.lookahead.slow_buffers)  # and lookahead's slow ones
        if self.parts.averages.ema is not None:
            self.parts.averages.ema.sync_buffers()
        self.clock.switch("eval")
        start = time.perf_counter()
        evaluation = self.parts.evaluator(self.parts.val_loader)
        self.clock.move(evaluation.compile_seconds, "eval", "compile")
        return evaluation, time.perf_counter() - start  # the evaluator ended with a host sync

    def _end_epoch(self, epoch: int, stats: EpochStats, first: bool, last: bool) -> None:
        """Validate (every train.eval_every epochs and at the last), record, checkpoint (every
        checkpoint.every_epochs epochs and at the last; in the background unless the run ends here)."""
        state, cfg = self.state, self.cfg
        if stats.first_step_seconds:
            self.logger.info(_compile_line(stats, epoch, self.ctx.device, cfg.train.compile_cache != "off"))
        evaluation, val_seconds = None, None
        if epoch % cfg.train.eval_every == 0 or last:
            evaluation, val_seconds = self.validate()
        self.parts.schedule.after_epoch(evaluation.loss if evaluation else None)
        state.epoch = epoch
        reached = (evaluation is not None and cfg.train.target_acc > 0 and evaluation.accuracy >= cfg.train.target_acc)
        saves = cfg.output.save_checkpoints and (epoch % cfg.checkpoint.every_epochs == 0 or last or reached)
        # best.pt's candidates: the validated epochs that write a checkpoint (all validated ones without checkpoints)
        is_best = (evaluation is not None and (saves or not cfg.output.save_checkpoints)
                   and evaluation.accuracy > state.best_val_acc)
        if is_best:
            state.best_val_acc, state.best_epoch = evaluation.accuracy, epoch
        record = self._epoch_record(epoch, stats, evaluation, val_seconds, is_best)
        if reached:
            self._reached_target(record, evaluation)
        if record.get("cudagraph_skips") and self.ctx.is_main and first:
            self.logger.info(f"warning: torch.compile skipped CUDA graphs {record['cudagraph_skips']} time(s) (its "
                             f"reasons are in the 'skipping cudagraphs due to' lines above; BatchNorm under DDP is a "
                             f"known one, pytorch#139207): train.capture=true records the whole step as one graph "
                             f"instead")
        state.history.append(record)  # before the save: the checkpoint holds its own epoch's record
        if saves:
            self.clock.switch("checkpoint")
            started = time.perf_counter()
            ends_run = last or reached  # written before the run goes on to its end
            evaluated = {"val_acc": evaluation.accuracy, "val_loss": evaluation.loss} if evaluation else {}
            state.last_checkpoint = save_epoch_checkpoints(  # best.pt too when is_best (state.best_epoch)
                cfg, self.ctx, self.parts, state, evaluated, self.run_dir, self.writer,
                background=cfg.checkpoint.background and not ends_run)
            # the stall training saw (metrics.jsonl has it; the checkpoint's own copy of the record does not)
            record["checkpoint_seconds"] = time.perf_counter() - started
            self.clock.switch("steps")
        self._each_callback(lambda callback: callback.on_epoch_end(record), f"writing epoch {epoch}'s record")

    def _reached_target(self, record: Dict[str, Any], evaluation: EvalStats) -> None:
        """train.target_acc reached at this validation: recorded (time from the clock's start, the DAWNBench
        count: start-up, compilation and validations included) and the run finishes after this epoch."""
        seconds = self.clock.elapsed()
        record["time_to_target_seconds"], record["steps_to_target"] = seconds, self.state.global_step
        self.clock.target = {"target_acc": self.cfg.train.target_acc, "val_acc": evaluation.accuracy,
                             "epoch": record["epoch"], "steps": self.state.global_step, "seconds": round(seconds, 4)}
        self.state.finished_by = TARGET_REACHED
        self.logger.info(f"target reached: val_acc {100 * evaluation.accuracy:.2f}% >= train.target_acc "
                         f"{100 * self.cfg.train.target_acc:.2f}% at epoch {record['epoch']}, step "
                         f"{self.state.global_step}, {seconds:.1f}s from {self.clock.origin_note}")

    def _epoch_record(self, epoch: int, stats: EpochStats, evaluation: Optional[EvalStats],
                      val_seconds: Optional[float], is_best: bool) -> Dict[str, Any]:
        record = {"epoch": epoch, "step": self.state.global_step, "train_loss": stats.loss,
                  "val_loss": evaluation.loss if evaluation else None,
                  "val_acc": evaluation.accuracy if evaluation else None,
                  "val_correct": evaluation.correct if evaluation else None,
                  "val_total": evaluation.total if evaluation else None, "lr": stats.last_lr,
                  "images_per_sec": stats.images_per_sec, "mfu": self._mfu(stats.images_per_sec),
                  "epoch_seconds": stats.seconds, "data_wait_seconds": stats.data_wait_seconds,
                  "compute_seconds": stats.seconds - stats.data_wait_seconds, "val_seconds": val_seconds,
                  "checkpoint_seconds": None, "peak_memory_mb": peak_memory_mb(self.ctx.device),
                  "skipped_steps": stats.skipped_steps, "world_size": self.ctx.world_size, "is_best": is_best}
        if self.cfg.train.compile != "off":
            record["compiled_graphs"] = compiled_graph_count()
            record["cudagraph_skips"] = cudagraph_skip_count()
        return record

    # ---------------------------------------------------------------- what the loop calls back

    def _log_interval(self, step: int, epoch: int, loss: float, lr: float, images_per_sec: float) -> None:
        interval = Interval(step, epoch, loss, lr, images_per_sec, self._mfu(images_per_sec))
        self._each_callback(lambda callback: callback.on_interval(interval), f"writing step {step}'s record")

    def _each_callback(self, call: Callable[[Callback], None], doing: str) -> None:
        """`call` on every callback. A failure is kept, not raised: on rank 0 it is the run folder's records,
        which the other ranks do not write, and raising here would leave them waiting in the next collective.
        The next reduction carries it (`_write_failed`) and every rank stops together (`_stop_on_failure`)."""
        for callback in self.callbacks:
            try:
                call(callback)
            except Exception as err:  # noqa: BLE001 - raised on every rank at the next agreement
                self._failure = self._failure or dist.failure_message(err, doing, self.ctx.rank)

    def _write_failed(self) -> float:
        """This rank's failure flag for the next reduction (a host read: no device value)."""
        return 1.0 if self._failure is not None or run_log_failure() is not None else 0.0

    def _stop_on_failure(self) -> None:
        """Every rank: raise the same one line when a rank's callback or rank 0's train.log failed (the epoch loop
        calls this when the reduced flags say so, and fit once at the end of the epochs)."""
        message = self._failure
        logged = run_log_failure()
        if message is None and logged is not None:
            message = str(folder_write_failed(logged[0], "train.log", logged[1]))
        dist.agree_on_error(message)

    def _at_boundary(self, global_step: int, step_in_epoch: int, totals: Callable[[], torch.Tensor],
                     signal: Optional[str]) -> bool:
        """Every rank, at the same boundaries (see loop.Boundaries): a step checkpoint when a callback
        asks for one or the run stops here (not at the epoch's last step: the epoch-end checkpoint follows).
        A periodic one is written in the background; one the run stops on, before it goes on."""
        here = Boundary(global_step, step_in_epoch, signal)
        stop = next((reason for reason in (c.stop_reason(here) for c in self.callbacks) if reason), None)
        wanted = stop or any(c.wants_checkpoint(here) for c in self.callbacks)
        if self.cfg.output.save_checkpoints and wanted and step_in_epoch < self.parts.steps_per_epoch:
            self.clock.switch("checkpoint")
            at = dataclasses.replace(self.state, global_step=global_step, step_in_epoch=step_in_epoch)
            self.state.last_checkpoint = save_step_checkpoint(
                self.cfg, self.ctx, self.parts, at, totals(), self.run_dir, self.writer,
                background=self.cfg.checkpoint.background and not stop)
            self.clock.switch("steps")
        if stop:
            self.state.stopped_by = stop
        return bool(stop)

    def _mfu(self, images_per_sec: float) -> Optional[float]:
        if not self.parts.peak_flops:
            return None
        return images_per_sec * self.parts.flops_per_image / (self.parts.peak_flops * self.ctx.world_size)


def _compile_line(stats: EpochStats, epoch: int, device: torch.device, cached: bool) -> str:
    what = (f"the first {stats.first_steps} training steps (compilation, warm-up"
            + (" and CUDA graph capture)" if device.type == "cuda" else ")")
            if stats.first_steps > 1 else "the first training step (compilation included)")
    counts = cache_counts()
    cache = (f"compile cache: {counts['fx_graph_hits']} graph(s) loaded, {counts['fx_graph_misses']} compiled" if cached
             else "compile cache off: every graph compiled")
    return (f"compile: {what} took {stats.first_step_seconds:.1f}s; epoch {epoch} images/s leave "
            f"{'them' if stats.first_steps > 1 else 'it'} out; {cache}")


def _console(line: str) -> None:
    """One line on stderr, from a signal handler (no logging locks)."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
