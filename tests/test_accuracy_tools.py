"""Accuracy per step (issue 21): label smoothing, an EMA of the weights, lookahead, test-time augmentation,
SGD with Nesterov and BatchNorm/bias parameter groups. Each is checked against its formula, then in real
runs: the eager and the captured step, stop + resume bit for bit with the averages on, and `fasttrain eval`
reporting what validation reported (two ranks like one process with the global batch: test_distributed.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import REPO, read_jsonl
from fasttrain.train.averaging import Lookahead, WeightEMA
from fasttrain.train.precision import build_precision
from fasttrain.train.validation import Evaluator, tta_logits, tta_views, validate

CPU = torch.device("cpu")
# every tool at once, on a small CNN (BatchNorm: the EMA copies its buffers; SmallCNN below) and synthetic data
TOOLS = ["train.label_smoothing=0.1", "train.ema_decay=0.9", "train.ema_every=2", "train.lookahead_k=3",
         "train.lookahead_alpha=0.5", "train.lookahead_start=0.5", "train.lookahead_end=epoch", "train.tta=flip"]
MODEL = "model.name=test_accuracy_tools:SmallCNN"  # a model of one's own, by import path
RUN = [MODEL, "data.train_size=512", "data.val_size=96", "train.batch_size=32", "train.epochs=3",
       "train.log_every=4", "data.loader=gpu", "output.plots=false", *TOOLS]
STEPS = 48  # 3 epochs x 16
STOP = 23  # mid-epoch, mid-cycle of the EMA (every 2) and of lookahead (every 3, from step 9; reset at 16, 32, 48)
CAPTURED = ["train.compile=default", "train.capture=true"]


class SmallCNN(nn.Module):
    """The runs' model: one conv-BatchNorm block pooled to the 4x4 grid of the synthetic classes' colour
    patterns, then a linear head. It learns those classes (0.4 after the 48 steps here) at 0.9 MFLOP an image
    forward and backward, the smoke config's CNN at 35: the runs here are about the tools, not the model."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(4))
        self.head = nn.Linear(8 * 16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def _small_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 10))


# --------------------------------------------------------------------------- the formulas


def test_ema_follows_its_formula_with_the_warm_up():
    model = _small_model()
    ema = WeightEMA(model, decay=0.95, every=1)
    expected = [p.detach().clone() for p in model.parameters()]
    for n in range(1, 8):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update()
        decay = min(0.95, (1 + n) / (10 + n))
        expected = [decay * e + (1 - decay) * p.detach() for e, p in zip(expected, model.parameters())]
    for mine, theirs in zip(ema.averaged.parameters(), expected):
        assert torch.allclose(mine, theirs, atol=1e-6)
    ema.sync_buffers()
    assert all(torch.equal(a, b) for a, b in zip(ema.averaged.buffers(), model.buffers()))


def test_lookahead_moves_the_slow_weights_and_restarts_from_them():
    model = _small_model()
    look = Lookahead(model, k=2, alpha=0.5)
    slow = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    look.update()
    for p, s in zip(model.parameters(), slow):
        assert torch.allclose(p, s + 0.5)  # half way from the slow weights to the trained ones, and from there on
    assert all(torch.equal(p, s) for p, s in zip(model.parameters(), look.slow))


def test_lookahead_power_moves_alpha_from_one_to_lookahead_alpha_as_the_records_cube():
    """train.lookahead_power=3 with lookahead_alpha = 1 - 0.95**5: the slow weights move 1 - 0.95**5 (t/T)**3 of the
    way at step t (the records' decay 0.95**5 (t/T)**3 of the slow weights kept), against a hand computation."""
    model = _small_model()
    look = Lookahead(model, k=2, alpha=1 - 0.95 ** 5, power=3, total_steps=10)
    assert look.alpha_at(0) == 1.0 and look.alpha_at(10) == pytest.approx(1 - 0.95 ** 5)
    assert look.alpha_at(4) == pytest.approx(1 - 0.95 ** 5 * 0.4 ** 3) and look.alpha_at(25) == look.alpha_at(10)
    slow = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    trained = [p.detach().clone() for p in model.parameters()]
    look.update(4)
    kept = 0.95 ** 5 * 0.4 ** 3
    for p, s, t in zip(model.parameters(), slow, trained):
        assert torch.allclose(p, kept * s + (1 - kept) * t, atol=1e-6)  # the trained weights restart from the slow
    assert Lookahead(model, k=2, alpha=0.3).alpha_at(7) == 0.3  # power 0: constant, as before


