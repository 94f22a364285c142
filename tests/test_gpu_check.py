"""`python -m benchmarks.gpu_check --smoke`: the GPU check's plumbing on the CPU, so that the
command is known to work before any GPU minute is spent on it (its own module: pytest-xdist gives
each module one process, and this one runs beside the other benchmark tests)."""

import json

from conftest import run_fasttrain
from fasttrain.data.dali import dali_available


def test_gpu_check_smoke_runs_every_section_on_the_cpu_and_writes_its_report(tmp_path):
    """`python -m benchmarks.gpu_check --smoke`: the GPU check's plumbing, known to work before a GPU
    minute is spent on it. CUDA-only checks say so; nothing else may be skipped or fail."""
    out = tmp_path / "check"
    result = run_fasttrain("--smoke", "--out", str(out), module="benchmarks.gpu_check")
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert "gpu_check" in lines[0] and lines[0]["gpu_check"]["smoke"] is True
    sections = {line["section"]: line for line in lines[1:]}
    assert list(sections) == ["hidden_syncs", "real_entry", "ladder", "correctness", "time_to_accuracy", "dali"]
    assert all(s["status"] == "ok" for name, s in sections.items() if name != "dali")
    assert sections["dali"]["status"] == ("ok" if dali_available() else "skipped")
    assert sections["hidden_syncs"]["result"]["eager"]["hidden_syncs"] == 0
    assert sections["hidden_syncs"]["result"]["captured"]["syncs_at_boundaries"] > 0
    assert sections["correctness"]["result"]["fp16_forced_overflow"] == \
        "skipped: no CUDA (fp16 autocast with a GradScaler is CUDA only)"
    assert sections["correctness"]["result"]["stop_resume_bitwise_deterministic"]["ok"]
    assert [r["variant"].split(" (")[0] for r in sections["ladder"]["result"]["rows"]][:2] == [
        "tutorial loop", "fasttrain, plain loader"]
    report = json.loads((out / "gpu_check.json").read_text())
    assert [s["section"] for s in report["sections"]] == list(sections)
    table = [line for line in (out / "gpu_check.md").read_text().splitlines() if line.startswith("| ")]
    assert len(table) == 1 + 6  # the header, then one row per section
