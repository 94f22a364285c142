"""How every benchmark figure is measured: warm-up, a correctness guard, timed windows between
device synchronizations, the data-wait share, and MFU from the model's own FLOP count.

`measure` times a step function in windows of a fixed step count (the loaders alone) or of at
least `min_seconds` each (the tutorial loop's rows); fasttrain's own rows time its real epoch loop
(benchmarks.epoch_loop)."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, List, Sequence

import torch
from fasttrain.train.loop import synchronize

class BrokenVariant(RuntimeError):
    """A variant whose losses are not finite or do not decrease: its speed must not be posted."""


@dataclass
class Measurement:
    images_per_sec: float  # median over the windows
    window_images_per_sec: List[float]
    data_wait_share: float  # host time blocked waiting for the next batch / total timed time
    guard_losses: List[float] = field(default_factory=list)


def _as_floats(values: Sequence[object]) -> List[float]:
    if values and isinstance(values[0], torch.Tensor):
        return [float(v) for v in torch.stack(list(values)).float().cpu().tolist()]  # host sync, once
    return [float(v) for v in values]


def guard(name: str, losses: Sequence[float]) -> None:
    """Finite, and the mean of the last quarter below the mean of the first quarter."""
    if not all(torch.isfinite(torch.tensor(losses)).tolist()):
        raise BrokenVariant(f"{name}: non-finite loss in the first {len(losses)} steps: {losses}")
    quarter = max(1, len(losses) // 4)
    first, last = statistics.mean(losses[:quarter]), statistics.mean(losses[-quarter:])
    if not last < first:
        raise BrokenVariant(f"{name}: the loss did not decrease over the first {len(losses)} steps "
                            f"({first:.4f} -> {last:.4f})")


@dataclass(frozen=True)
class Windows:
    """How a measurement runs: `guard_steps` (checked, then counted as warm-up), more warm-up up to
    `warmup` steps, then `count` timed windows: of `steps` steps each, or (steps=0) of whole steps
    until at least `min_seconds` have passed, so that a slow step or a periodic cost cannot fall
    outside a window."""
    warmup: int
    count: int
    steps: int = 0
    guard_steps: int = 0
    min_seconds: float = 0.0


def measure(name: str, next_batch: Callable[[], object], step: Callable[[object], object], batch_size: int,
            device: torch.device, plan: Windows) -> Measurement:
    """Images/s of `step` over batches from `next_batch`, timed as `plan` says (the median window)."""
    steps, min_seconds = plan.steps, plan.min_seconds
    guard_losses: List[float] = []
    if plan.guard_steps:
        guard_losses = _as_floats([step(next_batch()) for _ in range(plan.guard_steps)])
        guard(name, guard_losses)
    for _ in range(max(0, plan.warmup - plan.guard_steps)):
        step(next_batch())
    rates, waits, totals = [], 0.0, 0.0
    for _ in range(plan.count):
        synchronize(device)  # host sync: the clock starts with an idle device
        start = time.perf_counter()
        done = 0
        while True:
            before = time.perf_counter()
            batch = next_batch()
            waits += time.perf_counter() - before
            step(batch)
            done += 1
            if (done < steps) if steps else (time.perf_counter() - start < min_seconds):
                continue
            synchronize(device)  # host sync: the clock stops when the device is done
            elapsed = time.perf_counter() - start
            if steps or elapsed >= min_seconds:
                break
        totals += elapsed
        rates.append(done * batch_size / elapsed)
    return Measurement(statistics.median(rates), rates, waits / totals if totals else 0.0, guard_losses)
