"""The training step against its reference: the captured (compiled whole) step gives the eager
step's losses from the same weights and batches, reads the schedule's learning rate and betas
from the device, and averages gradients over ranks (two train like one process with the global
batch, as DDP does); the eager step keeps its bookkeeping off the per-step path; optimizer state
comes back in the form the run's kernels need."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
import yaml

from conftest import REPO, read_jsonl, run_ranks
from fasttrain.config import ModelConfig, OptimConfig, SchedConfig, load_config
from fasttrain.models import build_model
from fasttrain.train.optim import Schedule, build_optimizer, load_optimizer_state
from fasttrain.train.precision import build_precision
from fasttrain.train.step import LOSS_SUM, NONFINITE, WARMUP_STEPS, CapturedStep, EagerStep

CPU = torch.device("cpu")
STEPS = 10
SIDE = 16  # the step is the subject: the CNN's convolutions and BatchNorm, not CIFAR's 32 px


def _batches(n=STEPS, batch=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, SIDE, SIDE, generator=gen), torch.randint(0, 10, (batch,), generator=gen))
            for _ in range(n)]


def _losses(step, schedule, batches):
    """Per-step losses through the step's own sums (one take per step: fine in a test)."""
    losses = []
    for images, labels in batches:
        step(images, labels)
        schedule.after_batch()
        losses.append(float(step.take_sums()[LOSS_SUM]) / labels.shape[0])
    return losses


def _run(kind, model, batches, precision="fp32", optim=OptimConfig(name="adamw", lr=1e-3), max_lr=0.001,
         label_smoothing=0.0):
    model = copy.deepcopy(model)
    capture = kind == "captured"
    optimizer = build_optimizer(optim, model, CPU, capture=capture)
    # OneCycle changes the learning rate and beta1 (SGD: momentum) every step: a captured step that baked
    # them in would drift from the eager one within a few steps
    schedule = Schedule(SchedConfig(name="onecycle", max_lr=max_lr, pct_start=0.5), optimizer, 1, len(batches))
    prec = build_precision(precision, CPU, tf32=False)
    step = (CapturedStep(model, optimizer, prec, label_smoothing=label_smoothing) if capture
            else EagerStep(model, optimizer, prec, label_smoothing=label_smoothing))
    return _losses(step, schedule, batches), model


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    return build_model(ModelConfig(name="CNN"), 3, SIDE, 10)  # conv + BatchNorm, no dropout


@pytest.mark.slow
def test_captured_step_gives_the_eager_steps_losses_and_weights(cnn):
    batches = _batches(2) * (STEPS // 2)  # two batches seen again and again: the loss must fall
    eager, eager_model = _run("eager", cnn, batches)
    captured, captured_model = _run("captured", cnn, batches)
    # compiled kernels sum in another order: agreement to ~1e-4 relative over 8 AdamW steps
    assert captured == pytest.approx(eager, rel=1e-4, abs=1e-5)
    assert eager[-1] < eager[0]
    for (name, a), b in zip(eager_model.state_dict().items(), captured_model.state_dict().values()):
        if name.endswith(("conv.bias", "bn.running_mean")):
            continue  # a bias before BatchNorm has a gradient of pure rounding noise, which Adam scales up
        assert torch.allclose(a.float(), b.float(), rtol=1e-3, atol=1e-4), name  # BN buffers included


SGD_TOOLS = OptimConfig(name="sgd", lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4, decay_bn_bias=False,
                        bn_bias_lr_scale=4.0)


def test_captured_sgd_with_nesterov_and_param_groups_gives_the_eager_steps_losses(cnn):
    """SGD in the captured step (fasttrain's device-hyperparameter update, momentum cycled by OneCycle)
    against torch's fused SGD in the eager step, with the BatchNorm/bias group undecayed at 4x the lr and
    label smoothing on: the same losses and weights."""
    batches = _batches(2) * (STEPS // 2)
    eager, eager_model = _run("eager", cnn, batches, optim=SGD_TOOLS, max_lr=0.01, label_smoothing=0.1)
    captured, captured_model = _run("captured", cnn, batches, optim=SGD_TOOLS, max_lr=0.01, label_smoothing=0.1)
    assert captured == pytest.approx(eager, rel=1e-4, abs=1e-5)
    assert eager[-1] < eager[0]
    for (name, a), b in zip(eager_model.state_dict().items(), captured_model.state_dict().values()):
        if name.endswith(("conv.bias", "bn.running_mean")):
            continue  # a bias before BatchNorm has a gradient of pure rounding noise
        assert torch.allclose(a.float(), b.float(), rtol=1e-3, atol=1e-4), name


def test_label_smoothing_is_the_training_loss():
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="MLP", hidden_sizes=[16], dropout=0.0), 3, SIDE, 10)
    step = EagerStep(model, build_optimizer(OptimConfig(lr=1e-3), model, CPU), build_precision("fp32", CPU, False),
                     label_smoothing=0.2)
    images, labels = _batches(1)[0]
    with torch.no_grad():
        smoothed = float(F.cross_entropy(model(images), labels, label_smoothing=0.2))
        plain = float(F.cross_entropy(model(images), labels))
    step(images, labels)
    assert float(step.take_sums()[LOSS_SUM]) / labels.shape[0] == pytest.approx(smoothed, rel=1e-6)
    assert smoothed != pytest.approx(plain, rel=1e-3)


