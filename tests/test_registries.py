"""Registries: a model, optimizer or schedule is one decorated function, and the config accepts its
name with no second list; an unknown name is one line that lists the registered ones."""

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler

from conftest import read_jsonl
from fasttrain import run
from fasttrain.config import OptimConfig, SchedConfig, describe_keys, load_config
from fasttrain.errors import ConfigError
from fasttrain.models import build_model
from fasttrain.train.optim import EVERY_BATCH, Schedule, Stepping, build_optimizer
from fasttrain.config.registry import DATASETS, MODELS, OPTIMIZERS, SCHEDULES

TINY = ["--config", "configs/smoke.yaml", "train.epochs=1", "data.train_size=128", "data.val_size=64",
        "train.log_every=1"]


@pytest.fixture
def tiny_model():
    """A model registered by the test, as a user would in their own code; removed afterwards."""
    built = []

    @MODELS.register("TinyLinear")
    def tiny_linear(cfg, in_channels: int, image_size: int, num_classes: int) -> nn.Module:
        built.append((in_channels, image_size, num_classes))
        return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size * image_size, num_classes))

    yield built
    MODELS.unregister("TinyLinear")


@pytest.fixture
def plain_sgd():
    @OPTIMIZERS.register("plain_sgd")
    def plain_sgd(cfg: OptimConfig, params, kernels) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=cfg.lr)  # the default kernels: `kernels` is a choice, not a must

    yield "plain_sgd"
    OPTIMIZERS.unregister("plain_sgd")


@pytest.fixture
def warmup():
    @SCHEDULES.register("warmup")
    def linear_warmup(cfg: SchedConfig, optimizer, epochs: int, steps_per_epoch: int) -> Stepping:
        return Stepping(lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 4)), EVERY_BATCH)

    yield "warmup"
    SCHEDULES.unregister("warmup")


def test_a_registered_model_is_accepted_by_the_config_and_trains(tiny_model, tmp_path):
    assert load_config(None, ["model.name=TinyLinear"]).model.name == "TinyLinear"
    assert any("TinyLinear" in line for line in describe_keys() if "model.name" in line)  # --help lists it
    assert run.main([*TINY, "model.name=TinyLinear", f"output.dir={tmp_path}"]) == 0
    assert tiny_model == [(3, 32, 10)]  # built once, for the synthetic dataset's shape
    assert len(read_jsonl(tmp_path / "metrics.jsonl")) == 1


def test_a_registered_optimizer_and_schedule_are_built_and_train(plain_sgd, warmup, tmp_path):
    cfg = load_config(None, ["optim.name=plain_sgd", "optim.lr=0.1", "sched.name=warmup"])
    model = build_model(cfg.model, 3, 32, 10)
    optimizer = build_optimizer(cfg.optim, model)
    assert type(optimizer) is torch.optim.SGD and optimizer.param_groups[0]["lr"] == 0.1
    schedule = Schedule(cfg.sched, optimizer, epochs=1, steps_per_epoch=4)
    assert schedule.per_batch and schedule.lr() == pytest.approx(0.025)
    optimizer.step()  # no gradients: a no-op that lets the schedule step in the right order
    schedule.after_batch()
    assert schedule.lr() == pytest.approx(0.05)

    argv = [*TINY, "optim.name=plain_sgd", "sched.name=warmup", f"output.dir={tmp_path}"]
    assert run.main(argv) == 0
    lrs = [s["lr"] for s in read_jsonl(tmp_path / "steps.jsonl")]
    assert lrs == pytest.approx([0.00025, 0.0005])  # smoke.yaml's optim.lr=0.001, warming up every batch


@pytest.mark.parametrize("registry,key,builtin", [
    (MODELS, "model.name", "SimpleModel, MLP, MLPSequential, CNN, CIFAR10_CNN, SpeedNet"),
    (DATASETS, "data.dataset", "cifar10, mnist, synthetic, folder"),
    (OPTIMIZERS, "optim.name", "sgd, adam, adamw"),
    (SCHEDULES, "sched.name", "none, step, exponential, cosine, plateau, onecycle, triangle"),
], ids=["model", "dataset", "optimizer", "schedule"])
def test_an_unknown_name_is_one_line_listing_the_registered_names(registry, key, builtin):
    expected = f"config error: {key}='Nope' is not valid: expected one of {builtin}"
    with pytest.raises(ConfigError) as from_config:
        load_config(None, [f"{key}=Nope"])
    with pytest.raises(ConfigError) as from_registry:
        registry.get("Nope")
    assert str(from_config.value) == str(from_registry.value) == expected


def test_an_unknown_name_lists_the_newly_registered_one_too(tiny_model):
    with pytest.raises(ConfigError, match=r"expected one of SimpleModel, .*, CIFAR10_CNN, SpeedNet, TinyLinear$"):
        load_config(None, ["model.name=ResNet"])


def test_a_name_cannot_be_registered_twice(tiny_model):
    with pytest.raises(ValueError, match="'TinyLinear' is already registered"):
        MODELS.register("TinyLinear")(lambda cfg, c, s, k: nn.Identity())
    assert "TinyLinear" in MODELS
