"""No hidden host syncs: a real run (schedule, logging, progress, periodic checkpoints and the
preemption watch all active) reads no tensor on the host between log intervals.

Every host read of a tensor value (`item`, `tolist`, `bool()`, `float()`, `int()`, `cpu()`,
`numpy()`, an index) is counted with a TorchFunctionMode and attributed to where the loop stood:
inside a step, or after step k. On a GPU each such read waits for the device queue to drain, so
the only reads allowed are at log intervals (the sums, once) and at the boundaries that coincide
with them (checkpoints here), and between epochs (validation, the epoch's record).
"""

from __future__ import annotations

import traceback
from typing import List, Tuple

import pytest
import torch
from torch.overrides import TorchFunctionMode

from conftest import REPO
from fasttrain.config import load_config
from fasttrain.step import EagerStep
from fasttrain.trainer import train

HOST_READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy"}
LOG_EVERY = 4


class HostReads(TorchFunctionMode):
    """Records (steps done so far, inside a step?, read, where in fasttrain) for every host read."""

    def __init__(self):
        super().__init__()
        self.steps_done = 0
        self.in_step = False
        self.reads: List[Tuple[int, bool, str, str]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_READS:
            frames = [f for f in traceback.extract_stack()[:-1] if "/fasttrain/" in f.filename]
            where = f"{frames[-1].filename.split('/fasttrain/')[-1]}:{frames[-1].lineno}" if frames else "?"
            self.reads.append((self.steps_done, self.in_step, name, where))
        return func(*args, **(kwargs or {}))


# the plain loader with workers, as it runs for real: its per-image PIL transforms (host tensors by
# design, with .item() calls of their own) run in the worker processes, not in the training loop
@pytest.mark.parametrize("loader", [["data.loader=gpu"], ["data.loader=plain", "data.num_workers=2"]],
                         ids=["gpu", "plain"])
def test_a_run_reads_no_tensor_on_the_host_between_log_intervals(tmp_path, monkeypatch, loader):
    reads = HostReads()
    original = EagerStep.__call__

    def counted_step(self, images, labels):
        reads.in_step = True
        try:
            original(self, images, labels)
        finally:
            reads.in_step = False
            reads.steps_done += 1

    monkeypatch.setattr(EagerStep, "__call__", counted_step)
    # 512 images / batch 32 = 16 steps per epoch (a multiple of the log interval: epoch ends are log steps)
    cfg = load_config(str(REPO / "configs" / "smoke.yaml"), [
        f"output.dir={tmp_path / 'run'}", *loader, "data.train_size=512", "data.val_size=64",
        "train.batch_size=32", "train.epochs=2", f"train.log_every={LOG_EVERY}", "checkpoint.every_steps=8",
        "model.name=CIFAR10_CNN", "train.precision=bf16", "train.channels_last=true"])
    with reads:
        state = train(cfg)
    assert state.global_step == 32 and reads.steps_done == 32
    in_steps = [r for r in reads.reads if r[1]]
    assert not in_steps, f"host reads inside the step: {in_steps[:5]}"
    between = [r for r in reads.reads if r[0] % LOG_EVERY]
    assert not between, f"host reads between log intervals: {between[:5]}"
    at_intervals = {r[0] for r in reads.reads if 0 < r[0] < 32}
    assert at_intervals == set(range(LOG_EVERY, 32, LOG_EVERY))  # the counter works: the log reads are seen


def test_the_eager_step_adds_at_most_40_ops_per_step_around_the_model(tmp_path):
    """ATen calls per step of the real epoch loop (bf16, channels_last, gpu loader, world size 1),
    minus the model's own forward and backward: the loader, loss, optimizer, schedule and bookkeeping
    fasttrain adds. A count, not a timing: the same on every machine."""
    from benchmarks.host_overhead import OpCounter, TrainerLoop, _config, _model_ops, _quiet
    from fasttrain import dist
    from fasttrain.trainer import build_parts

    cfg = _config("cpu", ["model.name=CIFAR10_CNN", "train.batch_size=32", "data.train_size=2048",
                          "data.loader=gpu", "train.precision=bf16", "train.channels_last=true"])
    ctx = dist.setup("cpu")
    try:
        parts = build_parts(cfg, ctx, _quiet())
        loop = TrainerLoop(parts, cfg, ctx, tmp_path / "steps.jsonl")
        loop.run(max_batches=3)
        images = torch.randn(32, 3, 32, 32, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
        model_ops = _model_ops(parts.model, images, parts.precision.autocast)
        with OpCounter() as counter:
            steps = loop.run()  # a whole epoch of 64 steps: its start and end (and a log interval) amortized
    finally:
        dist.teardown()
    added = sum(counter.ops.values()) / steps - model_ops
    assert steps == 64 and 0 < added <= 40, (added, counter.ops.most_common(15))
