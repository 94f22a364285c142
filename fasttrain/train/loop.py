"""One training epoch: the tutorial's train_one_epoch (its validate is `fasttrain.train.validation`).

The step loop does per step only what a step needs: fetch a batch, run the step (`fasttrain.train.step`),
advance the schedule (host floats), count samples on the host, and, when the run keeps weight averages
(`fasttrain.train.averaging`), hand them the global step. Everything else happens at
boundaries that every rank reaches at the same global step: every `train.log_every` steps the
running sums are taken from the step, summed over ranks with the preemption flag riding along,
and read by the host once (a non-finite sum means a non-finite loss: the run stops, naming the
step); periodic checkpoints and train.stop_after_steps have boundaries of their own. Between
boundaries nothing reads a device value and no collective runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from fasttrain import dist
from fasttrain.data.sharding import Loader
from fasttrain.errors import TrainingDiverged
from fasttrain.train.optim import Schedule
from fasttrain.train.step import LOSS_SUM, NONFINITE, SKIPPED, SUMS, Step

# the vector summed over ranks at a log interval: the step's SUMS, then samples, the preemption flag and
# rank 0's flag for a write into the run folder that failed (its records, train.log)
SAMPLES, SIGNALLED, WRITE_FAILED = SUMS, SUMS + 1, SUMS + 2
REDUCED = SUMS + 3
# what a checkpoint carries as a rank's running sums of the epoch in progress: [loss sum, samples,
# skipped steps, non-finite losses] (the layout checkpoints have always had)
TOTALS = 4


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so that a clock read after it means something."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class EpochStats:
    loss: float  # mean training loss per sample, over all ranks (a resumed epoch: the part before the stop too)
    samples: int  # over all ranks, in the whole epoch
    steps: int  # steps done in the epoch
    seconds: float  # wall time of this process's steps, first steps included
    last_lr: float
    skipped_steps: int = 0  # fp16 steps the GradScaler skipped (inf/nan gradients)
    first_step_seconds: float = 0.0  # the first `first_steps` steps, measured apart when asked (compilation)
    data_wait_seconds: float = 0.0  # host time blocked waiting for the next batch (rank 0's view)
    stopped_early: bool = False  # a boundary asked to stop before the epoch's end
    timed_samples: int = -1  # samples of the steps this process ran (-1 = samples): what images/s counts
    timed_steps: int = -1  # steps this process ran (-1 = steps)
    first_steps: int = 1  # how many steps first_step_seconds covers
    signal_at_end: Optional[str] = None  # a preemption signal agreed at the epoch's end (stop after saving)

    def __post_init__(self) -> None:
        self.timed_samples = self.samples if self.timed_samples < 0 else self.timed_samples
        self.timed_steps = self.steps if self.timed_steps < 0 else self.timed_steps

    @property
    def images_per_sec(self) -> float:
        """Throughput over the steady part: the first steps are left out when they were timed apart."""
        samples, steps, first = self.timed_samples, self.timed_steps, self.first_steps
        if self.first_step_seconds and steps > first:
            return samples * (steps - first) / steps / max(self.seconds - self.first_step_seconds, 1e-9)
        return samples / self.seconds if self.seconds > 0 else 0.0


# (global step, epoch, mean loss over the interval, lr, images/s over the interval)
StepLogger = Callable[[int, int, float, float, float], None]


@dataclass
class EpochPlan:
    """Which epoch the loop runs and where it starts: a resumed epoch starts at `start_step` (the
    loader already skips those batches) with the running sums `carried` (TOTALS) from before the
    stop. `max_batches`: end the epoch after that many (0 = the whole loader). `time_first_steps`:
    synchronize after that many steps and time them apart (compilation and capture happen there)."""
    device: torch.device
    epoch: int
    global_step: int  # optimizer steps done before this epoch's first
    start_step: int = 0
    carried: Optional[torch.Tensor] = None
    max_batches: int = 0
    time_first_steps: int = 0


@dataclass
class Boundaries:
    """The global steps at which the loop leaves its per-step path, and what it does there.

    Every `log_every` steps: the sums are reduced over ranks, logged, checked for divergence, and
    the preemption flag is agreed (one collective that was needed anyway). `every`: another
    boundary every N steps (periodic checkpoints; 0 = none). `stop_at`: a boundary at that step
    (train.stop_after_steps; 0 = none). `signal_every`: an extra host-side agreement on the
    preemption flag every N steps (0 = only with the log reduction). At each boundary, after the
    reduction, `at_boundary(global step, steps in the epoch, running sums, agreed signal)` runs on
    every rank and returns whether to stop the epoch there."""
    log_every: int
    every: int = 0
    stop_at: int = 0
    signal_every: int = 0
    at_boundary: Optional[Callable[[int, int, Callable[[], torch.Tensor], Optional[str]], bool]] = None
    # this rank's flag, a host float set by a signal handler: 0 = none; summed over ranks (its kind rides in
    # its size: preemption.PREEMPT_CODE, INTERRUPT_CODE)
    signal_flag: Callable[[], float] = lambda: 0.0
    # called with that sum when the reduction says a rank was signalled: what stops the run (a signal's
    # name, this rank's or another's; preemption.INTERRUPT for a Ctrl-C anywhere)
    signal_agreed: Callable[[float], str] = lambda _total: "a signal on another rank"
    agree_on_signal: Optional[Callable[[], Optional[str]]] = None  # the extra host-side check (signal_every)
    # one process: its flag is the whole agreement, so it is read after every step (a host float, no collective)
    # and a signal stops the run at the next step, not at the next log interval
    solo: bool = False
    log_step: Optional["StepLogger"] = None  # at each log interval, with the values read there (rank 0)
    tick: Optional[Callable[[], None]] = None  # per step, host only (a progress counter; rank 0)
    # per step, with the global step just done: the weight averages (every rank; None when the run keeps none)
    after_step: Optional[Callable[[int], None]] = None
    # 1.0 when this rank (rank 0: the run folder's files) has a failure the ranks must stop on, else 0.0: a
    # host float that rides in the reductions; when their sum is positive every rank calls `stop_on_failure`,
    # which agrees on the message and raises it on every rank
    write_failed: Callable[[], float] = lambda: 0.0
    stop_on_failure: Optional[Callable[[], None]] = None

    def next_after(self, global_step: int) -> int:
        """The first boundary after `global_step`."""
        def next_multiple(every: int) -> int:
            return (global_step // every + 1) * every

        candidates = [next_multiple(self.log_every)]
        if self.every:
            candidates.append(next_multiple(self.every))
        if self.signal_every:
            candidates.append(next_multiple(self.signal_every))
        if self.stop_at > global_step:
            candidates.append(self.stop_at)
        return min(candidates)


def _raise_if_diverged(nonfinite: float, step: Step, interval_start: int, epoch: int) -> None:
    """`nonfinite`: non-finite losses summed over ranks; one anywhere stops every rank here."""
    if nonfinite > 0:
        offset = step.first_bad_offset()  # host sync, only once it has gone wrong
        where = f"at step {interval_start + offset}" if offset else "on another rank"
        raise TrainingDiverged(f"training diverged: the loss became nan/inf {where} (epoch {epoch}); the run stops "
                               f"and keeps its last good checkpoint: lower optim.lr or sched.max_lr, set "
                               f"train.grad_clip, or use train.precision=fp32, then continue with resume=auto")


def _as_totals(sums: torch.Tensor, samples: int) -> torch.Tensor:
    """The step's SUMS and a sample count, in the checkpoint layout (TOTALS)."""
    totals = torch.zeros(TOTALS, dtype=torch.float64, device=sums.device)
    totals[0], totals[2], totals[3] = sums[LOSS_SUM], sums[SKIPPED], sums[NONFINITE]
    totals[1] = samples
    return totals


