"""Resume arithmetic and finished work (issue 22): a checkpoint stores the exact sample its epoch
stopped at, the schedule continues at the right point whatever changed, a position that does not
fit the epoch is refused, and resume=PATH never replaces another run's files."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Dict

import pytest

from conftest import REPO, read_jsonl
from fasttrain import run
from fasttrain.checkpoint import load_checkpoint, save_checkpoint

SMOKE = str(REPO / "configs" / "smoke.yaml")
RUN = ["--config", SMOKE, "data.train_size=256", "data.val_size=32", "model.name=MLP", "model.hidden_sizes=[16]",
       "train.batch_size=32", "data.download=false", "sched.name=onecycle", "output.plots=false"]


pytestmark = pytest.mark.usefixtures("no_plots")  # the runs here are about their input, not plots


def tree(folder: Path) -> Dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_equal_total_steps_with_other_steps_per_epoch_continue_the_schedule(tmp_path):
    """8 steps x 2 epochs stopped after epoch 1, resumed as 4 steps x 4 epochs: the same 16 steps in
    total, but the run stands at step 4 of the new 16, not at step 8 (which stepped OneCycle past its end)."""
    out = tmp_path / "run"
    assert run.main([*RUN, "train.epochs=2", "train.stop_after_steps=8", f"output.dir={out}"]) == 0
    assert load_checkpoint(out / "checkpoints" / "last.pt")["global_step"] == 8
    assert run.main([*RUN, "data.train_size=128", "train.epochs=4", "resume=auto", f"output.dir={out}"]) == 0
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]
    assert records[-1]["lr"] < records[1]["lr"]  # annealed to the end of the new curve, not past it


def test_a_second_stop_in_a_resumed_epoch_of_another_global_batch_records_its_exact_sample(tmp_path):
    """Stopped at sample 96 (3 steps of 32), resumed at batch 64 (96 is no multiple of it) and stopped
    one step later: the checkpoint stands at sample 160, where the loader really was (a position in
    steps said 2 x 64 = 128 and trained 32 samples twice)."""
    out = tmp_path / "run"
    assert run.main([*RUN, "train.epochs=1", "train.stop_after_steps=3", f"output.dir={out}"]) == 0
    first = load_checkpoint(out / "checkpoints" / "step-00000003.pt")
    assert (first["step_in_epoch"], first["sample_in_epoch"]) == (3, 96)
    assert run.main([*RUN, "train.epochs=1", "train.batch_size=64", "train.stop_after_steps=4", "resume=auto",
                     f"output.dir={out}"]) == 0
    second = load_checkpoint(out / "checkpoints" / "step-00000004.pt")
    assert second["sample_in_epoch"] == 96 + 64
    assert run.main([*RUN, "train.epochs=1", "train.batch_size=64", "resume=auto", f"output.dir={out}"]) == 0
    last = load_checkpoint(out / "checkpoints" / "last.pt")
    assert (last["epoch"], last["sample_in_epoch"]) == (1, 0)
    # samples 160..255 in the last start: 2 steps of 64 (the second one partial), 4 + 2 = 6 steps in all
    assert last["global_step"] == 6


@pytest.mark.parametrize("step,sample", [(10**9, None), (3, 10**9), (0, 64)],
                         ids=["step 1e9", "sample 1e9", "sample without a step"])
def test_a_position_that_does_not_fit_the_epoch_is_refused(tmp_path, capsys, step, sample):
    out = tmp_path / "run"
    assert run.main([*RUN, "train.epochs=1", "train.stop_after_steps=3", f"output.dir={out}"]) == 0
    state = load_checkpoint(out / "checkpoints" / "step-00000003.pt")
    state["step_in_epoch"] = step
    if sample is None:
        state.pop("sample_in_epoch")
    else:
        state["sample_in_epoch"] = sample
    crafted = tmp_path / "crafted.pt"
    save_checkpoint(state, crafted)
    capsys.readouterr()
    assert run.main([*RUN, "train.epochs=1", f"resume={crafted}", f"output.dir={tmp_path / 'other'}"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "does not fit this run's epoch of 8 steps" in error, error
    assert not (tmp_path / "other").exists()


@pytest.mark.slow
def test_resume_from_another_run_never_replaces_a_finished_run(tmp_path, capsys):
    run_a, run_b = tmp_path / "A", tmp_path / "B"
    assert run.main([*RUN, "train.epochs=1", f"output.dir={run_a}"]) == 0
    assert run.main([*RUN, "train.epochs=1", "train.seed=1", f"output.dir={run_b}"]) == 0
    before = tree(run_b)
    capsys.readouterr()
    code = run.main([*RUN, "train.epochs=2", f"resume={run_a / 'checkpoints' / 'last.pt'}", f"output.dir={run_b}"])
    error = capsys.readouterr().err.strip()
    assert code == 2 and error.count("\n") == 0, error
    assert "already holds checkpoints of a run" in error and "output.overwrite=true" in error
    assert tree(run_b) == before
    # an earlier point of B itself would replace B's newer files too
    assert run.main([*RUN, "train.epochs=2", "checkpoint.every_steps=4", f"output.dir={tmp_path / 'C'}"]) == 0
    before = tree(tmp_path / "C")
    assert run.main([*RUN, "train.epochs=2", f"resume={tmp_path / 'C' / 'checkpoints' / 'step-00000004.pt'}",
                     f"output.dir={tmp_path / 'C'}"]) == 2
    assert tree(tmp_path / "C") == before
    # B's own newest checkpoint continues B (train longer); overwrite=true replaces B with A's continuation
    assert run.main([*RUN, "train.epochs=2", "train.seed=1", f"resume={run_b / 'checkpoints' / 'last.pt'}",
                     f"output.dir={run_b}"]) == 0
    assert [r["epoch"] for r in read_jsonl(run_b / "metrics.jsonl")] == [1, 2]
    assert run.main([*RUN, "train.epochs=2", f"resume={run_a / 'checkpoints' / 'last.pt'}", f"output.dir={run_b}",
                     "output.overwrite=true"]) == 0
    resumed = load_checkpoint(run_b / "checkpoints" / "last.pt")
    assert resumed["config"]["train"]["seed"] == load_checkpoint(run_a / "checkpoints" / "last.pt")["config"]["train"]["seed"]
    assert [r["epoch"] for r in read_jsonl(run_b / "metrics.jsonl")] == [1, 2]