@pytest.mark.parametrize("kind", ["eager", "captured"])
def test_a_summed_loss_at_lr_over_b_steps_like_the_mean_loss_at_lr(kind):
    """train.loss_reduction=sum: the gradient of the batch's summed loss, B times the mean's; plain SGD at lr / B
    then moves the weights as the mean at lr does. The logged loss stays the mean."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="SimpleModel"), 3, SIDE, 10)  # one linear layer: the smallest compile
    batches = _batches(3)
    ends, logged = [], []
    for lr, summed in ((0.1, False), (0.1 / 32, True)):
        copy_ = copy.deepcopy(model)
        optimizer = build_optimizer(OptimConfig(name="sgd", lr=lr, momentum=0.0, weight_decay=0.0), copy_, CPU,
                                    capture=kind == "captured")
        precision = build_precision("fp32", CPU, tf32=False)
        step = (CapturedStep(copy_, optimizer, precision, sum_loss=summed) if kind == "captured"
                else EagerStep(copy_, optimizer, precision, sum_over_ranks=1 if summed else 0))
        for images, labels in batches:
            step(images, labels)
        logged.append(float(step.take_sums()[LOSS_SUM]))
        ends.append(copy_.state_dict())
    assert logged[0] == pytest.approx(logged[1], rel=1e-5)
    for name, value in ends[0].items():
        assert torch.allclose(value, ends[1][name], rtol=1e-5, atol=1e-7), name
        assert not torch.equal(value, model.state_dict()[name])  # the steps moved it


@pytest.mark.slow
def test_two_ranks_summing_their_loss_step_like_one_process_summing_the_global_batch(tmp_path):
    """Under DDP the ranks' gradients are averaged: each rank's summed loss is scaled by the world size, so two
    ranks of 16 take the step one process of 32 takes (eager; the captured step scales the same way)."""
    run = ["--config", "configs/smoke.yaml", "model.name=MLP", "model.hidden_sizes=[32]", "model.dropout=0.0",
           "data.loader=gpu", "data.train_size=128", "data.val_size=32", "train.epochs=2", "train.log_every=1",
           "optim.name=sgd", "optim.lr=0.002", "optim.momentum=0.0", "optim.weight_decay=0.0", "sched.name=none",
           "train.loss_reduction=sum", "output.plots=false"]
    two = run_ranks(2, *run, "train.batch_size=16", f"output.dir={tmp_path / 'two'}")
    assert two.returncode == 0, two.stderr[-3000:]
    from fasttrain import run as fasttrain_run

    assert fasttrain_run.main([*run, "train.batch_size=32", f"output.dir={tmp_path / 'one'}"]) == 0
    steps = [read_jsonl(tmp_path / name / "steps.jsonl") for name in ("two", "one")]
    assert len(steps[0]) == len(steps[1]) == 8
    assert [s["loss"] for s in steps[0]] == pytest.approx([s["loss"] for s in steps[1]], rel=1e-5)
    weights = [torch.load(tmp_path / name / "checkpoints" / "last.pt", weights_only=True)["model"]
               for name in ("two", "one")]
    for name, value in weights[0].items():
        assert torch.allclose(value, weights[1][name], rtol=1e-4, atol=1e-6), name


def test_param_groups_leave_batchnorm_and_biases_undecayed_at_their_own_learning_rate(cnn):
    """optim.decay_bn_bias=false / optim.bn_bias_lr_scale: every 1-d parameter in a second group with no
    weight decay, and OneCycle's whole cycle scaled for it (its peak and its start)."""
    optimizer = build_optimizer(SGD_TOOLS, cnn, CPU)
    weights, vectors = optimizer.param_groups
    assert all(p.ndim > 1 for p in weights["params"]) and all(p.ndim == 1 for p in vectors["params"])
    assert len(weights["params"]) + len(vectors["params"]) == len(list(cnn.parameters()))
    assert weights["weight_decay"] == 5e-4 and vectors["weight_decay"] == 0.0
    schedule = Schedule(SchedConfig(name="onecycle", max_lr=0.05, pct_start=0.5), optimizer, 1, 10)
    assert vectors["lr"] == pytest.approx(4 * weights["lr"])
    optimizer._opt_called = True  # no step is taken here: only the schedule's values are read
    for _ in range(4):  # 10 steps, half warming up: the peak is the 5th step's
        schedule.after_batch()
    assert weights["lr"] == pytest.approx(0.05) and vectors["lr"] == pytest.approx(0.2)  # the peaks
    assert len(build_optimizer(OptimConfig(), cnn, CPU).param_groups) == 1  # the default: one group, as before


