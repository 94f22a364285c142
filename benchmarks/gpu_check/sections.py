"""The GPU check's sections that measure one run or one ladder each: hidden syncs, the real entry,
the ladder and DALI (correctness and time to accuracy have modules of their own). Each takes the plan
and its deadline and returns its result, with "ok" saying whether it passed."""

from __future__ import annotations

import contextlib
import re
import time
from typing import Dict, List

import torch

from benchmarks.gpu_check.plan import FAST, REPO, Plan, Skipped, data_name, fasttrain_run, metrics, tail


# --------------------------------------------------------------------------- 1. hidden syncs


def hidden_syncs(plan: Plan, deadline: float) -> dict:
    from benchmarks.syncs import sync_report
    from fasttrain.config import load_config
    from fasttrain.train.step import WARMUP_STEPS

    # 20 steps per epoch, 2 epochs, log every 5, checkpoint every 10 (smoke: 10 steps per epoch)
    size = ["data.train_size=640", "data.val_size=128"] if plan.smoke else ["train.batch_size=1024"]
    result: dict = {}
    # the captured run's first steps compile, warm up and capture, and the loop synchronizes once after
    # them to time them apart: syncs up to that point are expected
    for name, switches, warmup in (("eager", ["train.compile=off", "train.capture=false"], 0),
                                   ("captured", [], WARMUP_STEPS + 2)):
        if time.monotonic() > deadline:
            result[name] = "skipped: the section's budget is spent"
            continue
        cfg = load_config(str(REPO / FAST), [*plan.data(20480, 2048), *plan.tiny(), *size, *switches,
                                             "train.epochs=2", "train.log_every=5", "checkpoint.every_steps=10",
                                             f"output.dir={plan.out / ('syncs-' + name)}", "output.overwrite=true"])
        with open(plan.out / f"syncs-{name}.log", "w") as log, contextlib.redirect_stdout(log):
            report = sync_report(cfg, skip_first_steps=warmup)  # the run's own lines go to its log
        result[name] = {"detector": report.detector, "steps": report.steps, "hidden_syncs": report.hidden,
                        "syncs_at_boundaries": report.at_boundaries,
                        "first_hidden": [list(s) for s in (report.in_steps + report.between_log_intervals)[:5]]}
    hidden = sum(r["hidden_syncs"] for r in result.values() if isinstance(r, dict))
    return {"ok": hidden == 0, **result}


# --------------------------------------------------------------------------- 2. the real entry


def real_entry(plan: Plan, deadline: float) -> dict:
    out = plan.out / "entry"
    # smoke: 20 steps per epoch, enough for graphs compiled in epoch 1 to be reused (or not) in epoch 2
    result = fasttrain_run(["--config", FAST, *plan.sized((1280, 256)), *plan.tiny(), "train.epochs=2",
                            f"output.dir={out}", "output.overwrite=true"], deadline - time.monotonic(),
                           env={"TORCH_LOGS": "recompiles"})
    history = metrics(out)
    text = result.stdout
    after_epoch_1 = text.split("epoch   1/", 1)[1] if "epoch   1/" in text else ""
    recompiles = len(re.findall(r"[Rr]ecompiling", after_epoch_1))
    graphs = [r.get("compiled_graphs") for r in history]
    skips = [r.get("cudagraph_skips") for r in history]
    ok = (result.returncode == 0 and len(history) == 2 and graphs[0] == graphs[1] and not any(skips)
          and "skipping cudagraphs" not in text and recompiles == 0)
    return {"ok": ok, "exit_code": result.returncode, "data": data_name(plan),
            "images_per_sec": [round(r["images_per_sec"]) for r in history], "compiled_graphs": graphs,
            "cudagraph_skips": skips, "recompiles_after_epoch_1": recompiles,
            "val_acc": [round(r["val_acc"], 4) for r in history], **({} if ok else {"output": tail(text, 12)})}


# --------------------------------------------------------------------------- 3. the ladder


def ladder(plan: Plan, deadline: float) -> dict:
    from benchmarks.ladder import (TUTORIAL, Timing, base_overrides, fasttrain_measurement, ladder_rungs,
                                   tutorial_measurement, _mfu)
    from fasttrain import dist
    from fasttrain.config import load_config

    if plan.smoke:  # 40 steps per epoch of synthetic data: the guard, warm-up and a window fit in one
        sweep, timing, workers = (32,), Timing(12, 1, 12, 0.02), 0
        base = base_overrides("cpu", "SimpleModel", 32, str(plan.out / "no-data"), workers, log_every=2,
                              train_size=1280)
    else:
        sweep, timing, workers = (1024, 2048, 512, 128), Timing(20, 3, 12, 0.5), 4
        # synthetic data (no CIFAR-10 at --data-root): CIFAR-10's epoch length
        base = base_overrides(plan.device, "CIFAR10_CNN", 128, str(plan.data_root), workers, train_size=50000)
    ctx = dist.setup(plan.device if not plan.smoke else "cpu")
    rows: List[dict] = []
    skipped: List[str] = []
    try:
        tutorial = tutorial_measurement(load_config(None, base), ctx.device, timing, workers)
        rows.append({"variant": TUTORIAL, "batch_size": 128 if not plan.smoke else 32,
                     "images_per_sec": round(tutorial.images_per_sec), "speedup": 1.0})
        best: Dict[str, dict] = {}
        for size in sweep:  # every rung at one batch before the next batch: the likely best ones first
            for variant, overrides in ladder_rungs():
                if time.monotonic() > deadline:
                    skipped.append(f"{variant} at batch {size}")
                    continue
                torch._dynamo.reset()
                cfg = load_config(None, base + overrides + [f"train.batch_size={size}"])
                m, flops = fasttrain_measurement(cfg, ctx, timing, variant)
                if variant not in best or m.images_per_sec > best[variant]["images_per_sec"]:
                    mfu = _mfu(m.images_per_sec, flops, cfg, ctx.device, None)
                    best[variant] = {"variant": variant, "batch_size": size, "images_per_sec": round(m.images_per_sec),
                                     "speedup": round(m.images_per_sec / tutorial.images_per_sec, 2),
                                     "mfu": round(mfu, 4) if mfu is not None else None,
                                     "host_ms_per_step": round(m.host_ms_per_step, 3),
                                     "data_wait_share": round(m.data_wait_share, 3)}
        rows += list(best.values())
    finally:
        dist.teardown()
    return {"ok": True, "data": data_name(plan), "rows": rows, **({"not_measured": skipped} if skipped else {})}


# --------------------------------------------------------------------------- 6. DALI


def dali(plan: Plan, deadline: float) -> dict:
    from fasttrain.data.loaders.dali import dali_available

    if not dali_available():
        raise Skipped("skipped: nvidia.dali is not importable here")
    out = plan.out / "dali"
    result = fasttrain_run(["--config", FAST, *plan.sized((1280, 256)), *plan.tiny(), "data.loader=dali",
                            "train.epochs=1", f"output.dir={out}", "output.overwrite=true"], deadline - time.monotonic())
    history = metrics(out)
    ok = result.returncode == 0 and len(history) == 1
    return {"ok": ok, "exit_code": result.returncode, "operators": "GPU" if not plan.smoke else "CPU",
            "images_per_sec": round(history[0]["images_per_sec"]) if history else None,
            **({} if ok else {"output": tail(result.stdout, 8)})}
