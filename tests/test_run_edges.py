"""Edges of a running job: its run folder made read-only or removed while it trains, a captured step fed a
batch of another shape, the DALI loader's close and reference cycle, and the process-wide settings that
fasttrain.fit puts back."""

from __future__ import annotations

import gc
import logging
import hashlib
import os
import shutil
import subprocess
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, free_port, launcher_env, read_jsonl, wait_for_step
from fasttrain.checkpoint import load_checkpoint

RUN = ["--config", "configs/smoke.yaml", "data.train_size=512", "data.val_size=64", "model.name=MLP",
       "model.hidden_sizes=[32]", "train.batch_size=32", "train.epochs=50", "train.log_every=1",
       "checkpoint.every_steps=4", "checkpoint.background=false", "output.plots=false"]


# --------------------------------------------------------------------------- the run folder, mid-run


def _launch(out: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "fasttrain.run", *RUN, *extra, f"output.dir={out}"]
    return subprocess.Popen(command, cwd=REPO, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)


def _wait_for_checkpoint(out: Path, job: subprocess.Popen) -> None:
    """Until a step checkpoint is on disk and the run has logged a step past it (synchronized on the files
    the run writes, not on time)."""
    wait_for_step(out, 6, job, timeout=60)
    assert any((out / "checkpoints").glob("step-*.pt"))


def _ended(job: subprocess.Popen) -> tuple[int, str]:
    try:
        _, stderr = job.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        job.kill()
        job.communicate()
        raise AssertionError("the run went on after its folder became unusable")
    return job.returncode, stderr


def _one_line(code: int, stderr: str) -> str:
    assert code == 2, f"exit {code}\n{stderr[-3000:]}"
    assert "Traceback" not in stderr and "Logging error" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("fasttrain: error: "), stderr[-3000:]
    return lines[-1]


def _immutable_supported(folder: Path) -> bool:
    """Whether `chattr +i` works here: the read-only flag that binds root too (permission bits do not)."""
    if shutil.which("chattr") is None:
        return False
    probe = folder / "probe"
    probe.mkdir()
    try:
        if subprocess.run(["chattr", "+i", str(probe)], capture_output=True).returncode != 0:
            return False
        try:
            (probe / "x").touch()
            return False  # the flag did not hold
        except OSError:
            return True
    finally:
        subprocess.run(["chattr", "-i", str(probe)], capture_output=True)
        shutil.rmtree(probe, ignore_errors=True)


def test_a_run_folder_removed_mid_run_stops_with_one_line_naming_it(tmp_path):
    out = tmp_path / "run"
    job = _launch(out)
    try:
        _wait_for_checkpoint(out, job)
        os.rename(out, tmp_path / "moved")  # atomic: from now on the run's folder is gone
        shutil.rmtree(tmp_path / "moved")
        line = _one_line(*_ended(job))
    finally:
        if job.poll() is None:
            job.kill()
            job.communicate()
    assert str(out) in line and ("was removed" in line), line
    assert not out.exists()  # never recreated behind the user's back (nor its checkpoints/ folder)


def test_a_run_folder_made_read_only_mid_run_stops_with_one_line_and_keeps_its_checkpoints(tmp_path):
    if not _immutable_supported(tmp_path):
        pytest.skip("chattr +i (the read-only flag that holds for root too) is not supported on this file system; "
                    "permission bits do not stop root")
    out = tmp_path / "run"
    job = _launch(out)
    try:
        _wait_for_checkpoint(out, job)
        subprocess.run(["chattr", "-R", "+i", str(out)], check=True)
        kept = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (out / "checkpoints").glob("*.pt")}
        line = _one_line(*_ended(job))
    finally:
        if job.poll() is None:
            job.kill()
            job.communicate()
        subprocess.run(["chattr", "-R", "-i", str(out)], capture_output=True)
    assert str(out) in line and "resume=auto" in line, line
    assert kept and {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                     for p in (out / "checkpoints").glob("*.pt")} == kept
    for name in kept:
        load_checkpoint(out / "checkpoints" / name)  # each whole and valid (its content hash checked)
    logged = read_jsonl(out / "steps.jsonl")
    assert logged and all(r["step"] for r in logged)


@pytest.mark.slow
def test_under_ddp_every_rank_stops_together_when_rank_0_cannot_write(tmp_path):
    """Rank 0 alone writes the folder: its failure (here steps.jsonl, at a log interval with no checkpoint
    due) reaches rank 1 in the next reduction, and both stop with the same line, well before dist.timeout_s.
    The two ranks are launched by hand (RANK, WORLD_SIZE, MASTER_*, as srun would), each with its own exit:
    under torchrun the first rank to exit gets the other one SIGTERMed, before or after its line."""
    out, port = tmp_path / "run", free_port()
    jobs = [subprocess.Popen([sys.executable, "-m", "fasttrain.run", *RUN, "checkpoint.every_steps=0",
                              "dist.timeout_s=120", f"output.dir={out}"], cwd=REPO, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                             env=launcher_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                                              MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)))
            for rank in (0, 1)]
    try:
        wait_for_step(out, 3, jobs[0], timeout=60)
        os.rename(out, tmp_path / "moved")
        ended = [_ended(job) for job in jobs]
    finally:
        for job in jobs:
            if job.poll() is None:
                os.killpg(job.pid, 9)
                job.communicate()
    # rank 1 writes nothing: it can only name the removed folder by the ranks' agreement on rank 0's failure;
    # both exit 2 (within _ended's 60 s, not dist.timeout_s) with the same one line, rank 1's marked as its own
    line0 = _one_line(*ended[0])
    assert str(out) in line0 and "was removed" in line0 and "steps.jsonl" in line0, line0
    code1, stderr1 = ended[1]
    assert code1 == 2 and "Traceback" not in stderr1, f"exit {code1}\n{stderr1[-3000:]}"
    assert [line for line in stderr1.splitlines() if line.strip()][-1] == f"[rank 1] {line0}", stderr1[-3000:]


