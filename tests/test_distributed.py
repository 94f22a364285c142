"""Distributed training and evaluation with real processes (torchrun, accelerate launch; gloo on CPU)."""

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from conftest import REPO, read_jsonl, run_ranks, run_torchrun
from fasttrain import run
from fasttrain.config import load_config
from fasttrain.train.evaluate import evaluate_checkpoint
from fasttrain.train.lifecycle import train


@pytest.mark.slow
def test_torchrun_two_processes_train_the_smoke_config(tmp_path):
    """The README's launch on the smoke config as it is (3 epochs of 16 steps of 2 x 64: fewer stay at chance);
    the one run of this module that draws its plots, so the folder listing is a user's."""
    run_dir = tmp_path / "run"
    result = run_torchrun(2, "--config", "configs/smoke.yaml", f"output.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    # the console is rank 0's alone: one line per epoch, not two
    assert sum(line.startswith("epoch ") for line in result.stdout.splitlines()) == 3
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
    assert "world size 2: train.batch_size is per process, global batch 128" in (run_dir / "config.yaml").read_text()


# no dropout, no BatchNorm: what differs between 2 x B and 1 x 2B can only be the gradient averaging. The
# accuracy tools on too (label smoothing, an EMA of the weights, lookahead, test-time flips and shifts): they need
# no communication, every rank holds the same parameters after each step, so their averages must agree as well.
# The arithmetic is the speed records' (configs/cifar10_94.yaml, issue 23): the loss summed over the global
# batch, SGD with Nesterov momentum and decoupled decay, a scaled learning rate on the 1-d parameters, the
# triangle over a fractional number of epochs, lookahead with its cubed alpha ending on the slow weights, and
# the reflect-padded crops and alternating flips (drawn per sample from the seed, whatever the world size); the
# 1-d parameters' scale is 4, not the records' 64, which this MLP's biases (no BatchNorm) do not train well with
TOOLS = ["train.label_smoothing=0.2", "train.ema_decay=0.9", "train.ema_every=2", "train.lookahead_k=3",
         "train.lookahead_alpha=0.2262", "train.lookahead_power=3", "train.lookahead_end=slow",
         "train.tta=flip_shift"]
RECIPE = ["optim.name=sgd", "optim.lr=0.002", "optim.momentum=0.85", "optim.nesterov=true",
          "optim.weight_decay=0.002", "optim.decoupled_decay=true", "optim.bn_bias_lr_scale=4", "sched.name=triangle",
          "sched.max_lr=0.002", "train.loss_reduction=sum", "train.epochs=1.5", "aug.crop_padding=2",
          "aug.crop_padding_mode=reflect", "aug.flip_alternate=true"]
EQUIV = ["data.dataset=synthetic", "data.train_size=256", "data.val_size=100", "data.num_workers=0",
         "data.loader=gpu", "model.name=MLP", "model.hidden_sizes=[64]", "model.dropout=0.0",
         "train.log_every=1", "train.device=cpu", "output.plots=false", *RECIPE, *TOOLS]


@pytest.mark.slow
def test_two_ranks_of_batch_b_train_like_one_process_of_batch_2b(tmp_path):
    two = run_ranks(2, *EQUIV, "train.batch_size=16", f"output.dir={tmp_path / 'two'}")
    assert two.returncode == 0, two.stderr[-3000:]
    assert run.main([*EQUIV, "train.batch_size=32", f"output.dir={tmp_path / 'one'}"]) == 0  # not about the process
    steps_two, steps_one = read_jsonl(tmp_path / "two" / "steps.jsonl"), read_jsonl(tmp_path / "one" / "steps.jsonl")
    assert len(steps_one) == len(steps_two) == 12  # 1.5 epochs of 8 steps
    assert [s["lr"] for s in steps_two] == pytest.approx([s["lr"] for s in steps_one], rel=1e-12)
    assert [s["loss"] for s in steps_two] == pytest.approx([s["loss"] for s in steps_one], rel=1e-5, abs=1e-6)
    ep_two, ep_one = read_jsonl(tmp_path / "two" / "metrics.jsonl"), read_jsonl(tmp_path / "one" / "metrics.jsonl")
    assert [r["world_size"] for r in ep_two] == [2, 2] and [r["world_size"] for r in ep_one] == [1, 1]
    for a, b in zip(ep_two, ep_one):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)
        assert a["val_correct"] == b["val_correct"] and a["val_total"] == b["val_total"] == 100
    assert ep_one[-1]["val_acc"] > 0.25  # it learns (chance: 0.1): equal figures are not two runs doing nothing
    a, b = (torch.load(tmp_path / run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
            for run_dir in ("two", "one"))
    assert a["ema"]["updates"] == b["ema"]["updates"] == 6  # train.ema_every=2 of 12 steps
    for key in ("ema", "lookahead"):  # the same EMA and slow weights, to all-reduce rounding
        assert a[key]["weights"].keys() == b[key]["weights"].keys()
        for name, value in a[key]["weights"].items():
            assert torch.allclose(value, b[key]["weights"][name], rtol=1e-4, atol=1e-5), (key, name)


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    """A checkpoint whose test split (101 images) divides by neither 2 nor 3, and its evaluation in one
    process with the plain loader (what every other evaluation must count exactly)."""
    run_dir = tmp_path_factory.mktemp("ckpt") / "run"
    train(load_config(None, ["data.dataset=synthetic", "data.train_size=128", "data.val_size=101", "model.name=CNN",
                             "data.num_workers=0", "train.epochs=1", "train.batch_size=32", "train.eval_batch_size=8",
                             "train.device=cpu", "output.plots=false", f"output.dir={run_dir}"]))
    checkpoint = run_dir / "checkpoints" / "last.pt"
    return checkpoint, evaluate_checkpoint(str(checkpoint), ["data.loader=plain"]).stats


# one process: the other loaders in this process; 2 and 3 ranks: real torchrun launches of `fasttrain.cli eval`.
# Every loader shares one plan of the ranks' shares (ShardedBatches, exact): the plain loader checks it at both
# world sizes (101 leaves a remainder of 1 and of 2), each other loader its own batches of a share at 3 ranks
@pytest.mark.parametrize("world,loader", [(1, "gpu"), (1, "dali")] + [
    pytest.param(world, loader, marks=pytest.mark.slow) for world, loader in [(2, "plain"), (3, "plain"), (3, "gpu"),
                                                                               (3, "dali")]])
def test_evaluation_is_exact_for_any_world_size(small_checkpoint, world, loader):
    if loader == "dali":
        pytest.importorskip("nvidia.dali")
    checkpoint, expected = small_checkpoint
    assert expected.total == 101
    if world == 1:
        got = evaluate_checkpoint(str(checkpoint), [f"data.loader={loader}"]).stats
        correct, total, loss = got.correct, got.total, got.loss
    else:
        result = run_ranks(world, "eval", str(checkpoint), f"data.loader={loader}", "--json", module="fasttrain.cli")
        assert result.returncode == 0, result.stderr[-3000:]
        lines = result.stdout.strip().splitlines()
        assert len(lines) == 1  # rank 0 reports
        got = json.loads(lines[0])
        correct, total, loss = got["correct"], got["total"], got["val_loss"]
    assert total == 101 and correct == expected.correct
    assert loss == pytest.approx(expected.loss, rel=1e-6)  # float32 sums in other groupings


@pytest.mark.slow
def test_accelerate_launch_with_two_cpu_processes(tmp_path):
    pytest.importorskip("accelerate")
    run_dir = tmp_path / "run"
    # the GPU config on a CPU machine: refused unless the launch is said to be for the CPU (test_newcomer.py)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="true")
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
         "launch/accelerate/single_node_multi_gpu.yaml", "--num_processes", "2", "-m", "fasttrain.run",
         "--config", "configs/smoke.yaml", "train.epochs=1", "data.train_size=256", "data.val_size=128",
         "output.plots=false", f"output.dir={run_dir}"],
        cwd=REPO, env=env, text=True, capture_output=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    env = json.loads((run_dir / "env.json").read_text())
    assert (env["world_size"], env["backend"]) == (2, "gloo")
    history = read_jsonl(run_dir / "metrics.jsonl")
    assert [(r["epoch"], r["world_size"], r["val_total"]) for r in history] == [(1, 2, 128)]


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
