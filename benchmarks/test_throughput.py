"""pytest-benchmark versions of the key comparisons, CPU-sized: `pytest benchmarks/`.

Benchmarks, not assertions about speed: save them (`--benchmark-autosave`) and compare commits
(`--benchmark-compare`). Each group puts the tutorial's way next to fasttrain's. What each one times
is checked after it (a step that learns the batch, a loader that yields whole batches), so that a
benchmark of something broken fails instead of timing it.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from benchmarks.tutorial_loop import tutorial_loader
from fasttrain.config import ModelConfig, OptimConfig, load_config
from fasttrain.data import build_loaders
from fasttrain.data.loaders.dali import dali_available
from fasttrain.data.synthetic import make_synthetic
from fasttrain.train.step import EagerStep
from fasttrain.models import build_model
from fasttrain.train.optim import build_optimizer
from fasttrain.train.precision import build_precision

CPU = torch.device("cpu")
BATCH = 64
STEPS_CHECKED = 6  # a benchmarked step must have lowered the batch's loss after this many calls


@pytest.fixture(scope="module")
def batch():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(BATCH, 3, 32, 32, generator=gen), torch.randint(0, 10, (BATCH,), generator=gen)


def _model():
    torch.manual_seed(0)
    return build_model(ModelConfig(name="CNN"), 3, 32, 10)


@pytest.mark.benchmark(group="train step (CNN, batch 64)")
def test_step_tutorial_loop(benchmark, batch):
    model, (images, labels) = _model(), batch
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    criterion = torch.nn.CrossEntropyLoss()

    losses = []

    def step():  # the tutorial's step, with its per-step loss.item()
        optimizer.zero_grad()
        loss = criterion(model(images), labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())

    benchmark.pedantic(step, rounds=5, iterations=1, warmup_rounds=1)
    while len(losses) < STEPS_CHECKED:  # under xdist pytest-benchmark is off and calls the step once
        step()
    assert losses[-1] < losses[0]  # steps on one batch: it is being learned


@pytest.mark.benchmark(group="train step (CNN, batch 64)")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_step_fasttrain(benchmark, batch, precision):
    """fasttrain's eager step at world size 1: no DDP wrapper (nothing to average), fused AdamW."""
    model = _model()
    optimizer = build_optimizer(OptimConfig(), model, CPU)
    step = EagerStep(model, optimizer, build_precision(precision, CPU, tf32=False))
    images, labels = batch
    before, calls = _batch_loss(model, images, labels), []

    def counted_step():
        step(images, labels)
        calls.append(1)

    benchmark.pedantic(counted_step, rounds=5, iterations=1, warmup_rounds=1)
    while len(calls) < STEPS_CHECKED:  # under xdist pytest-benchmark is off and calls the step once
        counted_step()
    assert _batch_loss(model, images, labels) < before  # steps on one batch: it is being learned


def _batch_loss(model, images, labels) -> float:
    with torch.no_grad():
        return torch.nn.functional.cross_entropy(model(images), labels).item()


def _next_batch(loader):
    batches = itertools.chain.from_iterable(_epochs(loader))
    return lambda: next(batches)


def _assert_a_whole_batch(found) -> None:
    images, labels = found
    assert tuple(images.shape) == (BATCH, 3, 32, 32) and images.is_floating_point()
    assert tuple(labels.shape) == (BATCH,) and 0 <= int(labels.min()) and int(labels.max()) < 10


def _epochs(loader):
    for epoch in itertools.count():
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        yield loader


@pytest.mark.benchmark(group="loader alone (batch 64)")
def test_loader_tutorial_dataloader(benchmark):
    images, labels = make_synthetic(2048, seed=0)
    loader = tutorial_loader(images, labels, BATCH, num_workers=0, pin_memory=False)
    _assert_a_whole_batch(benchmark.pedantic(_next_batch(loader), rounds=20, iterations=1, warmup_rounds=2))


@pytest.mark.benchmark(group="loader alone (batch 64)")
@pytest.mark.parametrize("kind", ["plain", "gpu", "dali"])
def test_loader_fasttrain(benchmark, kind, tmp_path):
    if kind == "dali" and not dali_available():
        pytest.skip("DALI is not installed")
    cfg = load_config(None, ["data.dataset=synthetic", "data.train_size=2048", f"data.loader={kind}",
                             f"train.batch_size={BATCH}", "data.num_workers=0", f"output.dir={tmp_path}"])
    loader, _, _ = build_loaders(cfg, CPU)
    _assert_a_whole_batch(benchmark.pedantic(_next_batch(loader), rounds=20, iterations=1, warmup_rounds=2))