class RecordedStep(CapturedStep):
    """The CUDA path's control flow on the CPU: warm-up steps, then one recording, then replays of it
    with the batch copied into the static inputs. A stand-in for the graph: recording keeps the body
    without running it (as capture does), replaying runs it on the static inputs, gradients written
    fresh each time (as the captured backward does)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.on_cuda = True
        self.recorded = 0

    def _side_stream(self):
        import contextlib

        return contextlib.nullcontext()

    def _record(self, body):
        self.recorded += 1

        def replay():
            self.optimizer.zero_grad(set_to_none=True)
            body()

        return replay


def test_the_cuda_paths_warm_up_record_and_replay_give_the_eager_steps_losses(cnn):
    batches = _batches(2) * (STEPS // 2)
    eager, _ = _run("eager", cnn, batches)
    model = copy.deepcopy(cnn)
    optimizer = build_optimizer(OptimConfig(name="adamw", lr=1e-3), model, CPU, capture=True)
    schedule = Schedule(SchedConfig(name="onecycle", max_lr=0.001, pct_start=0.5), optimizer, 1, len(batches))
    step = RecordedStep(model, optimizer, build_precision("fp32", CPU, tf32=False))
    replayed = _losses(step, schedule, batches)
    assert step.recorded == 1 and step.steps_run == WARMUP_STEPS + 1  # recorded once, at the step after warm-up
    assert replayed == pytest.approx(eager, rel=1e-4, abs=1e-5)  # the replays read each new batch and lr


def test_captured_step_reads_the_schedules_learning_rate_from_the_device(cnn):
    """Freezing the learning rate at the first value (what a baked-in float would do) changes the
    losses; the captured step follows the schedule like the eager one."""
    model = copy.deepcopy(cnn)
    optimizer = build_optimizer(OptimConfig(name="adamw", lr=1e-3), model, CPU, capture=True)
    step = CapturedStep(model, optimizer, build_precision("fp32", CPU, tf32=False))
    batches = _batches()
    losses = []
    for i, (images, labels) in enumerate(batches):
        optimizer.param_groups[0]["lr"] = 0.0 if i >= 2 else 1e-3  # a schedule that stops learning at step 3
        step(images, labels)
        losses.append(float(step.take_sums()[LOSS_SUM]))
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    images, labels = batches[0]
    step(images, labels)  # lr 0: the weights must not move (AdamW's decay is lr x wd = 0 too)
    after = {k: v for k, v in model.state_dict().items() if k in frozen}
    assert all(torch.equal(frozen[k], after[k]) for k in frozen)


def test_captured_step_counts_a_non_finite_loss_and_names_its_position(cnn):
    model = copy.deepcopy(cnn)
    optimizer = build_optimizer(OptimConfig(name="adamw"), model, CPU, capture=True)
    step = CapturedStep(model, optimizer, build_precision("fp32", CPU, tf32=False))
    batches = _batches(4)
    step.start_interval()
    for i, (images, labels) in enumerate(batches):
        step(images * (float("nan") if i == 2 else 1.0), labels)
    sums = step.take_sums()
    assert sums[NONFINITE] >= 1 and step.first_bad_offset() == 3
    step.start_interval()
    assert step.first_bad_offset() == 0


def test_eager_step_sums_weight_each_loss_by_its_batch_and_name_the_first_bad_step():
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="MLP", hidden_sizes=[16], dropout=0.0), 3, SIDE, 10)
    step = EagerStep(model, build_optimizer(OptimConfig(lr=1e-3), model, CPU), build_precision("fp32", CPU, False))
    step.optimizer.param_groups[0]["lr"] = 0.0  # weights stay put: the expected losses can be computed apart
    batches = [(x[:n], y[:n]) for (x, y), n in zip(_batches(4), (32, 32, 7, 32))]
    batches[3] = (batches[3][0] * float("inf"), batches[3][1])
    with torch.no_grad():
        expected = sum(float(F.cross_entropy(model(x), y)) * y.shape[0] for x, y in batches[:3])
    step.start_interval()
    for images, labels in batches[:2]:
        step(images, labels)
    first = step.take_sums()  # a boundary between log intervals (a checkpoint) takes the sums too
    for images, labels in batches[2:]:
        step(images, labels)
    second = step.take_sums()
    assert float(first[LOSS_SUM] + second[LOSS_SUM]) == pytest.approx(expected, rel=1e-6)  # the inf loss left out
    assert first[NONFINITE] == 0 and second[NONFINITE] == 1
    assert step.first_bad_offset() == 4  # counted from start_interval(), across both takes
    step.start_interval()
    assert step.first_bad_offset() == 0


def test_optimizer_state_takes_the_runs_kernels_and_each_parameters_layout():
    """A checkpoint from an eager, contiguous run resumed as a captured, channels_last one: the
    group keeps this run's kernel flags (not the checkpoint's fused), the step counters are where
    those kernels want them, and every moment gets its parameter's strides (CUDA's fused AdamW
    requires them)."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="CNN"), 3, SIDE, 10)
    optimizer = build_optimizer(OptimConfig(), model, CPU)
    assert optimizer.param_groups[0]["fused"]
    images, labels = _batches(1)[0]
    EagerStep(model, optimizer, build_precision("fp32", CPU, tf32=False))(images, labels)
    saved = optimizer.state_dict()

    cl_model = copy.deepcopy(model).to(memory_format=torch.channels_last)
    resumed = build_optimizer(OptimConfig(), cl_model, CPU, capture=True)
    load_optimizer_state(resumed, saved)
    group = resumed.param_groups[0]
    assert not group["fused"] and group["foreach"] is False  # the captured step's CPU kernels, not the checkpoint's
    conv = cl_model.features[0].conv.weight
    assert not conv.is_contiguous() and conv.is_contiguous(memory_format=torch.channels_last)
    for param in cl_model.parameters():
        state = resumed.state[param]
        assert state["exp_avg"].stride() == param.stride() and state["exp_avg_sq"].stride() == param.stride()
        assert state["step"].device == param.device
    # and the values are the saved ones
    assert torch.equal(resumed.state[conv]["exp_avg"], optimizer.state[model.features[0].conv.weight]["exp_avg"])


