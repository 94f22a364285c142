"""The benchmark suite: `python -m benchmarks --preset cpu-smoke | cpu | gpu [--out DIR] [--data-root ...]`
(`fasttrain bench ...` in a source checkout; `--list` prints the presets).

In one run, side by side: the speed ladder (the tutorial's loop, then fasttrain with each feature
added in turn, with data-wait share and MFU), the best batch size of every variant, the loaders
alone, and scaling over 1..N ranks with per-rank efficiency. Writes DIR/results.json (with the
environment), DIR/results.md and DIR/results.png.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from benchmarks.ladder import Row, Timing, base_overrides, fasttrain_measurement, ladder_rungs, loader_rows, train_rows
from benchmarks import host_overhead
from benchmarks.report import environment, write_chart, write_markdown
from fasttrain import dist
from fasttrain.config import load_config

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Preset:
    device: str
    model: str
    batch_size: int
    sweep: Sequence[int]  # batch sizes tried for each variant's best
    timing: Timing
    loader_timing: Timing
    workers: int
    ranks: Sequence[int]  # world sizes of the scaling runs
    log_every: int = 50  # fasttrain's log interval: its sync points, and the timed windows' edges
    host_model: str = "CIFAR10_CNN"  # the host-overhead section: model whose ops per step are counted,
    host_steps: int = 100  # ... over this many steps
    host_images: int = 50000  # synthetic training images of the host-overhead runs (ops; host time: a tenth)
    train_images: int = 10000  # synthetic training images of the other sections, where CIFAR-10 is absent
    threads: int = 0  # torch's CPU threads in every process (0: torch's default)


PRESETS = {
    # CI-sized: checks that every part runs and writes well-formed results; its figures are noise. The sweep
    # holds the ladder's batch (its rows are reused) and one more (measured). One thread per process: on a
    # shared 2-core machine torch's thread pool waiting for busy cores made tiny steps up to 100x slower.
    "cpu-smoke": Preset("cpu", "SimpleModel", 32, (32, 64), Timing(12, 2, 12, 0.05), Timing(1, 2, 0, 0.05), 0,
                        (1, 2), log_every=2, host_model="SimpleModel", host_steps=5, host_images=1280,
                        train_images=1280, threads=1),
    # the case study on a CPU: minutes, for machines without a GPU (log every 10 steps: windows of ~1 s)
    "cpu": Preset("cpu", "CIFAR10_CNN", 128, (128, 256), Timing(16, 5, 12, 1.0), Timing(1, 3, 0, 1.0), 2,
                  (1, 2), log_every=10),
    # the case study on GPUs: every variant, batch sizes up to 2048, all the node's GPUs for scaling
    "gpu": Preset("cuda", "CIFAR10_CNN", 128, (128, 256, 512, 1024, 2048), Timing(30, 5, 12, 1.0),
                  Timing(1, 3, 0, 1.0), 4, ()),
}


def best_batch_rows(preset: Preset, base: List[str], ctx: dist.Dist, ladder: Sequence[Row], progress) -> List[dict]:
    """Every variant at every batch size of the sweep: the fastest, in images/s. At the ladder's batch size
    the ladder's row is that measurement already (same settings, same timing): it is not run again."""
    measured = {row.variant: row.images_per_sec for row in ladder}
    results = []
    for variant, overrides in ladder_rungs():
        tried = {}
        for batch in preset.sweep:
            if batch == preset.batch_size and variant in measured:
                tried[batch] = measured[variant]
                continue
            torch._dynamo.reset()
            cfg = load_config(None, base + overrides + [f"train.batch_size={batch}"])
            measurement, _ = fasttrain_measurement(cfg, ctx, replace(preset.timing, guard_steps=0), variant)
            tried[batch] = measurement.images_per_sec
        best = max(tried, key=tried.get)
        results.append({"variant": variant, "images_per_sec_by_batch": tried, "best_batch_size": best,
                        "best_images_per_sec": tried[best]})
        progress(f"  {variant}: best batch {best} ({tried[best]:,.0f} img/s)")
    return results


