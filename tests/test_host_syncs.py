"""No hidden host syncs: a real run (schedule, logging, progress, periodic checkpoints and the
preemption watch all active) reads no tensor on the host between log intervals.

Every host read of a tensor value (`item`, `tolist`, `bool()`, `float()`, `int()`, `cpu()`,
`numpy()`, an index) is counted with a TorchFunctionMode and attributed to where the loop stood:
inside a step, or after step k. On a GPU each such read waits for the device queue to drain, so
the only reads allowed are at log intervals (the sums, once) and at the boundaries that coincide
with them (checkpoints here), and between epochs (validation, the epoch's record).
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.syncs import sync_report
from conftest import REPO
from fasttrain.config import load_config

LOG_EVERY = 4
# the loop is the subject: the case study's model (BatchNorm, dropout) on 16 px synthetic images, a quarter of
# CIFAR's compute per step and the same ops
SIDE = 16


# the plain loader with workers, as it runs for real: its per-image PIL transforms (host tensors by
# design, with .item() calls of their own) run in the worker processes, not in the training loop
@pytest.mark.parametrize("loader", [["data.loader=gpu"], ["data.loader=plain", "data.num_workers=2"]],
                         ids=["gpu", "plain"])
def test_a_run_reads_no_tensor_on_the_host_between_log_intervals(tmp_path, loader):
    # 384 images / batch 32 = 12 steps per epoch; log and checkpoint steps at multiples of 4 and 8 (8 and 16:
    # checkpoints inside an epoch)
    cfg = load_config(str(REPO / "configs" / "smoke.yaml"), [
        f"output.dir={tmp_path / 'run'}", *loader, "data.train_size=384", "data.val_size=64",
        "train.batch_size=32", "train.epochs=2", f"train.log_every={LOG_EVERY}", "checkpoint.every_steps=8",
        "model.name=CIFAR10_CNN", f"data.image_size={SIDE}", "train.precision=bf16", "train.channels_last=true",
        "output.plots=false"])
    report = sync_report(cfg)
    assert report.detector == "host reads of tensors" and report.steps == 24
    assert not report.in_steps, f"host reads inside the step: {report.in_steps[:5]}"
    assert not report.between_log_intervals, f"host reads between log intervals: {report.between_log_intervals[:5]}"
    assert report.at_boundaries >= 24 // LOG_EVERY  # the counter works: the log intervals' reads are seen


def test_the_eager_step_adds_at_most_40_ops_per_step_around_the_model(tmp_path):
    """ATen calls per step of the real epoch loop (bf16, channels_last, gpu loader, world size 1),
    minus the model's own forward and backward: the loader, loss, optimizer, schedule and bookkeeping
    fasttrain adds. A count, not a timing: the same on every machine."""
    from benchmarks.host_overhead import OpCounter, _config, _model_ops, trainer_loop
    from fasttrain.observe.logs import silent_logger as _quiet
    from fasttrain import dist
    from fasttrain.train.build import build_parts

    cfg = _config("cpu", ["model.name=CIFAR10_CNN", "train.batch_size=32", "data.train_size=2048",
                          f"data.image_size={SIDE}", "data.loader=gpu", "train.precision=bf16",
                          "train.channels_last=true"])
    ctx = dist.setup("cpu")
    try:
        parts = build_parts(cfg, ctx, _quiet())
        loop = trainer_loop(parts, cfg, ctx, tmp_path / "steps.jsonl")
        loop.run(max_batches=3)
        images = torch.randn(32, 3, SIDE, SIDE, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
        model_ops = _model_ops(parts.model, images, parts.precision.autocast)
        with OpCounter() as counter:
            steps = loop.run().timed_steps  # a whole epoch of 64 steps: its start and end (and a log interval) amortized
    finally:
        dist.teardown()
    added = sum(counter.ops.values()) / steps - model_ops
    assert steps == 64 and 0 < added <= 40, (added, counter.ops.most_common(15))