def test_fused_kernels_are_chosen_for_every_optimizer_on_cuda_and_the_cpu():
    """SGD too: unfused SGD under fp16 makes the GradScaler sync every step to decide whether to step."""
    model = build_model(ModelConfig(name="SimpleModel"), 3, 32, 10)
    for name in ("sgd", "adam", "adamw"):
        for device in (CPU, torch.device("cuda")):  # the flag only; the kernel runs where the parameters are
            assert build_optimizer(OptimConfig(name=name), model, device).param_groups[0]["fused"], (name, device)


# --------------------------------------------------------------------------- whole runs

RUN = ["model.name=MLP", "model.hidden_sizes=[64]", "model.dropout=0.0", "data.loader=gpu", "data.train_size=512",
       "data.val_size=128", "train.batch_size=32", "train.epochs=2", "train.log_every=4", "output.plots=false"]
CAPTURED = ["train.compile=default", "train.capture=true"]


def fit(*overrides: str):
    """A run in this process through the Python API (the command line's path; it puts back what the run
    changed, compile settings included): these runs are about the step, not the process."""
    import fasttrain

    return fasttrain.fit(str(REPO / "configs" / "smoke.yaml"), overrides=[*RUN, *overrides])


@pytest.fixture(scope="module")
def captured_run(tmp_path_factory):
    """One uninterrupted captured run (2 epochs), shared by the tests below."""
    out = tmp_path_factory.mktemp("captured") / "run"
    assert fit(*CAPTURED, f"output.dir={out}").exit_code == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["capture"] is True
    assert all(record["compiled_graphs"] >= 1 for record in read_jsonl(out / "metrics.jsonl"))
    return out


