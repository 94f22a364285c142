"""What every benchmark writes beside its figures, and how: the environment (one dict, one line of
versions) and markdown tables. The suite's report (`write_markdown`, `write_chart`) is built from them,
as are the ladder's, host overhead's, fixed costs' and gpu_check's tables."""

from __future__ import annotations

import datetime
import os
import subprocess
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch

from fasttrain.observe.environment import describe


# --------------------------------------------------------------------------- the environment


def _driver() -> Optional[str]:
    """The NVIDIA driver's version (nvidia-smi), or None where there is none."""
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20)
        return done.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def environment(device: torch.device, world_size: int = 1, backend: Optional[str] = None, **extra) -> dict:
    """A run's env.json (fasttrain.observe.environment.describe: versions, device, world size, host, git commit,
    command) in the tables' terms: `device` is the device's name, `device_type` its kind; the CPU count,
    the driver on CUDA, the date, and `extra` (the benchmark's own settings) last."""
    env = describe(device, world_size, backend or ("nccl" if device.type == "cuda" else "gloo"))
    env.update(device=env.pop("device_name"), device_type=device.type, cpu_count=os.cpu_count(),
               driver=_driver() if device.type == "cuda" else None,
               date=datetime.datetime.now().isoformat(timespec="seconds"))
    env.update(extra)
    return env


def _short_commit(commit: Optional[str]) -> str:
    """The first 10 hex digits, keeping a "+dirty" mark."""
    if not commit:
        return "unknown (pass --commit)"
    sha, plus, rest = commit.partition("+")
    return sha[:10] + plus + rest


def versions_line(env: dict) -> str:
    """The versions a figure depends on, in one line: torch, CUDA (and the driver), DALI, Python, CPUs, commit."""
    driver = f" (driver {env['driver']})" if env.get("driver") else ""
    return (f"torch {env['torch']}, CUDA {env['cuda']}{driver}, DALI {env.get('dali')}, Python {env['python']}, "
            f"{env['cpu_count']} CPUs, commit {_short_commit(env.get('git_commit'))}")


# --------------------------------------------------------------------------- markdown


def table(columns: Sequence[str], rows: Iterable[Sequence[object]], align: str = "") -> str:
    """A markdown table. `align`: a letter per column, "l" for text, "r" for figures (missing letters: "l").
    A "|" inside a cell would end it early: it is written "/"."""
    def line(cells: Iterable[object]) -> str:
        return "| " + " | ".join(str(cell).replace("|", "/") for cell in cells) + " |"

    rule = "|" + "|".join("---:" if align[i:i + 1] == "r" else "---" for i in range(len(columns))) + "|"
    return "\n".join([line(columns), rule, *(line(row) for row in rows)])


def percent(value, digits: int = 1) -> str:
    """A share as "12.3%", or "n/a" where it is unknown (None)."""
    return f"{100 * value:.{digits}f}%" if value is not None else "n/a"


def write_markdown(results: dict, path: Path) -> str:
    """The suite's report (`python -m benchmarks`): its environment, then a table per part."""
    env = results["environment"]
    timing = env["timing"]
    best = {b["variant"]: b for b in results["best_batch"]}

    def best_cell(variant: str) -> str:
        b = best.get(variant)
        return f"{b['best_batch_size']} ({b['best_images_per_sec']:,.0f})" if b else "-"

    parts = [
        f"## {env['date'][:10]} — {env['device']} ({env['device_type']}), preset {env['preset']}",
        f"{versions_line(env)}; model {env['model']}, batch {env['batch_size']} per process, data {env['data']}; "
        f"timing: {timing['guard_steps']} guard steps (finite, falling losses), warm-up to {timing['warmup']} steps, "
        f"median of {timing['windows']} windows of at least {timing['min_seconds']:g} s (fasttrain: its real epoch "
        f"loop, windows cut at its log intervals of {env.get('log_every', 50)} steps).",
        "Data wait: the share of the timed time the host spent waiting for the next batch. MFU: achieved "
        "FLOP/s (forward + backward FLOPs per image, counted on the model) over the device's dense peak for the "
        "step's precision; n/a where the peak is unknown (CPUs).",
        table(["variant", "images/s", "speedup vs tutorial loop", "data wait", "MFU", "best batch (images/s)"],
              ([row["variant"], f"{row['images_per_sec']:,.0f}", f"{row['speedup']:.2f}x",
                percent(row["data_wait_share"], 0), percent(row["mfu"]), best_cell(row["variant"])]
               for row in results["ladder"]), "lrrrrl"),
        table(["loader alone (no model)", "images/s", "vs tutorial DataLoader"],
              ([row["variant"], f"{row['images_per_sec']:,.0f}", f"{row['speedup']:.2f}x"]
               for row in results["loaders"]), "lrr"),
    ]
    host = results.get("host_overhead")
    if host:
        from benchmarks.host_overhead import markdown as host_markdown

        parts += ["Host overhead: ATen ops called per step (torch.profiler, outermost calls), and host time per "
                  "step of a model small enough that the host dominates, against a bare hand-written loop over the "
                  "same data, optimizer and schedule (same run, alternating windows).",
                  host_markdown(host["ops"], host["host_time"], host["model"])]
    if results["scaling"]:
        parts.append(table([f"ranks ({results['scaling'][0]['variant']})", "images/s (all ranks)",
                            "per-rank efficiency"],
                           ([row["world_size"], f"{row['images_per_sec']:,.0f}", f"{100 * row['efficiency']:.0f}%"]
                            for row in results["scaling"]), "rrr"))
    text = "\n\n".join(parts) + "\n"
    path.write_text(text)
    return text


def write_chart(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    ladder = results["ladder"]
    names = [r["variant"].split(" (")[0] for r in ladder]
    values = [r["images_per_sec"] for r in ladder]
    fig, ax = plt.subplots(figsize=(9, 0.55 * len(names) + 1.5))
    bars = ax.barh(range(len(names)), values, color=["#888888"] + ["#2a7ab9"] * (len(names) - 1))
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    for bar, row in zip(bars, ladder):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {row['images_per_sec']:,.0f} ({row['speedup']:.2f}x)",
                va="center", fontsize=9)
    env = results["environment"]
    ax.set_xlabel("training images/s (median window)")
    ax.set_title(f"fasttrain vs the tutorial loop: {env['model']}, batch {env['batch_size']}, {env['device']}", fontsize=10)
    ax.set_xlim(0, max(values) * 1.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