# --------------------------------------------------------------------------- the captured step's inputs


def _recorded_step():
    """A CapturedStep as it stands after its capture on CUDA (static inputs of a batch of 8, a replay), on
    the CPU: the replay only counts (what it would run is not what is tested here)."""
    from fasttrain.config import OptimConfig
    from fasttrain.train.optim import build_optimizer
    from fasttrain.train.precision import build_precision
    from fasttrain.train.step import CapturedStep

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 10))
    optimizer = build_optimizer(OptimConfig(name="adamw", lr=1e-3), model, torch.device("cpu"), capture=True)
    step = CapturedStep(model, optimizer, build_precision("fp32", torch.device("cpu"), tf32=False))
    step.on_cuda = True  # the CUDA path's control flow
    step.static_images, step.static_labels = torch.zeros(8, 3, 4, 4), torch.zeros(8, dtype=torch.int64)
    replays = []
    step.replay = lambda: replays.append(1)
    return step, replays


@pytest.mark.parametrize("images,labels,wrong", [
    ((1, 3, 4, 4), (1,), "images of shape (8, 3, 4, 4) (torch.float32) but got (1, 3, 4, 4)"),  # broadcasts
    ((5, 3, 4, 4), (5,), "but got (5, 3, 4, 4)"),  # an epoch's last, smaller batch
    ((8, 3, 4, 4), (1,), "labels of shape (8,) (torch.int64) but got (1,)"),
], ids=["a batch of 1", "a smaller batch", "labels of 1"])
def test_a_captured_step_refuses_a_batch_of_another_shape_naming_both(images, labels, wrong):
    step, replays = _recorded_step()
    with pytest.raises(ValueError) as raised:
        step(torch.ones(images), torch.ones(labels, dtype=torch.int64))
    assert wrong in str(raised.value) and "\n" not in str(raised.value)
    assert not replays and bool((step.static_images == 0).all())  # nothing copied, nothing replayed


def test_a_captured_step_copies_a_batch_of_its_shape_and_replays():
    step, replays = _recorded_step()
    step(torch.ones(8, 3, 4, 4), torch.full((8,), 3, dtype=torch.int64))
    assert replays == [1] and bool((step.static_images == 1).all()) and bool((step.static_labels == 3).all())


# --------------------------------------------------------------------------- the DALI loaders' lifetime


def _dali_loader():
    from fasttrain.data.loaders.dali import DaliLoader
    from fasttrain.data.loaders.gpu import BatchFormat, CropFlip
    from fasttrain.data.sharding import ShardedBatches

    images = np.random.default_rng(0).integers(0, 256, (96, 32, 32, 3), dtype=np.uint8)
    fmt = BatchFormat(torch.device("cpu"), [0.5, 0.5, 0.5], [0.25, 0.25, 0.25], torch.float32, False)
    return DaliLoader(images, np.arange(96) % 10, ShardedBatches(96, 32, True, 5), fmt, CropFlip(4, True, 5))


def _dali_folder_loader(tmp_path: Path):
    from PIL import Image

    from fasttrain.data.loaders.dali_folder import DaliFolderLoader
    from fasttrain.data.folder import scan_split
    from fasttrain.data.loaders.gpu import BatchFormat
    from fasttrain.data.sharding import ShardedBatches

    for label in ("cat", "dog"):
        (tmp_path / "train" / label).mkdir(parents=True)
        for k in range(6):
            Image.fromarray(np.full((20, 24, 3), 40 * k, dtype=np.uint8)).save(tmp_path / "train" / label / f"{k}.png")
    index = scan_split(str(tmp_path), "train")
    fmt = BatchFormat(torch.device("cpu"), [0.5, 0.5, 0.5], [0.25, 0.25, 0.25], torch.float32, False)
    return DaliFolderLoader(index, ShardedBatches(len(index.paths), 4, True, 5), fmt, image_size=16, train=True)


