"""SpeedNet, the speed records' network (issue 23): the whitening layer set from the data, dirac starts,
frozen parameters that stay frozen, and the data hook that any model may define."""

import copy

import pytest
import torch

from conftest import read_jsonl, run_in_process
from fasttrain.config import ModelConfig, load_config
from fasttrain.data import training_sample
from fasttrain.errors import ConfigError
from fasttrain.models import SpeedNet, Whitening, build_model


def _images(n=64, side=16, seed=0):
    """Correlated channels and neighbouring pixels, as real images have (whitening must undo both)."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 1, side, side, generator=gen).cumsum(-1).cumsum(-2) / side
    return torch.cat([base + 0.1 * torch.randn(n, 1, side, side, generator=gen) for _ in range(3)], 1)


def _patch_rows(images):
    return images.double().unfold(2, 2, 1).unfold(3, 2, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, 12)


def test_the_whitening_layer_decorrelates_2x2_patches_of_the_data_it_was_set_from():
    images = _images()
    layer = Whitening(3, eps=1e-9).double()
    layer.init_from_data(images.double())
    out = layer(images.double())  # N, 24, H-1, W-1
    assert out.shape == (64, 24, 15, 15)
    first = out[:, :12].permute(0, 2, 3, 1).reshape(-1, 12)
    covariance = torch.cov(first.T)
    assert torch.allclose(covariance, torch.eye(12, dtype=torch.float64), atol=1e-4)  # white: unit, uncorrelated
    assert torch.equal(out[:, 12:], -out[:, :12])  # then their negations
    # the original patches were far from white: the test is not trivially true
    before = torch.cov(_patch_rows(images).T)
    assert (before - torch.diag(before.diag())).abs().max() > 0.1


def test_eps_damps_the_directions_of_least_variance():
    images = _images()
    layer = Whitening(3).double()  # eps 5e-4
    layer.init_from_data(images.double())
    variances = torch.cov(layer(images.double())[:, :12].permute(0, 2, 3, 1).reshape(-1, 12).T).diag()
    eigenvalues = torch.linalg.eigvalsh(torch.cov(_patch_rows(images).T)).flip(0)
    assert torch.allclose(variances, eigenvalues / (eigenvalues + 5e-4), rtol=1e-6)


def test_convolutions_start_as_identity_on_their_first_input_channels():
    torch.manual_seed(0)
    model = SpeedNet(3, 10)
    conv = model.blocks[1][0]  # 64 -> 256
    x = torch.randn(2, 64, 8, 8)
    assert torch.allclose(conv(x)[:, :64], x, atol=1e-6)  # the first 64 filters pass their channel through
    assert not torch.allclose(conv(x)[:, 64:128], x)  # the others are initialized as usual
    assert all(m.bias is None for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m is not model.whiten)


def test_frozen_parameters_are_the_whitening_filters_and_batchnorm_weights_and_stay_frozen():
    torch.manual_seed(0)
    model = SpeedNet(3, 10)
    model.init_from_data(_images(32, 32))
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    norms = [name for name, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert frozen == {"whiten.weight"} | {f"{n}.weight" for n in norms}
    assert all(m.momentum == pytest.approx(0.4) and m.eps == 1e-12 for m in model.modules()
               if isinstance(m, torch.nn.BatchNorm2d))
    before = copy.deepcopy(model.state_dict())
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    loss = torch.nn.functional.cross_entropy(model(_images(8, 32)), torch.arange(8))
    loss.backward()
    optimizer.step()
    after = model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in frozen)
    assert not torch.equal(before["whiten.bias"], after["whiten.bias"])  # trainable, until the recipe freezes it


def test_the_output_is_scaled_by_a_ninth_and_the_head_has_no_bias():
    torch.manual_seed(0)
    model = SpeedNet(3, 10).eval()
    x = torch.randn(2, 3, 32, 32)
    features = model.pool(model.blocks(model.activation(model.whiten(x)))).flatten(1)
    assert model.head.bias is None
    assert torch.allclose(model(x), model.head(features) / 9)


def test_speednet_is_registered_and_refuses_images_too_small_for_its_pools():
    assert build_model(ModelConfig(name="SpeedNet"), 3, 32, 10)(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ConfigError, match="SpeedNet needs images of at least 9 px"):
        build_model(ModelConfig(name="SpeedNet"), 3, 8, 10)
    with pytest.raises(ConfigError, match="model.kwargs"):
        load_config(None, ["model.name=SpeedNet", "model.kwargs.widths=[8,8,8]"])


def test_the_training_sample_is_normalized_seeded_and_the_same_for_every_call():
    cfg = load_config(None, ["data.dataset=synthetic", "data.train_size=300", "data.mean=[0.5]", "data.std=[0.25]"])
    a, b = training_sample(cfg.data, 100, seed=1), training_sample(cfg.data, 100, seed=1)
    assert a.shape == (100, 3, 32, 32) and a.dtype == torch.float32 and torch.equal(a, b)
    assert not torch.equal(a, training_sample(cfg.data, 100, seed=2))
    assert a.min() >= -2.0 and a.max() <= 2.0  # (x/255 - 0.5) / 0.25
    assert training_sample(cfg.data, 5000, seed=1).shape[0] == 300  # at most the split


def test_a_run_calls_the_data_hook_of_its_model_before_the_first_step(tmp_path, capsys):
    """SpeedNet trains end to end, and its whitening filters in the checkpoint are the ones the training
    sample gives (set before the first step, then never trained)."""
    out = tmp_path / "run"
    args = ["--config", "configs/smoke.yaml", "model.name=SpeedNet", "data.train_size=128", "data.val_size=32",
            "train.batch_size=32", "train.epochs=1", "optim.name=sgd", "optim.lr=0.01", "sched.name=none",
            "output.plots=false", f"output.dir={out}"]
    result = run_in_process(capsys, *args)
    assert result.returncode == 0, result.stderr
    cfg = load_config("configs/smoke.yaml", args[2:])
    expected = Whitening(3)
    expected.init_from_data(training_sample(cfg.data, 5000, cfg.train.seed))
    saved = torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)["model"]
    assert torch.equal(saved["whiten.weight"], expected.weight)
    assert read_jsonl(out / "metrics.jsonl")[-1]["epoch"] == 1


class SpeedNetFreezingEarly(SpeedNet):
    """SpeedNet whose whitening bias trains for 1.25 epochs (5 steps of the run below) instead of 3."""
    freeze_after_epochs = {"whiten.bias": 1.25}


@pytest.mark.slow  # three runs
def test_frozen_parameters_stay_frozen_through_a_stop_and_resume_and_the_resume_is_exact(tmp_path, capsys):
    """A SpeedNet run stopped mid-epoch and resumed ends with the uninterrupted run's weights bit for bit; the
    whitening filters are still the data's and the BatchNorm weights still 1 (the hook runs again at the resume,
    then the checkpoint's weights are loaded over it). Its whitening bias, frozen from the 6th step on, is
    resumed frozen at step 5 (where the stop was)."""
    args = ["--config", "configs/smoke.yaml", "model.name=test_speedrun:SpeedNetFreezingEarly", "data.loader=gpu",
            "data.train_size=128",
            "data.val_size=32", "train.batch_size=32", "train.epochs=2", "optim.name=sgd", "optim.lr=0.01",
            "optim.nesterov=true", "sched.name=triangle", "train.lookahead_k=2", "train.lookahead_alpha=0.2262",
            "train.lookahead_power=3", "train.loss_reduction=sum", "train.label_smoothing=0.2",
            "output.plots=false"]
    assert run_in_process(capsys, *args, f"output.dir={tmp_path / 'straight'}").returncode == 0
    stopped = run_in_process(capsys, *args, f"output.dir={tmp_path / 'resumed'}", "train.stop_after_steps=5")
    assert stopped.returncode == 0, stopped.stderr
    resumed = run_in_process(capsys, *args, f"output.dir={tmp_path / 'resumed'}", "resume=auto")
    assert resumed.returncode == 0, resumed.stderr
    straight, again = (torch.load(tmp_path / name / "checkpoints" / "last.pt", map_location="cpu",
                                  weights_only=True) for name in ("straight", "resumed"))
    groups = again["optimizer"]["param_groups"]
    assert groups[-1]["freeze_after_epochs"] == 1.25 and groups[-1]["lr"] == 0.0 and groups[0]["lr"] > 0
    straight, again = straight["model"], again["model"]
    assert straight.keys() == again.keys() and all(torch.equal(straight[k], again[k]) for k in straight)
    cfg = load_config("configs/smoke.yaml", args[2:])
    expected = Whitening(3)
    expected.init_from_data(training_sample(cfg.data, 5000, cfg.train.seed))
    assert torch.equal(again["whiten.weight"], expected.weight)
    norms = [k for k in again if k.endswith(".weight") and again[k].ndim == 1]
    assert norms and all(torch.equal(again[k], torch.ones_like(again[k])) for k in norms)


def test_the_recipe_file_runs_its_arithmetic_end_to_end(tmp_path, capsys):
    """configs/cifar10_94.yaml on a few synthetic images (1.5 epochs of 4 steps): the triangle ends at 0.07 of the
    peak on the 6th step, only the last epoch is validated (with TTA), and the optimizer holds the records'
    groups: the weights, BatchNorm's biases at 64x the learning rate, and the whitening bias alone (frozen
    after 3 epochs) at the weights' rate, each decayed by the same 0.00199565 of a weight per step at the peak."""
    out = tmp_path / "run"
    result = run_in_process(capsys, "--config", "configs/cifar10_94.yaml", "data.dataset=synthetic",
                            "data.train_size=64", "data.val_size=32", "train.batch_size=16", "train.epochs=1.5",
                            "train.lookahead_start=0.5", "train.device=cpu", "train.log_every=1", "output.plots=false",
                            f"output.dir={out}")
    assert result.returncode == 0, result.stderr
    steps = read_jsonl(out / "steps.jsonl")
    assert steps[-1]["step"] == 6 and steps[-1]["lr"] == pytest.approx(0.00146484 * 0.07)
    assert [(r["epoch"], r["val_acc"] is None) for r in read_jsonl(out / "metrics.jsonl")] == [(1, True), (2, False)]
    groups = torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)["optimizer"]["param_groups"]
    assert [(g["lr_scale"], len(g["params"]), "freeze_after_epochs" in g) for g in groups] == [
        (1.0, 7, False), (64.0, 6, False), (1.0, 1, True)]  # 6 convolutions and the head; 6 BatchNorm biases
    assert [g["weight_decay"] * 0.00146484 * g["lr_scale"] for g in groups] == pytest.approx([0.00199565] * 3)
