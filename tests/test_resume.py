"""Exact resume: training N steps straight, or k steps, stopping and resuming to N, gives the same
weights bit for bit (same world size, on CPU), for the plain and GPU loaders, one process and two
gloo ranks. The model has dropout and BatchNorm, so per-rank random states and buffers matter; lookahead keeps
slow copies of the BatchNorm statistics, which are per rank too until an epoch's end averages them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import assert_same_weights, read_jsonl, run_here, run_ranks
from fasttrain.checkpoint import load_checkpoint

# 256 images: 8 steps per epoch for one process of batch 32, 4 for two ranks; 2 epochs. The tutorial's CNN
# (dropout and BatchNorm) on 16 px images: the same random states and buffers at a quarter of the compute
RUN = ["--config", "configs/smoke.yaml", "data.train_size=256", "data.val_size=64", "model.name=CIFAR10_CNN",
       "data.image_size=16", "train.batch_size=32", "train.epochs=2", "train.log_every=1", "output.plots=false",
       "train.lookahead_k=2", "train.lookahead_start=0.5", "train.lookahead_end=epoch"]
LOADER_ARGS = {"plain": ["data.loader=plain", "data.num_workers=2"], "gpu": ["data.loader=gpu"]}


def train(world: int, *args: str):
    """One process: in this one (the resume is the subject here, not the process; test_preemption.py stops
    and resumes real processes). Two ranks: real processes."""
    if world == 1:
        return run_here(*RUN, *args)
    return run_ranks(world, *RUN, *args)


@pytest.fixture(scope="module")
def straight_runs(tmp_path_factory):
    """Uninterrupted runs, one per (loader, world size), made when first asked for."""
    made = {}

    def get(loader: str, world: int) -> Path:
        if (loader, world) not in made:
            out = tmp_path_factory.mktemp(f"straight-{loader}-{world}")
            result = train(world, *LOADER_ARGS[loader], f"output.dir={out}")
            assert result.returncode == 0, result.stderr[-3000:]
            made[loader, world] = out
        return made[loader, world]

    return get


@pytest.fixture(scope="module")
def two_rank_stop(tmp_path_factory) -> Path:
    """A 2-rank plain-loader run stopped after step 3 (mid-epoch 1), shared by two tests."""
    out = tmp_path_factory.mktemp("two-rank-stop") / "run"
    first = train(2, *LOADER_ARGS["plain"], f"output.dir={out}", "train.stop_after_steps=3")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "stopped after step 3 as train.stop_after_steps asks" in first.stdout
    return out


# (loader, world size, stop after step): a stop at an epoch's last step (one process: 8 steps per epoch), and
# mid-epoch stops of two ranks with each loader (4 steps per epoch). The truncated-checkpoint test below resumes
# one process mid-epoch, test_step.py a captured run of the gpu loader
CASES = [("plain", 1, 8), ("plain", 2, 3), ("gpu", 2, 6)]


@pytest.mark.slow
@pytest.mark.parametrize("loader,world,stop", CASES, ids=[f"{l}-{w}rank-stop{s}" for l, w, s in CASES])
def test_stop_and_resume_gives_the_same_weights_bit_for_bit(straight_runs, two_rank_stop, tmp_path, loader, world,
                                                            stop):
    out = tmp_path / "run"
    if (loader, world, stop) == ("plain", 2, 3):
        shutil.copytree(two_rank_stop, out)
    else:
        first = train(world, *LOADER_ARGS[loader], f"output.dir={out}", f"train.stop_after_steps={stop}")
        assert first.returncode == 0, first.stderr[-3000:]
        assert f"stopped after step {stop} as train.stop_after_steps asks" in first.stdout
    second = train(world, *LOADER_ARGS[loader], f"output.dir={out}", "resume=auto")
    assert second.returncode == 0, second.stderr[-3000:]
    assert json.loads((out / "env.json").read_text())["resumed_from"]["global_step"] == stop

    straight = straight_runs(loader, world)
    assert_same_weights(straight, out)
    # the history reads as one run: the same epochs, losses and accuracies, each step logged once
    keys = ("epoch", "step", "train_loss", "val_loss", "val_acc")
    assert [[r[k] for k in keys] for r in read_jsonl(out / "metrics.jsonl")] == \
        [[r[k] for k in keys] for r in read_jsonl(straight / "metrics.jsonl")]
    assert [r["step"] for r in read_jsonl(out / "steps.jsonl")] == [r["step"] for r in read_jsonl(straight / "steps.jsonl")]


@pytest.mark.slow
def test_a_truncated_newest_checkpoint_is_skipped_for_the_one_before(straight_runs, tmp_path):
    out = tmp_path / "run"
    first = run_here(*RUN, f"output.dir={out}", "checkpoint.every_steps=1", "checkpoint.keep=3",
                          "train.stop_after_steps=5", "resume=auto")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "no checkpoint in" in first.stdout and "starting fresh" in first.stdout  # resume=auto, first start
    ckpts = out / "checkpoints"
    # a bounded number kept: the newest three step checkpoints
    assert sorted(p.name for p in ckpts.glob("*.pt")) == ["step-00000003.pt", "step-00000004.pt", "step-00000005.pt"]
    newest = ckpts / "step-00000005.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a crash mid-copy, a full disk, ...
    (ckpts / ".step-00000006.pt.x1y2.tmp").write_bytes(b"half a checkpoint")  # a write a crash interrupted

    resumed = run_here(*RUN, f"output.dir={out}", "resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "step-00000005.pt is truncated or corrupt" in resumed.stdout
    assert json.loads((out / "env.json").read_text())["resumed_from"]["checkpoint"] == str(ckpts / "step-00000004.pt")
    assert not list(ckpts.glob(".*.tmp"))
    assert_same_weights(straight_runs("plain", 1), out)

    # the same command once more: the run is finished, nothing is trained or rewritten
    before = (ckpts / "last.pt").read_bytes()
    again = run_here(*RUN, f"output.dir={out}", "resume=auto")
    assert again.returncode == 0, again.stderr[-3000:]
    resumed_from = json.loads((out / "env.json").read_text())["resumed_from"]
    assert (resumed_from["checkpoint"], resumed_from["epoch"], resumed_from["step_in_epoch"]) == (
        str(ckpts / "last.pt"), 2, 0)
    assert (ckpts / "last.pt").read_bytes() == before
    assert len(read_jsonl(out / "metrics.jsonl")) == 2


@pytest.mark.slow
def test_resume_with_another_world_size_warns_that_the_data_order_changes(two_rank_stop, tmp_path):
    step_file = two_rank_stop / "checkpoints" / "step-00000003.pt"
    # what the checkpoint holds: the position, and each rank's own random states and running sums
    ckpt = torch.load(step_file, weights_only=False)
    assert (ckpt["epoch"], ckpt["global_step"], ckpt["step_in_epoch"], ckpt["world_size"]) == (0, 3, 3, 2)
    assert len(ckpt["ranks"]) == 2 and {"python", "numpy", "torch"} <= set(ckpt["ranks"][0]["rng"])
    assert not torch.equal(ckpt["ranks"][0]["rng"]["torch"], ckpt["ranks"][1]["rng"]["torch"])  # seeded per rank
    assert ckpt["ranks"][0]["epoch_totals"][1] == 3 * 32  # samples rank 0 trained on in the epoch so far
    evaluated = run_here("eval", str(step_file), module="fasttrain.cli")
    assert evaluated.returncode == 0 and "a mid-epoch checkpoint (step 3)" in evaluated.stdout, evaluated.stderr
    # resume=PATH: continue that checkpoint in a new folder, with one process instead of two
    one = tmp_path / "one"
    resumed = run_here(*RUN, *LOADER_ARGS["plain"], f"output.dir={one}", f"resume={step_file}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "written by 2 process(es) and this run has 1" in resumed.stdout
    assert "will not match an uninterrupted run bit for bit" in resumed.stdout
    # 3 steps of 64 images were done: the 1-process run continues at image 192 of epoch 1 (step 6 of 8)
    resumed_from = json.loads((one / "env.json").read_text())["resumed_from"]
    assert (resumed_from["global_step"], resumed_from["step_in_epoch"], resumed_from["start_sample"]) == (3, 6, 192)
    assert [r["step"] for r in read_jsonl(one / "steps.jsonl") if r["epoch"] == 1] == [4, 5]
    assert [r["epoch"] for r in read_jsonl(one / "metrics.jsonl")] == [1, 2]
    assert torch.load(one / "checkpoints" / "last.pt", weights_only=False)["world_size"] == 1


@pytest.mark.slow
def test_one_process_checkpoint_continued_by_two_ranks_when_the_rest_of_the_epoch_splits_unevenly(tmp_path):
    """97 images, batch 32: one process stops after step 1 (32 images); the 65 left over two ranks of batch 32
    are one global batch and one image, which only one rank could take: it is left out, and both ranks take the
    same number of steps (before: rank 0 waited for rank 1 in a collective until dist.timeout_s)."""
    run = ["--config", "configs/smoke.yaml", "data.train_size=97", "data.val_size=64", "model.name=MLP",
           "model.hidden_sizes=[64]", "train.batch_size=32", "train.epochs=2", f"output.dir={tmp_path}",
           "dist.timeout_s=60"]
    first = run_here(*run, "train.stop_after_steps=1")
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = run_ranks(2, *run, "resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["epoch"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2]
    last = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=False)
    assert (last["epoch"], last["world_size"]) == (2, 2)
    # epoch 1: 1 step of one process, then 1 step of two ranks; epoch 2: 97 images = 2 steps of two ranks
    assert last["global_step"] == 1 + 1 + 2


@pytest.mark.slow
def test_a_second_stop_after_a_resume_with_another_world_size_records_the_exact_sample(two_rank_stop, tmp_path):
    """2 ranks stopped at sample 192 of epoch 1 (3 steps x 32 x 2); one process at batch 40 resumes there (192 is
    no multiple of 40) and stops one step later: the checkpoint stands at sample 232, where the loader was, and
    the next start finishes the epoch from there (a position in steps said 5 x 40 = 200: 32 samples twice)."""
    out = tmp_path / "run"
    shutil.copytree(two_rank_stop, out)
    stopped = train(1, *LOADER_ARGS["plain"], "train.batch_size=40", "train.stop_after_steps=4", "resume=auto",
                    f"output.dir={out}")
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    ckpt = load_checkpoint(out / "checkpoints" / "step-00000004.pt")
    assert (ckpt["world_size"], ckpt["sample_in_epoch"]) == (1, 192 + 40)
    finished = train(1, *LOADER_ARGS["plain"], "train.batch_size=40", "resume=auto", f"output.dir={out}")
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert [r["epoch"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2]
