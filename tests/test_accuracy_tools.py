"""Accuracy per step (issue 21): label smoothing, an EMA of the weights, lookahead, test-time augmentation,
SGD with Nesterov and BatchNorm/bias parameter groups. Each is checked against its formula, then in real
runs: the eager and the captured step, stop + resume bit for bit with the averages on, two ranks like one
process with the global batch, and `fasttrain eval` reporting what validation reported."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import read_jsonl, run_fasttrain, run_torchrun
from fasttrain.train.averaging import Lookahead, WeightEMA
from fasttrain.train.precision import build_precision
from fasttrain.train.validation import Evaluator, tta_logits, tta_views, validate

CPU = torch.device("cpu")
# every tool at once, on a small CNN (BatchNorm: the EMA copies its buffers) and synthetic data
TOOLS = ["train.label_smoothing=0.1", "train.ema_decay=0.9", "train.ema_every=2", "train.lookahead_k=3",
         "train.lookahead_alpha=0.5", "train.tta=flip"]
RUN = ["--config", "configs/smoke.yaml", "model.name=CNN", "data.train_size=512", "data.val_size=96",
       "train.batch_size=32", "train.epochs=3", "train.log_every=4", "data.loader=gpu", *TOOLS]


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


def test_tta_views_and_the_mean_of_their_logits():
    images = torch.randn(5, 3, 8, 8)
    flip, shift = tta_views(images, "flip"), tta_views(images, "flip_shift")
    assert len(tta_views(images, "none")) == 1 and len(flip) == 2 and len(shift) == 6
    assert torch.equal(flip[1], images.flip(-1))
    assert torch.equal(shift[2][..., 1:, 1:], images[..., :-1, :-1])  # moved down-right by one pixel
    assert torch.equal(shift[3][..., :-1, :-1], images[..., 1:, 1:])  # moved up-left
    model = _small_model().eval()
    with torch.no_grad():
        expected = (model(images) + model(images.flip(-1))) / 2
        assert torch.allclose(tta_logits(model, images, "flip"), expected, atol=1e-6)


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


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """Uninterrupted eager and captured runs with every tool on (shared by the tests below)."""
    root = tmp_path_factory.mktemp("tools")
    for kind, extra in (("eager", []), ("captured", ["train.compile=default", "train.capture=true"])):
        result = run_fasttrain(*RUN, *extra, f"output.dir={root / kind}")
        assert result.returncode == 0, result.stderr[-3000:]
    return root


def _checkpoint(run_dir, name="last.pt"):
    return torch.load(run_dir / "checkpoints" / name, map_location="cpu", weights_only=False)


def test_every_tool_trains_in_the_eager_and_the_captured_step(straight):
    eager, captured = read_jsonl(straight / "eager" / "metrics.jsonl"), read_jsonl(straight / "captured" / "metrics.jsonl")
    assert [r["train_loss"] for r in captured] == pytest.approx([r["train_loss"] for r in eager], rel=1e-3)
    assert eager[-1]["val_acc"] > 0.2 and captured[-1]["val_acc"] > 0.2  # 48 steps: well above chance (0.1)
    for run in ("eager", "captured"):
        ckpt = _checkpoint(straight / run)
        steps = ckpt["global_step"]
        assert ckpt["ema"]["updates"] == steps // 2  # train.ema_every=2
        trained, averaged = ckpt["model"], ckpt["ema"]["weights"]
        assert averaged.keys() <= trained.keys() and any(not torch.equal(averaged[k], trained[k]) for k in averaged)
        assert ckpt["lookahead"]["weights"].keys() == averaged.keys()
        if steps % 3 == 0:  # the last step was a lookahead sync: the trained weights are the slow ones
            assert all(torch.equal(ckpt["lookahead"]["weights"][k], trained[k]) for k in averaged)


@pytest.mark.parametrize("kind", ["eager", "captured"])
def test_a_run_with_the_averages_stopped_and_resumed_ends_bit_for_bit_equal(straight, tmp_path, kind):
    extra = [] if kind == "eager" else ["train.compile=default", "train.capture=true"]
    out = tmp_path / "r"
    first = run_fasttrain(*RUN, *extra, f"output.dir={out}", "train.stop_after_steps=23")  # mid-epoch, mid-cycle
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_fasttrain(*RUN, *extra, f"output.dir={out}", "resume=auto")
    assert second.returncode == 0, second.stderr[-3000:]
    a, b = _checkpoint(straight / kind), _checkpoint(out)
    for key in ("model",):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    for key in ("ema", "lookahead"):
        assert all(torch.equal(a[key]["weights"][k], b[key]["weights"][k]) for k in a[key]["weights"]), key
    assert a["ema"]["updates"] == b["ema"]["updates"]
    assert read_jsonl(straight / kind / "metrics.jsonl")[-1]["val_acc"] == read_jsonl(out / "metrics.jsonl")[-1]["val_acc"]


def test_eval_reports_the_ema_weights_with_tta_as_validation_did(straight):
    import json

    ckpt = straight / "eager" / "checkpoints" / "last.pt"
    result = run_fasttrain("eval", str(ckpt), "--json", module="fasttrain.cli")
    assert result.returncode == 0, result.stderr[-2000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert (found["weights"], found["tta"]) == ("ema", "flip")
    assert found["val_acc"] == found["recorded_val_acc"]
    trained = run_fasttrain("eval", str(ckpt), "--json", "train.ema_decay=0", "train.tta=none", module="fasttrain.cli")
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert json.loads(trained.stdout.strip().splitlines()[-1])["weights"] == "trained"


def test_two_ranks_keep_the_averages_of_one_process_with_the_global_batch(tmp_path):
    """The averages need no communication: every rank holds the same parameters after each step. Two
    gloo ranks x 16 against one process x 32: the same EMA and slow weights (to all-reduce rounding). An
    MLP without dropout: with BatchNorm, 2 x 16 normalizes other batches than 1 x 32."""
    args = [arg for arg in RUN if not arg.startswith(("train.batch_size", "model.name"))]
    args += ["model.name=MLP", "model.hidden_sizes=[64]", "model.dropout=0.0", "train.epochs=2"]
    two = run_torchrun(2, *args, "train.batch_size=16", f"output.dir={tmp_path / 'two'}")
    assert two.returncode == 0, two.stderr[-3000:]
    one = run_fasttrain(*args, "train.batch_size=32", f"output.dir={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = _checkpoint(tmp_path / "two"), _checkpoint(tmp_path / "one")
    for key in ("ema", "lookahead"):
        for name, value in a[key]["weights"].items():
            assert torch.allclose(value, b[key]["weights"][name], rtol=1e-4, atol=1e-5), (key, name)
