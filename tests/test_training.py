"""Training end to end, as a user runs it: exit codes, files written, accuracy, reproducibility."""

import csv
import io
import json
import signal
import sys

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import REPO, TINY, read_jsonl, run_fasttrain, run_in_process

from fasttrain.config import load_config
from fasttrain.errors import UserError
from fasttrain.observe.progress import Progress
from fasttrain.train.session import EPOCH_COLUMNS
from fasttrain.train.lifecycle import train

SMOKE = str(REPO / "configs" / "smoke.yaml")
EPOCH_FIELDS = {"epoch", "train_loss", "val_loss", "val_acc", "lr", "images_per_sec"}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """One real `python -m fasttrain.run --config configs/smoke.yaml` shared by the tests below."""
    run_dir = tmp_path_factory.mktemp("smoke") / "run"
    result = run_fasttrain("--config", "configs/smoke.yaml", f"output.dir={run_dir}")
    assert result.returncode == 0, result.stderr
    return run_dir, result


@pytest.mark.slow
def test_smoke_run_learns_well_above_chance(smoke_run):
    run_dir, _ = smoke_run
    history = read_jsonl(run_dir / "metrics.jsonl")
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert all(EPOCH_FIELDS <= set(h) for h in history)
    assert history[-1]["val_acc"] > 0.5  # 10 classes: chance is 0.1
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert all(0.0 <= h["val_acc"] <= 1.0 and h["images_per_sec"] > 0 for h in history)
    assert all(h["val_total"] == 512 for h in history)


def test_smoke_run_writes_config_checkpoints_and_logs(smoke_run):
    run_dir, result = smoke_run
    for name in ("config.yaml", "metrics.jsonl", "steps.jsonl", "train.log", "checkpoints/best.pt", "checkpoints/last.pt"):
        assert (run_dir / name).is_file(), name
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["train"]["epochs"] == 3 and saved["output"]["dir"] == str(run_dir)
    assert load_config(str(run_dir / "config.yaml")).model.name == "CNN"  # the resolved config reloads as is
    last = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)
    assert last["epoch"] == 3 and set(last) >= {"model", "optimizer", "scheduler", "config", "history"}
    assert last["config"] == saved
    history = read_jsonl(run_dir / "metrics.jsonl")
    best = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=False)
    assert best["val_acc"] == max(h["val_acc"] for h in history)
    assert json.loads((run_dir / "env.json").read_text())["model"] == {"name": "CNN", "parameters": 545_290,
                                                                       "trainable": 545_290}
    assert sum(line.startswith("epoch ") for line in result.stdout.splitlines()) == 3
    assert "done: best val_acc" in result.stdout


def test_eval_reproduces_the_accuracy_recorded_at_training_time(smoke_run, capsys):
    run_dir, _ = smoke_run
    result = run_in_process(capsys, "eval", str(run_dir / "checkpoints" / "best.pt"), "--json", module="fasttrain.cli")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["total"] == 512
    assert out["val_acc"] == out["recorded_val_acc"]


def test_refuses_to_overwrite_an_earlier_run(smoke_run, capsys):
    run_dir, _ = smoke_run
    before = (run_dir / "checkpoints" / "best.pt").read_bytes()
    result = run_in_process(capsys, "--config", SMOKE, f"output.dir={run_dir}")
    assert result.returncode == 2 and "output.overwrite=true" in result.stderr
    assert (run_dir / "checkpoints" / "best.pt").read_bytes() == before


def test_corrupt_checkpoint_is_reported_with_exit_2(smoke_run, tmp_path, capsys):
    run_dir, _ = smoke_run
    broken = tmp_path / "broken.pt"
    broken.write_bytes((run_dir / "checkpoints" / "last.pt").read_bytes()[:1000])
    result = run_in_process(capsys, "eval", str(broken), module="fasttrain.cli")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "broken.pt is truncated or corrupt" in result.stderr


def test_checkpoint_of_another_model_names_the_shapes_that_differ(smoke_run, capsys):
    run_dir, _ = smoke_run
    result = run_in_process(capsys, "eval", str(run_dir / "checkpoints" / "best.pt"), "model.name=CIFAR10_CNN",
                           module="fasttrain.cli")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "does not fit this model" in result.stderr and "shapes differ: classifier.1.weight (128, 4096) vs model (256, 2048)" in result.stderr


