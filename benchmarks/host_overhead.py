"""Host overhead per training step, in numbers a CPU can measure.

    python -m benchmarks.host_overhead                  # both tables on this machine's CPU
    python -m benchmarks.host_overhead --json out.json  # ... and the rows as JSON

On a GPU a small model's step is a few hundred microseconds of device work, so the host's cost
per step sets the speed. Two measures of it:

1. **ATen ops called per training step** (torch.profiler over 100 steps of CIFAR10_CNN, batch 128,
   synthetic CIFAR-shaped data, world size 1; each outermost ATen call counts once, the ops it
   runs inside do not: one dispatch from the host program, the unit a launch-bound GPU pays for,
   and a count that compiled code does not hide): the tutorial's loop (fp32,
   its DataLoader with 2 workers: only the training process's ops count), fasttrain's eager fast
   step (bf16, channels_last, gpu loader: the real epoch loop, log interval 50) and the captured
   step (the same, train.capture=true: compiled whole; on CUDA one graph replay). Beside each
   total, the model's own forward + backward ops (counted alone, in the path's precision and
   memory format) and what the path adds around them: loader, wrapper, loss, optimizer,
   schedule, bookkeeping, checks. Epoch start and end are amortized over the 100 steps.
2. **Host time per step** on a model small enough that the host dominates (MLP with one hidden
   layer of 32, batch 32, synthetic data, one CPU thread): a bare hand-written loop (the same
   epoch tensors of the gpu loader, the same fused AdamW and OneCycle schedule, nothing else),
   fasttrain's eager epoch loop with the trainer's hooks (log interval reductions with the
   preemption flag, a steps.jsonl line per interval, the progress counter), the captured step's
   loop, and the tutorial's loop. Windows of whole epochs, at least `--min-seconds` each,
   alternating between the loops so that drift hits all alike; the median window.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from benchmarks.epoch_loop import TrainerLoop
from benchmarks.report import table
from benchmarks.tutorial_loop import tutorial_loader, tutorial_steps
from fasttrain import dist
from fasttrain.config import Config, ModelConfig, load_config
from fasttrain.data import load_split
from fasttrain.train.loop import synchronize
from fasttrain.models import build_model
from fasttrain.observe.metrics import JsonLines
from fasttrain.observe.logs import silent_logger
from fasttrain.train.optim import Schedule, build_optimizer
from fasttrain.train.build import build_parts

COUNTED_STEPS = 100
TUTORIAL = "tutorial loop (fp32, DataLoader, loss.item() per step)"
EAGER = "fasttrain eager step (real epoch loop)"
CAPTURED = "fasttrain captured step (train.capture=true)"
BARE = "bare hand-written loop (same data, optimizer, schedule)"


class OpCounter:
    """`with OpCounter() as counter:` counts the outermost ATen calls made inside (torch.profiler:
    views, in-place ops and the autograd engine's backward calls included; an op's sub-ops not)."""

    def __enter__(self) -> "OpCounter":
        self.ops: collections.Counter = collections.Counter()
        self._profile = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        self._profile.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._profile.__exit__(*exc)
        for event in self._profile.events():
            if not event.name.startswith("aten::"):
                continue
            parent = event.cpu_parent
            while parent is not None and not parent.name.startswith("aten::"):
                parent = parent.cpu_parent
            if parent is None:  # outermost: nothing above it is an ATen op
                self.ops[event.name] += 1


def _config(device: str, overrides: Sequence[str]) -> Config:
    return load_config(None, [f"train.device={device}", "data.dataset=synthetic", "data.drop_last=true",
                              "optim.name=adamw", "sched.name=onecycle", "train.epochs=1000", "train.log_every=50",
                              "output.dir=/nonexistent", *overrides])


def trainer_loop(parts, cfg: Config, ctx: dist.Dist, sink: Path) -> TrainerLoop:
    """fasttrain's epoch loop with the boundaries a Trainer of `cfg` gives it, steps.jsonl written to `sink`."""
    return TrainerLoop(parts, cfg.train.log_every, ctx.backend, JsonLines(sink).write, cfg.checkpoint.signal_check_every,
                       every=cfg.checkpoint.every_steps, stop_at=cfg.train.stop_after_steps,
                       at_boundary=lambda *_: False)


# --------------------------------------------------------------------------- ops per step


def _model_ops(model: torch.nn.Module, images: torch.Tensor, autocast: Callable) -> int:
    """The model's own forward + backward, alone: what every path must dispatch anyway."""
    with autocast():
        probe = model(images)
    grad = torch.ones_like(probe)
    with OpCounter() as counter:
        with autocast():
            out = model(images)
        out.backward(grad)
    model.zero_grad(set_to_none=True)
    return sum(counter.ops.values())


