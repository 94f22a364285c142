"""Preemption and elastic restarts, with real signals to real processes.

A scheduler's SIGTERM / SIGUSR1 makes every rank stop at the same step boundary, save one
checkpoint together and exit with code 75; a rerun with resume=auto finishes with the weights of
an uninterrupted run. Under `torchrun --max-restarts=1`, a worker killed with SIGKILL takes the
group down; the restarted group resumes from the newest step checkpoint and finishes with those
same weights.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
from pathlib import Path

import pytest

from conftest import (assert_same_weights, child_pids, frozen, logged_steps, read_jsonl, run_fasttrain, run_ranks,
                      start, torchrun_command, wait_for_step)

# 1024 images, batch 32 per rank: 16 steps per epoch for two ranks, 2 epochs, of the tutorial's CNN (dropout and
# BatchNorm) on 16 px images. The steps are short: where a signal meets the run is fixed by freezing the run's
# processes while the test reads its newest step and signals (conftest.frozen), not by the step's length
RUN = ["--config", "configs/smoke.yaml", "data.train_size=1024", "data.val_size=64", "model.name=CIFAR10_CNN",
       "data.image_size=16", "train.batch_size=32", "train.epochs=2", "train.log_every=1", "data.num_workers=0",
       "checkpoint.every_steps=4", "output.plots=false"]
EXIT_PREEMPTED = 75


def failure_report_exit_codes(torchrun_output: str) -> dict:
    """{rank: exit code} from torchrun's failure report ("rank : 1 (local_rank: 1)" then "exitcode : 75");
    its log lines repeat some codes, so only the report's entries count."""
    entries = re.findall(r"rank\s*:\s*(\d+) \(local_rank: \d+\)\s*\n\s*exitcode\s*:\s*(-?\d+)", torchrun_output)
    return {int(rank): int(code) for rank, code in entries}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    result = run_ranks(2, *RUN, f"output.dir={out}")  # the reference: launched by hand (the signals go to torchrun)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.mark.slow
def test_sigterm_to_a_two_rank_job_saves_one_checkpoint_and_a_rerun_finishes_identically(uninterrupted, tmp_path):
    out = tmp_path / "run"
    job = start(torchrun_command(2, *RUN, f"output.dir={out}", "resume=auto"))
    wait_for_step(out, 6, job)  # mid-epoch 1
    workers = child_pids(job.pid)
    assert len(workers) == 2
    with frozen(*workers):
        signalled_at = logged_steps(out)[-1]
        for pid in workers:  # as SLURM signals every task of a job
            os.kill(pid, signal.SIGTERM)
    output, _ = job.communicate(timeout=120)

    # both ranks exited with the distinct code, after the same step: the step in progress or the next (the
    # flag rides in each step's reduction, log_every=1: the one under way may have been reduced already)
    assert failure_report_exit_codes(output) == {0: EXIT_PREEMPTED, 1: EXIT_PREEMPTED}, output[-3000:]
    stops = re.findall(r"\[rank (\d)\] fasttrain: preempted by SIGTERM after step (\d+)", output)
    assert sorted(rank for rank, _ in stops) == ["0", "1"]
    stop_step = int(stops[0][1])
    assert {int(step) for _, step in stops} == {stop_step} and signalled_at < stop_step <= signalled_at + 2
    # one complete checkpoint of that step, no temporary files, and the marker a job script requeues on
    ckpts = out / "checkpoints"
    assert (ckpts / f"step-{stop_step:08d}.pt").is_file()
    assert not list(ckpts.glob(".*"))
    marker = json.loads((out / "preempted.json").read_text())
    assert marker["global_step"] == stop_step and marker["exit_code"] == EXIT_PREEMPTED

    rerun = run_ranks(2, *RUN, f"output.dir={out}", "resume=auto")  # the requeued job (a job script's launch)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert json.loads((out / "env.json").read_text())["resumed_from"]["checkpoint"] == str(ckpts / f"step-{stop_step:08d}.pt")
    assert not (out / "preempted.json").exists()
    assert_same_weights(uninterrupted, out)
    assert [r["step"] for r in read_jsonl(out / "steps.jsonl")] == list(range(1, 33))


