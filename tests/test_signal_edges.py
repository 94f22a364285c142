"""Signals at the edges of a run, and ranks that wait, with real signals to real processes.

The first moments (the early hold comes before torch is imported), the moments after training ended (a
preemption signal is absorbed: exit 0, plots, lock removed), the signals a config does not name (their
default action), a rank that waits for peers that never come (SIGTERM: 75, Ctrl-C: 130, within a
second), a failure in a section rank 0 does for all (every rank stops at once), the loader that
data.loader=auto picks (rank 0's, on every rank), and launch environments that do not read (one line).
Each waits for a file, a port or a log line rather than a fixed time.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import List

import pytest
import yaml

from conftest import REPO, as_a_terminal_job, free_port, launcher_env, run_ranks, start, wait_for_step

EXIT_PREEMPTED, EXIT_INTERRUPTED, EXIT_USER_ERROR = 75, 130, 2
# 16 steps of one epoch, a step logged each: long enough to signal mid-run, short to finish
RUN = ["--config", "configs/smoke.yaml", "data.train_size=256", "data.val_size=64", "train.batch_size=16",
       "train.epochs=1", "train.log_every=1", "data.num_workers=0", "output.plots=false"]
PYTHON = [sys.executable, "-m", "fasttrain.run"]


class Lines:
    """A started job's output, read by a thread as it comes, so that a test can wait for a line (the job
    runs with PYTHONUNBUFFERED=1: a pipe would otherwise hold its lines until it exits)."""

    def __init__(self, job: subprocess.Popen):
        self.job, self.lines = job, []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.job.stdout:
            self.lines.append(line)

    def wait_for(self, pattern: str, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = next((line for line in list(self.lines) if re.search(pattern, line)), None)
            if found is not None:
                return found
            if not self._reader.is_alive():  # the output ended without it
                break
            time.sleep(0.02)
        raise AssertionError(f"no line matching {pattern!r}:\n{''.join(self.lines)[-3000:]}")

    def finish(self, timeout: float) -> str:
        """The whole output once the job has exited."""
        self.job.wait(timeout=timeout)
        self._reader.join(timeout=30)
        return "".join(self.lines)


def catches(pid: int, number: int) -> bool:
    """Whether the process has a handler installed for signal `number` (/proc: SigCgt)."""
    status = Path(f"/proc/{pid}/status").read_text()
    mask = int(re.search(r"^SigCgt:\s*([0-9a-f]+)", status, re.M).group(1), 16)
    return bool(mask >> (number - 1) & 1)


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def launch(command: List[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen(command, cwd=REPO, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=as_a_terminal_job)


def stop(job: subprocess.Popen) -> None:
    """A job a failed test leaves behind: its whole session ends."""
    if job.poll() is None:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()


# ---------------------------------------------------------------- 1. the first moments


def test_sigterm_from_the_moment_a_handler_exists_is_a_preemption_before_torch_loads(tmp_path):
    """The early hold is the entry point's first line: by the time SIGTERM has a handler at all, torch is
    not loaded yet (before, --help's list of keys imported torch, torchvision and DALI first, ~1.5 s in
    which SIGTERM killed the process with -15 and no marker). Sent at that moment, it stops the run before
    its first step: exit 75, preempted.json, nothing trained and nothing lost."""
    out = tmp_path / "run"
    job = start([*PYTHON, *RUN, f"output.dir={out}"])
    try:
        deadline = time.monotonic() + 60
        while not catches(job.pid, signal.SIGTERM):
            assert job.poll() is None and time.monotonic() < deadline, "SIGTERM never got a handler"
            time.sleep(0.002)
        loaded = [line for line in Path(f"/proc/{job.pid}/maps").read_text().splitlines() if "libtorch" in line]
        job.send_signal(signal.SIGTERM)
        output, _ = job.communicate(timeout=120)
    finally:
        stop(job)
    assert not loaded, "torch was loaded before SIGTERM had a handler"
    assert job.returncode == EXIT_PREEMPTED, output[-3000:]
    marker = json.loads((out / "preempted.json").read_text())
    assert marker["signal"] == "SIGTERM" and marker["global_step"] == 0
    assert "Traceback" not in output


# ---------------------------------------------------------------- 2. after training ended


def test_preemption_signals_after_training_ended_are_absorbed_and_the_run_completes(tmp_path):
    """SIGUSR1 and SIGTERM once the final weights' digest is logged (training over; plots, the last lines and
    the lock still to come): before, either killed the complete run (-15 / -10), leaving the lock and no
    plots. Now: one line says they came after the end and were ignored; exit 0, plots, no lock."""
    out = tmp_path / "run"
    job = launch([*PYTHON, *RUN, "output.plots=true", f"output.dir={out}"], launcher_env(PYTHONUNBUFFERED="1"))
    lines = Lines(job)
    try:
        lines.wait_for(r"final weights: sha256")
        job.send_signal(signal.SIGUSR1)
        job.send_signal(signal.SIGTERM)
        output = lines.finish(timeout=120)
    finally:
        stop(job)
    assert job.returncode == 0, output[-3000:]
    said = [line for line in output.splitlines() if "came after training had ended: ignored" in line]
    assert len(said) == 1 and re.search(r"SIG(USR1|TERM) came", said[0]), output[-3000:]
    assert "came after training had ended" in (out / "train.log").read_text()
    assert (out / "curves.png").is_file() and (out / "time.png").is_file()
    assert not (out / ".fasttrain.lock").exists() and not (out / "preempted.json").exists()
    assert re.search(r"^done: ", output, re.M)


# ---------------------------------------------------------------- 3. signals the config does not name


def signal_at_step_2(out: Path, signum: int, *overrides: str) -> tuple:
    """Start a run, send `signum` once it has logged step 2; its exit code and output."""
    job = start([*PYTHON, *RUN, *overrides, f"output.dir={out}"])
    try:
        wait_for_step(out, 2, job)
        job.send_signal(signum)
        output, _ = job.communicate(timeout=120)
    finally:
        stop(job)
    return job.returncode, output


def test_sighup_and_sigusr2_not_in_checkpoint_signals_keep_their_default_action(tmp_path):
    """Before, SIGUSR2 and SIGHUP were recorded by the early hold and then swallowed for the whole run: a
    closed terminal or a `kill -USR2` did nothing. Not named in checkpoint.signals, they now end the
    process as they would any program."""
    code, output = signal_at_step_2(tmp_path / "run", signal.SIGUSR2)
    assert code == -signal.SIGUSR2, output[-3000:]


def test_sighup_named_in_checkpoint_signals_preempts_like_sigterm(tmp_path):
    out = tmp_path / "run"
    code, output = signal_at_step_2(out, signal.SIGHUP, "checkpoint.signals=[SIGTERM,SIGHUP]")
    assert code == EXIT_PREEMPTED, output[-3000:]
    assert json.loads((out / "preempted.json").read_text())["signal"] == "SIGHUP"


# ---------------------------------------------------------------- 4. a rank that waits for its peers


def test_rank_0_waiting_for_a_peer_that_never_comes_stops_on_sigterm_with_75(tmp_path):
    """WORLD_SIZE=2, no second process: rank 0 serves the store and waits for rank 1. Before, the wait was
    in C++ for dist.timeout_s (1800 s) and SIGTERM was only recorded; now the process stops within a
    fraction of a second with one line and exit 75."""
    port = free_port()
    env = launcher_env(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    job = launch([*PYTHON, *RUN, f"output.dir={tmp_path / 'run'}"], env)
    try:
        deadline = time.monotonic() + 120
        while not port_open(port):  # rank 0 serves the store: it is waiting for rank 1 from here on
            assert job.poll() is None and time.monotonic() < deadline, job.stdout.read()[-3000:]
            time.sleep(0.02)
        job.send_signal(signal.SIGTERM)
        output, _ = job.communicate(timeout=60)  # before: the wait went on for dist.timeout_s (1800 s)
    finally:
        stop(job)
    assert job.returncode == EXIT_PREEMPTED, output[-3000:]
    said = [line for line in output.splitlines() if "fasttrain:" in line]
    assert len(said) == 1 and "preempted by SIGTERM while waiting for the other ranks" in said[0], output[-3000:]
    assert not (tmp_path / "run").exists()  # nothing was claimed or written


@pytest.mark.slow
def test_rank_1_waiting_for_a_rank_0_that_never_comes_stops_on_ctrl_c_with_130(tmp_path):
    env = launcher_env(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
                    PYTHONUNBUFFERED="1")
    job = launch([*PYTHON, *RUN, f"output.dir={tmp_path / 'run'}"], env)
    lines = Lines(job)
    try:
        lines.wait_for(r"waiting for the other ranks to join")  # said once a rank has waited 5 s
        job.send_signal(signal.SIGINT)
        output = lines.finish(timeout=20)
    finally:
        stop(job)
    assert job.returncode == EXIT_INTERRUPTED, output[-3000:]
    assert "stopped by Ctrl-C" in output and "Traceback" not in output


# ---------------------------------------------------------------- 5. a failure in rank 0's section


@pytest.mark.slow
def test_any_exception_in_rank_0s_section_stops_every_rank_at_once_with_one_line(tmp_path):
    """resume=auto into a folder whose steps.jsonl ends in a line cut short (a full disk): trimming the
    records on rank 0 raises a JSONDecodeError, which is not a UserError. Before, only UserError reached
    the ranks' agreement, and rank 1 was left waiting in it; now both stop at once, each with one line."""
    out = tmp_path / "run"
    first = subprocess.run([*PYTHON, *RUN, "train.stop_after_steps=3", f"output.dir={out}"], cwd=REPO,
                           env=launcher_env(), text=True, capture_output=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    steps = out / "steps.jsonl"
    steps.write_text(steps.read_text() + '{"step": 4, "epoch": 1, "lo')
    # a rank left waiting would stop only at dist.timeout_s, with a timeout error instead of the JSONDecodeError
    # (and past the 300 s this test waits). The ranks are launched by hand (as srun would), each with its own
    # exit: under torchrun the first rank to exit gets the other SIGTERMed, sometimes before its line
    port = free_port()
    jobs = [launch([*PYTHON, *RUN, "resume=auto", "dist.timeout_s=1800", f"output.dir={out}"],
                   launcher_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                             MASTER_PORT=str(port)))
            for rank in (0, 1)]
    try:
        outputs = [job.communicate(timeout=300)[0] for job in jobs]
    finally:
        for job in jobs:
            stop(job)
    for rank, (job, output) in enumerate(zip(jobs, outputs)):
        errors = [line for line in output.splitlines() if "fasttrain: error:" in line]
        assert job.returncode == 2 and "Traceback" not in output, output[-3000:]
        assert len(errors) == 1 and "JSONDecodeError" in errors[0], output[-3000:]
        assert errors[0].startswith("[rank 1] " if rank else "fasttrain: error: "), errors