@pytest.mark.parametrize("kind", ["arrays", "folder"])
@pytest.mark.parametrize("closed", [True, False], ids=["closed", "dropped"])
def test_a_dali_loader_is_freed_at_once_without_the_garbage_collector(kind, closed, tmp_path):
    """close() stops the pipeline (its threads, its buffers), and no reference cycle holds the loader: the
    last reference gone, it and its pipeline are freed by reference counting, with the collector off."""
    pytest.importorskip("nvidia.dali")
    loader = _dali_loader() if kind == "arrays" else _dali_folder_loader(tmp_path)
    loader.set_epoch(0)
    first = next(iter(loader))  # a pipeline built, its epoch left in the middle
    assert first[0].shape[0] == loader.batches.batch_size
    pipeline = weakref.ref(loader._pipe)
    gc.collect()
    gc.disable()
    try:
        if closed:
            loader.close()
            assert loader._pipe is None and pipeline() is None  # released by close itself
            assert len(list(loader)) == len(loader)  # a later epoch builds a new pipeline and runs whole
        freed = weakref.ref(loader)
        del loader
        assert freed() is None and pipeline() is None
    finally:
        gc.enable()


# --------------------------------------------------------------------------- what fit leaves behind


def _process_settings() -> dict:
    """Every process-wide setting a run may touch, as values."""
    import signal

    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config

    from fasttrain.dist.preemption import CATCHABLE

    loggers = {name: (list(logging.getLogger(name).handlers), list(logging.getLogger(name).filters),
                      logging.getLogger(name).level, logging.getLogger(name).propagate)
               for name in ("fasttrain", "fasttrain.silent", "torch._dynamo.variables.ctx_manager")}
    return {"signals": {name: signal.getsignal(getattr(signal, name)) for name in CATCHABLE},
            "loggers": loggers, "environ": dict(os.environ),
            "dynamo": dynamo_config.get_config_copy(), "inductor": inductor_config.get_config_copy(),
            "switches": (torch.are_deterministic_algorithms_enabled(),
                         torch.is_deterministic_algorithms_warn_only_enabled(), torch.backends.cudnn.benchmark,
                         torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
                         torch.backends.cudnn.deterministic),
            "dtype": torch.get_default_dtype(), "threads": (torch.get_num_threads(), torch.get_num_interop_threads()),
            "process_group": torch.distributed.is_initialized()}


def _changed(before: dict, after: dict) -> dict:
    changed = {}
    for key in before:
        if isinstance(before[key], dict):
            keys = set(before[key]) | set(after[key])
            diff = {k: (before[key].get(k), after[key].get(k)) for k in keys if before[key].get(k) != after[key].get(k)}
            if diff:
                changed[key] = diff
        elif before[key] != after[key]:
            changed[key] = (before[key], after[key])
    return changed


@pytest.mark.parametrize("ends", ["returns", "raises"])
def test_fit_puts_back_every_process_wide_setting_it_changes(tmp_path, monkeypatch, ends):
    """A deterministic run launched as one srun task (fit sets MASTER_ADDR from the node list): afterwards,
    whether fit returned or raised, the process is as it was (compiling in-process costs half a minute on a
    CPU: the compile settings are checked on the restoring block below)."""
    import fasttrain

    # one srun task: the rendezvous address comes from the node list (fit exports it); a free port of our own
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_NODELIST", "localhost")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    before = _process_settings()
    overrides = ["data.dataset=synthetic", "data.train_size=64", "data.val_size=32", "train.batch_size=32",
                 "train.device=cpu", "data.num_workers=0", "model.name=MLP", "model.hidden_sizes=[16]",
                 "train.epochs=1", "train.deterministic=true", f"output.dir={tmp_path / 'run'}"]
    if ends == "raises":  # fails in the middle of training, after everything was set up: a nan loss
        overrides += ["optim.name=sgd", "optim.lr=1000", "sched.name=none", "train.log_every=1", "train.epochs=5"]
        with pytest.raises(fasttrain.errors.UserError, match="training diverged"):
            fasttrain.fit(overrides=overrides)
    else:
        assert fasttrain.fit(overrides=overrides).epoch == 1
    assert _changed(before, _process_settings()) == {}


def test_what_a_compiled_or_captured_run_sets_is_put_back():
    """torch._dynamo.config.optimize_ddp, set by a compiled run under DDP (dist.ddp.wrap_ddp: more than one rank,
    which one CPU process cannot make), and the filter a captured step adds to a Dynamo logger: fit's
    restoring block puts both back (checked on that block: compiling a captured step costs half a minute)."""
    from fasttrain.api import _process_state_restored
    from fasttrain.dist.ddp import wrap_ddp  # noqa: F401 - the setter named above
    from fasttrain.config import OptimConfig
    from fasttrain.train.optim import build_optimizer
    from fasttrain.train.precision import build_precision
    from fasttrain.train.step import CapturedStep

    before = _process_settings()
    with _process_state_restored():
        torch._dynamo.config.optimize_ddp = not torch._dynamo.config.optimize_ddp  # as wrap_ddp does
        model = torch.nn.Linear(4, 2)
        optimizer = build_optimizer(OptimConfig(name="sgd", lr=0.1), model, torch.device("cpu"), capture=True)
        CapturedStep(model, optimizer, build_precision("fp32", torch.device("cpu"), tf32=False))
        assert _changed(before, _process_settings())  # both changed in the block
    assert _changed(before, _process_settings()) == {}