@pytest.mark.slow
def test_sigterm_to_torchrun_and_its_workers_together_stops_them_cleanly(tmp_path):
    """What SLURM's --signal=TERM@120 and preemption do: every process of the job step, torchrun
    included, gets SIGTERM. torchrun passes it on and waits; the workers still stop together."""
    out = tmp_path / "run"
    job = start(torchrun_command(2, *RUN, f"output.dir={out}", "resume=auto"))
    wait_for_step(out, 6, job)
    with frozen(job.pid, *child_pids(job.pid)):  # the signal arrives mid-run, before the run can end
        os.killpg(job.pid, signal.SIGTERM)  # the job's session: torchrun and both workers
    output, _ = job.communicate(timeout=120)
    assert job.returncode != 0  # torchrun reports the signal; the marker tells the job script to requeue
    stops = re.findall(r"\[rank (\d)\] fasttrain: preempted by SIGTERM after step (\d+)", output)
    assert sorted(rank for rank, _ in stops) == ["0", "1"], output[-3000:]
    stop_step = int(stops[0][1])
    assert json.loads((out / "preempted.json").read_text())["global_step"] == stop_step
    assert (out / "checkpoints" / f"step-{stop_step:08d}.pt").is_file()


@pytest.mark.slow
def test_a_worker_killed_under_max_restarts_is_resumed_by_the_restarted_group(uninterrupted, tmp_path):
    out = tmp_path / "run"
    job = start(torchrun_command(2, *RUN, f"output.dir={out}", "resume=auto", launcher_args=("--max-restarts=1",)))
    wait_for_step(out, 6, job)  # past the step-4 checkpoint, mid-epoch 1
    workers = child_pids(job.pid)
    with frozen(*workers):
        seen = logged_steps(out)[-1]
        os.kill(workers[1], signal.SIGKILL)
    output, _ = job.communicate(timeout=300)
    assert job.returncode == 0, output[-3000:]
    # the restarted group continues from the newest step checkpoint written before the kill
    resumed_at = json.loads((out / "env.json").read_text())["resumed_from"]["global_step"]
    assert resumed_at % 4 == 0 and 4 <= resumed_at <= seen + 1, (resumed_at, seen, output[-3000:])
    assert_same_weights(uninterrupted, out)


