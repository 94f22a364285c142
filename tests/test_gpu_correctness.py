"""Correctness that only CUDA can show: fp16 with a GradScaler, bf16 on the card's kernels, bit-exact
resume with cuDNN's deterministic algorithms, a contiguous checkpoint into channels_last with the fused
AdamW that CUDA requires strides for, and data.loader=auto choosing among the device loaders.

`python -m benchmarks.gpu_check` runs this file (`pytest -m cuda`) as its correctness section, and
`pytest -m cuda` on a GPU machine does the same. Without CUDA every test skips; the CPU paths of the
same claims are tested elsewhere (test_speed_features, test_resume, test_step, test_signal_edges).
The runs use synthetic data: the claims are about arithmetic and state, not about CIFAR-10."""

from __future__ import annotations

import copy

import pytest
import torch
import yaml

from conftest import assert_same_weights, random_batches, run_fasttrain, sgd_losses

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")]

# the fast recipe, eager (compile and capture are gpu_check's other sections), 8 steps of 256 per epoch
FAST = ["--config", "configs/cifar10_cnn_fast.yaml", "data.dataset=synthetic", "data.train_size=2048",
        "data.val_size=256", "train.batch_size=256", "train.compile=off", "train.capture=false"]


def test_fp16_forced_overflow_skips_one_step_and_moves_no_weight():
    """A GradScaler whose scale overflows fp16: the step is skipped, counted, and no weight moves."""
    from fasttrain.config import ModelConfig, OptimConfig
    from fasttrain.models import build_model
    from fasttrain.train.optim import build_optimizer
    from fasttrain.train.precision import build_precision
    from fasttrain.train.step import SKIPPED, EagerStep

    device = torch.device("cuda")
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="CNN"), 3, 32, 10).to(device)
    precision = build_precision("fp16", device, tf32=False)
    precision.scaler = torch.amp.GradScaler("cuda", init_scale=2.0**60)  # any gradient overflows at this scale
    step = EagerStep(model, build_optimizer(OptimConfig(), model, device), precision)
    before = [p.detach().clone() for p in model.parameters()]
    images, labels = random_batches(1, device="cuda")[0]
    step(images, labels)
    assert float(step.take_sums()[SKIPPED]) == 1.0
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert precision.scaler.get_scale() < 2.0**60  # the scaler backed off


def test_bf16_losses_track_fp32_on_the_gpu():
    from fasttrain.config import ModelConfig
    from fasttrain.models import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(name="CNN"), 3, 32, 10).to("cuda")
    fp32 = sgd_losses(copy.deepcopy(model), random_batches(device="cuda"))
    bf16 = sgd_losses(copy.deepcopy(model), random_batches(device="cuda"), "bf16")
    assert bf16 == pytest.approx(fp32, rel=3e-2)  # bf16 keeps ~3 significant digits


def test_stop_and_resume_is_bit_identical_under_deterministic(tmp_path):
    common = [*FAST, "train.epochs=2", "train.deterministic=true", "train.log_every=1", "output.overwrite=true"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    runs = [run_fasttrain(*common, f"output.dir={straight}"),
            run_fasttrain(*common, f"output.dir={stopped}", "train.stop_after_steps=5"),
            run_fasttrain(*common, f"output.dir={stopped}", "resume=auto", "output.overwrite=false")]
    assert [r.returncode for r in runs] == [0, 0, 0], [r.stderr[-2000:] for r in runs if r.returncode]
    assert_same_weights(straight, stopped)


def test_a_contiguous_checkpoint_resumes_into_channels_last_with_fused_adamw(tmp_path):
    out = tmp_path / "run"
    common = [*FAST, "train.epochs=1", f"output.dir={out}"]
    first = run_fasttrain(*common, "train.channels_last=false", "train.stop_after_steps=1", "output.overwrite=true")
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_fasttrain(*common, "train.channels_last=true", "resume=auto")
    assert second.returncode == 0, second.stderr[-3000:]
    assert (out / "checkpoints" / "last.pt").is_file()


def test_data_loader_auto_chooses_a_loader_and_says_which(tmp_path):
    out = tmp_path / "run"
    result = run_fasttrain(*FAST, "data.loader=auto", "train.epochs=1", f"output.dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    chosen = yaml.safe_load((out / "config.yaml").read_text())["data"]["loader"]  # the resolved config
    assert chosen in ("gpu", "dali", "plain")
    assert f"data.loader=auto chose {chosen}" in result.stdout