def scaling_rows(preset: Preset, base: List[str], progress) -> List[dict]:
    """The top rung at 1..N ranks under torchrun; efficiency = images/s / (N x images/s at 1 rank)."""
    ranks = list(preset.ranks) or list(range(1, max(torch.cuda.device_count(), 1) + 1))
    # on a GPU every feature; on the CPU the resident loader without compile (compiling per process is slow)
    variant = "+ torch.compile" if preset.device == "cuda" else "+ gpu-resident loader"
    overrides = dict(ladder_rungs())[variant]
    rows: List[dict] = []
    for world in ranks:
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        if preset.device == "cpu":
            env["OMP_NUM_THREADS"] = str(preset.threads or max(1, (os.cpu_count() or 1) // world))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
               "-m", "benchmarks.scaling_worker", "--warmup", str(preset.timing.warmup), "--windows",
               str(preset.timing.windows), "--min-seconds", str(preset.timing.min_seconds), *base, *overrides]
        result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
        if result.returncode != 0:
            raise SystemExit(f"scaling run with {world} rank(s) failed:\n{result.stderr[-3000:]}")
        ips = json.loads(result.stdout.strip().splitlines()[-1])["images_per_sec"]
        rows.append({"variant": variant, "world_size": world, "images_per_sec": ips,
                     "efficiency": ips / (world * rows[0]["images_per_sec"]) if rows else 1.0})
        progress(f"  {world} rank(s): {ips:,.0f} img/s")
    return rows


def main(argv: Optional[Sequence[str]] = None, prog: str = "python -m benchmarks") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="gpu")
    parser.add_argument("--data-root", default="./data", help="folder holding cifar-10-batches-py/ (synthetic data "
                        "of the same shape when absent)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"), help="where results.{json,md,png} go")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak TFLOP/s for MFU (default: known GPUs)")
    parser.add_argument("--list", action="store_true", help="print the presets and what each runs, then exit")
    args = parser.parse_args(argv)
    if args.list:
        for name, p in sorted(PRESETS.items()):
            ranks = f"{', '.join(map(str, p.ranks))} rank(s)" if p.ranks else "1..N ranks (N: the node's GPUs)"
            print(f"{name}: {p.device}, {p.model} batch {p.batch_size} (sweep {', '.join(map(str, p.sweep))}), "
                  f"{p.workers} loader workers, scaling over {ranks}; writes {args.out}/results.{{json,md,png}}")
        return 0
    preset = PRESETS[args.preset]
    if preset.device == "cuda" and not torch.cuda.is_available():
        print("benchmarks: --preset gpu needs a CUDA device; use --preset cpu-smoke here", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    if preset.threads:
        torch.set_num_threads(preset.threads)
    progress = lambda line: print(line, flush=True)  # noqa: E731
    base = base_overrides(preset.device, preset.model, preset.batch_size, args.data_root, preset.workers,
                          preset.log_every, preset.train_images)

    ctx = dist.setup(preset.device)
    try:
        env = environment(ctx.device, ctx.world_size, ctx.backend, preset=args.preset, model=preset.model,
                          batch_size=preset.batch_size, data="cifar10" if "data.dataset=cifar10" in base else "synthetic",
                          timing=asdict(preset.timing), log_every=preset.log_every)
        progress(f"benchmarks: preset {args.preset} on {env['device']} (torch {env['torch']}, data {env['data']})")
        progress("ladder:")
        ladder: List[Row] = train_rows(base, ctx, preset.timing, preset.workers, args.peak_tflops, progress)
        progress("best batch size per variant:")
        best = best_batch_rows(preset, base, ctx, ladder, progress)
        progress("loaders alone:")
        loaders = loader_rows(base, ctx.device, preset.loader_timing, preset.workers, progress)
    finally:
        dist.teardown()
    progress("host overhead: ops per step")
    ops = [asdict(r) for r in host_overhead.ops_rows(preset.device, preset.host_model, preset.host_steps, progress,
                                                     preset.host_images)]
    progress("host overhead: host time per step (one thread)")
    host = [asdict(r) for r in host_overhead.host_time_rows(preset.device, preset.timing.min_seconds,
                                                            preset.timing.windows, 1, progress,
                                                            max(preset.host_images // 10, 128))]
    progress("scaling:")
    scaling = scaling_rows(preset, base, progress)

    results = {"environment": env, "ladder": [asdict(r) for r in ladder], "best_batch": best,
               "loaders": [asdict(r) for r in loaders], "host_overhead": {"model": preset.host_model, "ops": ops,
                                                                          "host_time": host},
               "scaling": scaling}
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    markdown = write_markdown(results, args.out / "results.md")
    write_chart(results, args.out / "results.png")
    print()
    print(markdown)
    print(f"wrote {args.out / 'results.json'}, {args.out / 'results.md'}, {args.out / 'results.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
