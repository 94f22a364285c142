"""Timing fasttrain the way it trains: the real epoch loop, not a bare step.

`EpochLoopTimer` drives `fasttrain.engine.train_one_epoch` with what the trainer gives it (the
step, the loader, the schedule, log-interval reductions with the preemption flag riding along, a
progress counter and a steps.jsonl-like sink), epoch after epoch. Windows are cut at log intervals,
where the loop has already synchronized with the device: a window closes at the first log
interval at least `min_seconds` after it opened, so per-epoch costs (the resident loader's
epoch augmentation, the epoch-end reduction) and the periodic syncs fall inside the windows as
often as they do in a run. Guard steps first (log interval 1: their losses must be finite and
fall), then warm-up (compilation, capture), then the timed windows.
"""

from __future__ import annotations

import io
import json
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, List

import torch
import torch.distributed

from benchmarks.measure import guard
from fasttrain.engine import Boundaries, synchronize, train_one_epoch
from fasttrain.observe import Progress
from fasttrain.preemption import PreemptionWatch


@dataclass
class LoopMeasurement:
    images_per_sec: float  # median over the windows
    window_images_per_sec: List[float]
    data_wait_share: float  # host time blocked on the loader / timed time
    guard_losses: List[float] = field(default_factory=list)
    steps_timed: int = 0
    seconds_timed: float = 0.0


class EpochLoopTimer:
    """fasttrain's epoch loop on `parts` (from trainer.build_parts), as the trainer runs it."""

    def __init__(self, parts, log_every: int, backend: str, world_size: int = 1):
        self.parts = parts
        self.log_every = log_every
        self.world_size = world_size
        self.epoch = 0
        self.global_step = 0
        self.watch = PreemptionWatch([], 0, backend)  # no handlers: the flag is still read and reduced
        self.sink = io.StringIO()  # what steps.jsonl would receive
        self.progress = Progress(enabled=True, stream=io.StringIO(), log=lambda line: None)
        self._marks: List[tuple] = []  # (clock, global step) at each log interval
        self._losses: List[float] = []
        self.data_wait = 0.0
        self.loop_seconds = 0.0

    def _log_step(self, step: int, epoch: int, loss: float, lr: float, ips: float) -> None:
        self._marks.append((time.perf_counter(), step))  # the reduction before this synchronized the device
        self._losses.append(loss)
        self.sink.write(json.dumps({"step": step, "epoch": epoch, "loss": loss, "lr": lr, "images_per_sec": ips}))
        self.progress.interval(step, loss, lr, ips)

    def _phase(self, log_every: int, until: Callable[[], bool]) -> None:
        """Epochs of the real loop until `until()` says so (checked at every log interval)."""
        device = self.parts.precision.device

        def agreed_until(*_) -> bool:
            if self.world_size == 1:
                return until()
            # every rank must stop at the same boundary: rank 0's clock decides (a benchmark-only collective)
            decision = torch.tensor([1.0 if until() else 0.0], device=device)
            torch.distributed.broadcast(decision, src=0)
            return bool(decision.item())

        boundaries = Boundaries(log_every=log_every, at_boundary=agreed_until,
                                signal_flag=self.watch.flag, signal_agreed=self.watch.agreed_elsewhere)
        self.parts.model.train()
        while True:
            self.parts.train_loader.set_epoch(self.epoch)
            self.progress.start_epoch(self.epoch + 1, 10**9, len(self.parts.train_loader))
            stats = train_one_epoch(self.parts.step, self.parts.train_loader, self.parts.schedule,
                                    self.parts.precision.device, epoch=self.epoch + 1, global_step=self.global_step,
                                    boundaries=boundaries, log_step=self._log_step, tick=self.progress.tick)
            self.global_step += stats.timed_steps
            self.data_wait += stats.data_wait_seconds
            self.loop_seconds += stats.seconds
            self.epoch += 1  # whole or not, the next pass draws a fresh epoch
            if stats.stopped_early:
                return

    def guard(self, name: str, steps: int) -> List[float]:
        """`steps` steps logged one by one: their losses must be finite and fall (measure.guard)."""
        if steps <= 0:
            return []
        self._losses = []
        self._phase(1, lambda: len(self._losses) >= steps)
        losses = self._losses[:steps]
        guard(name, losses)
        return losses

    def warm_up(self, steps: int) -> None:
        """At least `steps` more steps (to the next log interval), untimed: compilation and capture."""
        if steps <= 0:
            return
        start, self._marks = self.global_step, []
        self._phase(self.log_every, lambda: bool(self._marks) and self._marks[-1][1] >= start + steps)

    def time_windows(self, min_seconds: float, windows: int) -> LoopMeasurement:
        synchronize(self.parts.precision.device)
        self._marks = [(time.perf_counter(), self.global_step)]
        wait_before, loop_before = self.data_wait, self.loop_seconds
        edges = [0]  # indices into marks where windows start/end

        def enough() -> bool:
            clock, _ = self._marks[-1]
            if clock - self._marks[edges[-1]][0] >= min_seconds:
                edges.append(len(self._marks) - 1)
            return len(edges) > windows

        self._phase(self.log_every, enough)
        batch = self.parts.train_loader.batches.batch_size * self.world_size
        rates = []
        for a, b in zip(edges, edges[1:]):
            (t0, s0), (t1, s1) = self._marks[a], self._marks[b]
            rates.append((s1 - s0) * batch / (t1 - t0))
        timed = self.loop_seconds - loop_before
        first, last = self._marks[edges[0]], self._marks[edges[-1]]
        return LoopMeasurement(statistics.median(rates), rates,
                               (self.data_wait - wait_before) / timed if timed > 0 else 0.0,
                               steps_timed=last[1] - first[1], seconds_timed=last[0] - first[0])
