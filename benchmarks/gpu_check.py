"""One command that proves the GPU paths, inside a budget.

    python -m benchmarks.gpu_check                                 # one GPU: 8 minutes by construction
    python -m benchmarks.gpu_check --budget 300 --out runs/gpu_check --data-root ../shared/data
    python -m benchmarks.gpu_check --smoke                         # every section, tiny, on the CPU (CI)

Sections run in priority order, each with a budget of its own (seconds, of the default 480): one
is skipped, with a note, when less than its budget is left, and bounds its own work by it. Each
prints one JSON line when it ends; at the end DIR/gpu_check.json holds everything and
DIR/gpu_check.md a table ready to paste into benchmarks/RESULTS.md (card, driver, CUDA, torch,
commit). The exit code is 1 when a section failed, else 0 (skipped sections do not fail).

  1. hidden_syncs (60 s): the real run (schedule, logging, checkpoints, preemption watch) of the fast
     recipe, eager and captured, under torch.cuda.set_sync_debug_mode("warn"); zero syncs allowed
     inside steps and between log intervals (benchmarks/syncs.py).
  2. real_entry (60 s): `python -m fasttrain.run` with configs/cifar10_cnn_fast.yaml for 2 epochs:
     exit code, images/s, compiled graphs flat after epoch 1, no "skipping cudagraphs" and no
     recompilation after epoch 1 (TORCH_LOGS=recompiles).
  3. ladder (90 s): the tutorial loop (PIL DataLoader, 4 workers), then every fasttrain rung at its
     best batch of a sweep up to 2048 (1024 first, whose compiled graphs the sections before left in
     inductor's cache, then 2048, 512 and 128 while the budget lasts), with images/s, speedup, MFU
     and host ms per step (the training thread's CPU time).
  4. correctness (75 s): fp16 with a forced overflow counts one skipped step and moves no weight;
     bf16 tracks fp32 from the same weights; stop + resume gives the straight run's weights bit for
     bit (train.deterministic=true); a contiguous checkpoint resumes into channels_last with fused
     AdamW; data.loader=auto chooses and logs.
  5. time_to_accuracy (165 s): the case study's accuracy at its 100 epochs (its recipe at batch 128 in
     fasttrain), the tutorial loop's time per epoch over 3 epochs stated for 100, and the fast recipe
     with train.target_acc at that accuracy, from process start, with its time split, cold and warm
     compile cache: "reached the case study's accuracy N x sooner, end to end" (fewer epochs when the
     budget is short: stated).
  6. dali (30 s): the fast recipe with data.loader=dali for one epoch, when nvidia.dali is importable.

Real CIFAR-10 is used when DATA_ROOT/cifar-10-batches-py exists (--data-root; default ../shared/data,
then ./data), else synthetic data of the same shape, and the output says which.

On a machine without network (the GPU image holds torch, torchvision, pyyaml, tqdm, matplotlib but
not omegaconf): fetch its wheel where there is network and carry it along (wheels/ is git-ignored;
omegaconf 2.4 is pure Python and needs only PyYAML),

    python -m pip download omegaconf==2.4.0 --no-deps -d wheels/
    pip install --no-index wheels/*.whl && PYTHONPATH=. python -m benchmarks.gpu_check --commit <sha>

`--smoke` runs every section at tiny sizes on the CPU (CUDA-only checks say "skipped: no CUDA"), so
the command is known to work before any GPU minute is spent on it.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

REPO = Path(__file__).resolve().parents[1]
FAST = "configs/cifar10_cnn_fast.yaml"
# (name, seconds of the full 480 s plan)
SECTIONS = [("hidden_syncs", 60), ("real_entry", 60), ("ladder", 90), ("correctness", 75),
            ("time_to_accuracy", 165), ("dali", 30)]
SMOKE_BUDGET = 1800  # --smoke on a busy CI machine: every section must run, none is skipped for time
DEFAULT_BUDGET = sum(seconds for _, seconds in SECTIONS)


class Skipped(Exception):
    """A section, or a part of one, that cannot run here (no CUDA, no DALI): not a failure."""


@dataclass
class Plan:
    smoke: bool
    device: str
    data_root: Path
    real_data: bool
    out: Path
    budget: float
    started: float

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.started)

    def data(self, train_size: int = 0, val_size: int = 0) -> List[str]:
        """Overrides for the data: real CIFAR-10, or synthetic of its shape; sizes 0 = the whole split."""
        if self.real_data:
            return [f"data.root={self.data_root}", "data.download=false", "data.dataset=cifar10",
                    f"data.train_size={train_size}", f"data.val_size={val_size}"]
        return ["data.dataset=synthetic", f"data.train_size={train_size or 50000}", f"data.val_size={val_size or 10000}"]

    def tiny(self) -> List[str]:
        """Smoke sizes: the same code paths on a model and data small enough for a CPU in seconds."""
        if not self.smoke:
            return []
        return ["train.device=cpu", "model.name=MLP", "model.hidden_sizes=[32]", "model.dropout=0.0",
                "train.batch_size=64", "data.num_workers=0", "train.precision=bf16"]


def fasttrain_run(plan: Plan, args: Sequence[str], timeout: float, env: Optional[Dict[str, str]] = None,
                  module: str = "fasttrain.run") -> subprocess.CompletedProcess:
    """`python -m fasttrain.run ARGS` as a user launches it, output merged in order."""
    full_env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                    PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=full_env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=max(timeout, 30))


def _metrics(run_dir: Path) -> List[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _tail(text: str, lines: int = 6) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


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
    size = plan.data(5120, 1024) if plan.smoke else plan.data()
    result = fasttrain_run(plan, ["--config", FAST, *size, *plan.tiny(), "train.epochs=2", f"output.dir={out}",
                                  "output.overwrite=true"], deadline - time.monotonic(),
                           env={"TORCH_LOGS": "recompiles"})
    history = _metrics(out)
    text = result.stdout
    after_epoch_1 = text.split("epoch   1/", 1)[1] if "epoch   1/" in text else ""
    recompiles = len(re.findall(r"[Rr]ecompiling", after_epoch_1))
    graphs = [r.get("compiled_graphs") for r in history]
    skips = [r.get("cudagraph_skips") for r in history]
    ok = (result.returncode == 0 and len(history) == 2 and graphs[0] == graphs[1] and not any(skips)
          and "skipping cudagraphs" not in text and recompiles == 0)
    return {"ok": ok, "exit_code": result.returncode, "data": "cifar10" if plan.real_data else "synthetic",
            "images_per_sec": [round(r["images_per_sec"]) for r in history], "compiled_graphs": graphs,
            "cudagraph_skips": skips, "recompiles_after_epoch_1": recompiles,
            "val_acc": [round(r["val_acc"], 4) for r in history], **({} if ok else {"output": _tail(text, 12)})}


# --------------------------------------------------------------------------- 3. the ladder


def ladder(plan: Plan, deadline: float) -> dict:
    from benchmarks.ladder import (TUTORIAL, Timing, base_overrides, fasttrain_measurement, ladder_rungs,
                                   tutorial_measurement, _mfu)
    from fasttrain import dist
    from fasttrain.config import load_config

    if plan.smoke:
        sweep, timing, workers = (32,), Timing(12, 1, 12, 0.02), 0
        base = base_overrides("cpu", "SimpleModel", 32, str(plan.out / "no-data"), workers, log_every=2)
    else:
        sweep, timing, workers = (1024, 2048, 512, 128), Timing(20, 3, 12, 0.5), 4
        base = base_overrides(plan.device, "CIFAR10_CNN", 128, str(plan.data_root), workers)
        base += [] if plan.real_data else ["data.train_size=50000"]  # synthetic: CIFAR-10's epoch length
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
    return {"ok": True, "data": "cifar10" if plan.real_data else "synthetic", "rows": rows,
            **({"not_measured": skipped} if skipped else {})}


# --------------------------------------------------------------------------- 4. correctness


def _fp16_overflow(device: torch.device) -> dict:
    """A GradScaler whose scale overflows fp16: the step is skipped, counted, and no weight moves."""
    if device.type != "cuda":
        raise Skipped("skipped: no CUDA (fp16 autocast with a GradScaler is CUDA only)")
    from fasttrain.config import ModelConfig, OptimConfig
    from fasttrain.models import build_model
    from fasttrain.train.optim import build_optimizer
    from fasttrain.train.precision import build_precision
    from fasttrain.train.step import SKIPPED, EagerStep

    torch.manual_seed(0)
    model = build_model(ModelConfig(name="CNN"), 3, 32, 10).to(device)
    precision = build_precision("fp16", device, tf32=False)
    precision.scaler = torch.amp.GradScaler("cuda", init_scale=2.0**60)  # any gradient overflows at this scale
    step = EagerStep(model, build_optimizer(OptimConfig(), model, device), precision)
    before = [p.detach().clone() for p in model.parameters()]
    step(torch.randn(64, 3, 32, 32, device=device), torch.randint(0, 10, (64,), device=device))
    skipped = float(step.take_sums()[SKIPPED])
    unchanged = all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    return {"ok": skipped == 1.0 and unchanged and precision.scaler.get_scale() < 2.0**60,
            "skipped_steps": skipped, "weights_unchanged": unchanged, "scale_after": precision.scaler.get_scale()}


def _bf16_tracks_fp32(device: torch.device) -> dict:
    import copy

    import torch.nn.functional as F

    from fasttrain.config import ModelConfig
    from fasttrain.models import build_model
    from fasttrain.train.precision import build_precision

    torch.manual_seed(0)
    model = build_model(ModelConfig(name="CNN"), 3, 32, 10).to(device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    batches = [(torch.randn(64, 3, 32, 32, generator=gen).to(device), torch.randint(0, 10, (64,), generator=gen).to(device))
               for _ in range(2)] * 3
    losses = {}
    for name in ("fp32", "bf16"):
        copy_ = copy.deepcopy(model)
        precision = build_precision(name, device, tf32=False)
        optimizer = torch.optim.SGD(copy_.parameters(), lr=0.05)
        run = []
        for images, labels in batches:
            with precision.autocast():
                loss = F.cross_entropy(copy_(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            run.append(float(loss.detach()))
        losses[name] = run
    worst = max(abs(a - b) / abs(b) for a, b in zip(losses["bf16"], losses["fp32"]))
    return {"ok": worst < 3e-2, "max_relative_difference": round(worst, 5), "losses": losses}


def weights_digest(state: Dict[str, torch.Tensor]) -> str:
    """The first 16 hex digits of a sha256 over a state dict's names and raw bytes: equal only when bit-identical."""
    h = hashlib.sha256()
    for name, tensor in state.items():
        h.update(name.encode())
        # reshape(-1): a 0-dim buffer (BatchNorm's num_batches_tracked) cannot be viewed as bytes
        h.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _resume_bitwise(plan: Plan, deadline: float) -> dict:

    common = ["--config", FAST, *plan.data(2048, 256), *plan.tiny(), "train.batch_size=256" if not plan.smoke else
              "train.batch_size=64", "train.epochs=2", "train.compile=off", "train.capture=false",
              "train.deterministic=true", "train.log_every=1", "output.overwrite=true"]
    straight, stopped = plan.out / "resume-straight", plan.out / "resume-stopped"
    runs = [fasttrain_run(plan, [*common, f"output.dir={straight}"], deadline - time.monotonic()),
            fasttrain_run(plan, [*common, f"output.dir={stopped}", "train.stop_after_steps=5"],
                          deadline - time.monotonic()),
            fasttrain_run(plan, [*common, f"output.dir={stopped}", "resume=auto", "output.overwrite=false"],
                          deadline - time.monotonic())]
    if any(r.returncode != 0 for r in runs):
        return {"ok": False, "exit_codes": [r.returncode for r in runs],
                "output": _tail(next(r.stdout for r in runs if r.returncode != 0), 8)}

    def digest(run_dir: Path) -> str:
        return weights_digest(torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu",
                                         weights_only=False)["model"])

    a, b = digest(straight), digest(stopped)
    return {"ok": a == b, "straight_sha256": a, "resumed_sha256": b}


