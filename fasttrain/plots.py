"""Plots of a run folder, readable without the terminal: `curves.png` (loss, accuracy, learning
rate) and `throughput.png` (images/s). Written at the end of training and by `fasttrain plot RUN_DIR`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List

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


def plot_run(run_dir: str | Path) -> List[Path]:
    """Write curves.png and throughput.png into the run folder; returns their paths."""
    run = Path(run_dir)
    epochs = _read_jsonl(run / "metrics.jsonl")
    if not epochs:
        raise UserError(f"{run} has no metrics.jsonl with at least one epoch: give a run folder written by fasttrain "
                        f"(e.g. runs/<run>)")
    steps = _read_jsonl(run / "steps.jsonl")

    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    x = [e["epoch"] for e in epochs]
    fig, (loss_ax, acc_ax, lr_ax) = plt.subplots(1, 3, figsize=(15, 4.2))
    loss_ax.plot(x, [e["train_loss"] for e in epochs], marker="o", label="train")
    loss_ax.plot(x, [e["val_loss"] for e in epochs], marker="o", label="validation")
    loss_ax.set(title="loss", xlabel="epoch")
    loss_ax.legend()
    acc_ax.plot(x, [100 * e["val_acc"] for e in epochs], marker="o", color="tab:green")
    best = max(epochs, key=lambda e: e["val_acc"])
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
    steps_at_epoch_end = [e["step"] for e in epochs]
    ax.plot(steps_at_epoch_end, [e["images_per_sec"] for e in epochs], marker="o", label="epoch mean")
    ax.set(title=f"training throughput, all ranks ({run.name})", xlabel="optimizer step", ylabel="images/s")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    throughput = run / "throughput.png"
    fig.savefig(throughput, dpi=100)
    plt.close(fig)
    return [curves, throughput]
