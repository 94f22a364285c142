"""How torch.compile should meet DDP: `torch._dynamo.config.optimize_ddp` on or off, measured.

    torchrun --standalone --nproc_per_node=2 -m benchmarks.ddp_graphs --device cpu [key.sub=value ...]

With optimize_ddp on, Dynamo splits the compiled model at DDP's bucket boundaries so that each
bucket's all-reduce can start while the rest of the backward runs (for CIFAR10_CNN: two forward
and two backward graphs, because DDP's first bucket is small); off, the model is one graph and
the all-reduce of every bucket waits for the whole backward. Both run here side by side on the
same ranks (fasttrain's real epoch loop, eager step, DDP, compile=default), alternating windows;
rank 0 prints one JSON line: images/s per setting and the graphs AOTAutograd compiled for each
(the training forward/backward; evaluation is not run here).
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from benchmarks.epoch_loop import EpochLoopTimer
from fasttrain import dist
from fasttrain.config import load_config
from fasttrain.observe.logs import silent_logger
from fasttrain.run import exit_now
from fasttrain.train.build import build_parts


def aot_graphs() -> int:
    """Graphs AOTAutograd compiled so far: DDPOptimizer's split submodules count one each."""
    from torch._dynamo.utils import counters

    return int(counters["aot_autograd"]["total"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--windows", type=int, default=3)
    parser.add_argument("--min-seconds", type=float, default=1.0)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(None, [f"train.device={args.device}", "model.name=CIFAR10_CNN", "data.dataset=synthetic",
                             "data.train_size=10240", "data.loader=gpu", "train.batch_size=128",
                             "train.compile=default", "data.drop_last=true", "train.log_every=10",
                             "output.dir=/nonexistent", *args.overrides])
    ctx = dist.setup(cfg.train.device)
    quiet = silent_logger()
    try:
        timers, graphs = {}, {}
        for setting in (True, False):
            torch._dynamo.reset()
            before = aot_graphs()
            parts = build_parts(cfg, ctx, quiet)
            torch._dynamo.config.optimize_ddp = setting  # after build_parts, which sets fasttrain's choice
            timer = EpochLoopTimer(parts, cfg.train.log_every, ctx.backend, ctx.world_size)
            timer.measure("warm-up", 0, 20, 0.0, 1)  # compiles under this setting
            timers[setting], graphs[setting] = timer, aot_graphs() - before
        rates = {True: [], False: []}
        for _ in range(args.windows):
            for setting, timer in timers.items():
                torch._dynamo.config.optimize_ddp = setting  # guards of each compiled model expect its own
                rates[setting] += timer.measure("ddp", 0, 0, args.min_seconds, 1).window_images_per_sec
        if ctx.is_main:
            print(json.dumps({"world_size": ctx.world_size, "device": str(ctx.device),
                              "images_per_sec_per_rank": {str(k).lower(): statistics.median(v) for k, v in rates.items()},
                              "compiled_graphs": {str(k).lower(): v for k, v in graphs.items()}}), flush=True)
    finally:
        dist.teardown()


if __name__ == "__main__":
    main()
    exit_now(0)  # past torch's gloo teardown, which can abort a finished rank (see fasttrain.run.exit_now)