def test_unwritable_output_dir_exits_2(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    result = run_in_process(capsys, "--config", SMOKE, f"output.dir={blocker / 'run'}")
    assert result.returncode == 2 and "is not writable" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_requested_without_cuda_exits_2(tmp_path, capsys):
    result = run_in_process(capsys, "--config", SMOKE, "train.device=cuda", f"output.dir={tmp_path / 'r'}")
    assert result.returncode == 2 and "CUDA is not available" in result.stderr


# in-process runs (fasttrain.train.lifecycle.train): the CNN on a little synthetic data of 16 px, nothing saved or drawn
SMALL = ["data.dataset=synthetic", "data.image_size=16", "data.train_size=256", "data.val_size=64", "model.name=CNN",
         "train.epochs=2",
         "data.num_workers=0", "train.batch_size=32", "train.device=cpu", "output.save_checkpoints=false",
         "output.plots=false"]


def _losses(tmp_path, name, *overrides):
    state = train(load_config(None, SMALL + [f"output.dir={tmp_path / name}", *overrides]))
    return [(h["train_loss"], h["val_loss"]) for h in state.history]


def test_same_seed_gives_the_same_losses_and_another_seed_does_not(tmp_path):
    first = _losses(tmp_path, "a", "data.num_workers=0", "train.seed=1")
    assert _losses(tmp_path, "b", "data.num_workers=0", "train.seed=1") == first
    assert _losses(tmp_path, "c", "data.num_workers=0", "train.seed=2") != first


def test_worker_processes_do_not_change_the_data(tmp_path):
    # each sample's augmentation is seeded by (seed, epoch, index), not by which worker drew it
    assert _losses(tmp_path, "w0", "data.num_workers=0") == _losses(tmp_path, "w2", "data.num_workers=2")


def _assert_plot(path, min_width=600):
    image = Image.open(path)
    assert image.format == "PNG" and image.size[0] >= min_width and image.size[1] >= 300
    assert np.asarray(image.convert("L")).std() > 10  # curves and text, not a blank canvas


def test_smoke_run_writes_its_environment_and_plots(smoke_run):
    run_dir, result = smoke_run
    env = json.loads((run_dir / "env.json").read_text())
    assert {"fasttrain", "torch", "torchvision", "python", "device", "world_size", "git_commit", "command"} <= set(env)
    assert env["world_size"] == 1 and env["device"] == "cpu"
    _assert_plot(run_dir / "curves.png", min_width=1000)
    _assert_plot(run_dir / "throughput.png")
    assert "curves.png, throughput.png" in result.stdout


def test_a_run_with_plots_off_draws_none_and_fasttrain_plot_draws_them_later(tmp_path, capsys):
    out = tmp_path / "run"
    result = run_in_process(capsys, *TINY, f"output.dir={out}")  # TINY says output.plots=false
    assert result.returncode == 0, result.stderr[-3000:]
    assert not list(out.glob("*.png")) and ".png" not in result.stdout
    drawn = run_in_process(capsys, "plot", str(out), module="fasttrain.cli")
    assert drawn.returncode == 0, drawn.stderr
    _assert_plot(out / "curves.png", min_width=1000)
    _assert_plot(out / "throughput.png")
    assert Image.open(out / "time.png").format == "PNG"  # env.json's time split, drawn too


def test_fasttrain_plot_reports_bad_input_with_exit_2(tmp_path, capsys):
    result = run_in_process(capsys, "plot", str(tmp_path / "nothing"), module="fasttrain.cli")
    assert result.returncode == 2 and "has recorded no log interval (steps.jsonl) or epoch (metrics.jsonl)" in result.stderr
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1, "train_loss": 2.0, "val_lo')
    result = run_in_process(capsys, "plot", str(tmp_path), module="fasttrain.cli")
    assert result.returncode == 2 and "line 1 is not valid JSON" in result.stderr and "Traceback" not in result.stderr


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_is_a_bar_on_a_terminal_and_clean_lines_otherwise(smoke_run):
    _, result = smoke_run  # stdout was a pipe: no bar, one line per log interval
    assert "\r" not in result.stdout and "it/s" not in result.stdout
    assert "epoch 1 step 8/32 (global 8) | loss" in result.stdout and "epoch eta" in result.stdout
    terminal = _Terminal()
    progress = Progress(enabled=True, stream=terminal)
    progress.start_epoch(1, 3, 10)
    for _ in range(10):
        progress.tick()
    progress.interval(10, 1.2345, 0.01, 512.0)
    progress.end_epoch()
    assert "epoch 1/3" in terminal.getvalue() and "/10 [" in terminal.getvalue()  # a tqdm bar was drawn
    quiet = _Terminal()
    silent = Progress(enabled=False, stream=quiet)  # ranks other than 0
    silent.start_epoch(1, 3, 10)
    silent.tick()
    silent.interval(1, 1.0, 0.01, 1.0)
    silent.end_epoch()
    assert quiet.getvalue() == ""


def test_metrics_csv_mirrors_the_json_lines(smoke_run):
    run_dir, _ = smoke_run
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    history = read_jsonl(run_dir / "metrics.jsonl")
    assert len(rows) == len(history) == 3
    assert list(rows[0]) == EPOCH_COLUMNS
    for row, record in zip(rows, history):
        assert float(row["val_acc"]) == record["val_acc"] and int(row["epoch"]) == record["epoch"]
    for record in history:
        assert 0 <= record["data_wait_seconds"] <= record["epoch_seconds"] and record["peak_memory_mb"] > 0
        assert record["mfu"] is None  # a CPU has no known peak: no made-up MFU


def test_time_spent_waiting_for_batches_is_counted_as_data_wait(tmp_path, monkeypatch):
    """A loader that takes 50 ms a batch: each epoch's data_wait_seconds holds at least those waits (8 batches)."""
    import time

    import fasttrain.train.lifecycle as trainer_mod

    class SlowLoader:
        def __init__(self, loader):
            self.loader = loader

        def __getattr__(self, name):
            return getattr(self.loader, name)

        def __iter__(self):
            for batch in self.loader:
                time.sleep(0.05)
                yield batch

    real_build_parts = trainer_mod.build_parts

    def build_parts(*args, **kwargs):
        parts = real_build_parts(*args, **kwargs)
        parts.train_loader = SlowLoader(parts.train_loader)
        return parts

    monkeypatch.setattr(trainer_mod, "build_parts", build_parts)
    state = train(load_config(None, SMALL + [f"output.dir={tmp_path / 'slow'}"]))
    for record in state.history:
        assert 8 * 0.05 <= record["data_wait_seconds"] < record["epoch_seconds"], record


def test_mfu_uses_the_models_flops_and_the_given_peak(tmp_path):
    state = train(load_config(None, SMALL + [f"output.dir={tmp_path / 'mfu'}", "train.peak_tflops=0.5",
                                             "data.image_size=32"]))
    cnn_flops = 35.0e6  # CNN forward + backward per 3x32x32 image (FlopCounterMode)
    for record in state.history:
        assert record["mfu"] == pytest.approx(record["images_per_sec"] * cnn_flops / 0.5e12, rel=0.01)


def test_tensorboard_events_only_when_enabled(tmp_path):
    pytest.importorskip("tensorboard")
    train(load_config(None, SMALL + [f"output.dir={tmp_path / 'on'}", "output.tensorboard=true"]))
    events = list((tmp_path / "on" / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0
    train(load_config(None, SMALL + [f"output.dir={tmp_path / 'off'}"]))
    assert not (tmp_path / "off" / "tensorboard").exists()


def test_tensorboard_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(UserError, match="output.tensorboard=true needs the tensorboard package"):
        train(load_config(None, SMALL + [f"output.dir={tmp_path / 'x'}", "output.tensorboard=true"]))
    # the trainer had installed its signal handlers when the error came: they are put back
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_run_that_fails_after_its_loaders_are_built_closes_them(tmp_path, monkeypatch):
    """A checkpoint of another model fails the restore, after the loaders were built: they are
    closed (worker processes, device memory) before the error reaches the caller."""
    import fasttrain.train.lifecycle as trainer_mod

    first = tmp_path / "first"
    train(load_config(None, SMALL + [f"output.dir={first}", "output.save_checkpoints=true", "train.epochs=1"]))
    closed = []
    real_build_parts = trainer_mod.build_parts

    def build_parts(*args, **kwargs):
        parts = real_build_parts(*args, **kwargs)
        for name in ("train_loader", "val_loader"):
            loader = getattr(parts, name)
            monkeypatch.setattr(loader, "close", lambda name=name, close=loader.close: (closed.append(name), close()))
        return parts

    monkeypatch.setattr(trainer_mod, "build_parts", build_parts)
    with pytest.raises(UserError, match="does not fit this model"):
        train(load_config(None, SMALL + [f"output.dir={tmp_path / 'second'}", "model.name=MLP",
                                        f"resume={first / 'checkpoints' / 'last.pt'}"]))
    assert closed == ["train_loader", "val_loader"]