def train_one_epoch(step: Step, loader: Loader, schedule: Schedule, plan: EpochPlan,
                    boundaries: Boundaries) -> EpochStats:
    """Train for one epoch with `step` (an EagerStep or CapturedStep, model in train mode); losses
    are means over the samples of all ranks."""
    device, epoch, global_step = plan.device, plan.epoch, plan.global_step
    start_step, carried, max_batches = plan.start_step, plan.carried, plan.max_batches
    time_first_steps, log_step, tick = plan.time_first_steps, boundaries.log_step, boundaries.tick
    after_step = boundaries.after_step
    solo, signal_flag = boundaries.solo, boundaries.signal_flag
    # running sums on the device: the epoch's, and the current log interval's (the step's SUMS layout)
    epoch_sums = torch.zeros(SUMS, dtype=torch.float64, device=device)
    interval = torch.zeros(SUMS, dtype=torch.float64, device=device)
    epoch_samples = interval_samples = 0  # this rank's, counted on the host
    # what this rank had summed before the stop: counted in the epoch's loss, not in its images/s
    before = (torch.zeros(TOTALS, dtype=torch.float64) if carried is None else carried.double()).to(device)
    steps = start_step
    first_step_seconds = 0.0
    last_lr = schedule.lr()
    data_wait = 0.0
    stopped_early = False
    interval_start_step = global_step  # the global step before this log interval's first
    next_boundary = boundaries.next_after(global_step)
    step.start_interval()
    batches = iter(loader)
    synchronize(device)
    start = interval_clock = time.perf_counter()
    while not (max_batches and steps >= max_batches):
        fetch_start = time.perf_counter()
        batch = next(batches, None)
        data_wait += time.perf_counter() - fetch_start  # host time blocked on the loader
        if batch is None:
            break
        images, labels = batch
        last_lr = schedule.lr()  # a Python float: no device sync
        step(images, labels)
        schedule.after_batch()
        steps += 1
        global_step += 1
        if after_step is not None:
            after_step(global_step)  # foreach kernels every N steps, no device value read
        interval_samples += labels.shape[0]  # shape is host metadata: no sync
        if tick is not None:
            tick()  # host-only progress (a bar), no device value read
        if time_first_steps and steps == start_step + time_first_steps:
            synchronize(device)  # host sync, once: the first steps hold the compilation
            first_step_seconds = time.perf_counter() - start
        if global_step < next_boundary and not (solo and signal_flag()):
            continue
        # ---- a boundary: every rank is here at the same global step
        interval += step.take_sums()
        signal: Optional[str] = None
        if global_step % boundaries.log_every == 0:
            vector = torch.zeros(REDUCED, dtype=torch.float64, device=device)
            vector[:SUMS] = interval
            vector[SAMPLES] = interval_samples
            vector[SIGNALLED] = float(boundaries.signal_flag())
            vector[WRITE_FAILED] = boundaries.write_failed()
            reduced = dist.all_reduce_sum_tensor(vector).tolist()  # host sync, once per log interval
            _raise_if_diverged(reduced[NONFINITE], step, interval_start_step, epoch)
            if reduced[WRITE_FAILED] > 0 and boundaries.stop_on_failure is not None:
                boundaries.stop_on_failure()  # raises on every rank, with rank 0's line
            now = time.perf_counter()
            if log_step is not None:
                log_step(global_step, epoch, reduced[LOSS_SUM] / max(reduced[SAMPLES], 1), last_lr,
                         reduced[SAMPLES] / max(now - interval_clock, 1e-9))
            if reduced[SIGNALLED] > 0:
                signal = boundaries.signal_agreed(reduced[SIGNALLED])
            epoch_sums += interval
            epoch_samples += interval_samples
            interval.zero_()
            interval_samples = 0
            interval_clock = now
            interval_start_step = global_step
            step.start_interval()
        elif boundaries.signal_every and global_step % boundaries.signal_every == 0 and boundaries.agree_on_signal:
            signal = boundaries.agree_on_signal()  # a host-side collective, every signal_every steps
        elif solo and signal_flag():
            signal = boundaries.signal_agreed(signal_flag())  # this process's own flag: nothing to agree with
        next_boundary = boundaries.next_after(global_step)
        if boundaries.at_boundary is not None:
            so_far = lambda: before + _as_totals(epoch_sums + interval, epoch_samples + interval_samples)  # noqa: E731
            if boundaries.at_boundary(global_step, steps, so_far, signal):
                stopped_early = True
                break
    interval += step.take_sums()
    epoch_sums += interval
    epoch_samples += interval_samples
    now_totals = _as_totals(epoch_sums, epoch_samples)
    flag = torch.zeros(TOTALS, dtype=torch.float64, device=device)
    flag[0] = 0.0 if stopped_early else float(boundaries.signal_flag())
    flag[1] = boundaries.write_failed()
    reduced_now, reduced_before, reduced_flag = dist.all_reduce_sum_tensor(
        torch.stack([now_totals, before, flag])).tolist()  # host sync, per epoch
    _raise_if_diverged(reduced_now[3], step, interval_start_step, epoch)
    if reduced_flag[1] > 0 and boundaries.stop_on_failure is not None:
        boundaries.stop_on_failure()
    synchronize(device)
    seconds = time.perf_counter() - start
    loss_sum, samples, skipped_total = (reduced_now[i] + reduced_before[i] for i in range(3))
    # every rank skips the same steps (gradients are all-reduced before the inf check): count one rank's
    skipped_steps = int(round(skipped_total / max(dist.get_world_size(), 1)))
    signal_at_end = boundaries.signal_agreed(reduced_flag[0]) if reduced_flag[0] > 0 else None
    return EpochStats(loss_sum / max(samples, 1), int(samples), steps, seconds, last_lr, skipped_steps,
                      first_step_seconds, data_wait, stopped_early, int(reduced_now[1]), steps - start_step,
                      max(time_first_steps, 1), signal_at_end)


def run_epoch(parts, boundaries: Boundaries, epoch: int, global_step: int, max_batches: int = 0,
              loader: Optional[Iterable[Tuple[torch.Tensor, torch.Tensor]]] = None) -> EpochStats:
    """One epoch of fasttrain's training loop on `parts` (fasttrain.build.build_parts) outside a
    Trainer: the public entry the benchmarks time, so that what they measure is what a run trains with.

    `epoch` counts from 0 (it seeds the loader's permutation, as a run's first epoch is 0 there),
    `global_step` is the optimizer steps done before it, `max_batches` ends the epoch early (0 = the
    whole loader). `boundaries` says what happens at log intervals (a Trainer's reduce the preemption
    flag with the sums, write steps.jsonl and tick the progress counter). `loader`: the batches to train
    on, default `parts.train_loader` (a wrapper of it that times its waits, say). The Trainer adds
    resume, callbacks, validation and checkpoints around the same `train_one_epoch`."""
    loader = parts.train_loader if loader is None else loader
    parts.model.train()
    loader.set_epoch(epoch)
    plan = EpochPlan(parts.precision.device, epoch + 1, global_step, max_batches=max_batches)
    return train_one_epoch(parts.step, loader, parts.schedule, plan, boundaries)
