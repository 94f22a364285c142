"""The suite's results as a markdown report and a bar chart."""

from __future__ import annotations

from pathlib import Path


def _percent(value, digits: int = 1) -> str:
    return f"{100 * value:.{digits}f}%" if value is not None else "n/a"


def write_markdown(results: dict, path: Path) -> str:
    env = results["environment"]
    lines = [
        f"## {env['date'][:10]} — {env['device']} ({env['device_type']}), preset {env['preset']}",
        "",
        f"torch {env['torch']}, CUDA {env['cuda']}, DALI {env['dali']}, Python {env['python']}, "
        f"{env['cpu_count']} CPUs, commit {str(env['git_commit'])[:10]}; model {env['model']}, batch "
        f"{env['batch_size']} per process, data {env['data']}; timing: {env['timing']['guard_steps']} guard steps "
        f"(finite, falling losses), warm-up to {env['timing']['warmup']} steps, median of {env['timing']['windows']} "
        f"windows of at least {env['timing']['min_seconds']:g} s (fasttrain: its real epoch loop, windows cut at "
        f"its log intervals of {env.get('log_every', 50)} steps).",
        "",
        "Data wait: the share of the timed time the host spent waiting for the next batch. MFU: achieved "
        "FLOP/s (forward + backward FLOPs per image, counted on the model) over the device's dense peak for the "
        "step's precision; n/a where the peak is unknown (CPUs).",
        "",
        "| variant | images/s | speedup vs tutorial loop | data wait | MFU | best batch (images/s) |",
        "|---|---:|---:|---:|---:|---|",
    ]
    best = {b["variant"]: b for b in results["best_batch"]}
    for row in results["ladder"]:
        b = best.get(row["variant"])
        best_cell = f"{b['best_batch_size']} ({b['best_images_per_sec']:,.0f})" if b else "-"
        lines.append(f"| {row['variant']} | {row['images_per_sec']:,.0f} | {row['speedup']:.2f}x | "
                     f"{_percent(row['data_wait_share'], 0)} | {_percent(row['mfu'])} | {best_cell} |")
    lines += ["", "| loader alone (no model) | images/s | vs tutorial DataLoader |", "|---|---:|---:|"]
    for row in results["loaders"]:
        lines.append(f"| {row['variant']} | {row['images_per_sec']:,.0f} | {row['speedup']:.2f}x |")
    host = results.get("host_overhead")
    if host:
        from benchmarks.host_overhead import markdown as host_markdown

        lines += ["", "Host overhead: ATen ops called per step (torch.profiler, outermost calls), and host time per "
                  "step of a model small enough that the host dominates, against a bare hand-written loop over the "
                  "same data, optimizer and schedule (same run, alternating windows).", "",
                  host_markdown(host["ops"], host["host_time"], host["model"])]
    if results["scaling"]:
        lines += ["", f"| ranks ({results['scaling'][0]['variant']}) | images/s (all ranks) | per-rank efficiency |",
                  "|---:|---:|---:|"]
        for row in results["scaling"]:
            lines.append(f"| {row['world_size']} | {row['images_per_sec']:,.0f} | {100 * row['efficiency']:.0f}% |")
    text = "\n".join(lines) + "\n"
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
