"""`python -m benchmarks.gpu_check --smoke`: the GPU check's plumbing on the CPU, so that the
command is known to work before any GPU minute is spent on it (its own module: pytest-xdist gives
each module one process, and this one runs beside the other benchmark tests)."""

import json
from pathlib import Path

import pytest

import test_gpu_correctness
from conftest import run_fasttrain
from fasttrain.data.loaders.dali import dali_available


# the plan's sections in two smoke runs of about half a minute each (one would near a minute on a busy 2-core CI)
FIRST_HALF = ["hidden_syncs", "real_entry", "profile", "speedrun"]
SECOND_HALF = ["ladder", "correctness", "time_to_accuracy", "dali"]


def smoke_sections(out, names):
    """`python -m benchmarks.gpu_check --smoke --sections ...`: its JSON lines by section, checked against its
    report files. CUDA-only checks say so; nothing else may be skipped or fail."""
    result = run_fasttrain("--smoke", "--out", str(out), "--sections", ",".join(names), module="benchmarks.gpu_check")
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert "gpu_check" in lines[0] and lines[0]["gpu_check"]["smoke"] is True
    sections = {line["section"]: line for line in lines[1:]}
    assert list(sections) == names
    assert all(s["status"] == "ok" for name, s in sections.items() if name != "dali")
    report = json.loads((out / "gpu_check.json").read_text())
    assert [s["section"] for s in report["sections"]] == names
    table = [line for line in (out / "gpu_check.md").read_text().splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(names)  # the header, then one row per section
    return {name: line.get("result") for name, line in sections.items()}, sections


def test_the_plans_sections_are_the_two_smoke_halves_in_order():
    from benchmarks.gpu_check.cli import SECTIONS

    assert [name for name, _, _ in SECTIONS] == FIRST_HALF + SECOND_HALF


def test_the_default_plan_fits_8_minutes_with_its_start_and_report():
    """A lent GPU has 15 minutes; the machine's start and the data's carry take about 7 of them. The sections'
    budgets leave 20 s of the 480 for the process's start-up (imports, the environment line) and the report."""
    from benchmarks.gpu_check.cli import DEFAULT_BUDGET, SECTIONS

    assert DEFAULT_BUDGET == sum(seconds for _, _, seconds in SECTIONS) <= 460
    assert dict((name, seconds) for name, _, seconds in SECTIONS)["speedrun"] >= 90  # 5 seeds and a warm-up


@pytest.mark.slow
def test_gpu_check_smoke_first_half_syncs_entry_profile_and_speedrun(tmp_path):
    results, _ = smoke_sections(tmp_path / "check", FIRST_HALF)
    assert results["hidden_syncs"]["eager"]["hidden_syncs"] == 0
    assert results["hidden_syncs"]["captured"]["syncs_at_boundaries"] > 0
    profiled = results["profile"]  # both windows ran and kept their traces; no device here to profile
    assert [profiled[k]["steps"] for k in ("captured", "eager-compiled")] == [6, 6]
    assert all(Path(profiled[k]["trace"]).is_file() and profiled[k]["device"].startswith("CUDA only")
               for k in ("captured", "eager-compiled"))
    assert profiled["roofline"]["activation_bytes_per_training_image"] > 0
    speed = results["speedrun"]  # the recipe's file after a warm-up run, timed as the records time it
    assert speed["seeds"] == 1 and speed["warm_up"]["seed"] == 0 and [r["seed"] for r in speed["runs"]] == [1]
    assert 0 <= speed["min_acc"] <= speed["mean_acc"] <= 1 and 0 < speed["mean_train_seconds"] < speed["mean_wall_seconds"]


@pytest.mark.slow
def test_gpu_check_smoke_second_half_ladder_correctness_accuracy_and_dali(tmp_path):
    results, sections = smoke_sections(tmp_path / "check", SECOND_HALF)
    assert sections["dali"]["status"] == ("ok" if dali_available() else "skipped")
    # pytest ran every test of tests/test_gpu_correctness.py and reported each: without CUDA, a skip
    # (what pytest reports for a pass and a failure: test_the_correctness_section_reports_each_tests_outcome)
    correctness = {k: v for k, v in results["correctness"].items() if k != "ok"}
    assert correctness == {name.removeprefix("test_"): "skipped: no CUDA"
                           for name in dir(test_gpu_correctness) if name.startswith("test_")}
    assert [r["variant"].split(" (")[0] for r in results["ladder"]["rows"]][:2] == [
        "tutorial loop", "fasttrain, plain loader"]
    to_accuracy = results["time_to_accuracy"]
    assert 0 < to_accuracy["case_study_test_acc"] <= 1 and to_accuracy["tutorial_epochs_measured"] >= 1
    cold = to_accuracy["fast_cold"]  # from outside the process, with the run's own time split
    assert set(cold["time_split"]) == {"startup", "compile", "steps", "eval", "checkpoint", "end"}
    # the outside clock holds the run's own parts (each rounded to 4 places, the total to 3)
    assert cold["seconds"] >= sum(cold["time_split"].values()) - 0.001
    assert "the case study's accuracy" in to_accuracy["headline"]


def test_the_correctness_section_reports_each_tests_outcome(tmp_path):
    """The section runs pytest on a file's tests of one marker and reads back each one's outcome: a pass,
    a failure with its message, a skip with its reason; tests without the marker do not run. A file with
    none of them is an error, not a pass."""
    from benchmarks.gpu_check.correctness import run_tests

    tests = tmp_path / "test_marked.py"
    tests.write_text(
        "import pytest\n\n"
        "@pytest.mark.cuda\ndef test_passes():\n    assert 1 + 1 == 2\n\n"
        "@pytest.mark.cuda\ndef test_fails():\n    assert 1 + 1 == 3, 'arithmetic'\n\n"
        "@pytest.mark.cuda\n@pytest.mark.skip(reason='no CUDA')\ndef test_skips():\n    pass\n\n"
        "def test_unmarked():\n    pass\n")
    found = run_tests(tests, "cuda", tmp_path / "out", timeout=120)
    assert set(found) == {"passes", "fails", "skips"}
    assert found["passes"] == {"ok": True} and found["skips"] == "skipped: no CUDA"
    assert found["fails"]["ok"] is False and found["fails"]["error"].startswith("AssertionError: arithmetic")
    with pytest.raises(RuntimeError, match="ran no test of test_marked.py marked slow"):
        run_tests(tests, "slow", tmp_path / "none", timeout=120)


def test_sections_picks_what_runs_and_refuses_an_unknown_name(capsys):
    from benchmarks.gpu_check import main

    with pytest.raises(SystemExit) as stop:
        main(["--smoke", "--sections", "correctnes"])
    assert stop.value.code == 2
    assert "unknown section(s) correctnes; choose from hidden_syncs, real_entry" in capsys.readouterr().err


def test_the_speedrun_section_reads_the_records_table_and_stops_the_script_after_as_many_runs(tmp_path):
    """--peer-airbench: the record's script prints one table row per epoch, the last of a run with its TTA accuracy
    and time; the section reads the rows of its warm-up run and `count` more, stops the script (it would go on to
    25 runs) and summarises them as it does fasttrain's runs. Here a stand-in prints that table."""
    import time

    from benchmarks.gpu_check.plan import Plan
    from benchmarks.gpu_check.speedrun import peer_row, peer_runs

    assert peer_row("|  run     |  epoch  |  train_loss  |  train_acc  |  val_acc  |  tta_val_acc  |  total_time_seconds  |") is None
    assert peer_row("|       1  |      9  |      0.8812  |     0.9375  |   0.9340  |               |              3.1000  |") is None
    assert peer_row("|       1  |  eval   |      0.8812  |     0.9375  |   0.9340  |       0.9412  |              3.8300  |") == {
        "run": "1", "tta_val_acc": 0.9412, "train_seconds": 3.83}
    script = tmp_path / "record.py"
    script.write_text("import time\n"
                      "print('|  run  |  epoch  |  train_loss  |  train_acc  |  val_acc  |  tta_val_acc  |  total_time_seconds  |')\n"
                      "for run in range(25):\n"
                      "    print(f'|  {run}  |  1  |  1.0  |  0.5  |  0.5  |  |  1.0  |', flush=True)\n"
                      "    print(f'|  {run}  |  eval  |  1.0  |  0.5  |  0.5  |  0.94{run}  |  {3 + run}.0  |', flush=True)\n"
                      "    time.sleep(0.05)\n"
                      "open('finished', 'w').write('all 25 runs')\n")
    plan = Plan(True, "cpu", tmp_path, False, tmp_path / "out", 60.0, time.monotonic())
    found = peer_runs(script, plan, 2, time.monotonic() + 60)
    assert found["ok"] and found["warm_up"]["run"] == "0" and [r["run"] for r in found["runs"]] == ["1", "2"]
    assert found["mean_acc"] == (0.941 + 0.942) / 2 and found["min_acc"] == 0.941 and found["mean_train_seconds"] == 4.5
    assert not (tmp_path / "out" / "speedrun" / "peer" / "finished").exists()  # stopped after the runs it needed
    silent = tmp_path / "silent.py"
    silent.write_text("print('no table here')\n")
    assert peer_runs(silent, plan, 2, time.monotonic() + 60)["note"] == "no run of the record's script finished"
    assert "no such file" in peer_runs(tmp_path / "missing.py", plan, 2, time.monotonic() + 60)["note"]


def test_the_speedrun_section_runs_fewer_seeds_when_its_budget_ends_and_says_so(tmp_path, monkeypatch):
    """Each run takes 10 s of a 35 s budget (a stand-in for the run and the clock): the warm-up and seed 1, then
    seed 2 (15 s were left, 1.5 runs), then no more; the result counts 2 of the 5 seeds and says why."""
    from types import SimpleNamespace

    from benchmarks.gpu_check import speedrun as section
    from benchmarks.gpu_check.plan import Plan

    clock = SimpleNamespace(now=0.0)
    monkeypatch.setattr(section, "time", SimpleNamespace(monotonic=lambda: clock.now))

    def run(args, timeout):
        out = Path(next(a for a in args if a.startswith("output.dir=")).split("=", 1)[1])
        out.mkdir(parents=True)
        (out / "metrics.jsonl").write_text(json.dumps({"epoch": 10, "val_acc": 0.94}) + "\n")
        (out / "env.json").write_text(json.dumps({"time_split": {"parts": {"steps": 3.0, "eval": 0.5, "compile": 1.0}}}))
        clock.now += 10.0
        return SimpleNamespace(returncode=0, stdout="")

    monkeypatch.setattr(section, "fasttrain_run", run)
    plan = Plan(False, "cuda", tmp_path, True, tmp_path / "out", 35.0, 0.0)
    found = section.speedrun(plan, 35.0)
    assert [r["seed"] for r in found["runs"]] == [1, 2] and found["note"] == "2 of 5 seeds (the budget's limit)"
    assert found["mean_train_seconds"] == 3.5 and found["mean_acc"] == 0.94 and found["reached_target"]


def test_the_profiles_activation_bytes_and_roofline_against_a_hand_count():
    """A conv (3 -> 4 channels, 8x8, same padding) then a ReLU: the forward reads 3x64 + 4x64 and writes 4x64 + 4x64
    elements per image (960 x 4 bytes in fp32), a training step about 3x that; at 4.8 TB/s (an H200) that many
    bytes an image is 4.8e12 / 11,520 images/s."""
    from torch import nn

    from benchmarks.gpu_check.device_profile import activation_bytes, bandwidth_tb_s, roofline_images_per_sec

    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
    counted = activation_bytes(model, (3, 8, 8), element_bytes=4)
    assert counted == {"forward_bytes": 960 * 4, "training_bytes": 3 * 960 * 4}
    assert model.training  # put back as it was
    assert bandwidth_tb_s("NVIDIA H200") == 4.8 and bandwidth_tb_s("NVIDIA H100 80GB HBM3") == 3.35
    assert bandwidth_tb_s("NVIDIA H100 PCIe") == 2.0 and bandwidth_tb_s("cpu") is None
    assert roofline_images_per_sec(11_520, 4.8) == pytest.approx(4.8e12 / 11_520)
    assert roofline_images_per_sec(11_520, None) is None