def test_a_captured_run_matches_the_compiled_eager_run_and_does_not_recompile(captured_run, tmp_path):
    assert fit("train.compile=default", f"output.dir={tmp_path / 'e'}").exit_code == 0
    a, b = read_jsonl(captured_run / "metrics.jsonl"), read_jsonl(tmp_path / "e" / "metrics.jsonl")
    assert [r["train_loss"] for r in a] == pytest.approx([r["train_loss"] for r in b], rel=1e-4)
    assert [r["val_acc"] for r in a] == pytest.approx([r["val_acc"] for r in b], abs=0.01)
    graphs = [r["compiled_graphs"] for r in a]
    assert graphs[0] > 0 and graphs[1] == graphs[0], graphs  # no recompilation after the first epoch
    assert all(r["cudagraph_skips"] == 0 for r in a)


@pytest.mark.slow
def test_a_captured_two_rank_run_averages_gradients_like_one_process_with_the_global_batch(captured_run, tmp_path):
    """Two gloo ranks x 16: the captured step's own all-reduce (one flat buffer), against the
    captured run of one process x 32 (no dropout, no BatchNorm: the batch split changes nothing else), as
    test_distributed.py holds DDP to the same. Exit code 0 also says the ranks ended with identical weights."""
    captured = run_ranks(2, "--config", "configs/smoke.yaml", *RUN, *CAPTURED, "train.batch_size=16",
                         "checkpoint.every_steps=0", f"output.dir={tmp_path / 'c'}")
    assert captured.returncode == 0, captured.stderr[-3000:]
    a, b = read_jsonl(tmp_path / "c" / "metrics.jsonl"), read_jsonl(captured_run / "metrics.jsonl")
    assert [r["world_size"] for r in a] == [2, 2] and [r["world_size"] for r in b] == [1, 1]
    assert [r["train_loss"] for r in a] == pytest.approx([r["train_loss"] for r in b], rel=1e-4)
    steps_a, steps_b = read_jsonl(tmp_path / "c" / "steps.jsonl"), read_jsonl(captured_run / "steps.jsonl")
    assert len(steps_a) == len(steps_b) == 8  # 2 epochs x 16 steps, logged every 4
    assert [s["loss"] for s in steps_a] == pytest.approx([s["loss"] for s in steps_b], rel=1e-4)


def test_a_captured_run_stopped_and_resumed_ends_with_the_same_weights(captured_run, tmp_path):
    from conftest import assert_same_weights

    first = fit(*CAPTURED, f"output.dir={tmp_path / 'r'}", "train.stop_after_steps=6")
    assert (first.stopped_by, first.global_step) == ("stop_after_steps", 6)
    assert fit(*CAPTURED, f"output.dir={tmp_path / 'r'}", "resume=auto").global_step == 32
    assert_same_weights(captured_run, tmp_path / "r")


@pytest.mark.parametrize("setting,expect", [
    (["train.compile=off"], "train.compile='off' is not valid: expected default or max-autotune with train.capture"),
    (["train.compile=reduce-overhead"], "reduce-overhead would record CUDA graphs of its own"),
    (["train.compile=default", "optim.name=lamb"], "sgd, adam, adamw with train.capture=true"),
])
def test_capture_refuses_what_it_cannot_capture(setting, expect):
    from fasttrain.errors import ConfigError
    from fasttrain.config.registry import OPTIMIZERS

    OPTIMIZERS.register("lamb")(lambda cfg, groups, kernels: torch.optim.Adam(groups))  # a user's, not capturable
    try:
        with pytest.raises(ConfigError, match="config error") as err:
            load_config(str(REPO / "configs" / "smoke.yaml"), ["train.capture=true", *setting])
    finally:
        OPTIMIZERS.unregister("lamb")
    assert expect in str(err.value)


def test_capture_refuses_fp16_with_a_clear_message():
    from fasttrain.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.capture=true", "train.compile=default", "train.precision=fp16"])
    assert "fp32 or bf16 with train.capture=true" in str(err.value)


def test_world_size_one_trains_without_ddp(tmp_path):
    from fasttrain import dist
    from fasttrain.train.build import build_parts

    cfg = load_config(str(REPO / "configs" / "smoke.yaml"), [f"output.dir={tmp_path}"])
    ctx = dist.setup("cpu")
    try:
        parts = build_parts(cfg, ctx, logging.getLogger("test-quiet"))
    finally:
        dist.teardown()
    assert isinstance(parts.step, EagerStep) and parts.step.model is parts.model  # no wrapper at all
