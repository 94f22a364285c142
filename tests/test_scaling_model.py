"""The multi-GPU model on paper (benchmarks.scaling_model, issue 24): its arithmetic by hand, DDP's buckets
against what torch's DDP builds over two real gloo ranks, and the command's table and bad input."""

from __future__ import annotations

import json
import textwrap

import pytest
from torch import nn

from benchmarks import scaling_model as sm
from conftest import REPO, run_torchrun

MIB = 1 << 20


def test_an_allreduce_takes_the_latency_plus_the_rings_share_of_the_bytes_at_bus_bandwidth():
    fabric = sm.Fabric("test", 8, latency_s=20e-6, bus_bytes_per_s=450e9)
    assert sm.allreduce_seconds(8e6, 8, fabric) == pytest.approx(20e-6 + 8e6 * 14 / 8 / 450e9)
    assert sm.allreduce_seconds(8e6, 2, fabric) == pytest.approx(20e-6 + 8e6 / 450e9)  # 2 (2 - 1) / 2 = 1
    assert sm.allreduce_seconds(8e6, 1, fabric) == 0.0  # one GPU: nothing to reduce


def test_buckets_fill_in_reverse_order_the_first_closing_at_1_mib_the_others_at_25():
    sizes = [MIB // 2, 2 * MIB, MIB // 4, 30 * MIB, 10 * MIB, 20 * MIB]  # registration order
    # reversed: 20 (>= 1: closes), 10 + 30 (>= 25: closes), 1/4 + 2 + 1/2 (left over: the last bucket)
    assert sm.ddp_buckets(sizes) == [20 * MIB, 40 * MIB, MIB // 4 + 2 * MIB + MIB // 2]
    assert sm.ddp_buckets([]) == []


def test_the_exposed_time_of_buckets_with_and_without_overlap_by_hand():
    # world 2: each all-reduce takes bytes / busbw; busbw 1 byte/s and no latency make bytes seconds
    fabric = sm.Fabric("test", 2, latency_s=0.0, bus_bytes_per_s=1.0)
    # bucket 1 (1 s) ready at 1/4 of a 4 s backward, done at 2; bucket 2 (3 s) ready at 4, done at 7: 3 s exposed
    assert sm.exposed_seconds([1, 3], backward_s=4.0, world=2, fabric=fabric, overlap=True) == pytest.approx(3.0)
    # a backward long enough to hide the first bucket, not the last: only the last is exposed
    assert sm.exposed_seconds([1, 3], backward_s=40.0, world=2, fabric=fabric, overlap=True) == pytest.approx(3.0)
    # no overlap (the captured step: after the backward): all of it
    assert sm.exposed_seconds([1, 3], backward_s=4.0, world=2, fabric=fabric, overlap=False) == pytest.approx(4.0)
    assert sm.exposed_seconds([1, 3], backward_s=4.0, world=1, fabric=fabric, overlap=False) == 0.0


def test_weak_and_strong_scaling_efficiency_by_hand():
    fabric = sm.Fabric("test", 8, latency_s=0.0, bus_bytes_per_s=1e9)
    sizes = [4_000_000]  # 4 MB of gradients: at 8 GPUs 4e6 x 14/8 / 1e9 = 7 ms
    weak = sm.predict(sm.Recipe("w", sizes, step_ms=10.0, batch=1024, weak=True), 8, fabric, overlap=False)
    assert (weak.batch_per_gpu, weak.compute_ms, weak.exposed_ms) == (1024, 10.0, pytest.approx(7.0))
    assert weak.efficiency == pytest.approx(10 / 17)
    strong = sm.predict(sm.Recipe("s", sizes, step_ms=10.0, batch=1024, weak=False), 8, fabric, overlap=False)
    assert (strong.batch_per_gpu, strong.compute_ms) == (128, pytest.approx(1.25))
    assert strong.efficiency == pytest.approx(10 / (8 * (1.25 + 7.0)))
    floored = sm.predict(sm.Recipe("s", sizes, step_ms=10.0, batch=1024, weak=False, floor_ms=2.0), 8, fabric,
                         overlap=False)
    assert floored.compute_ms == 2.0
    # the pessimistic column: twice the latency (0 here), half the bandwidth: 14 ms exposed
    assert weak.efficiency_pessimistic == pytest.approx(10 / 24)


@pytest.mark.slow
def test_the_buckets_are_the_ones_torch_ddp_builds_over_two_gloo_ranks(tmp_path):
    """DDP's first iteration reduces one bucket of everything, then it rebuilds its buckets in the order the
    gradients became ready: a comm hook sees each bucket's bytes, in the order they are reduced, which from the
    second iteration on must be ddp_buckets of the model's gradient bytes."""
    script = tmp_path / "buckets.py"
    script.write_text(textwrap.dedent(f"""
        import json, os, sys
        import torch, torch.distributed as dist
        from torch import nn
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
        sys.path.insert(0, {str(REPO)!r})
        from benchmarks.scaling_model import recipe_model
        dist.init_process_group("gloo")
        model = nn.parallel.DistributedDataParallel(recipe_model("CIFAR10_CNN"))
        seen = []

        def hook(state, bucket):
            seen.append(bucket.buffer().numel() * bucket.buffer().element_size())
            return allreduce_hook(state, bucket)

        model.register_comm_hook(None, hook)
        for _ in range(3):
            seen.clear()
            model(torch.randn(2, 3, 32, 32)).sum().backward()
        if dist.get_rank() == 0:
            print(json.dumps(seen), flush=True)
        dist.destroy_process_group()
        os._exit(0)  # torch's teardown after gloo can abort a finished process (fasttrain.run.exit_now does the same)
    """))
    result = run_torchrun(2, str(script), module="", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    reduced = json.loads(result.stdout.strip().splitlines()[-1])
    expected = sm.ddp_buckets(sm.gradient_bytes(sm.recipe_model("CIFAR10_CNN")))
    assert len(expected) == 2 and reduced == expected  # the 1 MiB-capped first bucket, then the rest


def test_the_command_prints_both_recipes_at_1_to_16_gpus(capsys, tmp_path):
    assert sm.main(["--fast-step-ms", "2.65", "--speedrun-step-ms", "4.0", "--json", str(tmp_path / "m.json")]) == 0
    out = capsys.readouterr().out
    assert "| fast (CIFAR10_CNN, 1024 per GPU) | 8 | NVLink 4 (one node, H100/H200 SXM) | 1024 | 2.650 |" in out
    assert "| speed run (SpeedNet, 1024 in all) | 16 | NVLink + InfiniBand NDR (2 nodes) | 64 | 0.250 |" in out
    rows = json.loads((tmp_path / "m.json").read_text())["predictions"]
    assert [(r["world"], r["efficiency"] == 1.0) for r in rows[:2]] == [(1, True), (2, False)]
    assert all(0 < r["efficiency_pessimistic"] <= r["efficiency"] <= 1 for r in rows)


def test_a_step_time_that_is_no_time_is_one_line(capsys):
    with pytest.raises(SystemExit) as stop:
        sm.main(["--fast-step-ms", "0"])
    assert stop.value.code == 2
    assert "--fast-step-ms=0.0 is not valid: expected milliseconds above 0" in capsys.readouterr().err


def test_gradient_bytes_count_the_trainable_parameters_in_fp32():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    model[1].weight.requires_grad_(False)
    assert sm.gradient_bytes(model) == [48, 16, 16]  # weight 12, bias 4, BatchNorm's bias 4 (its weight frozen)
