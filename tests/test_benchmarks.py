"""The benchmark scripts run end to end (tiny sizes on the CPU) and print well-formed results."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.measure import BrokenVariant, Windows, guard, measure
from fasttrain.observe.flops import flops_per_image

from conftest import run_fasttrain
from fasttrain.data.loaders.dali import dali_available


@pytest.mark.slow
def test_loader_only_mode_times_every_loader(tmp_path):
    out = tmp_path / "loaders.json"
    result = run_fasttrain("--loaders-only", "--device", "cpu", "--batch-size", "64", "--min-seconds", "0.05", "--warmup", "1",
                           "--windows", "1", "--tutorial-workers", "0", "--data-root", str(tmp_path), "--train-size",
                           "1280", "--threads", "1", "--json", str(out), module="benchmarks.ladder")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["tutorial DataLoader (PIL transforms)", "fasttrain plain", "fasttrain gpu"] + (
        ["fasttrain dali"] if dali_available() else [])
    assert all(r["images_per_sec"] > 0 for r in rows)


def test_guard_refuses_a_variant_whose_loss_is_not_finite_or_does_not_fall():
    with pytest.raises(BrokenVariant, match="non-finite"):
        guard("x", [2.3, float("nan"), 2.1, 2.0])
    with pytest.raises(BrokenVariant, match="did not decrease"):
        guard("x", [2.3, 2.3, 2.4, 2.5])
    guard("x", [2.3, 2.2, 2.2, 2.0])
    with pytest.raises(BrokenVariant):  # a broken fast path: its timing is never reached
        measure("broken", lambda: None, lambda _: torch.tensor(float("inf")), 32, torch.device("cpu"),
                Windows(warmup=4, count=1, steps=2, guard_steps=4))


def test_flops_per_image_are_counted_on_the_model():
    from fasttrain.models import CIFAR10_CNN

    flops = flops_per_image(CIFAR10_CNN(), (3, 32, 32))
    # forward multiply-adds of the convolutions and linears, x2 FLOPs each, x3 for forward + backward
    convs = [(3, 32, 32), (32, 32, 32), (32, 64, 16), (64, 64, 16), (64, 128, 8), (128, 128, 8)]
    forward = sum(2 * cin * cout * 9 * side * side for cin, cout, side in convs) + 2 * (2048 * 256 + 256 * 10)
    assert flops == pytest.approx(3 * forward, rel=0.01)


@pytest.mark.slow
def test_suite_smoke_preset_writes_json_markdown_and_a_chart(tmp_path, capsys):
    """`python -m benchmarks --preset cpu-smoke`: the ladder (benchmarks.ladder, the rows its own command prints
    as well), the batch sweep, the loaders, host overhead and scaling, in one run."""
    result = run_fasttrain("--preset", "cpu-smoke", "--data-root", str(tmp_path), "--out", str(tmp_path / "out"),
                           module="benchmarks")
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert {"device", "torch", "cuda", "dali", "cpu_count", "python", "git_commit"} <= set(data["environment"])
    # the ladder: every rung, each timed over its windows after a guard run whose loss fell
    rows = data["ladder"]
    expected = ["tutorial loop", "fasttrain, plain loader", "+ gpu-resident loader", "+ channels_last",
                "+ bf16 autocast", "+ torch.compile", "+ whole-step capture"] + (
        ["DALI instead of the gpu-resident loader"] if dali_available() else [])
    assert [r["variant"].split(" (")[0] for r in rows] == expected
    assert all(r["images_per_sec"] > 0 and len(r["window_images_per_sec"]) == 2 for r in rows)
    assert all(math.isfinite(r["guard_last_loss"]) and r["guard_last_loss"] < r["guard_first_loss"] for r in rows)
    assert rows[0]["data_wait_share"] is None and all(0.0 <= r["data_wait_share"] <= 1.0 for r in rows[1:])
    assert rows[0]["speedup"] == 1.0
    assert all(r["mfu"] is None for r in rows)  # no known peak for a CPU: "n/a", not a made-up figure
    assert len(data["ladder"]) == len(data["best_batch"]) + 1  # every fasttrain variant got a batch sweep
    from benchmarks.ladder import Row, print_table  # `python -m benchmarks.ladder`'s table of these rows

    capsys.readouterr()
    print_table([Row(**row) for row in rows], loaders_only=False)
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert printed[0].startswith("| variant | images/s | speedup vs tutorial loop |") and len(printed) == 1 + len(rows)
    assert [s["world_size"] for s in data["scaling"]] == [1, 2] and data["scaling"][0]["efficiency"] == 1.0
    assert len(data["loaders"]) >= 3
    host = data["host_overhead"]
    assert [r["path"].split(" (")[0] for r in host["ops"]] == ["tutorial loop", "fasttrain eager step",
                                                               "fasttrain captured step"]
    assert all(r["ops_per_step"] > r["model_ops_per_step"] > 0 for r in host["ops"][:2])
    assert [r["vs_bare"] for r in host["host_time"]][0] == 1.0 and all(r["us_per_step"] > 0 for r in host["host_time"])
    markdown = (tmp_path / "out" / "results.md").read_text()
    assert markdown.count("| tutorial loop") == 3 and "per-rank efficiency" in markdown  # ladder, ops, host time
    assert "| bare hand-written loop" in markdown
    image = Image.open(tmp_path / "out" / "results.png")
    assert image.format == "PNG" and image.size[0] > 500 and image.size[1] > 300
    pixels = np.asarray(image.convert("L"))
    assert pixels.std() > 10  # bars and text, not a blank canvas



def test_every_benchmark_table_aligns_figures_right_and_keeps_a_pipe_inside_its_cell():
    """benchmarks.report.table writes every benchmark's markdown tables: figures right-aligned, text left,
    and a "|" in a cell (a variant's name, an error) cannot split it into two."""
    from benchmarks.report import table

    text = table(["variant", "images/s"], [["a | b", "1,234"], ["c", 5]], "lr")
    assert text.splitlines() == ["| variant | images/s |", "|---|---:|", "| a / b | 1,234 |", "| c | 5 |"]
