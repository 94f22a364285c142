"""Time to accuracy (issue 21): where a run's wall time goes, and the fixed costs cut: the time split adds up
to the wall time measured from outside, a target accuracy ends the run with its time and steps recorded,
validation and checkpoints every N epochs, checkpoints written in the background (a kill during such a
write leaves the previous one loadable; a failed one stops the run with one line), the compile cache's
second run, the decoded dataset kept as .npy files, and start-up without imports the run does not need."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, read_jsonl, run_fasttrain, start
from fasttrain import cli, run
from fasttrain.checkpoint import CheckpointWriter, load_checkpoint
from fasttrain.errors import UserError

SMOKE = ["--config", "configs/smoke.yaml", "data.train_size=512", "data.val_size=128", "train.batch_size=64",
         "train.log_every=4", "data.loader=gpu"]
# the interpreter's own start-up made slow on purpose (a site hook that sleeps before anything is imported, as
# a slow disk or a large site-packages would): a clock counted from the process's start holds it
SLOW_SITE = 1.0


def _env(run_dir: Path) -> dict:
    return json.loads((run_dir / "env.json").read_text())


@pytest.fixture(scope="module")
def every_two(tmp_path_factory):
    """One run: 3 epochs, validation and epoch checkpoints every 2 (and at the last), step checkpoints
    every 5 steps, a plateau schedule; timed from outside the process, whose interpreter start-up takes
    SLOW_SITE seconds more than usual. Shared by the tests below (an MLP: the run's parts are the subject,
    not its model)."""
    root = tmp_path_factory.mktemp("every-two")
    (root / "site").mkdir()
    (root / "site" / "sitecustomize.py").write_text(f"import time\ntime.sleep({SLOW_SITE})\n")
    out = root / "run"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(root / "site")]))
    started = time.monotonic()  # before the process exists: its own clock starts later
    result = subprocess.run([sys.executable, "-m", "fasttrain.run", *SMOKE, "model.name=MLP",
                             "model.hidden_sizes=[64]", "train.epochs=3", "train.eval_every=2", "checkpoint.every_epochs=2", "checkpoint.every_steps=5",
                             "sched.name=plateau", "optim.lr=0.003", f"output.dir={out}"],
                            cwd=REPO, env=env, text=True, capture_output=True, timeout=600)
    outside = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result, outside


@pytest.mark.slow
def test_the_time_split_adds_up_to_the_wall_time_measured_from_outside(every_two):
    out, _, outside = every_two
    split = _env(out)["time_split"]
    parts, startup = split["parts"], split["startup"]
    assert set(parts) == {"startup", "compile", "steps", "eval", "checkpoint", "end"}
    assert sum(parts.values()) == pytest.approx(split["wall_seconds"], abs=1e-3)
    assert sum(startup.values()) == pytest.approx(parts["startup"], abs=1e-3)
    # the process's own count, from its start time in /proc (one clock tick, 10 ms, of resolution): inside the
    # test's clock around the whole command, and holding the interpreter's start-up before any fasttrain import
    assert split["from"] == "process start"
    assert split["wall_seconds"] <= outside + 0.01, (split["wall_seconds"], outside)
    assert startup["imports"] >= SLOW_SITE, startup
    assert all(parts[name] > 0 for name in ("startup", "steps", "eval", "checkpoint", "end"))
    assert parts["compile"] == 0.0  # nothing compiled in an eager run
    assert startup["imports"] > 0 and startup["data"] > 0 and startup["model"] > 0
    last_line = (out / "train.log").read_text().splitlines()[-1]
    assert f"time: {split['wall_seconds']:.1f}s from process start = start-up" in last_line
    assert (out / "time.png").stat().st_size > 0
    (out / "time.png").unlink()
    assert cli.main(["plot", str(out)]) == 0 and (out / "time.png").is_file()  # fasttrain plot draws it again


def test_a_target_accuracy_ends_the_run_with_its_time_and_steps(tmp_path):
    """Through the Python API (the command line's path): the run ends complete (exit code 0) with
    `finished_by`, its time split counted from the fit() call; resumed, it trains nothing more. An MLP
    (about 0.3, 0.6, 0.7 after epochs 1 to 3 here): the target falls in the second epoch."""
    import fasttrain

    overrides = {"data.train_size": 512, "data.val_size": 128, "train.batch_size": 64, "train.epochs": 6,
                 "model.name": "MLP", "model.hidden_sizes": [64], "train.target_acc": 0.5, "data.loader": "gpu",
                 "output.plots": False, "output.dir": str(tmp_path / "run")}
    result = fasttrain.fit(str(REPO / "configs" / "smoke.yaml"), overrides=overrides)
    assert (result.finished_by, result.exit_code, result.stopped_by) == ("target_acc", 0, None)
    history = read_jsonl(result.metrics_path)
    assert history == result.history
    reached = history[-1]
    assert 1 < result.epoch == reached["epoch"] == len(history) < 6
    assert reached["val_acc"] >= 0.5 and all(r["val_acc"] < 0.5 for r in history[:-1])
    assert reached["steps_to_target"] == reached["step"] and reached["time_to_target_seconds"] > 0
    target = result.time_split["target"]
    assert result.time_split["from"] == "the fit() call"
    assert (target["epoch"], target["steps"]) == (reached["epoch"], reached["step"]) and target["seconds"] > 0
    assert _env(result.run_dir)["time_split"]["target"] == target
    assert not (result.run_dir / "preempted.json").exists()
    assert load_checkpoint(result.run_dir / "checkpoints" / "last.pt")["epoch"] == reached["epoch"]
    again = fasttrain.fit(str(REPO / "configs" / "smoke.yaml"), overrides={**overrides, "resume": "auto"})
    assert (again.finished_by, again.exit_code, again.epoch) == ("target_acc", 0, reached["epoch"])
    epochs = [(r["epoch"], r["step"], r["val_acc"]) for r in history]
    assert [(r["epoch"], r["step"], r["val_acc"]) for r in read_jsonl(result.metrics_path)] == epochs  # none again


def test_validation_and_checkpoints_every_n_epochs_and_always_at_the_last(every_two):
    out, result, _ = every_two
    history = read_jsonl(out / "metrics.jsonl")
    assert [r["val_acc"] is not None for r in history] == [False, True, True]
    assert [r["checkpoint_seconds"] is not None for r in history] == [False, True, True]
    assert load_checkpoint(out / "checkpoints" / "last.pt")["epoch"] == 3
    best = load_checkpoint(out / "checkpoints" / "best.pt")
    assert best["epoch"] == max(history[1:], key=lambda r: r["val_acc"])["epoch"] and "val_acc" in best
    assert (out / "curves.png").stat().st_size > 0  # drawn with an epoch without val_acc


# --------------------------------------------------------------------------- background checkpoints


def test_a_background_write_returns_at_once_and_the_next_waits_for_it(tmp_path, monkeypatch):
    import fasttrain.checkpoint.writer as writer_module

    release = threading.Event()
    real = writer_module.serialize

    def held(state):
        release.wait(30)
        return real(state)

    monkeypatch.setattr(writer_module, "serialize", held)
    writer = CheckpointWriter()
    live = torch.zeros(3)
    writer.write({"weights": live}, [tmp_path / "a.pt"], background=True)
    assert writer.pending and not (tmp_path / "a.pt").exists()  # returned while the thread waits to serialize
    live.add_(1.0)  # the job goes on changing its tensors: the write holds the copy taken at the save
    release.set()
    writer.write({"weights": live}, [tmp_path / "b.pt"], background=True)  # waits for a.pt first
    assert (tmp_path / "a.pt").exists()
    writer.wait()
    assert torch.equal(torch.load(tmp_path / "a.pt")["weights"], torch.zeros(3))
    assert torch.equal(torch.load(tmp_path / "b.pt")["weights"], torch.ones(3))


def test_a_failed_background_write_stops_the_run_with_one_line_and_keeps_the_last_good_checkpoint(
        tmp_path, monkeypatch, capsys):
    import fasttrain.checkpoint.writer as writer_module

    calls = []
    real = writer_module.write_serialized

    def full_disk_on_the_second(buffer, paths):
        calls.append(paths)
        if len(calls) == 2:
            raise UserError(f"could not write checkpoint {paths[0]} (No space left on device); free disk space")
        real(buffer, paths)

    monkeypatch.setattr(writer_module, "write_serialized", full_disk_on_the_second)
    out = tmp_path / "run"
    code = run.main([*SMOKE, "data.train_size=128", "data.val_size=32", "train.epochs=4", "model.name=MLP",
                     "model.hidden_sizes=[16]", "output.plots=false", f"output.dir={out}"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().splitlines() == [f"fasttrain: error: could not write checkpoint {out / 'checkpoints' / 'last.pt'}"
                                        f" (No space left on device); free disk space"]
    assert load_checkpoint(out / "checkpoints" / "last.pt")["epoch"] == 1  # the write before it, untouched
    assert len(calls) == 2  # the run stopped at its next save: nothing written after the failure


@pytest.mark.slow
def test_a_kill_during_a_background_write_leaves_the_previous_checkpoint_loadable(tmp_path):
    """A model of ~40 MB (checkpoints of ~120 MB with AdamW's moments): SIGKILL to the process group while an
    epoch's last.pt is being written behind the training; then resume=auto finishes the run."""
    out = tmp_path / "run"
    args = [*SMOKE, "data.train_size=128", "data.val_size=32", "model.name=MLP", "model.hidden_sizes=[2048,2048]",
            "train.epochs=3", "output.plots=false", f"output.dir={out}"]
    job = start([sys.executable, "-m", "fasttrain.run", *args])
    ckpts, caught = out / "checkpoints", None
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and job.poll() is None:
            writing = list(ckpts.glob(".last.pt.*.tmp")) if ckpts.is_dir() else []
            if writing and (ckpts / "last.pt").is_file():
                os.killpg(job.pid, signal.SIGKILL)
                caught = writing[0]
                break
            time.sleep(0.002)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
        job.wait()
    assert caught is not None, "no background write of last.pt seen after the first one"
    previous = load_checkpoint(ckpts / "last.pt")  # loads: the interrupted write never replaced it
    assert 1 <= previous["epoch"] < 3
    assert run.main([*args, "resume=auto"]) == 0  # the resume: in this process
    assert load_checkpoint(ckpts / "last.pt")["epoch"] == 3 and not list(ckpts.glob(".*.tmp"))


# --------------------------------------------------------------------------- compile cache, data cache, imports


@pytest.mark.slow  # two processes, the first compiling from scratch on purpose
def test_a_second_identical_run_loads_its_compiled_graphs_from_the_cache(tmp_path):
    # the smallest model that compiles (an MLP: a few kernels): this run compiles from scratch by design
    args = [*SMOKE, "model.name=MLP", "model.hidden_sizes=[16]", "train.epochs=1", "train.compile=default",
            f"train.compile_cache={tmp_path / 'cache'}", "data.train_size=256", "data.val_size=64", "data.loader=gpu",
            "output.plots=false"]
    first = run_fasttrain(*args, f"output.dir={tmp_path / 'a'}")
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_fasttrain(*args, f"output.dir={tmp_path / 'b'}")
    assert second.returncode == 0, second.stderr[-3000:]
    cold, warm = (_env(tmp_path / name)["time_split"]["compile_cache"] for name in ("a", "b"))
    assert cold["fx_graph_misses"] > 0 and cold["fx_graph_hits"] == 0
    assert warm["fx_graph_misses"] == 0 and warm["fx_graph_hits"] >= cold["fx_graph_misses"]
    assert warm["aot_autograd_misses"] == 0 and warm["aot_autograd_hits"] > 0
    assert any((tmp_path / "cache").iterdir())  # train.compile_cache's folder holds them


def test_the_decoded_dataset_is_read_from_the_cache_by_the_next_run(tiny_cifar_root, tmp_path, monkeypatch):
    from fasttrain.data import cifar

    cache = tmp_path / "cache"
    images, labels = cifar.load_cifar10.__wrapped__(str(tiny_cifar_root), True, False, cache)
    assert sorted(p.name.split("-")[0] for p in cache.iterdir()) == ["cifar10", "cifar10"]

    def no_unpickling(path):
        raise AssertionError(f"unpickled {path}")

    monkeypatch.setattr(cifar, "_read_batch", no_unpickling)  # the next process: from the cache only
    again, again_labels = cifar.load_cifar10.__wrapped__(str(tiny_cifar_root), True, False, cache)
    assert np.array_equal(again, images) and np.array_equal(again_labels, labels) and not again.flags.writeable


def test_a_broken_cache_entry_or_folder_costs_the_cache_not_the_run(tiny_cifar_root, tmp_path):
    import logging

    from fasttrain.data import cifar
    from fasttrain.observe.logs import LOGGER_NAME

    said = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger(LOGGER_NAME)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)

    cache = tmp_path / "cache"
    images, _ = cifar.load_cifar10.__wrapped__(str(tiny_cifar_root), False, False, cache)
    entry = next(cache.glob("*-images.npy"))
    entry.write_bytes(b"\x93NUMPY garbage")  # a hand-made or truncated file: data, never code
    try:
        again, _ = cifar.load_cifar10.__wrapped__(str(tiny_cifar_root), False, False, cache)
        assert np.array_equal(again, images)
        blocked = tmp_path / "a-file"
        blocked.write_text("not a folder")
        third, _ = cifar.load_cifar10.__wrapped__(str(tiny_cifar_root), False, False, blocked / "cache")
    finally:
        logger.removeHandler(handler)
    assert np.array_equal(third, images)
    assert any(f"data cache entry {entry} cannot be read" in line and "decoding again" in line for line in said), said
    assert any(f"data cache {blocked / 'cache'} cannot be written" in line for line in said), said
    assert np.load(entry, allow_pickle=False).shape == images.shape  # rewritten whole


def test_a_run_imports_no_plotting_tensorboard_or_dali_until_it_needs_them():
    probe = ("import sys, fasttrain.run, fasttrain.train.lifecycle; "
             "print(sorted({m.split('.')[0] for m in sys.modules} & {'matplotlib', 'tensorboard', 'torchvision'}), "
             "'nvidia.dali' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, text=True, capture_output=True,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[] False"
