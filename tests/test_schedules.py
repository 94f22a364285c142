"""Each learning-rate schedule over a real (tiny) run, read back from steps.jsonl.

4 epochs x 4 steps, logging every step: the lr each optimizer step used.
"""

import math

import pytest

from conftest import read_jsonl
from fasttrain.config import load_config
from fasttrain.train.lifecycle import train

EPOCHS, STEPS = 4, 4
BASE = ["data.dataset=synthetic", "data.train_size=64", "data.val_size=32", "data.num_workers=0",
        "model.name=SimpleModel", "train.batch_size=16", f"train.epochs={EPOCHS}", "train.log_every=1",
        "train.device=cpu", "optim.name=sgd", "optim.lr=0.1", "optim.momentum=0.0", "optim.weight_decay=0.0",
        "output.save_checkpoints=false"]


def lr_curve(tmp_path, *overrides):
    """Per epoch, the learning rates of its optimizer steps."""
    cfg = load_config(None, BASE + [f"output.dir={tmp_path}", *overrides])
    train(cfg)
    steps = read_jsonl(tmp_path / "steps.jsonl")
    assert [s["step"] for s in steps] == list(range(1, EPOCHS * STEPS + 1))
    return [[s["lr"] for s in steps if s["epoch"] == e] for e in range(1, EPOCHS + 1)]


def test_onecycle_changes_every_batch_warming_up_then_annealing(tmp_path):
    curve = lr_curve(tmp_path, "sched.name=onecycle", "sched.max_lr=1.0", "sched.pct_start=0.25",
                     "sched.div_factor=10", "sched.final_div_factor=100")
    flat = [lr for epoch in curve for lr in epoch]
    assert flat[0] == pytest.approx(0.1)  # max_lr / div_factor
    peak = flat.index(max(flat))
    assert flat[peak] == pytest.approx(1.0) and peak == round(0.25 * 16) - 1
    assert all(a < b for a, b in zip(flat[:peak], flat[1:peak + 1]))  # rises every step
    assert all(a > b for a, b in zip(flat[peak:], flat[peak + 1:]))  # then falls every step
    assert flat[-1] == pytest.approx(0.1 / 100)  # initial / final_div_factor at the last step
    assert len(set(curve[1])) == STEPS  # within an epoch: a new lr every batch


def test_step_decays_once_per_epoch(tmp_path):
    curve = lr_curve(tmp_path, "sched.name=step", "sched.step_size=2", "sched.gamma=0.5")
    assert [set(e) for e in curve] == [{0.1}, {0.1}, {0.05}, {0.05}]


def test_exponential_decays_once_per_epoch(tmp_path):
    curve = lr_curve(tmp_path, "sched.name=exponential", "sched.gamma=0.5")
    for epoch, lrs in enumerate(curve):
        assert lrs == pytest.approx([0.1 * 0.5**epoch] * STEPS)


def test_cosine_follows_the_half_cosine_over_epochs(tmp_path):
    curve = lr_curve(tmp_path, "sched.name=cosine", "sched.eta_min=0.01")
    for epoch, lrs in enumerate(curve):
        expected = 0.01 + (0.1 - 0.01) * (1 + math.cos(math.pi * epoch / EPOCHS)) / 2
        assert lrs == pytest.approx([expected] * STEPS)


def test_plateau_reduces_when_the_validation_loss_stops_improving(tmp_path):
    # lr so small that the validation loss cannot improve by the 1e-4 relative threshold
    curve = lr_curve(tmp_path, "optim.lr=1e-6", "sched.name=plateau", "sched.plateau_patience=0",
                     "sched.plateau_factor=0.5")
    assert [e[0] for e in curve] == pytest.approx([1e-6, 1e-6, 5e-7, 2.5e-7])
    assert all(len(set(e)) == 1 for e in curve)