def _channels_last_resume(plan: Plan, deadline: float) -> dict:
    out = plan.out / "channels-last-resume"
    common = ["--config", FAST, *plan.data(2048, 256), *plan.tiny(), "train.epochs=1", "train.compile=off",
              "train.capture=false", f"output.dir={out}"]
    first = fasttrain_run(plan, [*common, "train.channels_last=false", "train.stop_after_steps=1",
                                 "output.overwrite=true", "train.batch_size=256" if not plan.smoke else
                                 "train.batch_size=64"], deadline - time.monotonic())
    second = fasttrain_run(plan, [*common, "train.channels_last=true", "resume=auto", "train.batch_size=256" if not
                                  plan.smoke else "train.batch_size=64"], deadline - time.monotonic())
    ok = first.returncode == 0 and second.returncode == 0
    return {"ok": ok, "exit_codes": [first.returncode, second.returncode],
            **({} if ok else {"output": _tail(second.stdout if first.returncode == 0 else first.stdout, 8)})}


def _auto_loader(plan: Plan, deadline: float) -> dict:
    out = plan.out / "auto-loader"
    result = fasttrain_run(plan, ["--config", FAST, *plan.data(2048, 256), *plan.tiny(), "data.loader=auto",
                                  "train.epochs=1", "train.compile=off", "train.capture=false",
                                  f"output.dir={out}", "output.overwrite=true"], deadline - time.monotonic())
    line = next((l for l in result.stdout.splitlines() if "data.loader=auto chose" in l), "")
    return {"ok": result.returncode == 0 and bool(line), "exit_code": result.returncode,
            "logged": line.split("| ", 1)[-1][:160] if line else None}


