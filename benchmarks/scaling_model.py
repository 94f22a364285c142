"""Multi-GPU efficiency on paper (issue 24, item 4): fasttrain's two recipes at 2, 4 and 8 GPUs of one node
(NVLink) and 2 x 8 over InfiniBand, predicted from a measured single-GPU step and a stated model of the
all-reduce; validated here against real gloo ranks on the CPU.

    python -m benchmarks.scaling_model                       # the H200 step of benchmarks/RESULTS.md
    python -m benchmarks.scaling_model --fast-step-ms 2.65 --speedrun-step-ms 4.0 [--json out.json]
    python -m benchmarks.scaling_model --validate-cpu        # predicted vs measured: 2 and 4 gloo ranks here

The model, per optimizer step of one GPU:

    step(N) = compute(per-GPU batch) + exposed all-reduce(N)
    all-reduce of S bytes over N GPUs = latency + S x 2 (N - 1) / N / bus bandwidth

The second line is nccl-tests' definition of bus bandwidth inverted (github.com/NVIDIA/nccl-tests,
doc/PERFORMANCE.md: busbw = algbw x 2 (n - 1) / n for all_reduce, the ring's data volume per GPU), so a
published busbw gives the time. Gradients are fp32 (fasttrain keeps fp32 weights under autocast).

Exposure: the captured step (train.capture) all-reduces one flat buffer of every gradient inside the CUDA
graph after the backward (NCCL inside the graph; nothing overlaps it); the eager step uses DDP's buckets
(the first 1 MiB, then 25 MiB, filled in reverse parameter order as the backward produces them), whose
all-reduces start as each bucket is ready and run one after another: the part that ends after the backward
is exposed. A bucket is taken as ready when the backward (BACKWARD_SHARE of the step) has produced its share
of the gradient bytes.

The recipes: the fast recipe keeps its batch per GPU (1024: weak scaling, efficiency = step(1) / step(N));
the speed-run recipe keeps the global batch of 1024 that its accuracy was tuned for (1024 / N per GPU: strong
scaling, efficiency = step(1) / (N x step(N))). The speed run's compute at the smaller batch is taken as
linear in the batch, above a floor (`--floor-ms`, 0 by default): an upper bound, since small batches fill a
GPU less; measure the captured step at 128-512 and pass it to tighten it.

Published figures used (bus bandwidth at large messages):
    one node, 8x H100 SXM, NVLink 4 through NVSwitch: 460-480 GB/s (the reference table of
        docs.alayanew.com/en/docs/tech-blog/2026-05-06-nccl-tests) -> 450 GB/s taken
    2 nodes x 8x H100 SXM, NVLink inside, InfiniBand NDR (400 Gb/s per GPU): 400-450 GB/s for 8 GB messages
        (saturncloud.io/blog/crusoe-nccl-cluster-validation) -> 400 GB/s taken
Latency per all-reduce is not in those sources: 20 us in a node and 40 us over InfiniBand are assumed
(NCCL's small-message all-reduce times are tens of microseconds), and every table also shows the efficiency
with twice the latency and half the bandwidth, which a gradient of a few MB (far below the sizes that reach
the peak busbw) may well see.

`--validate-cpu` checks the composition where it can run: torchrun with 1, 2 and 4 gloo ranks of the
case-study CNN on this CPU (benchmarks.scaling_worker: fasttrain's real DDP step, batch 64 per rank),
against the same model with the CPU's terms measured apart: gloo's latency and bandwidth from all-reduces of
4 KiB and 16 MiB at that world size, the compute of one rank with the threads each rank gets, slowed by the
ranks sharing the cores (ranks x threads / cores when above 1), and no overlap (gloo's thread competes with
the backward for the same cores).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
MIB = 1 << 20
FIRST_BUCKET_BYTES, BUCKET_BYTES = 1 * MIB, 25 * MIB  # torch DDP's defaults (bucket_cap_mb=25; the first 1 MiB)
BACKWARD_SHARE = 2 / 3  # of a step's compute: a backward costs about twice the forward
GRADIENT_ELEMENT_BYTES = 4  # fp32
# the H200 run of benchmarks/RESULTS.md (2026-11-27): the captured fast recipe, 387,053 img/s at batch 1024
H200_FAST_STEP_MS = 1024 / 387_053 * 1e3


@dataclass(frozen=True)
class Fabric:
    name: str
    gpus_per_node: int
    latency_s: float  # per all-reduce (assumed; see the docstring)
    bus_bytes_per_s: float  # nccl-tests' busbw at large messages (published; see the docstring)


NVLINK = Fabric("NVLink 4 (one node, H100/H200 SXM)", 8, 20e-6, 450e9)  # H200 SXM: the same NVLink 4, NVSwitch
INFINIBAND = Fabric("NVLink + InfiniBand NDR (2 nodes)", 8, 40e-6, 400e9)


def allreduce_seconds(nbytes: float, world: int, fabric: Fabric) -> float:
    """One all-reduce of `nbytes` over `world` GPUs: latency + the ring's 2 (N - 1) / N of the bytes at busbw."""
    if world <= 1:
        return 0.0
    return fabric.latency_s + nbytes * 2 * (world - 1) / world / fabric.bus_bytes_per_s