# ---------------------------------------------------------------- 6. data.loader=auto on every rank

CHOOSER = """
import os, sys
import fasttrain.data, fasttrain.train.lifecycle
from fasttrain import run
if os.environ["RANK"] == "1":  # this rank sees no free memory: left to itself it would choose another loader
    fasttrain.data.auto._free_memory = lambda device: (0, "host")
build_parts = fasttrain.train.lifecycle.build_parts
def recording(cfg, *args, **kwargs):
    with open(os.path.join(sys.argv[1], "loader-rank" + os.environ["RANK"]), "w") as f:
        f.write(str(cfg.data.loader))
    return build_parts(cfg, *args, **kwargs)
fasttrain.train.lifecycle.build_parts = recording
run.exit_now(run.main(sys.argv[2:], ends_process=True))
"""


@pytest.mark.slow
def test_data_loader_auto_is_rank_0s_choice_on_every_rank(tmp_path):
    """The choice depends on free memory, which each rank reads for itself: here rank 1 is made to see none.
    Every rank must still use rank 0's loader (before, rank 1 built another one)."""
    from test_folder_data import write_folder

    root = write_folder(tmp_path / "images", train_per_class=4, val_per_class=2)
    script = tmp_path / "choose_loader.py"
    script.write_text(CHOOSER)
    seen = tmp_path / "seen"
    seen.mkdir()
    result = run_ranks(2, str(script), str(seen), "--config", "configs/smoke.yaml", "data.dataset=folder",
                       f"data.root={root}", "data.image_size=32", "data.loader=auto", "data.num_workers=0",
                       "train.batch_size=4", "train.epochs=1", f"output.dir={tmp_path / 'run'}", module="",
                       timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [(seen / f"loader-rank{r}").read_text() for r in (0, 1)] == ["gpu", "gpu"]
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["data"]["loader"] == "gpu"  # as recorded


# ---------------------------------------------------------------- 7, 8. launch environments that do not read


def test_rank_without_world_size_is_refused_with_one_line(tmp_path):
    """RANK=1 alone: before, the run went on as rank 0 of 1 while reporting as rank 1, and a config error
    was not printed at all (config errors are printed by rank 0 only)."""
    result = subprocess.run([*PYTHON, *RUN, "train.epochz=2", f"output.dir={tmp_path / 'run'}"], cwd=REPO,
                            env=launcher_env(RANK="1"), text=True, capture_output=True, timeout=120)
    assert result.returncode == EXIT_USER_ERROR
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "RANK=1 is set but WORLD_SIZE is not" in lines[0], result.stderr


def test_a_malformed_slurm_node_list_is_refused_with_one_line(tmp_path):
    """`node[01-` used to be read as a host named `node`, which every rank then waited for."""
    env = launcher_env(SLURM_PROCID="0", SLURM_NTASKS="2", SLURM_LOCALID="0", SLURM_JOB_NODELIST="node[01-")
    result = subprocess.run([*PYTHON, *RUN, f"output.dir={tmp_path / 'run'}"], cwd=REPO, env=env, text=True,
                            capture_output=True, timeout=120)
    assert result.returncode == EXIT_USER_ERROR, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot read the SLURM node list 'node[01-'" in lines[0], result.stderr
    script = subprocess.run([sys.executable, "-m", "fasttrain.dist.hostlist", "first", "node[01-"], cwd=REPO, env=env,
                            text=True, capture_output=True, timeout=60)
    assert script.returncode != 0 and script.stdout == ""
    assert len(script.stderr.strip().splitlines()) == 1 and "node[01-" in script.stderr
