"""Timing fasttrain the way it trains: the real epoch loop, not a bare step.

`TrainerLoop` runs `fasttrain.train.loop.run_epoch` epoch after epoch with what the trainer gives the
loop (the step, the loader, the schedule, log-interval reductions with the preemption flag riding
along, a progress counter and a steps.jsonl record per interval); host_overhead counts its ops and
times it. `EpochLoopTimer.measure` drives it in one continuous run: guard steps first (logged one by
one: their losses must be finite and fall), then warm-up (compilation, capture), then the timed
windows, without restarting an epoch between the phases. Windows are cut at log intervals, where the
loop has already synchronized with the device: a window closes at the first log interval at least
`min_seconds` after it opened. So per-epoch costs (the resident loader's epoch augmentation, the
epoch-end reduction) and the periodic syncs fall inside the windows as often as they do in a run, no
more.
"""

from __future__ import annotations

import io
import json
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, List, Optional

import torch
import torch.distributed as torch_dist

from benchmarks.measure import guard
from fasttrain.train.loop import Boundaries, EpochStats, run_epoch, synchronize
from fasttrain.observe.progress import Progress
from fasttrain.dist.preemption import PreemptionWatch


@dataclass
class LoopMeasurement:
    images_per_sec: float  # median over the windows
    window_images_per_sec: List[float]
    data_wait_share: float  # host time blocked on the loader / timed time
    guard_losses: List[float] = field(default_factory=list)
    steps_timed: int = 0
    seconds_timed: float = 0.0
    host_ms_per_step: float = 0.0  # CPU time of the training thread per step (time.thread_time): its host cost


class _TimedLoader:
    """The loader as it is, with the host time spent waiting in next() added up."""

    def __init__(self, loader):
        self.loader = loader
        self.batches = loader.batches
        self.wait = 0.0

    def set_epoch(self, epoch: int, start_sample: int = 0) -> None:
        self.loader.set_epoch(epoch, start_sample)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator:
        batches = iter(self.loader)
        while True:
            start = time.perf_counter()
            batch = next(batches, None)
            self.wait += time.perf_counter() - start
            if batch is None:
                return
            yield batch


class TrainerLoop:
    """fasttrain's epoch loop on `parts` (from fasttrain.train.build.build_parts) with the hooks a Trainer
    hangs on it, whole epochs at a time: at each log interval the sums are reduced with the preemption
    flag riding along (a watch with no handlers: read and reduced, never set), `record` gets the
    steps.jsonl line and the progress counter its interval; the counter ticks every step. `boundaries`
    (every, stop_at, at_boundary, ...) go to the loop's Boundaries as a Trainer's would; `loader`
    replaces parts.train_loader (a wrapper of it)."""

    def __init__(self, parts, log_every: int, backend: str, record: Callable[[dict], None],
                 watch_check_every: int = 0, loader=None, **boundaries):
        self.parts = parts
        self.loader = parts.train_loader if loader is None else loader
        self.watch = PreemptionWatch([], watch_check_every, backend)
        self.progress = Progress(enabled=True, stream=io.StringIO(), log=lambda line: None)
        self.record = record
        # (global step, the interval's mean loss) at each log interval, before its record: what a benchmark watches
        self.on_interval: Optional[Callable[[int, float], None]] = None
        self.boundaries = Boundaries(log_every=log_every, signal_flag=self.watch.flag,
                                     signal_agreed=self.watch.agreed_elsewhere, log_step=self._log_step,
                                     tick=self.progress.tick, **boundaries)
        self.epoch = self.global_step = 0

    def _log_step(self, step: int, epoch: int, loss: float, lr: float, ips: float) -> None:
        if self.on_interval is not None:
            self.on_interval(step, loss)
        self.record({"step": step, "epoch": epoch, "loss": loss, "lr": lr, "images_per_sec": ips})
        self.progress.interval(step, loss, lr, ips)

    def run(self, max_batches: int = 0) -> EpochStats:
        """One epoch (or its first max_batches steps), or less where `at_boundary` stops it."""
        self.progress.start_epoch(self.epoch + 1, 10**9, len(self.loader))
        stats = run_epoch(self.parts, self.boundaries, self.epoch, self.global_step, max_batches, self.loader)
        self.epoch += 1
        self.global_step += stats.timed_steps
        return stats


class EpochLoopTimer:
    """fasttrain's epoch loop on `parts` (from fasttrain.train.build.build_parts), as the trainer runs it."""

    def __init__(self, parts, log_every: int, backend: str, world_size: int = 1):
        self.parts = parts
        self.log_every = log_every
        self.world_size = world_size
        self.loader = _TimedLoader(parts.train_loader)
        self.sink = io.StringIO()  # what steps.jsonl would receive
        self.loop = TrainerLoop(parts, log_every, backend, lambda line: self.sink.write(json.dumps(line)),
                                loader=self.loader)

    def measure(self, name: str, guard_steps: int, warmup: int, min_seconds: float,
                windows: int) -> LoopMeasurement:
        """Guard, warm up to `warmup` steps from here (guard included), then `windows` timed windows."""
        losses: List[float] = []
        marks: List[tuple] = []  # (clock, global step, loader wait, thread CPU time) at each log interval
        edges: List[int] = []  # indices into marks where windows open and close
        phase = "guard" if guard_steps else "warmup"
        start = self.loop.global_step
        boundaries = self.loop.boundaries
        boundaries.log_every = 1 if guard_steps else self.log_every

        def on_interval(step: int, loss: float) -> None:
            if phase == "guard":
                losses.append(loss)
            elif phase == "timing":
                marks.append((time.perf_counter(), step, self.loader.wait, time.thread_time()))  # just synchronized

        def at_boundary(global_step: int, *_) -> bool:
            nonlocal phase
            if phase == "guard" and len(losses) >= guard_steps:
                guard(name, losses[:guard_steps])
                phase, boundaries.log_every = "warmup", self.log_every  # read by the loop's next_after()
            elif phase == "warmup" and global_step >= start + warmup and global_step % self.log_every == 0:
                synchronize(self.parts.precision.device)
                phase = "timing"
                marks.append((time.perf_counter(), global_step, self.loader.wait, time.thread_time()))
                edges.append(0)
            elif phase == "timing" and marks[-1][0] - marks[edges[-1]][0] >= min_seconds:
                edges.append(len(marks) - 1)
            return self._agree(phase == "timing" and len(edges) > windows)

        self.loop.on_interval, boundaries.at_boundary = on_interval, at_boundary
        while not self.loop.run().stopped_early:
            pass
        batch = self.loader.batches.batch_size * self.world_size
        rates = []
        for a, b in zip(edges, edges[1:]):
            (t0, s0, _, _), (t1, s1, _, _) = marks[a], marks[b]
            rates.append((s1 - s0) * batch / (t1 - t0))
        (t_first, s_first, w_first, c_first), (t_last, s_last, w_last, c_last) = marks[edges[0]], marks[edges[-1]]
        steps = max(s_last - s_first, 1)
        return LoopMeasurement(statistics.median(rates), rates, (w_last - w_first) / (t_last - t_first),
                               losses[:guard_steps], s_last - s_first, t_last - t_first,
                               1000 * (c_last - c_first) / steps)

    def _agree(self, stop: bool) -> bool:
        """Every rank must stop at the same boundary: rank 0's clock decides (a benchmark-only collective)."""
        if self.world_size == 1:
            return stop
        decision = torch.tensor([1.0 if stop else 0.0], device=self.parts.precision.device)
        torch_dist.broadcast(decision, src=0)
        return bool(decision.item())