def gradient_bytes(model: nn.Module) -> List[int]:
    """The trainable parameters' gradient bytes, in registration order (what DDP buckets, reversed)."""
    return [p.numel() * GRADIENT_ELEMENT_BYTES for p in model.parameters() if p.requires_grad]


def ddp_buckets(sizes: Sequence[int], first_cap: int = FIRST_BUCKET_BYTES, cap: int = BUCKET_BYTES) -> List[int]:
    """DDP's buckets of gradient bytes in the order the backward fills them (reverse registration): a bucket
    closes once it holds at least its cap (the first one's is smaller, so that communication starts early)."""
    buckets, current, limit = [], 0, first_cap
    for size in reversed(sizes):
        current += size
        if current >= limit:
            buckets.append(current)
            current, limit = 0, cap
    if current:
        buckets.append(current)
    return buckets


def exposed_seconds(buckets: Sequence[int], backward_s: float, world: int, fabric: Fabric, overlap: bool) -> float:
    """The all-reduce time left after the backward ends. `overlap` False: the buckets' all-reduces one after
    another once the backward is done (the captured step: one bucket of every gradient). True: each bucket's
    all-reduce starts once the backward has produced its bytes and the previous one is done."""
    total = sum(buckets)
    if world <= 1 or total == 0:
        return 0.0
    if not overlap:
        return sum(allreduce_seconds(size, world, fabric) for size in buckets)
    done_at, produced = 0.0, 0
    for size in buckets:
        produced += size
        ready = backward_s * produced / total
        done_at = max(ready, done_at) + allreduce_seconds(size, world, fabric)
    return max(0.0, done_at - backward_s)


@dataclass(frozen=True)
class Recipe:
    name: str
    gradient_sizes: Sequence[int]  # bytes per parameter, registration order
    step_ms: float  # one GPU's compute per step at `batch`
    batch: int
    weak: bool  # True: the batch per GPU stays; False: the global batch stays (divided over the GPUs)
    floor_ms: float = 0.0  # strong scaling: the least a step takes, however small its batch


@dataclass
class Prediction:
    recipe: str
    fabric: str
    world: int
    batch_per_gpu: int
    compute_ms: float
    exposed_ms: float
    efficiency: float  # per GPU, against one GPU
    efficiency_pessimistic: float  # twice the latency, half the bandwidth