def test_plateau_keeps_the_lr_while_the_validation_loss_improves(tmp_path):
    curve = lr_curve(tmp_path, "optim.lr=0.05", "sched.name=plateau", "sched.plateau_patience=0")
    metrics = read_jsonl(tmp_path / "metrics.jsonl")
    losses = [m["val_loss"] for m in metrics]
    assert all(b < a for a, b in zip(losses, losses[1:])), losses  # this tiny run improves every epoch
    assert {lr for e in curve for lr in e} == {0.05}


def test_none_keeps_the_lr(tmp_path):
    assert {lr for e in lr_curve(tmp_path, "sched.name=none") for lr in e} == {0.1}


def test_triangle_rises_from_a_fifth_of_the_peak_then_falls_to_the_end_factor_at_the_last_step(tmp_path):
    """The speed records' schedule against a hand computation: 16 steps (index 0..15), the peak at
    0.23 x 15 = 3.45, start 0.2 and end 0.07 of sched.max_lr; BatchNorm/bias parameters at their own scale."""
    curve = sum(lr_curve(tmp_path, "sched.name=triangle", "sched.max_lr=1.0", "sched.pct_start=0.23"), [])
    top = 0.23 * 15
    hand = [0.2 + 0.8 * t / top if t <= top else 1 - 0.93 * (t - top) / (15 - top) for t in range(16)]
    assert curve == pytest.approx(hand, rel=1e-12)
    assert curve[0] == pytest.approx(0.2) and curve[-1] == pytest.approx(0.07) and max(curve) < 1.0


def test_triangle_resumed_mid_run_or_on_more_steps_per_epoch_continues_at_the_same_point():
    import torch

    from fasttrain.train.optim import Triangle

    def fresh(total):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        return optimizer, Triangle(optimizer, [2.0], total, 0.25, 0.2, 0.07)

    optimizer, straight = fresh(20)
    lrs = []
    for _ in range(19):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        straight.step()
    optimizer, first = fresh(20)
    for _ in range(7):
        optimizer.step()
        first.step()
    optimizer, resumed = fresh(20)
    resumed.load_state_dict(first.state_dict())
    for group, lr in zip(optimizer.param_groups, resumed.get_last_lr()):
        group["lr"] = lr
    rest = []
    for _ in range(12):
        rest.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        resumed.step()
    assert rest == lrs[7:]
    # twice the steps per epoch (half the ranks): the closed form at the same fraction of training
    resumed.total_steps, resumed.last_epoch = 40, 14
    assert resumed.get_lr()[0] == pytest.approx(2.0 * resumed.factor(14))
    assert resumed.factor(39) == pytest.approx(0.07)


class _BiasForFirstEpochs(__import__("torch").nn.Module):
    """A linear layer whose bias trains for the first 1.5 epochs only (the hook SpeedNet's whitening bias uses)."""
    freeze_after_epochs = {"layer.bias": 1.5}

    def __init__(self):
        super().__init__()
        import torch

        self.layer = torch.nn.Linear(4, 3)


@pytest.mark.parametrize("sched", [["sched.name=triangle", "sched.max_lr=0.1"],
                                   ["sched.name=cosine", "sched.eta_min=0.01"]])  # per batch; per epoch with a floor
