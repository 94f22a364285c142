"""What each accuracy tool adds to the fast recipe at equal epochs, on real CIFAR-10 (issue 21's table).

    python -m benchmarks.accuracy_tools --data-root ../shared/data --epochs 20          # every variant
    python -m benchmarks.accuracy_tools --data-root ../shared/data --variants b512 b512_ls

Each variant is a real run of `python -m fasttrain.run --config configs/cifar10_cnn_fast.yaml` with its
overrides, and every run keeps an EMA of its weights (it changes no step: validation reports it, and the
trained weights are in the same checkpoint), so one run gives four test accuracies: trained and EMA
weights, each without and with test-time augmentation (flip, flip_shift), measured by `fasttrain eval`
on its last.pt. Runs that already finished in --out are reused (the sweep can be stopped and continued).
Results: --out/results.jsonl (one line per evaluation) and --out/results.md (the table).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

from benchmarks.report import table

REPO = Path(__file__).resolve().parents[1]
RECIPE = "configs/cifar10_cnn_fast.yaml"
# every run: a passive EMA (evaluated at the end), validation every 5 epochs (the last always)
COMMON = ["train.ema_decay=0.98", "train.eval_every=5", "train.tta=none"]
VARIANTS: Dict[str, List[str]] = {
    "b1024": [],  # the fast recipe as shipped before issue 21: batch 1024, AdamW, peak lr 0.01
    "b512": ["train.batch_size=512"],
    "b512_ls": ["train.batch_size=512", "train.label_smoothing=0.1"],
    "b512_ls_lookahead": ["train.batch_size=512", "train.label_smoothing=0.1", "train.lookahead_k=5",
                          "train.lookahead_alpha=0.5"],
    "b512_ls_sgd": ["train.batch_size=512", "train.label_smoothing=0.1", "optim.name=sgd", "optim.nesterov=true",
                    "optim.momentum=0.9", "optim.weight_decay=0.0005", "optim.decay_bn_bias=false",
                    "sched.max_lr=0.2"],
}
EVALS = [("trained", "none"), ("trained", "flip"), ("trained", "flip_shift"), ("ema", "none"), ("ema", "flip"),
         ("ema", "flip_shift")]


def _env() -> Dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def train(name: str, overrides: List[str], args: argparse.Namespace) -> Path:
    run_dir = Path(args.out) / name
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file() and (run_dir / "checkpoints" / "last.pt").is_file():
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        if records and records[-1]["epoch"] == args.epochs:
            print(f"{name}: finished earlier, reused ({run_dir})", flush=True)
            return run_dir
    command = [sys.executable, "-m", "fasttrain.run", "--config", RECIPE, f"data.root={args.data_root}",
               f"train.epochs={args.epochs}", f"train.device={args.device}", f"output.dir={run_dir}", "resume=auto",
               *COMMON, *overrides]
    print(f"{name}: {' '.join(command[2:])}", flush=True)
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=_env(), text=True, capture_output=True)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    print(f"{name}: trained in {time.perf_counter() - started:.0f}s", flush=True)
    return run_dir


def evaluate(run_dir: Path, weights: str, tta: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, "-m", "fasttrain.cli", "eval", str(run_dir / "checkpoints" / "last.pt"), "--json",
               f"data.root={args.data_root}", f"train.device={args.device}", f"train.tta={tta}"]
    if weights == "trained":
        command.append("train.ema_decay=0")
    done = subprocess.run(command, cwd=REPO, env=_env(), text=True, capture_output=True)
    if done.returncode != 0:
        raise SystemExit(f"eval of {run_dir} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def results_table(rows: List[dict]) -> str:
    def cells(name: str) -> list:
        found = {(r["weights"], r["tta"]): r["val_acc"] for r in rows if r["variant"] == name}
        return [name, " ".join(VARIANTS.get(name, [])) or "(as shipped)",
                *(f"{100 * found[key]:.2f}%" if key in found else "-" for key in EVALS)]

    return table(["variant", "overrides (on configs/cifar10_cnn_fast.yaml)", "trained", "+ flip", "+ flip_shift", "EMA",
                  "EMA + flip", "EMA + flip_shift"], map(cells, dict.fromkeys(row["variant"] for row in rows)), "llrrrrrr")


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "out" / "accuracy_tools"))
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    rows = [json.loads(line) for line in results.read_text().splitlines()] if results.is_file() else []
    for name in args.variants:
        run_dir = train(name, VARIANTS[name], args)
        for weights, tta in EVALS:
            if any(r["variant"] == name and r["weights"] == weights and r["tta"] == tta for r in rows):
                continue
            found = evaluate(run_dir, weights, tta, args)
            row = {"variant": name, "weights": weights, "tta": tta, "val_acc": found["val_acc"],
                   "correct": found["correct"], "epochs": args.epochs}
            rows.append(row)
            with open(results, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{name}: {weights} weights, tta {tta}: {100 * found['val_acc']:.2f}%", flush=True)
        (out / "results.md").write_text(results_table(rows) + "\n")
    print(results_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
