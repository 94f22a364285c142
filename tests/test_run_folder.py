"""The run folder: one run at a time, nothing changed by a run that is rejected, and best.pt put back
after a stop between the two checkpoint writes of an epoch's end."""

from __future__ import annotations

import hashlib
import shutil
import sys
from pathlib import Path

import pytest
import torch

from conftest import frozen, read_jsonl, run_fasttrain, run_in_process, start
from fasttrain.checkpoint import save_checkpoint

RUN = ["--config", "configs/smoke.yaml", "data.train_size=512", "data.val_size=64", "model.name=MLP",
       "model.hidden_sizes=[32]", "train.batch_size=32", "output.plots=false"]


def snapshot(folder: Path) -> dict:
    """Every file's bytes and modification time: what 'unchanged' means."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished 2-epoch run whose best epoch is its last (read-only for the tests: they copy it)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    result = run_fasttrain(*RUN, "train.epochs=2", f"output.dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["is_best"] for r in read_jsonl(out / "metrics.jsonl")] == [True, True]
    return out


@pytest.mark.slow
def test_a_second_run_into_a_folder_in_use_stops_with_one_line_and_changes_nothing(tmp_path):
    out = tmp_path / "run"
    first = start([sys.executable, "-m", "fasttrain.run", *RUN, "train.epochs=50", "train.log_every=1",
                   f"output.dir={out}"])
    try:
        from conftest import wait_for_step

        wait_for_step(out, 2, first)
        with frozen(first.pid):  # the first run holds the folder, and writes nothing while the others try
            before = snapshot(out)
            for extra in (["resume=auto"], ["output.overwrite=true"]):
                second = run_fasttrain(*RUN, "train.epochs=50", f"output.dir={out}", *extra)
                assert second.returncode == 2, second.stderr[-2000:]
                error = second.stderr.strip().splitlines()[-1]
                assert error.startswith(f"fasttrain: error: output.dir {out} is in use by another fasttrain run "
                                        f"(pid {first.pid} on "), error
                assert snapshot(out) == before
    finally:
        first.kill()
        first.communicate()


def test_a_rejected_resume_leaves_the_run_folder_exactly_as_it_was(finished, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    before = snapshot(out)
    result = run_in_process(capsys, *RUN, "train.epochs=3", "optim.name=sgd", "resume=auto", f"output.dir={out}")
    assert result.returncode == 2 and "was trained with optim.name=adamw" in result.stderr, result.stderr[-2000:]
    assert snapshot(out) == before  # config.yaml, env.json and train.log included
    assert {p.name for p in out.iterdir()} == {Path(k).parts[0] for k in before}  # nothing added


@pytest.mark.parametrize("bad", [["data.dataset=cifar10", "data.root=/nonexistent", "data.download=false"],
                                 ["train.precision=fp16"]], ids=["missing data", "fp16 on the CPU"])
def test_a_run_that_fails_before_training_leaves_no_folder_behind(tmp_path, capsys, bad):
    out = tmp_path / "run"
    result = run_in_process(capsys, *RUN, *bad, f"output.dir={out}")
    assert result.returncode == 2, result.stderr[-2000:]
    assert not out.exists()


def test_a_run_that_fails_while_training_keeps_the_error_in_its_log(tmp_path, capsys):
    out = tmp_path / "run"
    result = run_in_process(capsys, "--config", "configs/smoke.yaml", "data.train_size=512", "optim.name=sgd", "optim.lr=10",
                           "sched.name=none", "train.log_every=1", f"output.dir={out}")
    assert result.returncode == 2
    assert "error: training diverged" in (out / "train.log").read_text().splitlines()[-1]


@pytest.mark.parametrize("damage", ["stale", "missing"])
def test_best_pt_left_behind_by_a_stop_between_the_two_writes_is_put_back_on_resume(finished, tmp_path, capsys,
                                                                                    damage):
    """An epoch's end writes last.pt, then best.pt: a kill (or a full disk) in between leaves best.pt of an
    older epoch (or none) while last.pt records the newer best. resume=auto puts it back from last.pt,
    also when the run has nothing left to train."""
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    best = out / "checkpoints" / "best.pt"
    if damage == "stale":
        ckpt = torch.load(best, weights_only=False)
        ckpt["epoch"], ckpt["model"] = 1, {k: torch.zeros_like(v) for k, v in ckpt["model"].items()}
        save_checkpoint(ckpt, best)
    else:
        best.unlink()
    result = run_in_process(capsys, *RUN, "train.epochs=2", "resume=auto", f"output.dir={out}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "best.pt put back from last.pt (epoch 2, the best so far)" in result.stdout
    assert best.read_bytes() == (finished / "checkpoints" / "best.pt").read_bytes()
