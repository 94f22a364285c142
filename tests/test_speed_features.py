"""Speed switches against the plain fp32 eager path: same accuracy band on the smoke config,
matching losses from the same weights, no recompiles after the first epoch, clear errors (the
command line's: one line, exit code 2)."""

import copy

import pytest
import torch

from conftest import REPO, random_batches, sgd_losses
from fasttrain import run
from fasttrain.config import ModelConfig, load_config
from fasttrain.models import build_model
from fasttrain.train.lifecycle import train

def smoke(tmp_path, name, *overrides):
    cfg = load_config(str(REPO / "configs" / "smoke.yaml"), [f"output.dir={tmp_path / name}", "output.plots=false",
                                                             "output.save_checkpoints=false", *overrides])
    return train(cfg).history


@pytest.fixture(scope="module")
def reference_acc(tmp_path_factory):
    return smoke(tmp_path_factory.mktemp("ref"), "plain")[-1]["val_acc"]


# the whole smoke config (smaller runs are still climbing, where two loaders' draws differ by more than the
# band), every switch at once: the gpu loader, bf16, channels_last, compile. DALI's loader gives the gpu
# loader's batches pixel for pixel (test_dali_loader.py), so this band holds for it too; each switch alone is
# checked against the plain path's losses from the same weights below.
@pytest.mark.slow
def test_every_switch_at_once_trains_to_the_plain_paths_accuracy_band(tmp_path, reference_acc):
    history = smoke(tmp_path, "run", "data.loader=gpu", "train.precision=bf16", "train.channels_last=true",
                    "train.compile=default")
    assert reference_acc > 0.8
    assert history[-1]["val_acc"] > reference_acc - 0.08, (history[-1]["val_acc"], reference_acc)
    graphs = [h["compiled_graphs"] for h in history]
    assert graphs[0] > 0 and graphs[1] == graphs[0] and graphs[2] == graphs[0], graphs  # no recompiles


SIDE = 16  # the comparisons need a model with convolutions and BatchNorm, not CIFAR's 32 px


def test_bf16_losses_track_fp32_from_the_same_weights():
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="CNN"), 3, SIDE, 10)
    fp32 = sgd_losses(copy.deepcopy(model), random_batches(side=SIDE))
    bf16 = sgd_losses(copy.deepcopy(model), random_batches(side=SIDE), "bf16")
    assert bf16 == pytest.approx(fp32, rel=3e-2)  # bf16 keeps ~3 significant digits
    assert bf16 != fp32  # and autocast did compute in bf16


def test_channels_last_losses_match_contiguous_from_the_same_weights():
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="CNN"), 3, SIDE, 10)
    plain = sgd_losses(copy.deepcopy(model), random_batches(side=SIDE))
    cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    batches = [(x.contiguous(memory_format=torch.channels_last), y) for x, y in random_batches(side=SIDE)]
    assert sgd_losses(cl, batches) == pytest.approx(plain, rel=1e-4)


def test_compiled_losses_match_eager_from_the_same_weights():
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="MLP", hidden_sizes=[64], dropout=0.0), 3, SIDE, 10)
    eager = sgd_losses(copy.deepcopy(model), random_batches(side=SIDE))
    compiled_model = copy.deepcopy(model)
    compiled = sgd_losses(torch.compile(compiled_model), random_batches(side=SIDE))
    assert compiled == pytest.approx(eager, rel=1e-4)


def test_fp16_on_cpu_is_refused_with_a_clear_message(tmp_path, capsys):
    assert run.main(["--config", "configs/smoke.yaml", "train.precision=fp16", f"output.dir={tmp_path / 'r'}"]) == 2
    err = capsys.readouterr().err
    assert "train.precision=fp16 needs CUDA" in err and "bf16" in err and len(err.strip().splitlines()) == 1


def test_gpu_loader_refuses_augmentations_it_does_not_implement(tmp_path, capsys):
    assert run.main(["--config", "configs/smoke.yaml", "data.loader=gpu", "aug.rotation=15",
                     f"output.dir={tmp_path / 'r'}"]) == 2
    err = capsys.readouterr().err
    assert "aug.rotation" in err and "data.loader=plain" in err and len(err.strip().splitlines()) == 1


def test_compile_false_in_yaml_means_off():
    assert load_config(None, ["train.compile=false"]).train.compile == "off"