@dataclass
class OpsRow:
    path: str
    ops_per_step: float
    model_ops_per_step: int  # the model's forward + backward alone, eager
    added_ops_per_step: Optional[float]  # None for the compiled step: its model ops are fused into kernels
    top_ops: Dict[str, float]  # the most frequent ops of the path, per step (the model's included)


def _row(path: str, counter: OpCounter, steps: int, model_ops: int, compiled: bool = False) -> OpsRow:
    total = sum(counter.ops.values()) / steps
    top = {name: round(count / steps, 2) for name, count in counter.ops.most_common(12)}
    return OpsRow(path, round(total, 2), model_ops, None if compiled else round(total - model_ops, 2), top)


def ops_rows(device: str = "cpu", model_name: str = "CIFAR10_CNN", counted_steps: int = COUNTED_STEPS,
             progress=print, train_size: int = 50000) -> List[OpsRow]:
    """Ops per step of each path; `train_size` synthetic images (an epoch of CIFAR-10's size by default)."""
    ctx = dist.setup(device)
    rows: List[OpsRow] = []
    try:
        base = [f"model.name={model_name}", "train.batch_size=128", f"data.train_size={train_size}",
                "data.num_workers=2"]
        # the tutorial's loop: fp32, contiguous, its own DataLoader (2 workers) and AdamW
        cfg = _config(device, base)
        images, labels, info = load_split(cfg.data, train=True)
        torch.manual_seed(0)
        model = build_model(ModelConfig(name=model_name), 3, 32, 10).to(ctx.device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
        steps = tutorial_steps(model, tutorial_loader(images, labels, 128, 2, pin_memory=device == "cuda"),
                               optimizer, ctx.device)
        for _ in range(5):
            next(steps)
        batch = torch.randn(128, 3, 32, 32, device=ctx.device)
        model_ops = _model_ops(model, batch, torch.enable_grad)
        with OpCounter() as counter:
            for _ in range(counted_steps):
                next(steps)
        rows.append(_row(TUTORIAL, counter, counted_steps, model_ops))
        progress(f"  {TUTORIAL}: {rows[-1].ops_per_step:.0f} ops/step")

        fast = base + ["data.loader=gpu", "train.precision=bf16", "train.channels_last=true"]
        for path, extra in ((EAGER, []), (CAPTURED, ["train.compile=default", "train.capture=true"])):
            torch._dynamo.reset()
            cfg = _config(device, fast + extra)
            with tempfile.TemporaryDirectory() as tmp:
                parts = build_parts(cfg, ctx, silent_logger())
                loop = trainer_loop(parts, cfg, ctx, Path(tmp) / "steps.jsonl")
                loop.run(max_batches=10)  # compilation, capture, the optimizer's state
                images = torch.randn(128, 3, 32, 32, device=ctx.device, dtype=parts.precision.input_dtype)
                images = images.contiguous(memory_format=torch.channels_last)
                model_ops = _model_ops(parts.model, images, parts.precision.autocast)
                parts.model.zero_grad(set_to_none=True)
                with OpCounter() as counter:
                    done = loop.run(max_batches=counted_steps).timed_steps
            rows.append(_row(path, counter, done, model_ops, compiled=path == CAPTURED))
            progress(f"  {path}: {rows[-1].ops_per_step:.0f} ops/step"
                     + (f", {rows[-1].added_ops_per_step:.0f} added around the model's {model_ops}"
                        if path != CAPTURED else ""))
    finally:
        dist.teardown()
    return rows


# --------------------------------------------------------------------------- host time per step


@dataclass
class TimeRow:
    path: str
    us_per_step: float  # median window
    images_per_sec: float
    vs_bare: float  # time per step over the bare loop's, same run
    window_us_per_step: List[float]


def _bare_loop(parts, cfg: Config) -> Callable[[], int]:
    """The loop a person writes by hand around the same model, data, optimizer and schedule."""
    model = build_model(cfg.model, 3, 32, 10).to(parts.precision.device)
    model.load_state_dict(parts.model.state_dict())
    optimizer = build_optimizer(cfg.optim, model, parts.precision.device)
    schedule = Schedule(cfg.sched, optimizer, cfg.train.epochs, len(parts.train_loader))
    loader, size = parts.train_loader, cfg.train.batch_size
    epoch = [10_000]

    def run_epoch() -> int:
        model.train()
        loader.set_epoch(epoch[0])
        epoch[0] += 1
        images, labels = loader.epoch_tensors()
        steps = 0
        for start in range(0, labels.shape[0] - size + 1, size):
            loss = F.cross_entropy(model(images[start : start + size]), labels[start : start + size])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.after_batch()
            steps += 1
        return steps

    return run_epoch


def _tutorial_epoch(cfg: Config, device: torch.device) -> Callable[[], int]:
    images, labels, _ = load_split(cfg.data, train=True)
    torch.manual_seed(0)
    model = build_model(cfg.model, 3, 32, 10).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    loader = tutorial_loader(images, labels, cfg.train.batch_size, 2, pin_memory=device.type == "cuda")
    steps = tutorial_steps(model, loader, optimizer, device)
    per_epoch = len(labels) // cfg.train.batch_size

    def run_epoch() -> int:
        for _ in range(per_epoch):
            next(steps)
        return per_epoch

    return run_epoch


def _window(run_epoch: Callable[[], int], device: torch.device, min_seconds: float) -> float:
    """Whole epochs until at least min_seconds have passed: seconds per step."""
    synchronize(device)
    start, steps = time.perf_counter(), 0
    while True:
        steps += run_epoch()
        synchronize(device)
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return elapsed / steps


def host_time_rows(device: str = "cpu", min_seconds: float = 1.0, windows: int = 5, threads: int = 1,
                   progress=print, train_size: int = 5000) -> List[TimeRow]:
    """Host time per step of each loop on the MLP, over epochs of `train_size` synthetic images."""
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    ctx = dist.setup(device)
    try:
        small = ["model.name=MLP", "model.hidden_sizes=[32]", "model.dropout=0.0", "train.batch_size=32",
                 "data.loader=gpu", "data.num_workers=2", f"data.train_size={train_size}"]
        with tempfile.TemporaryDirectory() as tmp:
            loops: Dict[str, Callable[[], int]] = {}
            cfg = _config(device, small)
            eager_parts = build_parts(cfg, ctx, silent_logger())
            loops[BARE] = _bare_loop(eager_parts, cfg)
            eager = trainer_loop(eager_parts, cfg, ctx, Path(tmp) / "eager.jsonl")
            loops[EAGER] = lambda: eager.run().timed_steps
            torch._dynamo.reset()
            cap_cfg = _config(device, small + ["train.compile=default", "train.capture=true"])
            captured = trainer_loop(build_parts(cap_cfg, ctx, silent_logger()), cap_cfg, ctx,
                                    Path(tmp) / "captured.jsonl")
            loops[CAPTURED] = lambda: captured.run().timed_steps
            loops[TUTORIAL] = _tutorial_epoch(cfg, ctx.device)
            for run_epoch in loops.values():
                run_epoch()  # warm-up: compilation, capture, workers, the optimizers' state
            times: Dict[str, List[float]] = {name: [] for name in loops}
            for _ in range(windows):  # alternate: drift of a shared machine hits every loop alike
                for name, run_epoch in loops.items():
                    times[name].append(_window(run_epoch, ctx.device, min_seconds))
    finally:
        dist.teardown()
        torch.set_num_threads(previous_threads)
    bare = statistics.median(times[BARE])
    rows = []
    for name in (BARE, EAGER, CAPTURED, TUTORIAL):
        median = statistics.median(times[name])
        rows.append(TimeRow(name, round(median * 1e6, 1), round(cfg.train.batch_size / median, 1),
                            round(median / bare, 3), [round(t * 1e6, 1) for t in times[name]]))
        progress(f"  {name}: {median * 1e6:,.0f} us/step ({median / bare:.2f}x the bare loop)")
    return rows


# --------------------------------------------------------------------------- report


def markdown(ops: Sequence[dict], host: Sequence[dict], model_name: str = "CIFAR10_CNN", threads: int = 1) -> str:
    """The two tables, from the rows as dicts (asdict of OpsRow / TimeRow, or read back from JSON)."""
    def added(row: dict) -> str:
        return (f"{row['added_ops_per_step']:.1f}" if row["added_ops_per_step"] is not None
                else "n/a (compiled: the model's ops are fused)")

    return "\n\n".join([
        table([f"path ({model_name}, batch 128, world size 1)", "ATen ops per step", "model's own fwd+bwd",
               "added around the model"],
              ([row["path"], f"{row['ops_per_step']:.1f}", row["model_ops_per_step"], added(row)] for row in ops), "lrrr"),
        table([f"loop (MLP [32], batch 32, {threads} thread)", "host us per step", "images/s", "vs bare loop"],
              ([row["path"], f"{row['us_per_step']:,.0f}", f"{row['images_per_sec']:,.0f}", f"{row['vs_bare']:.2f}x"]
               for row in host), "lrrr")])


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.host_overhead", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--min-seconds", type=float, default=1.0, help="each host-time window lasts at least this")
    parser.add_argument("--windows", type=int, default=5, help="host-time windows per loop (median reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads for the host-time table")
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    progress = lambda line: print(line, flush=True)  # noqa: E731
    progress("ops per step:")
    ops = [asdict(r) for r in ops_rows(args.device, progress=progress)]
    progress("host time per step:")
    host = [asdict(r) for r in host_time_rows(args.device, args.min_seconds, args.windows, args.threads, progress)]
    print()
    print(markdown(ops, host, threads=args.threads))
    if args.json:
        args.json.write_text(json.dumps({"ops": ops, "host_time": host}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
