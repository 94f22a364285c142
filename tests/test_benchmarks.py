"""The benchmark scripts run end to end (tiny sizes on the CPU) and print well-formed results."""

import json
import math

from conftest import run_fasttrain


def test_ladder_runs_every_rung_and_writes_its_table(tmp_path):
    out = tmp_path / "ladder.json"
    result = run_fasttrain("--device", "cpu", "--model", "SimpleModel", "--batch-size", "32", "--steps", "3",
                           "--warmup", "1", "--windows", "1", "--tutorial-workers", "0", "--data-root",
                           str(tmp_path), "--json", str(out), module="benchmarks.ladder")
    assert result.returncode == 0, result.stderr[-3000:]
    table = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + 6  # header + tutorial loop + 5 rungs
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"].split(" (")[0] for r in rows] == [
        "tutorial loop", "fasttrain, plain loader", "+ gpu-resident loader", "+ channels_last", "+ bf16 autocast",
        "+ torch.compile"]
    assert all(r["images_per_sec"] > 0 and math.isfinite(r["last_loss"]) for r in rows)
    assert rows[0]["speedup"] == 1.0
