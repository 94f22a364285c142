"""How every benchmark figure is measured: warm-up, a correctness guard, timed windows between
device synchronizations, the data-wait share, and MFU from the model's own FLOP count."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fasttrain.engine import synchronize

# Dense peak TFLOP/s from the vendors' datasheets, by the precision the step runs in
# ("tf32" = fp32 with TF32 tensor cores allowed). Matched by substring of the device name.
PEAK_TFLOPS = {
    "H200": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H100": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},  # SXM; PCIe is lower
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "L40S": {"bf16": 362.1, "fp16": 362.1, "tf32": 183.0, "fp32": 91.6},
    "RTX 4090": {"bf16": 165.2, "fp16": 165.2, "tf32": 82.6, "fp32": 82.6},
}


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


def measure(name: str, next_batch: Callable[[], object], step: Callable[[object], object], batch_size: int,
            device: torch.device, warmup: int, steps: int, windows: int, guard_steps: int = 0) -> Measurement:
    """Guard steps (checked, then counted as warm-up), more warm-up, then timed windows."""
    guard_losses: List[float] = []
    if guard_steps:
        guard_losses = _as_floats([step(next_batch()) for _ in range(guard_steps)])
        guard(name, guard_losses)
    for _ in range(max(0, warmup - guard_steps)):
        step(next_batch())
    rates, waits, totals = [], 0.0, 0.0
    for _ in range(windows):
        synchronize(device)  # host sync: the clock starts with an idle device
        start = time.perf_counter()
        for _ in range(steps):
            before = time.perf_counter()
            batch = next_batch()
            waits += time.perf_counter() - before
            step(batch)
        synchronize(device)  # host sync: the clock stops when the device is done
        elapsed = time.perf_counter() - start
        totals += elapsed
        rates.append(steps * batch_size / elapsed)
    return Measurement(statistics.median(rates), rates, waits / totals if totals else 0.0, guard_losses)


def flops_per_image(model: nn.Module, input_shape: Tuple[int, int, int]) -> float:
    """Forward + backward FLOPs of one image, counted on the model itself (a CPU copy)."""
    import copy

    probe = copy.deepcopy(model).float().cpu().train()
    x = torch.randn(2, *input_shape)
    with FlopCounterMode(display=False) as counter:
        probe(x).sum().backward()
    return counter.get_total_flops() / 2


def peak_flops(device: torch.device, precision: str, tf32: bool, override_tflops: Optional[float] = None) -> Optional[float]:
    """The device's dense peak FLOP/s for this precision, or None when unknown (the CPU, unlisted GPUs)."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    key = "tf32" if precision == "fp32" and tf32 else precision
    for card, peaks in PEAK_TFLOPS.items():
        if card in name:
            return peaks[key] * 1e12
    return None
