"""`python -m benchmarks.gpu_check`: the plan from the command line, the sections in priority order
within their budgets, one JSON line each, and the report (gpu_check.json, gpu_check.md)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import torch

from benchmarks.gpu_check.correctness import correctness
from benchmarks.gpu_check.device_profile import device_profile
from benchmarks.gpu_check.plan import REPO, Plan, Skipped, data_name
from benchmarks.gpu_check.sections import dali, hidden_syncs, ladder, real_entry
from benchmarks.gpu_check.speedrun import speedrun
from benchmarks.gpu_check.to_accuracy import time_to_accuracy
from benchmarks.report import environment, table, versions_line

# (name, what runs it, seconds of the full plan), in priority order. 460 s in all, so that the command with its
# start-up and report fits 8 minutes: a lent GPU has 15 minutes, and the machine's start and the data's carry
# take the rest. The last H200 run's sections took 54, 25, 116 (ladder, cut by its budget) and 66 s.
SECTIONS: List[tuple] = [("hidden_syncs", hidden_syncs, 45), ("real_entry", real_entry, 35),
                         ("profile", device_profile, 30), ("speedrun", speedrun, 90), ("ladder", ladder, 75),
                         ("correctness", correctness, 70), ("time_to_accuracy", time_to_accuracy, 90),
                         ("dali", dali, 25)]
SMOKE_BUDGET = 1800  # --smoke on a busy CI machine: every section must run, none is skipped for time
DEFAULT_BUDGET = sum(seconds for _, _, seconds in SECTIONS)


def _summary(name: str, record: dict) -> str:
    """One cell of the markdown table: the figures that matter for each section."""
    if "result" not in record:  # skipped, or failed before it had a result
        return record.get("note", "")
    r = record.get("result", {})
    if name == "real_entry":
        return (f"exit {r.get('exit_code')}, {r.get('images_per_sec')} img/s per epoch, graphs {r.get('compiled_graphs')}, "
                f"cudagraph skips {r.get('cudagraph_skips')}, recompiles after epoch 1: {r.get('recompiles_after_epoch_1')}")
    if name == "profile":
        windows = {k: v for k, v in r.items() if isinstance(v, dict) and "steps" in v}
        roof = r.get("roofline", {})
        return "; ".join(f"{k}: {v.get('verdict', v.get('device'))}, host {v.get('host_cpu_ms_per_step')} ms/step, "
                         f"wall {v.get('wall_ms_per_step')} ms/step" for k, v in windows.items()) + (
            f"; roofline {roof.get('roofline_images_per_sec')} img/s at {roof.get('activation_bytes_per_training_image')} "
            f"B/image, captured {roof.get('captured_images_per_sec')} img/s")
    if name == "speedrun":
        peer = r.get("peer") if isinstance(r.get("peer"), dict) else {}
        return (f"{r.get('seeds')} seeds of {r.get('recipe')}: mean acc {r.get('mean_acc')} (min {r.get('min_acc')}), "
                f"{r.get('mean_train_seconds')} s as the records count it, {r.get('mean_wall_seconds')} s from process "
                f"start" + (f"; the record's script: mean acc {peer.get('mean_acc')} (min {peer.get('min_acc')}), "
                            f"{peer.get('mean_train_seconds')} s; time ratio {r.get('time_ratio_vs_peer')}" if peer
                            else ""))
    if name == "ladder":
        return "; ".join(f"{row['variant'].split(' (')[0]} b{row['batch_size']}: {row['images_per_sec']:,} img/s "
                         f"({row['speedup']}x" + (f", host {row['host_ms_per_step']} ms/step" if 'host_ms_per_step' in row
                                                  else "") + ")" for row in r.get("rows", []))
    if name == "time_to_accuracy":
        cold = r.get("fast_cold", {})
        warm = r.get("fast_warm") if isinstance(r.get("fast_warm"), dict) else {}
        return (f"{r.get('note')}: {r.get('headline')}; tutorial loop {r.get('tutorial_seconds_per_epoch')} s/epoch "
                f"({r.get('tutorial_epochs_measured')} measured) = {r.get('tutorial_seconds')} s; fast recipe cold "
                f"{cold.get('seconds')} s ({cold.get('epochs')} epochs, fixed {cold.get('fixed_seconds')} s), warm "
                f"{warm.get('seconds')} s (fixed {warm.get('fixed_seconds')} s)")
    parts = []
    for key, value in r.items():
        if key == "ok":
            continue
        if isinstance(value, dict):
            parts.append(f"{key}: {'ok' if value.get('ok') else 'FAILED'}" if "ok" in value else
                         f"{key}: {value.get('hidden_syncs', '')} hidden syncs in {value.get('steps', '?')} steps")
        else:
            parts.append(f"{key}: {value}")
    return "; ".join(parts)[:600]


def markdown(env: dict, records: List[dict]) -> str:
    command = "python -m benchmarks.gpu_check" + (" --smoke" if env["smoke"] else "")
    return (f"### {env['date'][:10]} — {env['device']} (`{command}`)\n\n"
            f"{versions_line(env)}, data {env['data']}, budget {env['budget_s']:.0f} s\n\n"
            + table(["section", "status", "seconds", "what it found"],
                    ([r["section"], r["status"], f"{r.get('seconds', 0):.0f}", _summary(r["section"], r)]
                     for r in records), "llrl") + "\n")


def run_section(name: str, runner: Callable[[Plan, float], dict], budget: float, plan: Plan) -> dict:
    """One section within its budget: its record (status ok / failed / skipped, its result or a note)."""
    record: dict = {"section": name, "budget_s": round(budget)}
    if plan.left() + 2.0 < budget:  # 2 s: the setup before the first section
        return {**record, "status": "skipped", "note": f"skipped: needs {budget:.0f} s, {max(plan.left(), 0):.0f} s left"}
    start = time.monotonic()
    try:
        result = runner(plan, start + budget)
        record.update(status="ok" if result.get("ok") else "failed", result=result)
    except Skipped as note:
        record.update(status="skipped", note=str(note))
    except Exception as err:  # one section's failure must not cost the others their minutes
        record.update(status="failed", note=f"{type(err).__name__}: {str(err).splitlines()[0][:300]}",
                      traceback=traceback.format_exc()[-2000:])
    record["seconds"] = round(time.monotonic() - start, 1)
    return record


def _parser() -> argparse.ArgumentParser:
    import benchmarks.gpu_check as package  # its docstring is the command's description

    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=package.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, help=f"seconds in all (default: {DEFAULT_BUDGET}; --smoke: "
                        f"{SMOKE_BUDGET})")
    parser.add_argument("--out", type=Path, default=Path("runs/gpu_check"), help="where the runs and reports go")
    parser.add_argument("--data-root", type=Path, help="folder holding cifar-10-batches-py/ (default: "
                        "../shared/data, then ./data; synthetic data of the same shape when absent)")
    parser.add_argument("--smoke", action="store_true", help="every section at tiny sizes on the CPU")
    parser.add_argument("--sections", help="comma-separated sections to run, in the plan's order (default: all of "
                        f"{','.join(name for name, _, _ in SECTIONS)})")
    parser.add_argument("--commit", help="the commit being checked (default: git rev-parse HEAD)")
    parser.add_argument("--peer-airbench", type=Path, help="the CIFAR-10 speed record's own script (airbench94.py: "
                        "your own fetched copy, never committed): the speedrun section runs it on the same data for "
                        "as many runs as fasttrain's seeds and reports both")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    known = [name for name, _, _ in SECTIONS]
    chosen = [name.strip() for name in args.sections.split(",") if name.strip()] if args.sections else known
    unknown = [name for name in chosen if name not in known]
    if unknown or not chosen:
        parser.error(f"--sections: unknown section(s) {', '.join(unknown) or '(none given)'}; "
                     f"choose from {', '.join(known)}")
    planned = sum(seconds for name, _, seconds in SECTIONS if name in chosen)  # the chosen sections' share of the plan
    args.budget = args.budget or (SMOKE_BUDGET if args.smoke else planned)
    roots = [args.data_root] if args.data_root else [REPO.parent / "shared" / "data", REPO / "data"]
    root = next((r for r in roots if (r / "cifar-10-batches-py").is_dir()), roots[0])
    if not args.smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run it on a GPU, or --smoke for the plumbing", file=sys.stderr)
        return 2
    if args.smoke:
        # one CPU thread in this process and the runs it starts: the smoke run's figures are noise anyway,
        # and on a shared 2-core machine torch's thread pool waiting for busy cores made a tiny step up to
        # 100x slower (an MLP's step: 1.5 ms on one thread, 150 ms on two, under load)
        torch.set_num_threads(1)
        os.environ["OMP_NUM_THREADS"] = "1"
    # smoke: synthetic data (learnable classes, so a tiny model's loss falls within a few steps)
    real = (root / "cifar-10-batches-py").is_dir() and not args.smoke
    plan = Plan(args.smoke, "cpu" if args.smoke else "cuda", root.resolve(), real, args.out.resolve(), args.budget,
                time.monotonic(), args.peer_airbench)
    plan.out.mkdir(parents=True, exist_ok=True)
    env = environment(torch.device("cpu") if args.smoke else torch.device("cuda", 0),
                      smoke=args.smoke, budget_s=args.budget, data=data_name(plan),
                      **({"git_commit": args.commit} if args.commit else {}))
    print(json.dumps({"gpu_check": env}), flush=True)
    # the full plan's budgets scale with --budget (smoke: tiny work, the same order)
    scale = args.budget / (DEFAULT_BUDGET if args.smoke else planned)
    records: List[dict] = []
    for name, runner, seconds in SECTIONS:
        if name in chosen:
            records.append(run_section(name, runner, seconds * scale, plan))
            print(json.dumps(records[-1]), flush=True)
    (plan.out / "gpu_check.json").write_text(json.dumps({"environment": env, "sections": records}, indent=2))
    text = markdown(env, records)
    (plan.out / "gpu_check.md").write_text(text)
    print()
    print(text)
    return 1 if any(r["status"] == "failed" for r in records) else 0
