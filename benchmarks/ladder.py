"""The speed ladder: images/s of the tutorial's loop, then fasttrain with each speed feature added
in turn, on the same model, data and batch size, measured side by side in one run.

    python -m benchmarks.ladder                                   # CUDA, CIFAR10_CNN, batch 128 (< 5 min on one GPU)
    python -m benchmarks.ladder --data-root ../shared/data        # where cifar-10-batches-py/ lives
    python -m benchmarks.ladder --loaders-only                    # the loaders alone, no model
    python -m benchmarks.ladder --device cpu --model SimpleModel --min-seconds 0.2 --log-every 5   # a CPU check

Each rung: guard steps whose losses must be finite and decreasing (a broken fast path cannot post
a number), more warm-up (compilation and capture happen there and are left out), then
`--windows` timed windows of at least `--min-seconds` each; the figure is the median window.
fasttrain's rungs run its real epoch loop (`fasttrain.train.loop.train_one_epoch` with the trainer's
step, schedule, loader, log-interval reductions and preemption flag; benchmarks.epoch_loop), so
per-epoch costs and periodic syncs land in the windows as they do in a run; the tutorial's loop
runs its own loop. `python -m benchmarks` runs the full suite (ladder, batch sizes, loaders, host
overhead, scaling) and writes JSON, markdown and a chart.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from benchmarks.epoch_loop import EpochLoopTimer, LoopMeasurement
from benchmarks.measure import Measurement, Windows, measure
from benchmarks.report import percent, environment, table
from benchmarks.tutorial_loop import tutorial_loader, tutorial_steps
from fasttrain import dist
from fasttrain.config import Config, ModelConfig, load_config
from fasttrain.data import build_loaders, load_split
from fasttrain.data.loaders.dali import dali_available
from fasttrain.train.loop import synchronize
from fasttrain.observe.flops import flops_per_image, peak_flops
from fasttrain.models import build_model
from fasttrain.observe.logs import silent_logger
from fasttrain.train.build import build_parts

TUTORIAL = "tutorial loop (PIL transforms, DataLoader, loss.item() per step)"
# each rung adds its switch to the ones above it
RUNGS: List[Tuple[str, List[str]]] = [
    ("fasttrain, plain loader", ["data.loader=plain"]),
    ("+ gpu-resident loader", ["data.loader=gpu"]),
    ("+ channels_last", ["train.channels_last=true"]),
    ("+ bf16 autocast", ["train.precision=bf16"]),
    ("+ torch.compile", ["train.compile=default"]),
    ("+ whole-step capture", ["train.capture=true"]),
]
DALI_RUNG = ("DALI instead of the gpu-resident loader", ["data.loader=dali"])


@dataclass
class Timing:
    """How long and how hard to measure."""
    warmup: int = 20  # steps before timing, guard steps included (the loaders alone: whole epochs)
    windows: int = 5
    guard_steps: int = 12
    min_seconds: float = 1.0  # each window runs at least this long


@dataclass
class Row:
    variant: str
    batch_size: int
    images_per_sec: float
    window_images_per_sec: List[float]
    speedup: float  # over the first row of its table, measured in the same run
    data_wait_share: Optional[float]  # None for the tutorial loop, whose fetch is inside its step
    mfu: Optional[float]  # achieved FLOP/s / the device's peak for the precision; None when unknown
    guard_first_loss: float = 0.0
    guard_last_loss: float = 0.0


def base_overrides(device: str, model: str, batch_size: int, data_root: str, workers: int,
                   log_every: int = 50, train_size: int = 10000) -> List[str]:
    """The settings every row shares; `train_size`: synthetic images per epoch where CIFAR-10 is absent."""
    real = (Path(data_root) / "cifar-10-batches-py").is_dir()
    # a constant AdamW lr 1e-3, as the tutorial loop row uses: the guard needs the loss to move from step one
    return [f"train.device={device}", f"model.name={model}", f"train.batch_size={batch_size}", "train.epochs=10000",
            f"train.log_every={log_every}",
            "optim.name=adamw", "optim.lr=0.001", "sched.name=none",
            "data.drop_last=true", f"data.num_workers={workers}", "output.dir=/nonexistent", f"data.root={data_root}",
            "data.download=false", "data.dataset=cifar10" if real else "data.dataset=synthetic",
            "data.train_size=0" if real else f"data.train_size={train_size}"]


def ladder_rungs() -> List[Tuple[str, List[str]]]:
    """(variant, cumulative overrides) for every rung, DALI last when it is installed."""
    rungs, overrides = [], []
    for variant, switch in RUNGS:
        overrides = overrides + switch
        rungs.append((variant, overrides))
    if dali_available():
        rungs.append((DALI_RUNG[0], rungs[-1][1] + DALI_RUNG[1]))
    return rungs


def tutorial_measurement(cfg: Config, device: torch.device, timing: Timing, workers: int) -> Measurement:
    images, labels, info = load_split(cfg.data, train=True)
    torch.manual_seed(cfg.train.seed)
    model = build_model(ModelConfig(name=cfg.model.name), info.in_channels, info.image_size,
                        info.num_classes).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    loader = tutorial_loader(images, labels, cfg.train.batch_size, workers, pin_memory=device.type == "cuda")
    steps = tutorial_steps(model, loader, optimizer, device)
    # the tutorial's loop fetches and steps in one go: its data wait is inside the step here
    return measure(TUTORIAL, lambda: None, lambda _: next(steps), cfg.train.batch_size, device,
                   Windows(timing.warmup, timing.windows, 0, timing.guard_steps, timing.min_seconds))


def fasttrain_measurement(cfg: Config, ctx: dist.Dist, timing: Timing, name: str) -> Tuple[LoopMeasurement, float]:
    """(measurement of the real epoch loop, forward+backward FLOPs per image of the model)."""
    parts = build_parts(cfg, ctx, silent_logger())
    timer = EpochLoopTimer(parts, cfg.train.log_every, ctx.backend, ctx.world_size)
    measurement = timer.measure(name, timing.guard_steps, timing.warmup, timing.min_seconds, timing.windows)
    shape = tuple(next(iter(parts.val_loader))[0].shape[1:])
    return measurement, flops_per_image(parts.model, shape)


def _mfu(ips: float, flops: float, cfg: Config, device: torch.device, peak_override: Optional[float]) -> Optional[float]:
    peak = peak_flops(device, cfg.train.precision, cfg.train.tf32, peak_override)
    return ips * flops / peak if peak else None


def train_rows(base: List[str], ctx: dist.Dist, timing: Timing, workers: int,
               peak_override: Optional[float] = None, progress=print) -> List[Row]:
    cfg = load_config(None, base)
    first = tutorial_measurement(cfg, ctx.device, timing, workers)
    rows = [Row(TUTORIAL, cfg.train.batch_size, first.images_per_sec, first.window_images_per_sec, 1.0, None, None, first.guard_losses[0] if first.guard_losses else 0.0,
                first.guard_losses[-1] if first.guard_losses else 0.0)]
    progress(f"  {TUTORIAL}: {first.images_per_sec:,.0f} img/s")
    for variant, overrides in ladder_rungs():
        torch._dynamo.reset()  # each rung compiles from scratch
        rung_cfg = load_config(None, base + overrides)
        m, flops = fasttrain_measurement(rung_cfg, ctx, timing, variant)
        rows.append(Row(variant, rung_cfg.train.batch_size, m.images_per_sec, m.window_images_per_sec,
                        m.images_per_sec / rows[0].images_per_sec, m.data_wait_share,
                        _mfu(m.images_per_sec, flops, rung_cfg, ctx.device, peak_override),
                        m.guard_losses[0] if m.guard_losses else 0.0, m.guard_losses[-1] if m.guard_losses else 0.0))
        progress(f"  {variant}: {m.images_per_sec:,.0f} img/s")
    return rows


def _epoch_rates(run_epoch: Callable[[], int], device: torch.device, timing: Timing) -> List[float]:
    """images/s of windows of whole epochs (at least timing.min_seconds each), after warm-up epochs:
    a loader that does its work when an epoch starts (the resident one) pays it inside the window."""
    for _ in range(timing.warmup):
        run_epoch()
    rates = []
    for _ in range(timing.windows):
        synchronize(device)  # host sync: the clock starts with an idle device
        start, samples = time.perf_counter(), 0
        while True:
            samples += run_epoch()
            synchronize(device)  # host sync: the window closes when the device is done
            elapsed = time.perf_counter() - start
            if elapsed >= timing.min_seconds:
                break
        rates.append(samples / elapsed)
    return rates


def loader_rows(base: List[str], device: torch.device, timing: Timing, workers: int, progress=print) -> List[Row]:
    """Images/s of each loader alone, over whole epochs: batches produced on the device, nothing
    trained (each batch's labels are summed on the device, so producing it must finish in time)."""
    cfg = load_config(None, base)
    images, labels, _ = load_split(cfg.data, train=True)
    tutorial = tutorial_loader(images, labels, cfg.train.batch_size, workers, pin_memory=device.type == "cuda")

    def tutorial_epoch() -> int:
        samples = 0
        for x, y in tutorial:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            y.sum()
            samples += y.shape[0]
        return samples

    sources: List[Tuple[str, Callable[[], int]]] = [("tutorial DataLoader (PIL transforms)", tutorial_epoch)]
    for name in ("plain", "gpu") + (("dali",) if dali_available() else ()):
        train_loader, _, _ = build_loaders(load_config(None, base + [f"data.loader={name}"]), device)
        sources.append((f"fasttrain {name}", _epochs_of(train_loader)))
    rows: List[Row] = []
    for variant, run_epoch in sources:
        rates = _epoch_rates(run_epoch, device, timing)
        median = statistics.median(rates)
        rows.append(Row(variant, cfg.train.batch_size, median, rates,
                        median / (rows[0].images_per_sec if rows else median), None, None))
        progress(f"  {variant}: {median:,.0f} img/s")
    return rows


def _epochs_of(loader) -> Callable[[], int]:
    epoch = itertools.count()

    def run_epoch() -> int:
        loader.set_epoch(next(epoch))
        samples = 0
        for _, y in loader:
            y.sum()
            samples += y.shape[0]
        return samples

    return run_epoch


def print_table(rows: Sequence[Row], loaders_only: bool) -> None:
    if loaders_only:
        print(table(["loader (no model)", "images/s", "vs tutorial DataLoader"],
                    ([row.variant, f"{row.images_per_sec:,.0f}", f"{row.speedup:.2f}x"] for row in rows), "lrr"))
        return
    print(table(["variant", "images/s", "speedup vs tutorial loop", "data wait", "MFU", "guard loss first -> last"],
                ([row.variant, f"{row.images_per_sec:,.0f}", f"{row.speedup:.2f}x", percent(row.data_wait_share, 0),
                  percent(row.mfu), f"{row.guard_first_loss:.3f} -> {row.guard_last_loss:.3f}"] for row in rows),
                "lrrrrl"))


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ladder", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--data-root", default="./data", help="folder holding cifar-10-batches-py/; synthetic data "
                        "of the same shape is used when it is absent")
    parser.add_argument("--model", default="CIFAR10_CNN")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=20, help="steps before timing, guard steps included (with "
                        "--loaders-only: whole epochs)")
    parser.add_argument("--guard-steps", type=int, default=12, help="first steps whose losses must be finite and fall")
    parser.add_argument("--min-seconds", type=float, default=1.0, help="each training window runs at least this long")
    parser.add_argument("--windows", type=int, default=5, help="timed windows per rung; the median is reported")
    parser.add_argument("--log-every", type=int, default=50, help="fasttrain's train.log_every: its log intervals "
                        "are the loop's sync points, and the windows' edges")
    parser.add_argument("--train-size", type=int, default=10000, help="synthetic training images per epoch, where "
                        "--data-root holds no CIFAR-10 (smaller: quicker epochs for a check)")
    parser.add_argument("--tutorial-workers", type=int, default=4,
                        help="num_workers of the DataLoaders (the tutorial's 4; fasttrain's plain loader uses the same)")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak TFLOP/s for MFU (default: known GPUs)")
    parser.add_argument("--loaders-only", action="store_true",
                        help="time the loaders alone (no model): tutorial DataLoader, plain, gpu, dali")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's own); 1 keeps "
                        "a check on a busy shared CPU from waiting on its thread pool")
    parser.add_argument("--json", type=Path, help="also write the rows and the environment to this JSON file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    timing = Timing(args.warmup if args.loaders_only else max(args.warmup, args.guard_steps), args.windows,
                    args.guard_steps, args.min_seconds)
    base = base_overrides(args.device, args.model, args.batch_size, args.data_root, args.tutorial_workers,
                          args.log_every, args.train_size)
    real = "data.dataset=cifar10" in base
    ctx = dist.setup(args.device)
    try:
        env = environment(ctx.device, ctx.world_size, ctx.backend)
        print(f"device {ctx.device} ({env['device']}) | torch {env['torch']} | model {args.model} | batch "
              f"{args.batch_size} | data {'CIFAR-10' if real else 'synthetic CIFAR-shaped'} | {timing.guard_steps} "
              f"guard + warm-up to {timing.warmup} steps, "
              + (f"{timing.windows} windows of whole epochs >= {timing.min_seconds:g} s" if args.loaders_only else
                 f"{timing.windows} windows of >= {timing.min_seconds:g} s (fasttrain: cut at log intervals of "
                 f"{args.log_every} steps)") + ", median",
              flush=True)
        progress = lambda line: print(line, flush=True)  # noqa: E731
        rows = (loader_rows(base, ctx.device, timing, args.tutorial_workers, progress) if args.loaders_only
                else train_rows(base, ctx, timing, args.tutorial_workers, args.peak_tflops, progress))
    finally:
        dist.teardown()
    print()
    print_table(rows, args.loaders_only)
    if args.json:
        env.update({"model": args.model, "batch_size": args.batch_size, "data": "cifar10" if real else "synthetic",
                    **asdict(timing)})
        args.json.write_text(json.dumps({"environment": env, "rows": [asdict(r) for r in rows]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
