"""Plots of a run folder, readable without the terminal: `curves.png` (loss, accuracy, learning
rate), `throughput.png` (images/s) and `time.png` (where the wall time went, from env.json's time split).
Written at the end of training and by `fasttrain plot RUN_DIR`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional

from fasttrain.errors import UserError


def _read_jsonl(path: Path) -> List[dict]:
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise UserError(f"{path} line {number} is not valid JSON (a truncated write?): fix or delete "
                                f"that line and plot again") from None
    return records


def plot_run(run_dir: str | Path, time_split: bool = True) -> List[Path]:
    """Write curves.png and throughput.png into the run folder, and time.png when env.json holds a time
    split and `time_split` (a run in progress draws its own at its end); returns their paths."""
    run = Path(run_dir)
    epochs = _read_jsonl(run / "metrics.jsonl")
    steps = _read_jsonl(run / "steps.jsonl")  # a run stopped in its first epoch has only these
    if not epochs and not steps:
        raise UserError(f"{run} has recorded no log interval (steps.jsonl) or epoch (metrics.jsonl) yet: give a run "
                        f"folder written by fasttrain (e.g. runs/<run>) once it has logged")

    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    x = [e["epoch"] for e in epochs]
    validated = [e for e in epochs if e.get("val_acc") is not None]  # train.eval_every leaves epochs out
    fig, (loss_ax, acc_ax, lr_ax) = plt.subplots(1, 3, figsize=(15, 4.2))
    if epochs:
        loss_ax.plot(x, [e["train_loss"] for e in epochs], marker="o", label="train")
        loss_ax.plot([e["epoch"] for e in validated], [e["val_loss"] for e in validated], marker="o",
                     label="validation")
        loss_ax.set(title="loss", xlabel="epoch")
    else:  # no epoch ended: the log intervals' training loss
        loss_ax.plot([s["step"] for s in steps], [s["loss"] for s in steps], marker=".", label="train")
        loss_ax.set(title="loss (no epoch ended yet)", xlabel="optimizer step")
    loss_ax.legend()
    if not validated:
        acc_ax.text(0.5, 0.5, "no validated epoch yet", ha="center", va="center", transform=acc_ax.transAxes)
    acc_ax.plot([e["epoch"] for e in validated], [100 * e["val_acc"] for e in validated], marker="o",
                color="tab:green")
    if validated:
        best = max(validated, key=lambda e: e["val_acc"])
        acc_ax.annotate(f"best {100 * best['val_acc']:.2f}%", (best["epoch"], 100 * best["val_acc"]),
                        textcoords="offset points", xytext=(0, -14), ha="center")
    acc_ax.set(title="validation accuracy (%)", xlabel="epoch")
    if steps:
        lr_ax.plot([s["step"] for s in steps], [s["lr"] for s in steps])
        lr_ax.set(title="learning rate", xlabel="optimizer step")
    else:
        lr_ax.plot(x, [e["lr"] for e in epochs], marker="o")
        lr_ax.set(title="learning rate", xlabel="epoch")
    for ax in (loss_ax, acc_ax, lr_ax):
        ax.grid(alpha=0.3)
    for ax in (loss_ax, acc_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(run.name)
    fig.tight_layout()
    curves = run / "curves.png"
    fig.savefig(curves, dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4))
    if steps:
        ax.plot([s["step"] for s in steps], [s["images_per_sec"] for s in steps], alpha=0.6,
                label=f"every {steps[0]['step']} steps")
    if epochs:
        ax.plot([e["step"] for e in epochs], [e["images_per_sec"] for e in epochs], marker="o", label="epoch mean")
    ax.set(title=f"training throughput, all ranks ({run.name})", xlabel="optimizer step", ylabel="images/s")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    throughput = run / "throughput.png"
    fig.savefig(throughput, dpi=100)
    plt.close(fig)
    written = [curves, throughput]
    time_plot = plot_time_split(run) if time_split else None
    return written + ([time_plot] if time_plot else [])


def plot_time_split(run_dir: str | Path) -> Optional[Path]:
    """time.png from env.json's time split; None when the run folder has none yet."""
    run = Path(run_dir)
    split = _time_split(run)
    if not split:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return _plot_time_split(plt, run, split)


def _time_split(run: Path) -> Optional[Dict[str, Any]]:
    """env.json's time split (written at the end of a run), or None when there is none (a run that
    has not ended, or an older fasttrain)."""
    env_file = run / "env.json"
    try:
        split = json.loads(env_file.read_text()).get("time_split") if env_file.is_file() else None
    except (OSError, ValueError):
        return None
    if not isinstance(split, dict) or not isinstance(split.get("parts"), dict):
        return None
    return split


def _plot_time_split(plt: Any, run: Path, split: Dict[str, Any]) -> Path:
    """time.png: one bar of the run's wall time, a segment per part (start-up, compile and warm-up,
    steady steps, evaluation, checkpoint stalls, end), each labelled with its seconds."""
    parts = [(name, float(seconds)) for name, seconds in split["parts"].items()]
    total = float(split.get("wall_seconds") or sum(seconds for _, seconds in parts)) or 1.0
    fig, ax = plt.subplots(figsize=(10, 2.6))
    left = 0.0
    colors = ["tab:gray", "tab:purple", "tab:blue", "tab:green", "tab:orange", "tab:brown"]
    for (name, seconds), color in zip(parts, colors):
        ax.barh([0], [seconds], left=left, color=color, label=f"{name} {seconds:.1f}s")
        if seconds / total > 0.06:
            ax.text(left + seconds / 2, 0, f"{seconds:.1f}s", ha="center", va="center", color="white", fontsize=9)
        left += seconds
    ax.set(yticks=[], xlabel="seconds", title=f"where the wall time went: {total:.1f}s from {split.get('from', 'start')} "
           f"({run.name})")
    ax.legend(ncol=len(parts), loc="upper center", bbox_to_anchor=(0.5, -0.45), fontsize=8, frameon=False)
    fig.tight_layout()
    path = run / "time.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