def predict(recipe: Recipe, world: int, fabric: Fabric, overlap: bool) -> Prediction:
    """`recipe` at `world` GPUs. Weak scaling keeps the batch per GPU; strong scaling divides it (its compute
    linear in the batch, not below the recipe's floor)."""
    per_gpu = recipe.batch if recipe.weak else max(1, recipe.batch // world)
    compute = recipe.step_ms if recipe.weak else max(recipe.floor_ms, recipe.step_ms * per_gpu / recipe.batch)
    buckets = ddp_buckets(recipe.gradient_sizes) if overlap else [sum(recipe.gradient_sizes)]

    def efficiency(fab: Fabric) -> tuple:
        exposed = exposed_seconds(buckets, compute * 1e-3 * BACKWARD_SHARE, world, fab, overlap) * 1e3
        step = compute + exposed
        return exposed, (recipe.step_ms / step if recipe.weak else recipe.step_ms / (world * step))

    exposed, eff = efficiency(fabric)
    slow = Fabric(fabric.name, fabric.gpus_per_node, 2 * fabric.latency_s, fabric.bus_bytes_per_s / 2)
    return Prediction(recipe.name, fabric.name, world, per_gpu, round(compute, 4), round(exposed, 4), eff,
                      efficiency(slow)[1])


def recipe_model(name: str) -> nn.Module:
    from fasttrain.config import ModelConfig
    from fasttrain.models.build import build_model

    return build_model(ModelConfig(name=name), 3, 32, 10)


def paper_table(fast_step_ms: float, speedrun_step_ms: float, floor_ms: float) -> List[Prediction]:
    """Both recipes, captured (their GPU form), at 1, 2, 4, 8 GPUs in a node and 16 over InfiniBand."""
    rows = []
    recipes = [Recipe("fast (CIFAR10_CNN, 1024 per GPU)", gradient_bytes(recipe_model("CIFAR10_CNN")), fast_step_ms,
                      1024, weak=True),
               Recipe("speed run (SpeedNet, 1024 in all)", gradient_bytes(recipe_model("SpeedNet")), speedrun_step_ms,
                      1024, weak=False, floor_ms=floor_ms)]
    for recipe in recipes:
        for world, fabric in ((1, NVLINK), (2, NVLINK), (4, NVLINK), (8, NVLINK), (16, INFINIBAND)):
            rows.append(predict(recipe, world, fabric, overlap=False))
    return rows


def speedrun_step_estimate(fast_step_ms: float) -> float:
    """Without a measured speed-run step: the fast recipe's step scaled by the two models' FLOPs per image
    (a compute-bound guess; the GPU check's speedrun section measures it)."""
    from fasttrain.observe.flops import flops_per_image

    ratio = flops_per_image(recipe_model("SpeedNet"), (3, 32, 32)) / flops_per_image(recipe_model("CIFAR10_CNN"), (3, 32, 32))
    return fast_step_ms * ratio


# --------------------------------------------------------------------------- the CPU validation


def _torchrun(world: int, threads: int, args: Sequence[str]) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads),
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", *args]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"scaling_model: {world} rank(s) failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def allreduce_worker(sizes: Sequence[int], repeats: int) -> None:
    """One rank of the gloo measurement (under torchrun): the median time of `repeats` all-reduces per size."""
    import torch.distributed as torch_dist

    torch_dist.init_process_group("gloo")
    try:
        medians = {}
        for size in sizes:
            tensor = torch.ones(size // 4)
            torch_dist.all_reduce(tensor)  # warm-up: the connection's buffers
            times = []
            for _ in range(repeats):
                torch_dist.barrier()
                start = time.perf_counter()
                torch_dist.all_reduce(tensor)
                times.append(time.perf_counter() - start)
            medians[str(size)] = sorted(times)[len(times) // 2]
        if torch_dist.get_rank() == 0:
            print(json.dumps(medians), flush=True)
    finally:
        torch_dist.destroy_process_group()


def gloo_fabric(world: int, threads: int) -> Fabric:
    """Latency and bus bandwidth of gloo at `world` ranks on this machine, from 4 KiB and 16 MiB all-reduces."""
    small, large = 4096, 16 * MIB
    times = _torchrun(world, threads, ["-m", "benchmarks.scaling_model", "--allreduce-worker",
                                       "--sizes", str(small), str(large)])
    latency = times[str(small)]
    busbw = large * 2 * (world - 1) / world / max(times[str(large)] - latency, 1e-9)
    return Fabric(f"gloo, {world} ranks on this CPU", world, latency, busbw)


VALIDATION_BATCH = 64
VALIDATION_RUN = ["train.device=cpu", "model.name=CIFAR10_CNN", f"train.batch_size={VALIDATION_BATCH}",
                  "train.epochs=10000", "train.log_every=4", "optim.name=adamw", "optim.lr=0.001", "sched.name=none",
                  "data.dataset=synthetic", "data.train_size=4096", "data.loader=gpu", "data.drop_last=true",
                  "output.dir=/nonexistent"]


def measured_images_per_sec(world: int, threads: int) -> float:
    return _torchrun(world, threads, ["-m", "benchmarks.scaling_worker", "--warmup", "4", "--windows", "3",
                                      "--min-seconds", "2", *VALIDATION_RUN])["images_per_sec"]


def validate_cpu(worlds: Sequence[int] = (2, 4)) -> List[dict]:
    """Predicted vs measured global images/s at each world size (see the docstring)."""
    cores = os.cpu_count() or 1
    sizes = gradient_bytes(recipe_model("CIFAR10_CNN"))
    one_rank = {}  # threads -> one rank's compute ms per step
    rows = []
    for world in worlds:
        threads = max(1, cores // world)
        if threads not in one_rank:
            one_rank[threads] = VALIDATION_BATCH / measured_images_per_sec(1, threads) * 1e3
        sharing = max(1.0, world * threads / cores)
        compute_ms = one_rank[threads] * sharing
        fabric = gloo_fabric(world, threads)
        exposed_ms = exposed_seconds(ddp_buckets(sizes), compute_ms * 1e-3 * BACKWARD_SHARE, world, fabric,
                                     overlap=False) * 1e3
        predicted = world * VALIDATION_BATCH / ((compute_ms + exposed_ms) * 1e-3)
        measured = measured_images_per_sec(world, threads)
        rows.append({"world": world, "threads_per_rank": threads, "one_rank_compute_ms": round(one_rank[threads], 2),
                     "cores_shared": sharing, "gloo_latency_us": round(fabric.latency_s * 1e6, 1),
                     "gloo_busbw_gb_s": round(fabric.bus_bytes_per_s / 1e9, 3), "exposed_ms": round(exposed_ms, 2),
                     "predicted_images_per_sec": round(predicted, 1), "measured_images_per_sec": round(measured, 1),
                     "error": predicted / measured - 1})
    return rows


# --------------------------------------------------------------------------- output


def markdown(rows: List[Prediction], fast_step_ms: float, speedrun_step_ms: float, speedrun_measured: bool,
             sizes: Dict[str, int]) -> str:
    from benchmarks.report import percent, table

    head = (f"Inputs: fast recipe {fast_step_ms:.3f} ms per step at batch 1024 on one GPU; speed run "
            f"{speedrun_step_ms:.3f} ms per step at batch 1024 ({'given' if speedrun_measured else 'estimated from the FLOPs per image'}); "
            f"gradients {', '.join(f'{name} {size / MIB:.2f} MiB' for name, size in sizes.items())} (fp32); "
            f"captured steps (one flat all-reduce after the backward, no overlap).")
    body = table(["recipe", "GPUs", "fabric", "batch per GPU", "compute ms", "exposed all-reduce ms",
                  "efficiency per GPU", "at 2x latency, 1/2 bandwidth"],
                 [[r.recipe, r.world, r.fabric, r.batch_per_gpu, f"{r.compute_ms:.3f}", f"{r.exposed_ms:.3f}",
                   percent(r.efficiency), percent(r.efficiency_pessimistic)] for r in rows])
    return head + "\n\n" + body


def validation_markdown(rows: List[dict]) -> str:
    from benchmarks.report import table

    return table(["ranks", "threads each", "one rank's compute ms", "cores shared x", "gloo latency us",
                  "gloo busbw GB/s", "exposed ms", "predicted img/s", "measured img/s", "error"],
                 [[r["world"], r["threads_per_rank"], r["one_rank_compute_ms"], f"{r['cores_shared']:g}",
                   r["gloo_latency_us"], r["gloo_busbw_gb_s"], r["exposed_ms"], f"{r['predicted_images_per_sec']:,.0f}",
                   f"{r['measured_images_per_sec']:,.0f}", f"{100 * r['error']:+.1f}%"] for r in rows])


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scaling_model", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast-step-ms", type=float, default=H200_FAST_STEP_MS,
                        help="the captured fast recipe's step on one GPU at batch 1024 (default: the H200 run's)")
    parser.add_argument("--speedrun-step-ms", type=float, help="the captured speed-run step at batch 1024 "
                        "(default: the fast step scaled by the FLOPs per image)")
    parser.add_argument("--floor-ms", type=float, default=0.0, help="the smallest step time a small batch takes")
    parser.add_argument("--validate-cpu", action="store_true", help="predicted vs measured, 2 and 4 gloo ranks here")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--allreduce-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--sizes", type=int, nargs="*", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.allreduce_worker:
        allreduce_worker(args.sizes, repeats=20)
        return 0
    for name in ("fast_step_ms", "speedrun_step_ms", "floor_ms"):
        value = getattr(args, name)
        if value is not None and not (0 <= value < 1e6 and (value > 0 or name == "floor_ms")):
            parser.error(f"--{name.replace('_', '-')}={value} is not valid: expected milliseconds above 0")
    speedrun_ms = args.speedrun_step_ms or speedrun_step_estimate(args.fast_step_ms)
    rows = paper_table(args.fast_step_ms, speedrun_ms, args.floor_ms)
    sizes = {name: sum(gradient_bytes(recipe_model(name))) for name in ("CIFAR10_CNN", "SpeedNet")}
    print(markdown(rows, args.fast_step_ms, speedrun_ms, args.speedrun_step_ms is not None, sizes))
    result = {"predictions": [asdict(r) for r in rows]}
    if args.validate_cpu:
        checks = validate_cpu()
        print("\nValidation on this CPU (gloo, CIFAR10_CNN, batch 64 per rank, eager DDP step):\n")
        print(validation_markdown(checks))
        result["cpu_validation"] = checks
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