@pytest.mark.slow
def test_sigusr1_to_a_single_process_exits_75_and_resume_auto_finishes(tmp_path):
    """One process, SIGUSR1 (SLURM's advance warning): the exit code is the process's own. (Bitwise
    equality after such a stop is shown by the two-rank test above.)"""
    small = [*RUN, "data.train_size=256", "train.batch_size=16"]  # 16 steps per epoch
    out = tmp_path / "run"
    job = start([sys.executable, "-m", "fasttrain.run", *small, f"output.dir={out}"])
    wait_for_step(out, 5, job)
    with frozen(job.pid):
        job.send_signal(signal.SIGUSR1)
    output, _ = job.communicate(timeout=120)
    assert job.returncode == EXIT_PREEMPTED, output[-3000:]
    assert json.loads((out / "preempted.json").read_text())["signal"] == "SIGUSR1"
    rerun = run_fasttrain(*small, f"output.dir={out}", "resume=auto")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resumed_from" in json.loads((out / "env.json").read_text()) and not (out / "preempted.json").exists()
    assert [r["epoch"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2]


def _wait_for_file(path, job, timeout=300):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if job.poll() is not None:
            raise AssertionError(f"the job ended before {path} appeared:\n{job.stdout.read()[-3000:]}")
        if path.exists():
            return
        time.sleep(0.02)
    raise AssertionError(f"{path} did not appear in {timeout}s")


@pytest.mark.slow
def test_one_process_stops_at_the_next_step_whatever_its_log_interval(tmp_path):
    """One process has no other rank to agree with: its flag is read after every step (a host float, no
    collective), so a signal stops it at the next step, not at the next of its log intervals (every 50 here)."""
    small = [*RUN, "data.train_size=512", "train.batch_size=16", "train.log_every=50", "checkpoint.every_steps=20"]
    out = tmp_path / "run"
    job = start([sys.executable, "-m", "fasttrain.run", *small, f"output.dir={out}"])  # 32 steps per epoch
    _wait_for_file(out / "checkpoints" / "step-00000020.pt", job)
    with frozen(job.pid):
        job.send_signal(signal.SIGTERM)  # a few steps past step 20 at most
    output, _ = job.communicate(timeout=120)
    assert job.returncode == EXIT_PREEMPTED, output[-3000:]
    stop = json.loads((out / "preempted.json").read_text())["global_step"]
    # the step under way, or the next: not the epoch's end (32), where the next boundary was
    assert 20 < stop < 32, stop
    assert (out / "checkpoints" / f"step-{stop:08d}.pt").is_file()


@pytest.mark.slow
def test_signal_check_every_adds_a_host_side_check_between_long_log_intervals(tmp_path):
    """Two ranks must agree on a stop: by default at the log intervals' reduction; checkpoint.signal_check_every=2
    adds a host-side agreement every 2 steps, so the stop comes long before the log interval at 50."""
    small = [*RUN, "data.train_size=512", "train.batch_size=16", "train.log_every=50",
             "checkpoint.signal_check_every=2", "checkpoint.every_steps=6"]
    out = tmp_path / "run"
    job = start(torchrun_command(2, *small, f"output.dir={out}"))
    _wait_for_file(out / "checkpoints" / "step-00000006.pt", job)
    workers = child_pids(job.pid)
    with frozen(*workers):
        for pid in workers:
            os.kill(pid, signal.SIGTERM)
    output, _ = job.communicate(timeout=120)
    assert failure_report_exit_codes(output) == {0: EXIT_PREEMPTED, 1: EXIT_PREEMPTED}, output[-3000:]
    stop = json.loads((out / "preempted.json").read_text())["global_step"]
    assert stop % 2 == 0 and 6 < stop <= 12 and stop < 50, stop  # 16 steps per epoch: well before 50


# the shipped recipe's way of loading (DataLoader worker processes), on the smoke data
WORKERS = [*RUN, "data.train_size=512", "train.batch_size=16", "data.loader=plain", "data.num_workers=2"]


def test_sigterm_to_the_whole_process_group_with_dataloader_workers_saves_and_exits_75(tmp_path):
    """SLURM at preemption, or `kill -TERM -PGID`: the DataLoader workers get the signal too. They ignore
    it (before: they died first, and the main process failed with 'DataLoader worker is killed by
    signal' without a checkpoint or the marker)."""
    out = tmp_path / "run"
    job = start([sys.executable, "-m", "fasttrain.run", *WORKERS, f"output.dir={out}"])
    wait_for_step(out, 3, job)
    with frozen(job.pid):  # the workers get the signal at once, the training process when it continues
        os.killpg(job.pid, signal.SIGTERM)
    output, _ = job.communicate(timeout=120)
    assert job.returncode == EXIT_PREEMPTED, output[-3000:]
    assert "Traceback" not in output and "killed by signal" not in output
    marker = json.loads((out / "preempted.json").read_text())
    assert (out / "checkpoints" / f"step-{marker['global_step']:08d}.pt").is_file()


def test_ctrl_c_stops_at_the_next_log_interval_with_a_checkpoint_and_exit_130(tmp_path):
    """Ctrl-C reaches the terminal's whole process group (workers included): a graceful stop that keeps
    the work, like a preemption but not to be requeued (no marker), then resume=auto continues."""
    out = tmp_path / "run"
    job = start([sys.executable, "-m", "fasttrain.run", *WORKERS, f"output.dir={out}"])
    wait_for_step(out, 3, job)
    with frozen(job.pid):
        os.killpg(job.pid, signal.SIGINT)
    output, _ = job.communicate(timeout=120)
    assert job.returncode == 130, output[-3000:]
    assert "Traceback" not in output and "KeyboardInterrupt" not in output
    stop = int(re.search(r"interrupted by Ctrl-C after step (\d+): checkpoint saved", output).group(1))
    assert (out / "checkpoints" / f"step-{stop:08d}.pt").is_file()
    assert not (out / "preempted.json").exists()  # the user stopped it: a job script must not requeue


def test_a_preemption_signal_while_the_run_is_being_built_is_acted_on_not_a_kill(tmp_path):
    """SIGTERM in the first seconds (torch importing, data loading, model building): before, it killed
    the process (-15: no marker, no requeue); now it is recorded and the run stops before its first step."""
    out = tmp_path / "run"
    job = start([sys.executable, "-m", "fasttrain.run", *RUN, f"output.dir={out}"])
    _wait_for_file(out, job)  # the run folder exists: the config is read, the run is being built
    job.send_signal(signal.SIGTERM)
    output, _ = job.communicate(timeout=120)
    assert job.returncode == EXIT_PREEMPTED, output[-3000:]
    assert json.loads((out / "preempted.json").read_text())["exit_code"] == EXIT_PREEMPTED


def test_the_watch_acts_on_an_early_signal_and_a_second_ctrl_c_stops_at_once():
    """In-process: a signal recorded before the watch exists is its first; Ctrl-C sets the interrupt code
    (which outweighs any number of preemption flags in the sum over ranks); a second Ctrl-C raises."""
    from fasttrain.dist import preemption

    saved = {n: signal.getsignal(n) for n in (signal.SIGINT, signal.SIGUSR1)}
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # as a terminal gives it (see conftest.as_a_terminal_job)
        preemption.hold_early_signals()
        os.kill(os.getpid(), signal.SIGUSR1)
        watch = preemption.PreemptionWatch(["SIGUSR1"], 0, "gloo", graceful_interrupt=True)
        assert watch.received == "SIGUSR1" and watch.flag() == preemption.PREEMPT_CODE
        os.kill(os.getpid(), signal.SIGINT)
        assert watch.flag() == preemption.INTERRUPT_CODE
        assert watch.agreed_elsewhere(preemption.INTERRUPT_CODE + 3 * preemption.PREEMPT_CODE) == preemption.INTERRUPT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):  # the handler runs between bytecodes
                pass
    finally:
        preemption.release_early_signals()
        for number, handler in saved.items():
            signal.signal(number, handler)


def test_a_process_that_exits_holding_a_loader_with_workers_ends_them(tmp_path):
    """The workers ignore a process group's SIGTERM but not their parent's: multiprocessing ends daemonic
    workers with SIGTERM at interpreter exit, and a script that still holds a loader must not hang there."""
    import subprocess

    script = ("import numpy as np, torch\n"
              "from fasttrain.config import DataConfig\n"
              "from fasttrain.data.loaders.plain import CustomDataset, PlainLoader\n"
              "from fasttrain.data.sharding import ShardedBatches\n"
              "from fasttrain.data.transforms import eval_transform\n"
              "data = CustomDataset(np.zeros((64, 32, 32, 3), np.uint8), np.zeros(64, np.int64), "
              "eval_transform(DataConfig(), 3))\n"
              "loader = PlainLoader(data, ShardedBatches(64, 8, True, 0), 2, False, True, torch.device('cpu'))\n"
              "batches = iter(loader)\n"
              "next(batches)\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, text=True, capture_output=True,
                            timeout=120, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert result.returncode == 0, result.stderr[-2000:]
