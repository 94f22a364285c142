"""The speed ladder: images/s of the tutorial's loop, then fasttrain with each speed feature added
in turn, on the same model, data and batch size, measured side by side in one run.

    python -m benchmarks.ladder                                   # CUDA, CIFAR10_CNN, batch 128 (< 5 min on one GPU)
    python -m benchmarks.ladder --data-root ../shared/data        # where cifar-10-batches-py/ lives
    python -m benchmarks.ladder --device cpu --model SimpleModel --steps 5 --warmup 2   # a CPU check

Each rung: warm-up steps (compilation happens there and is left out), then `--windows` timed
windows of `--steps` steps, each between device synchronizations; the figure is the median
window's images/s. Every rung's losses are checked to be finite, so a broken fast path cannot
post a number. Training steps are the real ones (`fasttrain.engine.train_step`, DDP with world
size 1, the configured loader), not a mock-up.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import torch

from benchmarks.tutorial_loop import tutorial_loader, tutorial_steps
from fasttrain import dist
from fasttrain.config import Config, ModelConfig, load_config
from fasttrain.data import build_loaders, load_split
from fasttrain.data.dali import dali_available
from fasttrain.engine import synchronize, train_step
from fasttrain.models import build_model
from fasttrain.optim import build_optimizer
from fasttrain.trainer import build_parts

# each rung adds its switch to the ones above it
RUNGS: List[Tuple[str, List[str]]] = [
    ("fasttrain, plain loader", ["data.loader=plain"]),
    ("+ gpu-resident loader", ["data.loader=gpu"]),
    ("+ channels_last", ["train.channels_last=true"]),
    ("+ bf16 autocast", ["train.precision=bf16"]),
    ("+ torch.compile", ["train.compile=default"]),
]
DALI_RUNG = ("DALI instead of the gpu-resident loader", ["data.loader=dali"])


@dataclass
class Row:
    variant: str
    images_per_sec: float
    window_images_per_sec: List[float]
    speedup: float
    first_loss: float
    last_loss: float


def measure(step: Callable[[], object], batch: int, warmup: int, steps: int, windows: int,
            device: torch.device) -> Tuple[float, List[float], List[float]]:
    """(median images/s, each window's images/s, the losses of every timed step)."""
    for _ in range(warmup):
        step()
    results: List[object] = []
    rates = []
    for _ in range(windows):
        synchronize(device)  # host sync: the clock starts when the device is idle
        start = time.perf_counter()
        for _ in range(steps):
            results.append(step())
        synchronize(device)  # host sync: the clock stops when the device is done
        rates.append(steps * batch / (time.perf_counter() - start))
    losses = [float(v) for v in (torch.stack(results).float().cpu().tolist() if isinstance(results[0], torch.Tensor)
                                 else results)]
    return statistics.median(rates), rates, losses


def _check(variant: str, losses: Sequence[float]) -> None:
    if not all(torch.isfinite(torch.tensor(losses))):
        raise SystemExit(f"benchmark: {variant} produced non-finite losses: its figure would be meaningless")


def _cycle(loader) -> Iterator:
    for epoch in itertools.count():
        loader.set_epoch(epoch)
        yield from loader


def tutorial_rung(cfg: Config, device: torch.device, args: argparse.Namespace) -> Tuple[float, List[float], List[float]]:
    images, labels, info = load_split(cfg.data, train=True)
    torch.manual_seed(cfg.train.seed)
    model = build_model(ModelConfig(name=args.model), info.in_channels, info.image_size, info.num_classes).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    loader = tutorial_loader(images, labels, args.batch_size, args.tutorial_workers, pin_memory=device.type == "cuda")
    steps = tutorial_steps(model, loader, optimizer, device)
    return measure(lambda: next(steps), args.batch_size, args.warmup, args.steps, args.windows, device)


def fasttrain_rung(cfg: Config, ctx: dist.Dist, args: argparse.Namespace) -> Tuple[float, List[float], List[float]]:
    logger = logging.getLogger("fasttrain.bench")
    logger.addHandler(logging.NullHandler())
    logger.propagate = False
    parts = build_parts(cfg, ctx, logger)
    batches = _cycle(parts.train_loader)
    parts.train_model.train()

    def step() -> torch.Tensor:
        images, labels = next(batches)
        loss, _ = train_step(parts.train_model, images, labels, parts.optimizer, parts.precision)
        parts.schedule.after_batch()
        return loss  # stays on the device: no per-step sync

    return measure(step, args.batch_size, args.warmup, args.steps, args.windows, ctx.device)


def train_rows(base: List[str], ctx: dist.Dist, args: argparse.Namespace) -> List[Row]:
    rows: List[Row] = []
    rate, rates, losses = tutorial_rung(load_config(None, base), ctx.device, args)
    _check("tutorial loop", losses)
    rows.append(Row("tutorial loop (PIL transforms, DataLoader, loss.item() per step)", rate, rates, 1.0,
                    losses[0], losses[-1]))
    print(f"  {rows[-1].variant}: {rate:,.0f} img/s", flush=True)
    rungs: List[Tuple[str, List[str]]] = []
    overrides: List[str] = []
    for variant, switch in RUNGS:
        overrides = overrides + switch
        rungs.append((variant, overrides))
    if dali_available():
        rungs.append((DALI_RUNG[0], rungs[-1][1] + DALI_RUNG[1]))
    for variant, rung_overrides in rungs:
        torch._dynamo.reset()  # each rung compiles from scratch
        rate, rates, losses = fasttrain_rung(load_config(None, base + rung_overrides), ctx, args)
        _check(variant, losses)
        rows.append(Row(variant, rate, rates, rate / rows[0].images_per_sec, losses[0], losses[-1]))
        print(f"  {variant}: {rate:,.0f} img/s", flush=True)
    return rows


def loader_rows(base: List[str], device: torch.device, args: argparse.Namespace) -> List[Row]:
    """Images/s of each loader alone: batches produced on the device, nothing trained."""
    cfg = load_config(None, base)
    images, labels, _ = load_split(cfg.data, train=True)
    tutorial = tutorial_loader(images, labels, args.batch_size, args.tutorial_workers, pin_memory=device.type == "cuda")

    def tutorial_batches() -> Iterator:
        while True:
            for x, y in tutorial:
                yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    sources = [("tutorial DataLoader (PIL transforms)", tutorial_batches())]
    for name in ("plain", "gpu") + (("dali",) if dali_available() else ()):
        train_loader, _, _ = build_loaders(load_config(None, base + [f"data.loader={name}"]), device)
        sources.append((f"fasttrain {name}", _cycle(train_loader)))
    rows: List[Row] = []
    for variant, batches in sources:
        rate, rates, _ = measure(lambda: next(batches)[1].sum(), args.batch_size, args.warmup, args.steps,
                                 args.windows, device)
        rows.append(Row(variant, rate, rates, rate / (rows[0].images_per_sec if rows else rate), 0.0, 0.0))
        print(f"  {variant}: {rate:,.0f} img/s", flush=True)
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ladder", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--data-root", default="./data", help="folder holding cifar-10-batches-py/; synthetic data "
                        "of the same shape is used when it is absent")
    parser.add_argument("--model", default="CIFAR10_CNN")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=20, help="steps before timing (compilation happens here)")
    parser.add_argument("--steps", type=int, default=50, help="steps per timed window")
    parser.add_argument("--windows", type=int, default=3, help="timed windows per rung; the median is reported")
    parser.add_argument("--tutorial-workers", type=int, default=4,
                        help="num_workers of the DataLoaders (the tutorial's 4; fasttrain's plain loader uses the same)")
    parser.add_argument("--loaders-only", action="store_true",
                        help="time the loaders alone (no model): tutorial DataLoader, plain, gpu, dali")
    parser.add_argument("--json", type=Path, help="also write the rows and the environment to this JSON file")
    args = parser.parse_args(argv)

    real = (Path(args.data_root) / "cifar-10-batches-py").is_dir()
    base = [f"train.device={args.device}", f"model.name={args.model}", f"train.batch_size={args.batch_size}",
            "train.epochs=10000", "data.drop_last=true", f"data.num_workers={args.tutorial_workers}",
            "output.dir=/nonexistent",
            f"data.root={args.data_root}", "data.download=false",
            "data.dataset=cifar10" if real else "data.dataset=synthetic",
            "data.train_size=0" if real else "data.train_size=10000"]
    ctx = dist.setup(args.device)
    try:
        device = ctx.device
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
        header = (f"device {device} ({name}) | torch {torch.__version__} | model {args.model} | batch "
                  f"{args.batch_size} | data {'CIFAR-10' if real else 'synthetic CIFAR-shaped'} | warm-up "
                  f"{args.warmup} steps, {args.windows} windows x {args.steps} steps, median")
        print(header, flush=True)
        rows = loader_rows(base, device, args) if args.loaders_only else train_rows(base, ctx, args)
    finally:
        dist.teardown()

    print()
    if args.loaders_only:
        print("| loader (no model) | images/s | vs tutorial DataLoader |")
        print("|---|---:|---:|")
        for row in rows:
            print(f"| {row.variant} | {row.images_per_sec:,.0f} | {row.speedup:.2f}x |")
    else:
        print("| variant | images/s | speedup vs tutorial loop | loss first -> last timed step |")
        print("|---|---:|---:|---|")
        for row in rows:
            print(f"| {row.variant} | {row.images_per_sec:,.0f} | {row.speedup:.2f}x | "
                  f"{row.first_loss:.3f} -> {row.last_loss:.3f} |")
    if args.json:
        env = {"device": name, "torch": torch.__version__, "python": platform.python_version(),
               "model": args.model, "batch_size": args.batch_size, "data": "cifar10" if real else "synthetic",
               "warmup": args.warmup, "steps": args.steps, "windows": args.windows}
        args.json.write_text(json.dumps({"environment": env, "rows": [asdict(r) for r in rows]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
