"""Speed switches against the plain fp32 eager path: same accuracy band on the smoke config,
matching losses from the same weights, no recompiles after the first epoch, clear errors."""

import copy

import pytest
import torch

from conftest import REPO, random_batches, run_fasttrain, sgd_losses
from fasttrain.config import ModelConfig, load_config
from fasttrain.models import build_model
from fasttrain.trainer import train


def smoke(tmp_path, name, *overrides):
    cfg = load_config(str(REPO / "configs" / "smoke.yaml"), [f"output.dir={tmp_path / name}",
                                                             "output.save_checkpoints=false", *overrides])
    return train(cfg).history


@pytest.fixture(scope="module")
def reference_acc(tmp_path_factory):
    return smoke(tmp_path_factory.mktemp("ref"), "plain")[-1]["val_acc"]


@pytest.mark.parametrize("switches", [
    ["data.loader=gpu"],
    ["data.loader=dali"],
    ["train.precision=bf16"],
    ["train.channels_last=true"],
    ["train.compile=default"],
    ["data.loader=gpu", "train.precision=bf16", "train.channels_last=true", "train.compile=default"],
], ids=["gpu-loader", "dali-loader", "bf16", "channels-last", "compile", "all"])
def test_each_switch_trains_to_the_plain_paths_accuracy_band(tmp_path, reference_acc, switches):
    if "data.loader=dali" in switches:
        pytest.importorskip("nvidia.dali")
    history = smoke(tmp_path, "run", *switches)
    assert reference_acc > 0.8
    assert history[-1]["val_acc"] > reference_acc - 0.08, (history[-1]["val_acc"], reference_acc)
    if "train.compile=default" in switches:
        graphs = [h["compiled_graphs"] for h in history]
        assert graphs[0] > 0 and graphs[1] == graphs[0] and graphs[2] == graphs[0], graphs  # no recompiles


def test_bf16_losses_track_fp32_from_the_same_weights():
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="CNN"), 3, 32, 10)
    fp32 = sgd_losses(copy.deepcopy(model), random_batches())
    bf16 = sgd_losses(copy.deepcopy(model), random_batches(), "bf16")
    assert bf16 == pytest.approx(fp32, rel=3e-2)  # bf16 keeps ~3 significant digits


def test_channels_last_losses_match_contiguous_from_the_same_weights():
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="CNN"), 3, 32, 10)
    plain = sgd_losses(copy.deepcopy(model), random_batches())
    cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    batches = [(x.contiguous(memory_format=torch.channels_last), y) for x, y in random_batches()]
    assert sgd_losses(cl, batches) == pytest.approx(plain, rel=1e-4)


def test_compiled_losses_match_eager_from_the_same_weights():
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="MLP", hidden_sizes=[64], dropout=0.0), 3, 32, 10)
    eager = sgd_losses(copy.deepcopy(model), random_batches())
    compiled_model = copy.deepcopy(model)
    compiled = sgd_losses(torch.compile(compiled_model), random_batches())
    assert compiled == pytest.approx(eager, rel=1e-4)


def test_fp16_on_cpu_is_refused_with_a_clear_message(tmp_path):
    result = run_fasttrain("--config", "configs/smoke.yaml", "train.precision=fp16", f"output.dir={tmp_path / 'r'}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "train.precision=fp16 needs CUDA" in result.stderr and "bf16" in result.stderr


def test_gpu_loader_refuses_augmentations_it_does_not_implement(tmp_path):
    result = run_fasttrain("--config", "configs/smoke.yaml", "data.loader=gpu", "aug.rotation=15",
                           f"output.dir={tmp_path / 'r'}")
    assert result.returncode == 2 and "aug.rotation" in result.stderr and "data.loader=plain" in result.stderr


def test_compile_false_in_yaml_means_off():
    assert load_config(None, ["train.compile=false"]).train.compile == "off"
