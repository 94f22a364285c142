"""The benchmark scripts run end to end (tiny sizes on the CPU) and print well-formed results."""

import json
import math

from conftest import run_fasttrain
from fasttrain.data.dali import dali_available


def test_ladder_runs_every_rung_and_writes_its_table(tmp_path):
    out = tmp_path / "ladder.json"
    result = run_fasttrain("--device", "cpu", "--model", "SimpleModel", "--batch-size", "32", "--steps", "3",
                           "--warmup", "1", "--windows", "1", "--tutorial-workers", "0", "--data-root",
                           str(tmp_path), "--json", str(out), module="benchmarks.ladder")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    expected = ["tutorial loop", "fasttrain, plain loader", "+ gpu-resident loader", "+ channels_last",
                "+ bf16 autocast", "+ torch.compile"] + (["DALI instead of the gpu-resident loader"] if dali_available() else [])
    assert [r["variant"].split(" (")[0] for r in rows] == expected
    table = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(expected)
    assert all(r["images_per_sec"] > 0 and math.isfinite(r["last_loss"]) for r in rows)
    assert rows[0]["speedup"] == 1.0


def test_loader_only_mode_times_every_loader(tmp_path):
    out = tmp_path / "loaders.json"
    result = run_fasttrain("--loaders-only", "--device", "cpu", "--batch-size", "64", "--steps", "3", "--warmup", "1",
                           "--windows", "1", "--tutorial-workers", "0", "--data-root", str(tmp_path), "--json", str(out),
                           module="benchmarks.ladder")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["tutorial DataLoader (PIL transforms)", "fasttrain plain", "fasttrain gpu"] + (
        ["fasttrain dali"] if dali_available() else [])
    assert all(r["images_per_sec"] > 0 for r in rows)
