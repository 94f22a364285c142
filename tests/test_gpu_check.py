"""`python -m benchmarks.gpu_check --smoke`: the GPU check's plumbing on the CPU, so that the
command is known to work before any GPU minute is spent on it (its own module: pytest-xdist gives
each module one process, and this one runs beside the other benchmark tests)."""

import json

from conftest import run_fasttrain
from fasttrain.data.loaders.dali import dali_available


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
    to_accuracy = sections["time_to_accuracy"]["result"]
    assert 0 < to_accuracy["case_study_test_acc"] <= 1 and to_accuracy["tutorial_epochs_measured"] >= 1
    cold = to_accuracy["fast_cold"]  # from outside the process, with the run's own time split
    assert set(cold["time_split"]) == {"startup", "compile", "steps", "eval", "checkpoint", "end"}
    assert cold["seconds"] >= sum(cold["time_split"].values())
    assert "the case study's accuracy" in to_accuracy["headline"]
    report = json.loads((out / "gpu_check.json").read_text())
    assert [s["section"] for s in report["sections"]] == list(sections)
    table = [line for line in (out / "gpu_check.md").read_text().splitlines() if line.startswith("| ")]
    assert len(table) == 1 + 6  # the header, then one row per section


def test_the_bitwise_digest_covers_batchnorm_buffers_and_sees_a_one_bit_change():
    """The H200 run found the digest failing on BatchNorm's 0-dim `num_batches_tracked`
    (the smoke run's MLP has none): a model with BatchNorm must digest, and one flipped bit must show."""
    import torch
    from benchmarks.gpu_check import weights_digest

    state = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).state_dict()
    assert state["1.num_batches_tracked"].dim() == 0
    before = weights_digest(state)
    assert weights_digest({k: v.clone() for k, v in state.items()}) == before
    state["0.weight"].view(torch.int32)[0, 0, 0, 0] ^= 1
    assert weights_digest(state) != before


def test_sections_picks_what_runs_and_refuses_an_unknown_name(capsys):
    import pytest
    from benchmarks.gpu_check import main

    with pytest.raises(SystemExit) as stop:
        main(["--smoke", "--sections", "correctnes"])
    assert stop.value.code == 2
    assert "unknown section(s) correctnes; choose from hidden_syncs, real_entry" in capsys.readouterr().err