def correctness(plan: Plan, deadline: float) -> dict:
    device = torch.device("cuda" if plan.device.startswith("cuda") and not plan.smoke else "cpu")
    checks: Dict[str, Callable[[], dict]] = {
        "fp16_forced_overflow": lambda: _fp16_overflow(device),
        "bf16_tracks_fp32": lambda: _bf16_tracks_fp32(device),
        "stop_resume_bitwise_deterministic": lambda: _resume_bitwise(plan, deadline),
        "contiguous_checkpoint_into_channels_last": lambda: _channels_last_resume(plan, deadline),
        "auto_loader_chooses_and_logs": lambda: _auto_loader(plan, deadline),
    }
    results: Dict[str, object] = {}
    for name, check in checks.items():
        if time.monotonic() > deadline:
            results[name] = "skipped: the section's budget is spent"
            continue
        try:
            results[name] = check()
        except Skipped as note:
            results[name] = str(note)
        except Exception as err:  # one check's error must not cost the others their run
            results[name] = {"ok": False, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"}
    return {"ok": all(r["ok"] for r in results.values() if isinstance(r, dict)), **results}


# --------------------------------------------------------------------------- 5. time to accuracy


def time_to_accuracy(plan: Plan, deadline: float, tutorial_images_per_sec: Optional[float]) -> dict:
    """What a user waits for: a model of the case study's accuracy, from the command to the file.

    1. The reference accuracy: the case study's recipe (configs/cifar10_cnn.yaml: batch 128, AdamW,
       OneCycle) for its 100 epochs in fasttrain (the resident loader, bf16, the step captured: the same
       recipe, trained faster), its final test accuracy.
    2. The tutorial's loop: its wall time per epoch (training and its per-epoch validation) measured over
       3 epochs, stated for 100 (its start-up not counted: in its favour).
    3. The fast recipe (configs/cifar10_cnn_fast.yaml) with train.target_acc at that accuracy, for up to
       100 epochs, timed from outside the process (start-up, compilation, validation, checkpoints
       included), with its own time split: first with an empty compile cache, then again with the cache
       the first left (a rerun on the same machine).
    Headline: reached the case study's accuracy N x sooner, end to end. Fewer epochs when the budget is
    short (stated)."""
    from benchmarks.tutorial_loop import tutorial_eval_loader, tutorial_fit, tutorial_loader
    from fasttrain.config import ModelConfig, load_config
    from fasttrain.data import load_split
    from fasttrain.models import build_model

    size = plan.data(1024 if plan.smoke else 0, 256 if plan.smoke else 0)
    epochs = 1 if plan.smoke else 100 if deadline - time.monotonic() >= 150 else 30
    note = "the case study's 100 epochs" if epochs == 100 else f"{epochs} epoch(s) (the budget's limit)"

    # 1. the reference accuracy, at batch 128
    reference = plan.out / "tta-reference"
    faster = [] if plan.smoke else ["data.loader=gpu", "train.precision=bf16", "train.channels_last=true",
                                    "train.compile=default", "train.capture=true"]
    result = fasttrain_run(plan, ["--config", "configs/cifar10_cnn.yaml", *size, *plan.tiny(), *faster,
                                  f"train.epochs={epochs}", f"output.dir={reference}", "output.overwrite=true",
                                  "output.save_checkpoints=false", "train.eval_every=1000"],
                           0.5 * (deadline - time.monotonic()))
    history = _metrics(reference)
    if result.returncode != 0 or not history:
        return {"ok": False, "step": "reference", "exit_code": result.returncode, "output": _tail(result.stdout, 8)}
    target = history[-1]["val_acc"]

    # 2. the tutorial's loop, 3 epochs (1 in --smoke), per epoch
    cfg = load_config(None, [*size, *plan.tiny(), "output.dir=/nonexistent"])
    images, labels, _ = load_split(cfg.data, train=True)
    test_images, test_labels, _ = load_split(cfg.data, train=False)
    device = torch.device("cuda" if plan.device.startswith("cuda") and not plan.smoke else "cpu")
    workers, measured = (0, 1) if plan.smoke else (4, 3)
    torch.manual_seed(42)
    model = build_model(ModelConfig(name=cfg.model.name, hidden_sizes=cfg.model.hidden_sizes,
                                    dropout=cfg.model.dropout), 3, 32, 10).to(device)
    start = time.perf_counter()
    tutorial_fit(model, tutorial_loader(images, labels, 128, workers, pin_memory=device.type == "cuda"),
                 tutorial_eval_loader(test_images, test_labels, 128, workers), measured, device)
    tutorial_epoch = (time.perf_counter() - start) / measured
    tutorial_seconds = tutorial_epoch * epochs

    # 3. the fast recipe to that accuracy, cold then warm compile cache (--smoke: the plumbing, not compiled)
    cheap = ["train.compile=off", "train.capture=false"] if plan.smoke else []
    cache = plan.out / "tta-compile-cache"
    if cache.exists():
        import shutil

        shutil.rmtree(cache)
    runs = {}
    # --smoke compiles nothing, so a second run would only repeat the first: the plumbing is the same
    for name in (("cold",) if plan.smoke else ("cold", "warm")):
        out = plan.out / f"tta-fast-{name}"
        start = time.perf_counter()
        result = fasttrain_run(plan, ["--config", FAST, *size, *plan.tiny(), *cheap, f"train.epochs={epochs}",
                                      f"train.target_acc={target}", f"train.compile_cache={cache}",
                                      f"output.dir={out}", "output.overwrite=true"],
                               deadline - time.monotonic() + 60)
        seconds = time.perf_counter() - start
        history = _metrics(out)
        if result.returncode != 0 or not history:
            return {"ok": False, "step": f"fast recipe, {name} cache", "exit_code": result.returncode,
                    "output": _tail(result.stdout, 8)}
        split = json.loads((out / "env.json").read_text()).get("time_split", {})
        reached = split.get("target")
        runs[name] = {"seconds": round(seconds, 1), "reached": bool(reached),
                      "epochs": history[-1]["epoch"], "test_acc": round(history[-1]["val_acc"], 4),
                      "seconds_to_target": reached["seconds"] if reached else None,
                      "fixed_seconds": round(sum(split["parts"][k] for k in ("startup", "compile", "end")), 1),
                      "time_split": split.get("parts"), "compile_cache": split.get("compile_cache")}
    cold = runs["cold"]
    warm = runs.get("warm", cold)
    headline = (f"reached the case study's accuracy ({100 * target:.2f}%) {tutorial_seconds / cold['seconds']:.1f}x "
                f"sooner end to end (cold compile cache; {tutorial_seconds / warm['seconds']:.1f}x warm)"
                if cold["reached"] and warm["reached"] else
                f"did not reach the case study's accuracy ({100 * target:.2f}%) in {epochs} epochs: fast recipe "
                f"{100 * cold['test_acc']:.2f}% in {cold['seconds']} s")
    return {"ok": True, "epochs": epochs, "note": note, "data": "cifar10" if plan.real_data else "synthetic",
            "case_study_test_acc": round(target, 4), "tutorial_seconds_per_epoch": round(tutorial_epoch, 2),
            "tutorial_epochs_measured": measured, "tutorial_seconds": round(tutorial_seconds, 1),
            "fast_cold": cold, "fast_warm": runs.get("warm", "not run in --smoke (nothing compiled)"),
            "speedup_cold": round(tutorial_seconds / cold["seconds"], 2),
            "speedup_warm": round(tutorial_seconds / warm["seconds"], 2) if "warm" in runs else None,
            "headline": headline}


# --------------------------------------------------------------------------- 6. DALI


def dali(plan: Plan, deadline: float) -> dict:
    from fasttrain.data.loaders.dali import dali_available

    if not dali_available():
        raise Skipped("skipped: nvidia.dali is not importable here")
    out = plan.out / "dali"
    size = plan.data(5120, 1024) if plan.smoke else plan.data()
    result = fasttrain_run(plan, ["--config", FAST, *size, *plan.tiny(), "data.loader=dali", "train.epochs=1",
                                  f"output.dir={out}", "output.overwrite=true"], deadline - time.monotonic())
    history = _metrics(out)
    ok = result.returncode == 0 and len(history) == 1
    return {"ok": ok, "exit_code": result.returncode, "operators": "GPU" if not plan.smoke else "CPU",
            "images_per_sec": round(history[0]["images_per_sec"]) if history else None,
            **({} if ok else {"output": _tail(result.stdout, 8)})}


# --------------------------------------------------------------------------- the run


def environment(plan: Plan, commit: Optional[str]) -> dict:
    from fasttrain.observe.environment import device_name, git_commit

    cuda = torch.cuda.is_available() and not plan.smoke
    driver = None
    if cuda:
        try:
            driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            driver = None
    return {"device": device_name(torch.device("cuda", 0) if cuda else torch.device("cpu")),
            "driver": driver, "cuda": torch.version.cuda, "torch": torch.__version__,
            "python": platform.python_version(), "commit": commit or git_commit() or "unknown (pass --commit)",
            "smoke": plan.smoke, "budget_s": plan.budget, "data": "cifar10" if plan.real_data else "synthetic",
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def _summary(name: str, record: dict) -> str:
    """One cell of the markdown table: the figures that matter for each section."""
    if "result" not in record:  # skipped, or failed before it had a result
        return record.get("note", "")
    r = record.get("result", {})
    if name == "real_entry":
        return (f"exit {r.get('exit_code')}, {r.get('images_per_sec')} img/s per epoch, graphs {r.get('compiled_graphs')}, "
                f"cudagraph skips {r.get('cudagraph_skips')}, recompiles after epoch 1: {r.get('recompiles_after_epoch_1')}")
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
        elif isinstance(value, str):
            parts.append(f"{key}: {value}")
        else:
            parts.append(f"{key}: {value}")
    return "; ".join(parts)[:600]


def markdown(env: dict, records: List[dict]) -> str:
    lines = [f"### {env['date'][:10]} — {env['device']} (`python -m benchmarks.gpu_check"
             + (" --smoke" if env["smoke"] else "") + "`)", "",
             f"driver {env['driver']}, CUDA {env['cuda']}, torch {env['torch']}, Python {env['python']}, commit "
             f"{env['commit']}, data {env['data']}, budget {env['budget_s']:.0f} s", "",
             "| section | status | seconds | what it found |", "|---|---|---:|---|"]
    for record in records:
        cell = _summary(record["section"], record).replace("|", "/")
        lines.append(f"| {record['section']} | {record['status']} | {record.get('seconds', 0):.0f} | {cell} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, help=f"seconds in all (default: {DEFAULT_BUDGET}; --smoke: "
                        f"{SMOKE_BUDGET})")
    parser.add_argument("--out", type=Path, default=Path("runs/gpu_check"), help="where the runs and reports go")
    parser.add_argument("--data-root", type=Path, help="folder holding cifar-10-batches-py/ (default: "
                        "../shared/data, then ./data; synthetic data of the same shape when absent)")
    parser.add_argument("--smoke", action="store_true", help="every section at tiny sizes on the CPU")
    parser.add_argument("--sections", help="comma-separated sections to run, in the plan's order (default: all of "
                        f"{','.join(name for name, _ in SECTIONS)})")
    parser.add_argument("--commit", help="the commit being checked (default: git rev-parse HEAD)")
    args = parser.parse_args(argv)
    known = [name for name, _ in SECTIONS]
    chosen = [name.strip() for name in args.sections.split(",") if name.strip()] if args.sections else known
    unknown = [name for name in chosen if name not in known]
    if unknown or not chosen:
        parser.error(f"--sections: unknown section(s) {', '.join(unknown) or '(none given)'}; "
                     f"choose from {', '.join(known)}")
    planned = sum(seconds for name, seconds in SECTIONS if name in chosen)  # the chosen sections' share of 480 s
    args.budget = args.budget or (SMOKE_BUDGET if args.smoke else planned)
    roots = [args.data_root] if args.data_root else [REPO.parent / "shared" / "data", REPO / "data"]
    root = next((r for r in roots if (r / "cifar-10-batches-py").is_dir()), roots[0])
    if not args.smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run it on a GPU, or --smoke for the plumbing", file=sys.stderr)
        return 2
    # smoke: synthetic data (learnable classes, so a tiny model's loss falls within a few steps)
    real = (root / "cifar-10-batches-py").is_dir() and not args.smoke
    plan = Plan(args.smoke, "cpu" if args.smoke else "cuda", root.resolve(), real, args.out.resolve(), args.budget,
                time.monotonic())
    plan.out.mkdir(parents=True, exist_ok=True)
    env = environment(plan, args.commit)
    print(json.dumps({"gpu_check": env}), flush=True)
    # the full plan's budgets scale with --budget (smoke: tiny work, the same order)
    scale = args.budget / (DEFAULT_BUDGET if args.smoke else planned)
    records: List[dict] = []
    tutorial_ips: Optional[float] = None
    for name, seconds in SECTIONS:
        if name not in chosen:
            continue
        budget = seconds * scale
        record: dict = {"section": name, "budget_s": round(budget)}
        if plan.left() + 2.0 < budget:  # 2 s: the setup before the first section
            record.update(status="skipped", note=f"skipped: needs {budget:.0f} s, {max(plan.left(), 0):.0f} s left")
        else:
            start = time.monotonic()
            deadline = start + budget
            try:
                runner = {"hidden_syncs": hidden_syncs, "real_entry": real_entry, "ladder": ladder,
                          "correctness": correctness, "dali": dali,
                          "time_to_accuracy": lambda p, d: time_to_accuracy(p, d, tutorial_ips)}[name]
                result = runner(plan, deadline)
                record.update(status="ok" if result.get("ok") else "failed", result=result)
                if name == "ladder" and result.get("rows"):
                    tutorial_ips = result["rows"][0]["images_per_sec"]
            except Skipped as note:
                record.update(status="skipped", note=str(note))
            except Exception as err:  # one section's failure must not cost the others their minutes
                record.update(status="failed", note=f"{type(err).__name__}: {str(err).splitlines()[0][:300]}",
                              traceback=traceback.format_exc()[-2000:])
            record["seconds"] = round(time.monotonic() - start, 1)
        records.append(record)
        print(json.dumps(record), flush=True)
    (plan.out / "gpu_check.json").write_text(json.dumps({"environment": env, "sections": records}, indent=2))
    text = markdown(env, records)
    (plan.out / "gpu_check.md").write_text(text)
    print()
    print(text)
    return 1 if any(r["status"] == "failed" for r in records) else 0


if __name__ == "__main__":
    code = main()
    from fasttrain.run import exit_now

    exit_now(code)
