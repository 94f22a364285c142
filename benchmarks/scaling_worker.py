"""One rank of the scaling benchmark, run under torchrun by `python -m benchmarks`:
every rank trains the same variant with its per-rank batch; rank 0 prints the global images/s
(the sum over ranks of each rank's median window) as one JSON line."""

from __future__ import annotations

import argparse
import json

import torch
import torch.distributed as torch_dist

from benchmarks.ladder import Timing, fasttrain_measurement
from fasttrain import dist
from fasttrain.config import load_config
from fasttrain.run import exit_now


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--warmup", type=int, required=True)
    parser.add_argument("--windows", type=int, required=True)
    parser.add_argument("--min-seconds", type=float, required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(None, args.overrides)
    ctx = dist.setup(cfg.train.device)
    try:
        timing = Timing(args.warmup, args.windows, guard_steps=0, min_seconds=args.min_seconds)
        measurement, _ = fasttrain_measurement(cfg, ctx, timing, "scaling")
        total = torch.tensor([measurement.images_per_sec], dtype=torch.float64, device=ctx.device)
        torch_dist.all_reduce(total)
        if ctx.is_main:
            print(json.dumps({"world_size": ctx.world_size, "images_per_sec": total.item()}), flush=True)
    finally:
        dist.teardown()


if __name__ == "__main__":
    main()
    exit_now(0)  # past torch's gloo teardown, which can abort a finished rank (see fasttrain.run.exit_now)