def test_tta_views_and_the_mean_of_their_logits():
    images = torch.randn(5, 3, 8, 8)
    flip, shift = tta_views(images, "flip"), tta_views(images, "flip_shift")
    assert len(tta_views(images, "none")) == 1 and len(flip) == 2 and len(shift) == 6
    assert torch.equal(flip[1], images.flip(-1))
    assert torch.equal(shift[2][..., 1:, 1:], images[..., :-1, :-1])  # moved down-right by one pixel
    assert torch.equal(shift[3][..., :-1, :-1], images[..., 1:, 1:])  # moved up-left
    # the mirrors of the shifted views (the records' pairs), not the mirror shifted the same way
    assert torch.equal(shift[4], shift[2].flip(-1)) and torch.equal(shift[5], shift[3].flip(-1))
    assert {tuple(v.flip(-1).flatten().tolist()) for v in shift} == {tuple(v.flatten().tolist()) for v in shift}
    model = _small_model().eval()
    with torch.no_grad():
        expected = (model(images) + model(images.flip(-1))) / 2
        assert torch.allclose(tta_logits(model, images, "flip"), expected, atol=1e-6)
        # flip_shift: the published weights, the unshifted pair half of the total, the four shifted views the rest
        logits = [model(view) for view in shift]
        expected = (logits[0] + logits[1]) / 4 + sum(logits[2:]) / 8
        assert torch.allclose(tta_logits(model, images, "flip_shift"), expected, atol=1e-6)


def test_an_input_that_is_its_own_mirror_gets_the_same_logits_with_and_without_flips():
    """A mirror-symmetric image: its mirror view is itself, so flip TTA gives the model's own logits."""
    half = torch.randn(3, 3, 8, 4)
    images = torch.cat([half, half.flip(-1)], dim=-1)
    assert torch.equal(images, images.flip(-1))
    model = _small_model().eval()
    with torch.no_grad():
        assert torch.allclose(tta_logits(model, images, "flip"), model(images), atol=1e-6)


def _batches(sizes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 3, 8, 8, generator=gen), torch.randint(0, 10, (n,), generator=gen)) for n in sizes]


def test_compiled_evaluation_pads_the_last_batch_and_counts_every_image_once():
    """One batch shape for the compiled pass: the last batch (7 images) is padded to 16 with ignored
    labels; the totals equal the eager pass's, and a second pass compiles nothing new."""
    from torch._dynamo.utils import counters

    import fasttrain.dist as dist

    dist.setup("cpu")
    try:
        model = _small_model()
        loader = _batches([16, 16, 7])
        precision = build_precision("fp32", CPU, tf32=False)
        eager = validate(model, loader, precision, tta="flip")
        evaluator = Evaluator(model, precision, "flip", compiled=True, pad_to=16)
        compiled = evaluator(loader)
        graphs = counters["stats"]["unique_graphs"]
        again = evaluator(loader)
    finally:
        dist.teardown()
    assert (compiled.correct, compiled.total) == (eager.correct, eager.total) == (again.correct, 39)
    assert compiled.loss == pytest.approx(eager.loss, rel=1e-5)
    assert counters["stats"]["unique_graphs"] == graphs and again.compile_seconds == 0.0