def test_a_parameter_trained_for_the_first_epochs_only_stays_put_from_then_on_and_after_a_resume(sched):
    """model.freeze_after_epochs: its group's learning rate is held at 0 from step round(1.5 x 4) = 6 on, whatever
    the schedule sets (a per-epoch schedule's floor included), so that parameter, momentum and decay notwithstanding,
    no longer moves while the others do; a schedule put back at a later step (a resume) holds it there too."""
    import torch

    from fasttrain.config import OptimConfig
    from fasttrain.train.optim import FREEZE_KEY, Schedule, build_optimizer

    cfg = load_config(None, sched)
    torch.manual_seed(0)
    model = _BiasForFirstEpochs()
    optimizer = build_optimizer(OptimConfig(name="sgd", lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01,
                                            decay_bn_bias=False), model, peak=0.1)
    assert [FREEZE_KEY in g for g in optimizer.param_groups] == [False, True]  # the weight; the bias, alone
    schedule = Schedule(cfg.sched, optimizer, 3, 4)
    biases, weights = [], []
    for step in range(12):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        optimizer.step()
        schedule.after_batch()
        if step % 4 == 3:
            schedule.after_epoch(1.0)
        biases.append(model.layer.bias.detach().clone())
        weights.append(model.layer.weight.detach().clone())
    moved = [not torch.equal(a, b) for a, b in zip(biases, biases[1:])]
    assert moved == [True] * 5 + [False] * 6  # steps 1-6 move it (the 6th step is the last with lr > 0)
    assert all(not torch.equal(a, b) for a, b in zip(weights, weights[1:]))
    resumed = Schedule(cfg.sched, optimizer, 3, 4)
    optimizer.param_groups[-1]["lr"] = 0.05  # what a rebuilt schedule would set there
    resumed.position(7)
    assert optimizer.param_groups[-1]["lr"] == 0.0


def test_a_freeze_naming_no_parameter_is_refused():
    import torch

    from fasttrain.config import OptimConfig
    from fasttrain.train.optim import build_optimizer

    model = _BiasForFirstEpochs()
    model.freeze_after_epochs = {"layer.bais": 2}
    with pytest.raises(ValueError, match="_BiasForFirstEpochs.freeze_after_epochs names 'layer.bais', which it has no "
                                         "trainable parameter of"):
        build_optimizer(OptimConfig(), model, torch.device("cpu"))


def test_a_fractional_epoch_count_ends_the_last_epoch_early_on_the_schedules_last_step(tmp_path):
    """train.epochs=2.5 with 4 steps per epoch: round(2.5 x 4) = 10 steps, the third epoch cut after 2 of them, and
    validated and recorded as epoch 3; the triangle spans the 10 steps (its last one at end_factor x the peak)."""
    cfg = load_config(None, BASE + [f"output.dir={tmp_path}", "train.epochs=2.5", "sched.name=triangle",
                                    "sched.max_lr=0.1"])
    assert (cfg.train.epoch_count(), cfg.train.total_steps(STEPS), cfg.train.steps_in_epoch(3, STEPS)) == (3, 10, 2)
    train(cfg)
    steps = read_jsonl(tmp_path / "steps.jsonl")
    assert [(s["step"], s["epoch"]) for s in steps] == [(i, (i - 1) // 4 + 1) for i in range(1, 11)]
    assert steps[-1]["lr"] == pytest.approx(0.1 * 0.07)  # the schedule's last step, not one short of it
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1, 2, 3] and records[-1]["val_acc"] is not None


def test_a_run_stopped_in_its_short_last_epoch_resumes_to_the_same_weights(tmp_path):
    """Stopped after step 9 of 10 (inside the cut third epoch of 2.5) and resumed: the weights and the last
    step's lr of the run that went straight through."""
    import torch

    args = BASE + ["train.epochs=2.5", "sched.name=onecycle", "sched.max_lr=0.1", "data.loader=gpu",
                   "output.save_checkpoints=true"]
    train(load_config(None, args + [f"output.dir={tmp_path / 'straight'}"]))
    stopped = train(load_config(None, args + [f"output.dir={tmp_path / 'resumed'}", "train.stop_after_steps=9"]))
    assert stopped.global_step == 9 and stopped.epoch == 2
    train(load_config(None, args + [f"output.dir={tmp_path / 'resumed'}", "resume=auto"]))
    straight, resumed = (torch.load(tmp_path / name / "checkpoints" / "last.pt", map_location="cpu",
                                    weights_only=True)["model"] for name in ("straight", "resumed"))
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    lrs = [read_jsonl(tmp_path / name / "steps.jsonl")[-1]["lr"] for name in ("straight", "resumed")]
    assert lrs[0] == lrs[1] and [r["epoch"] for r in read_jsonl(tmp_path / "resumed" / "metrics.jsonl")] == [1, 2, 3]
