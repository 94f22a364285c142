"""What a run does around its step loop, as small objects the TrainingSession calls at fixed points.

The step loop (`fasttrain.train.loop`) leaves its per-step path only at boundaries that every rank
reaches at the same global step (log intervals, periodic checkpoints, a requested stop). There
the session asks its callbacks whether to stop and whether to save; at a log interval it hands
them the numbers it has just read; after validation, the epoch's record. Nothing here runs per
step except `Progress.tick`, a host counter.

The protocol (`Callback` has a no-op default for each):
    start_epoch(epoch, epochs, steps, done)  before an epoch's first step (every rank)
    on_interval(interval)                    at a log interval, with the values read there
    end_steps()                              after an epoch's steps (or a stop), before validation
    stop_reason(boundary) -> str | None      every rank, at a boundary: why the run stops there
    wants_checkpoint(boundary) -> bool       every rank, at a boundary: a step checkpoint there
    on_epoch_end(record)                     after validation, with the epoch's record
    close()                                  on every way out of fit
Rank 0's sinks (files, TensorBoard, the progress display) are only given to rank 0.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

from fasttrain.errors import folder_write_failed
from fasttrain.observe.metrics import CsvRows, JsonLines, TensorBoard
from fasttrain.observe.progress import Progress, epoch_line
from fasttrain.dist.preemption import PreemptionWatch


@dataclass(frozen=True)
class Interval:
    """A log interval's numbers, read once at its end (over all ranks)."""
    step: int
    epoch: int
    loss: float
    lr: float
    images_per_sec: float
    mfu: Optional[float]


@dataclass(frozen=True)
class Boundary:
    """Where every rank stands at a boundary: `signal` is what the ranks agreed stops them (a signal's
    name, preemption.INTERRUPT for a Ctrl-C) or None."""
    global_step: int
    step_in_epoch: int
    signal: Optional[str]


class Callback:
    def start_epoch(self, epoch: int, epochs: float, steps: int, done: int) -> None:
        pass

    def on_interval(self, interval: Interval) -> None:
        pass

    def end_steps(self) -> None:
        pass

    def stop_reason(self, boundary: Boundary) -> Optional[str]:
        return None

    def wants_checkpoint(self, boundary: Boundary) -> bool:
        return False

    def on_epoch_end(self, record: Dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class MetricSinks(Callback):
    """Rank 0's records: steps.jsonl per log interval; metrics.jsonl, metrics.csv and the epoch line per
    epoch; both as TensorBoard scalars when asked for. A file that cannot be written (the run folder made
    read-only or removed, a full disk) raises the one line of `folder_write_failed`."""

    def __init__(self, run_dir: Path, columns: List[str], history: List[Dict[str, Any]], epochs: float,
                 tensorboard: bool, log) -> None:
        self.run_dir = run_dir
        self.steps = JsonLines(run_dir / "steps.jsonl")
        self.metrics = JsonLines(run_dir / "metrics.jsonl")
        with self._writing("metrics.csv"):
            self.table = CsvRows(run_dir / "metrics.csv", columns, history)
        self.board = TensorBoard(run_dir / "tensorboard") if tensorboard else None
        self.epochs, self.log = epochs, log

    @contextmanager
    def _writing(self, what: str) -> Iterator[None]:
        try:
            yield
        except OSError as err:
            raise folder_write_failed(self.run_dir, what, err) from None

    def on_interval(self, interval: Interval) -> None:
        record = {"step": interval.step, "epoch": interval.epoch, "loss": interval.loss, "lr": interval.lr,
                  "images_per_sec": interval.images_per_sec, "mfu": interval.mfu}
        with self._writing("steps.jsonl"):
            self.steps.write(record)
        if self.board is not None:
            with self._writing("tensorboard/"):
                self.board.scalars("step", record, interval.step)

    def on_epoch_end(self, record: Dict[str, Any]) -> None:
        with self._writing("metrics.jsonl"):
            self.metrics.write(record)
        with self._writing("metrics.csv"):
            self.table.write(record)
        if self.board is not None:
            with self._writing("tensorboard/"):
                self.board.scalars("epoch", record, record["epoch"])
        self.log(epoch_line(record, self.epochs))

    def close(self) -> None:
        if self.board is not None:
            self.board.close()


class ProgressDisplay(Callback):
    """Rank 0's bar or per-interval line (`fasttrain.observe.progress.Progress`); `tick` is the loop's per-step call."""

    def __init__(self, log, run_steps: int = 0, short_hint: str = "") -> None:
        self.progress = Progress(enabled=True, log=log, run_steps=run_steps, short_hint=short_hint)
        self.tick = self.progress.tick

    def start_epoch(self, epoch: int, epochs: float, steps: int, done: int) -> None:
        self.progress.start_epoch(epoch, epochs, steps, done=done)

    def on_interval(self, interval: Interval) -> None:
        self.progress.interval(interval.step, interval.loss, interval.lr, interval.images_per_sec)

    def end_steps(self) -> None:
        self.progress.end_epoch()


class Preemption(Callback):
    """The signal handlers (`fasttrain.dist.preemption.PreemptionWatch`): the loop sums each rank's flag at
    its log intervals; an agreed signal stops the run at that boundary."""

    def __init__(self, watch: PreemptionWatch) -> None:
        self.watch = watch

    def stop_reason(self, boundary: Boundary) -> Optional[str]:
        return boundary.signal

    def close(self) -> None:
        self.watch.close()


class StopAfterSteps(Callback):
    """train.stop_after_steps: a planned stop with a checkpoint (the epoch loop has a boundary there)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def stop_reason(self, boundary: Boundary) -> Optional[str]:
        return "stop_after_steps" if self.step and boundary.global_step == self.step else None


class PeriodicCheckpoints(Callback):
    """checkpoint.every_steps: a step checkpoint every N optimizer steps (the epoch loop has a boundary there)."""

    def __init__(self, every: int) -> None:
        self.every = every

    def wants_checkpoint(self, boundary: Boundary) -> bool:
        return bool(self.every) and boundary.global_step % self.every == 0