class RecordedEvaluator(Evaluator):
    """The CUDA path's control flow on the CPU (as test_step.RecordedStep): warm-up batches, one recording
    of the padded batch, replays with each batch copied into the static inputs."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.capture, self.recorded = True, 0

    def _side_stream(self):
        import contextlib

        return contextlib.nullcontext()

    def _record(self, body):
        self.recorded += 1
        return body


def test_the_cuda_paths_warm_up_record_and_replay_give_the_eager_totals():
    import fasttrain.dist as dist

    dist.setup("cpu")
    try:
        model = _small_model()
        loader = _batches([16, 16, 16, 16, 5])
        precision = build_precision("fp32", CPU, tf32=False)
        eager = validate(model, loader, precision)
        evaluator = RecordedEvaluator(model, precision, compiled=True, pad_to=16)
        first, second = evaluator(loader), evaluator(loader)
    finally:
        dist.teardown()
    assert evaluator.recorded == 1  # recorded once, at the third batch, replayed ever after
    for result in (first, second):
        assert (result.correct, result.total) == (eager.correct, eager.total)
        assert result.loss == pytest.approx(eager.loss, rel=1e-5)


# --------------------------------------------------------------------------- real runs


def fit(*overrides: str):
    """A run in this process (the runs here are about the tools, not the process): the command line's
    path through fasttrain.fit, which puts back what the run changed (signal handlers, compile settings)."""
    import fasttrain

    return fasttrain.fit(str(REPO / "configs" / "smoke.yaml"), overrides=[*RUN, *overrides])


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """Uninterrupted eager and captured runs with every tool on (shared by the tests below)."""
    root = tmp_path_factory.mktemp("tools")
    for kind, extra in (("eager", []), ("captured", CAPTURED)):
        assert fit(*extra, f"output.dir={root / kind}").exit_code == 0
    return root


def _checkpoint(run_dir, name="last.pt"):
    return torch.load(run_dir / "checkpoints" / name, map_location="cpu", weights_only=False)


@pytest.mark.slow
def test_every_tool_trains_in_the_eager_and_the_captured_step(straight):
    eager, captured = read_jsonl(straight / "eager" / "metrics.jsonl"), read_jsonl(straight / "captured" / "metrics.jsonl")
    assert [r["train_loss"] for r in captured] == pytest.approx([r["train_loss"] for r in eager], rel=1e-3)
    assert eager[-1]["val_acc"] > 0.2 and captured[-1]["val_acc"] > 0.2  # well above chance (0.1)
    for run in ("eager", "captured"):
        ckpt = _checkpoint(straight / run)
        steps = ckpt["global_step"]
        assert steps == STEPS and ckpt["ema"]["updates"] == steps // 2  # train.ema_every=2
        trained, averaged = ckpt["model"], ckpt["ema"]["weights"]
        assert averaged.keys() <= trained.keys() and any(not torch.equal(averaged[k], trained[k]) for k in averaged)
        # lookahead's slow copy: the parameters and BatchNorm's running statistics (not its integer step count)
        statistics = {k for k in trained if k.endswith(("running_mean", "running_var"))}
        assert statistics and ckpt["lookahead"]["weights"].keys() == averaged.keys() | statistics
        # the last step was a lookahead sync (STEPS % 3 == 0): the trained weights are the slow ones
        assert all(torch.equal(ckpt["lookahead"]["weights"][k], trained[k]) for k in averaged)


@pytest.mark.parametrize("kind", ["eager", "captured"])
def test_a_run_with_the_averages_stopped_and_resumed_ends_bit_for_bit_equal(straight, tmp_path, kind):
    extra = [] if kind == "eager" else CAPTURED
    out = tmp_path / "r"
    first = fit(*extra, f"output.dir={out}", f"train.stop_after_steps={STOP}")
    assert (first.stopped_by, first.global_step) == ("stop_after_steps", STOP)
    assert fit(*extra, f"output.dir={out}", "resume=auto").global_step == STEPS
    a, b = _checkpoint(straight / kind), _checkpoint(out)
    for key in ("model",):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    for key in ("ema", "lookahead"):
        assert all(torch.equal(a[key]["weights"][k], b[key]["weights"][k]) for k in a[key]["weights"]), key
    assert a["ema"]["updates"] == b["ema"]["updates"]
    assert read_jsonl(straight / kind / "metrics.jsonl")[-1]["val_acc"] == read_jsonl(out / "metrics.jsonl")[-1]["val_acc"]


def test_eval_reports_the_ema_weights_with_tta_as_validation_did(straight, capsys):
    import json

    from fasttrain import cli

    ckpt = straight / "eager" / "checkpoints" / "last.pt"
    assert cli.main(["eval", str(ckpt), MODEL, "--json"]) == 0  # eval imports a model only when named
    found = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (found["weights"], found["tta"]) == ("ema", "flip")
    assert found["val_acc"] == found["recorded_val_acc"]
    assert cli.main(["eval", str(ckpt), MODEL, "--json", "train.ema_decay=0", "train.tta=none"]) == 0
    trained = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert trained["weights"] == "trained" and trained["tta"] == "none"
    assert (trained["val_acc"], trained["val_loss"]) != (found["val_acc"], found["val_loss"])  # other weights


# two ranks keep the averages of one process with the global batch: test_distributed.py's
# test_two_ranks_of_batch_b_train_like_one_process_of_batch_2b (with every tool on)


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_decoupled_decay_takes_the_same_fraction_off_every_group_whatever_its_learning_rate(name):
    """optim.decoupled_decay (the speed records' form): a step with zero gradients moves each weight by
    -weight_decay x (lr / peak) x weight, in the weights' group and in the 1-d group at 64x the learning rate
    alike (a 64x BatchNorm-bias learning rate, not a 64x decay). Without it, the 1-d group decays 64x as fast."""
    from fasttrain.config import OptimConfig, SchedConfig
    from fasttrain.train.optim import build_optimizer, peak_lr

    lr, peak, decay = 0.002, 0.004, 0.01  # optim.lr now, the schedule's peak: the decay at half its peak
    for decoupled, expected in ((True, {"weights": decay * lr / peak, "1-d": decay * lr / peak}),
                                (False, {"weights": decay * lr, "1-d": decay * lr * 64})):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
        with torch.no_grad():
            model[1].weight.uniform_(0.5, 1.5)  # BatchNorm's ones would hide a wrong group
        cfg = OptimConfig(name=name, lr=lr, momentum=0.0, weight_decay=decay, bn_bias_lr_scale=64.0,
                          decoupled_decay=decoupled)
        optimizer = build_optimizer(cfg, model, CPU, peak=peak)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        optimizer.step()
        for n, p in model.named_parameters():
            fraction = expected["weights" if p.ndim > 1 else "1-d"]
            torch.testing.assert_close(p.detach(), before[n] * (1 - fraction), rtol=1e-6, atol=0), (decoupled, n)
    # the peak it divides by: the schedule's for onecycle and triangle, else optim.lr
    optim = OptimConfig(lr=0.5)
    assert peak_lr(optim, SchedConfig(name="triangle", max_lr=2.0)) == 2.0
    assert peak_lr(optim, SchedConfig(name="onecycle", max_lr=3.0)) == 3.0
    assert peak_lr(optim, SchedConfig(name="cosine")) == 0.5


def test_decoupled_decay_is_refused_where_the_decay_is_no_step_on_the_weights():
    from fasttrain.config import load_config
    from fasttrain.errors import ConfigError

    with pytest.raises(ConfigError, match=r"optim.decoupled_decay=True is not valid: expected false with optim.name=adam "):
        load_config(None, ["optim.name=adam", "optim.decoupled_decay=true"])


def test_lookahead_ending_on_the_slow_weights_drops_the_steps_since_the_last_sync():
    """train.lookahead_end=slow: at the last step (7 of 7, k=5) the trained weights become the slow weights of
    the step-5 sync, by hand; with `fast` they keep steps 6 and 7. Refused without lookahead."""
    from fasttrain.config import load_config
    from fasttrain.errors import ConfigError
    from fasttrain.train.averaging import build_averages

    for end_on_slow in (True, False):
        weight = nn.Parameter(torch.zeros(3))
        model = nn.Module()
        model.weight = weight
        train = load_config(None, ["train.lookahead_k=5", "train.lookahead_alpha=0.5", "train.epochs=1",
                                   f"train.lookahead_end={'slow' if end_on_slow else 'fast'}"]).train
        averages = build_averages(model, train, steps_per_epoch=7)
        slow = torch.zeros(3)
        for step in range(1, 8):
            with torch.no_grad():
                weight.add_(1.0)  # what an optimizer step would do
            averages.after_step(step)
            if step == 5:  # the sync: slow += 0.5 (fast - slow), fast = slow
                slow = slow + 0.5 * (torch.full((3,), 5.0) - slow)
                assert torch.equal(weight.detach(), slow)
        expected = slow if end_on_slow else slow + 2.0
        assert torch.equal(weight.detach(), expected), (end_on_slow, weight)
    with pytest.raises(ConfigError, match="train.lookahead_end='slow' is not valid: expected fast when "
                                          "train.lookahead_k=0"):
        load_config(None, ["train.lookahead_end=slow"])


class _WeightAndStatistics(nn.Module):
    """One weight, a floating-point running statistic and an integer count: what lookahead copies, and not."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(2))
        self.register_buffer("running_mean", torch.zeros(2))
        self.register_buffer("batches", torch.zeros((), dtype=torch.long))


@pytest.mark.parametrize("end", ["slow", "epoch"])
def test_lookahead_starts_after_its_epochs_and_ends_each_epoch_on_the_slow_weights(end):
    """The records' loop (train.lookahead_start=1 with 8 steps an epoch, k=5, alpha 0.5, 23 steps): no sync up to
    step 8; the sync at step 10 takes the slow weights as a copy; step 15 moves them half way; `epoch` resets the
    trained weights to them at the epoch's end (step 16) and at the last step (23), `slow` at the last step only.
    Running statistics move with the weights; the integer count is left alone. By hand, each step adding 1 to
    the weight and 10 to the statistic."""
    from fasttrain.config import load_config

    train = load_config(None, ["train.lookahead_k=5", "train.lookahead_alpha=0.5", "train.lookahead_start=1",
                               f"train.lookahead_end={end}", "train.epochs=2.875"]).train
    model = _WeightAndStatistics()
    look = Lookahead(model, train.lookahead_k, train.lookahead_alpha, total_steps=train.total_steps(8), end=end,
                     start_step=train.lookahead_start_step(8), steps_per_epoch=8)
    assert (look.total_steps, look.start_step, look.first_sync) == (23, 8, 10)
    seen = {}
    for step in range(1, 24):
        with torch.no_grad():
            model.weight.add_(1.0)
            model.running_mean.add_(10.0)
            model.batches.add_(1)
        look.after_step(step)
        seen[step] = model.weight[0].item()
    assert [seen[s] for s in (8, 9, 10)] == [8.0, 9.0, 10.0]  # nothing before the start, and the copy at 10
    assert seen[15] == 12.5  # 10 + 0.5 x (15 - 10)
    if end == "epoch":
        assert seen[16] == 12.5  # 13.5 reset to the slow weights at the epoch's end
        assert seen[20] == 14.5  # slow 12.5, trained 16.5: half way
        assert seen[23] == 14.5  # 17.5 reset at the last step
    else:
        assert seen[16] == 13.5
        assert seen[20] == 15.0  # slow 12.5, trained 17.5
        assert seen[23] == 15.0  # 18 reset at the last step
    assert model.running_mean[0].item() == 10 * seen[23] and model.batches.item() == 23
    assert look.names == ["weight", "running_mean"] and look.slow_buffers == [look.slow[1]]


def test_lookahead_start_needs_lookahead_and_a_run_shorter_than_it_says_so():
    from fasttrain.config import load_config
    from fasttrain.errors import ConfigError
    from fasttrain.train.build import _accuracy_tools

    with pytest.raises(ConfigError, match=r"train.lookahead_start=3.0 is not valid: expected 0 when "
                                          r"train.lookahead_k=0 \(there is no lookahead to start\)"):
        load_config(None, ["train.lookahead_start=3"])
    # the speed-run recipe shortened for a quick look: it runs, and its log says lookahead never starts
    short = load_config(str(REPO / "configs" / "cifar10_94.yaml"), ["train.epochs=1.5"])
    assert "lookahead (k 5, alpha 0.2262, from epoch 3: never in this run of 1.5 epochs)" in _accuracy_tools(short)
    assert "lookahead (k 5, alpha 0.2262, from epoch 3)" in _accuracy_tools(load_config(str(REPO / "configs" / "cifar10_94.yaml")))


def test_bn_bias_scope_norm_scales_the_normalization_layers_parameters_only():
    """optim.bn_bias_scope=norm (the speed records' groups): BatchNorm's weight and bias take bn_bias_lr_scale and
    skip decay; a convolution's bias trains as the weights do. The default (1d) puts every 1-d parameter there."""
    from fasttrain.config import OptimConfig
    from fasttrain.train.optim import param_groups

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2, bias=False))
    conv_bias, bn_weight, bn_bias = model[0].bias, model[1].weight, model[1].bias
    for scope, special in (("norm", {id(bn_weight), id(bn_bias)}), ("1d", {id(conv_bias), id(bn_weight), id(bn_bias)})):
        groups = param_groups(OptimConfig(name="sgd", lr=0.1, weight_decay=0.01, bn_bias_lr_scale=64.0,
                                          decay_bn_bias=False, bn_bias_scope=scope), model)
        assert [(g["lr_scale"], g["weight_decay"]) for g in groups] == [(1.0, 0.01), (64.0, 0.0)]
        assert {id(p) for p in groups[1]["params"]} == special, scope
        assert len(groups[0]["params"]) + len(groups[1]["params"]) == 5
