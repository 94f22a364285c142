"""The fast recipe's fixed costs, before and after issue 21's cuts, from each run's own time split.

    python -m benchmarks.fixed_costs --data-root ../shared/data             # 3 runs of 2 short epochs each

Three real runs of `python -m fasttrain.run --config configs/cifar10_cnn_fast.yaml`, timed from outside:
  before      the cuts switched off: train.compile_cache=off (compiled from scratch), data.cache_dir=off
              (CIFAR-10 unpickled), checkpoint.background=false (the epoch's checkpoint written while
              training waits)
  after/cold  the cuts on, with empty compile and data caches (the first run on a machine)
  after/warm  the same command again (every later run on that machine)
Epochs are cut short (--limit-batches) since the steady steps are not a fixed cost; the evaluation pass
is put against a whole epoch's training time at the measured images/s. Writes --out/fixed_costs.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

from benchmarks.report import table

REPO = Path(__file__).resolve().parents[1]
RUNS = {"before": ["train.compile_cache=off", "data.cache_dir=off", "checkpoint.background=false"],
        "after, cold caches": [], "after, warm caches": []}


def run_once(name: str, extra: List[str], args: argparse.Namespace, caches: Path) -> Dict[str, object]:
    out = Path(args.out) / name.replace(", ", "-").replace(" ", "-")
    command = [sys.executable, "-m", "fasttrain.run", "--config", "configs/cifar10_cnn_fast.yaml",
               f"data.root={args.data_root}", f"train.epochs={args.epochs}", f"train.device={args.device}",
               f"train.limit_train_batches={args.limit_batches}", f"output.dir={out}", "output.overwrite=true",
               f"train.compile_cache={caches / 'compile'}", f"data.cache_dir={caches / 'data'}", *extra]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    started = time.monotonic()
    done = subprocess.run(command, cwd=REPO, env=env, text=True, capture_output=True)
    outside = time.monotonic() - started
    if done.returncode != 0:
        raise SystemExit(f"{name} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    split = json.loads((out / "env.json").read_text())["time_split"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    images_per_sec = records[-1]["images_per_sec"]
    epoch_seconds = 50_000 / images_per_sec  # a whole epoch's training at the measured speed
    evals = [r["val_seconds"] for r in records[1:] if r["val_seconds"] is not None] or [records[0]["val_seconds"]]
    stalls = [r["checkpoint_seconds"] for r in records if r["checkpoint_seconds"] is not None]
    return {"run": name, "outside_seconds": round(outside, 2), "split": split,
            "eval_pass_seconds": round(min(evals), 3), "epoch_train_seconds": round(epoch_seconds, 2),
            "eval_share_of_epoch": round(min(evals) / epoch_seconds, 4),
            "checkpoint_stall_seconds": round(max(stalls[:-1] or stalls), 3),  # the last save is synchronous
            "images_per_sec": round(images_per_sec)}


def fixed_costs_table(rows: List[Dict[str, object]]) -> str:
    def cells(row: Dict[str, object]) -> list:
        parts, startup = row["split"]["parts"], row["split"]["startup"]  # type: ignore[index]
        inner = " / ".join(f"{startup[k]:.1f}" for k in ("imports", "setup", "data", "model", "restore"))
        return [row["run"], f"{row['outside_seconds']:.1f} s", f"{parts['startup']:.1f} s ({inner})",
                f"{parts['compile']:.1f} s", f"{parts['steps']:.1f} s", f"{parts['eval']:.1f} s",
                f"{parts['checkpoint']:.2f} s", f"{parts['end']:.1f} s", f"{100 * row['eval_share_of_epoch']:.1f}%",
                f"{row['checkpoint_stall_seconds']:.3f} s"]

    return table(["run", "wall (outside)", "start-up (imports / setup / data / model / restore)", "compile + warm-up",
                  "steady steps", "eval", "checkpoint stalls", "end", "eval pass / epoch", "stall per save"],
                 map(cells, rows), "lrlrrrrrrr")


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--limit-batches", type=int, default=20)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "out" / "fixed_costs"))
    args = parser.parse_args(argv)
    out = Path(args.out)
    caches = out / "caches"
    shutil.rmtree(caches, ignore_errors=True)  # the "cold" run starts from empty caches
    rows = []
    for name, extra in RUNS.items():
        rows.append(run_once(name, extra, args, caches))
        print(json.dumps(rows[-1]), flush=True)
    cold, warm = rows[1]["split"]["parts"]["compile"], rows[2]["split"]["parts"]["compile"]  # type: ignore[index]
    text = fixed_costs_table(rows) + (f"\n\nwarm compile and warm-up / cold: {warm:.1f} s / {cold:.1f} s = "
                          f"{100 * warm / max(cold, 1e-9):.0f}%\n")
    (out / "fixed_costs.json").write_text(json.dumps(rows, indent=2))
    (out / "fixed_costs.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
