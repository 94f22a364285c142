"""Distributed training and evaluation with real processes (torchrun, accelerate launch; gloo on CPU)."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from conftest import REPO, read_jsonl, run_fasttrain, run_torchrun
from fasttrain.config import load_config
from fasttrain.trainer import train


def test_torchrun_two_processes_train_the_smoke_config(tmp_path):
    run_dir = tmp_path / "run"
    result = run_torchrun(2, "--config", "configs/smoke.yaml", f"output.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert sum(line.startswith("epoch ") for line in out.splitlines()) == 3  # printed by rank 0 only
    env = json.loads((run_dir / "env.json").read_text())
    assert (env["world_size"], env["backend"]) == (2, "gloo")
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["batch_size"] == 64  # per process
    # exit 0 also says the weights were identical on both ranks: a difference is an error at the end
    history = read_jsonl(run_dir / "metrics.jsonl")
    assert [h["epoch"] for h in history] == [1, 2, 3] and all(h["world_size"] == 2 for h in history)
    assert all(h["val_total"] == 512 for h in history)
    assert history[-1]["val_acc"] > 0.5
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoints", "config.yaml", "curves.png", "env.json", "metrics.csv",
                                                          "metrics.jsonl", "steps.jsonl", "throughput.png", "time.png", "train.log"]
    assert json.loads((run_dir / "env.json").read_text())["world_size"] == 2
    assert "world size 2: train.batch_size is per process, global batch 128" in (run_dir / "config.yaml").read_text()


# no dropout, no BatchNorm: what differs between 2 x B and 1 x 2B can only be the gradient averaging
EQUIV = ["data.dataset=synthetic", "data.train_size=256", "data.val_size=100", "data.num_workers=0",
         "model.name=MLP", "model.hidden_sizes=[64]", "model.dropout=0.0", "train.epochs=2", "train.log_every=1",
         "train.device=cpu", "optim.name=adamw", "sched.name=onecycle", "output.save_checkpoints=false"]


def test_two_ranks_of_batch_b_train_like_one_process_of_batch_2b(tmp_path):
    two = run_torchrun(2, *EQUIV, "train.batch_size=16", f"output.dir={tmp_path / 'two'}")
    assert two.returncode == 0, two.stderr[-3000:]
    one = run_fasttrain(*EQUIV, "train.batch_size=32", f"output.dir={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr[-3000:]
    steps_two, steps_one = read_jsonl(tmp_path / "two" / "steps.jsonl"), read_jsonl(tmp_path / "one" / "steps.jsonl")
    assert len(steps_one) == len(steps_two) == 16
    assert [s["lr"] for s in steps_two] == pytest.approx([s["lr"] for s in steps_one], rel=1e-12)
    assert [s["loss"] for s in steps_two] == pytest.approx([s["loss"] for s in steps_one], rel=1e-5, abs=1e-6)
    ep_two, ep_one = read_jsonl(tmp_path / "two" / "metrics.jsonl"), read_jsonl(tmp_path / "one" / "metrics.jsonl")
    for a, b in zip(ep_two, ep_one):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)
        assert a["val_correct"] == b["val_correct"] and a["val_total"] == b["val_total"] == 100


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    """A checkpoint whose test split (101 images) divides by neither 2 nor 3."""
    run_dir = tmp_path_factory.mktemp("ckpt") / "run"
    train(load_config(None, ["data.dataset=synthetic", "data.train_size=128", "data.val_size=101", "model.name=CNN",
                             "data.num_workers=0", "train.epochs=1", "train.batch_size=32", "train.eval_batch_size=8",
                             "train.device=cpu", f"output.dir={run_dir}"]))
    return run_dir / "checkpoints" / "last.pt"


@pytest.mark.parametrize("loader", ["plain", "gpu", "dali"])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_evaluation_is_exact_for_any_world_size(small_checkpoint, world, loader):
    if loader == "dali":
        pytest.importorskip("nvidia.dali")
    single = run_fasttrain("eval", str(small_checkpoint), "--json", module="fasttrain.cli")  # plain, one process
    assert single.returncode == 0, single.stderr
    expected = json.loads(single.stdout.strip().splitlines()[-1])
    result = run_torchrun(world, "eval", str(small_checkpoint), f"data.loader={loader}", "--json",
                          module="fasttrain.cli")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1  # rank 0 reports
    got = json.loads(lines[0])
    assert got["total"] == 101 and got["correct"] == expected["correct"]
    assert got["val_loss"] == pytest.approx(expected["val_loss"], rel=1e-6)  # float32 sums in other groupings


def test_accelerate_launch_with_two_cpu_processes(tmp_path):
    pytest.importorskip("accelerate")
    run_dir = tmp_path / "run"
    # the GPU config on a CPU machine: refused unless the launch is said to be for the CPU (test_newcomer.py)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="true")
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
         "launch/accelerate/single_node_multi_gpu.yaml", "--num_processes", "2", "-m", "fasttrain.run",
         "--config", "configs/smoke.yaml", "train.epochs=1", f"output.dir={run_dir}"],
        cwd=REPO, env=env, text=True, capture_output=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    env = json.loads((run_dir / "env.json").read_text())
    assert (env["world_size"], env["backend"]) == (2, "gloo")
    assert len(read_jsonl(run_dir / "metrics.jsonl")) == 1


def test_the_weights_digest_covers_batchnorm_buffers_and_sees_a_one_bit_change():
    """What the ranks compare at the end of a run (and gpu_check's resume check once did with a copy of
    its own): the H200 run found that copy failing on BatchNorm's 0-dim `num_batches_tracked`. A model
    with BatchNorm must digest, and one flipped bit must show."""
    import torch

    from fasttrain.dist import weights_digest

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    assert model.state_dict()["1.num_batches_tracked"].dim() == 0
    before = weights_digest(model)
    twin = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    twin.load_state_dict(model.state_dict())
    assert weights_digest(twin) == before
    with torch.no_grad():
        model[0].weight.view(torch.int32)[0, 0, 0, 0] ^= 1
    assert weights_digest(model) != before
