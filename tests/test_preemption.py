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

import pytest

from conftest import (assert_same_weights, child_pids, read_jsonl, run_fasttrain, run_torchrun, start,
                      torchrun_command, wait_for_step)

# 1024 images, batch 32 per rank: 16 steps per epoch for two ranks, 2 epochs; a step takes ~0.1 s
RUN = ["--config", "configs/smoke.yaml", "data.train_size=1024", "data.val_size=64", "model.name=CIFAR10_CNN",
       "train.batch_size=32", "train.epochs=2", "train.log_every=1", "data.num_workers=0",
       "checkpoint.every_steps=4"]
EXIT_PREEMPTED = 75


def failure_report_exit_codes(torchrun_output: str) -> dict:
    """{rank: exit code} from torchrun's failure report ("rank : 1 (local_rank: 1)" then "exitcode : 75");
    its log lines repeat some codes, so only the report's entries count."""
    entries = re.findall(r"rank\s*:\s*(\d+) \(local_rank: \d+\)\s*\n\s*exitcode\s*:\s*(-?\d+)", torchrun_output)
    return {int(rank): int(code) for rank, code in entries}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    result = run_torchrun(2, *RUN, f"output.dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_sigterm_to_a_two_rank_job_saves_one_checkpoint_and_a_rerun_finishes_identically(uninterrupted, tmp_path):
    out = tmp_path / "run"
    job = start(torchrun_command(2, *RUN, f"output.dir={out}", "resume=auto"))
    signalled_at = wait_for_step(out, 6, job)  # mid-epoch 1
    workers = child_pids(job.pid)
    assert len(workers) == 2
    for pid in workers:  # as SLURM signals every task of a job
        os.kill(pid, signal.SIGTERM)
    output, _ = job.communicate(timeout=120)

    # both ranks exited with the distinct code, after the same step, a few steps after the signal
    assert failure_report_exit_codes(output) == {0: EXIT_PREEMPTED, 1: EXIT_PREEMPTED}, output[-3000:]
    stops = re.findall(r"\[rank (\d)\] fasttrain: preempted by SIGTERM after step (\d+)", output)
    assert sorted(rank for rank, _ in stops) == ["0", "1"]
    stop_step = int(stops[0][1])
    assert {int(step) for _, step in stops} == {stop_step} and signalled_at <= stop_step <= signalled_at + 3
    # one complete checkpoint of that step, no temporary files, and the marker a job script requeues on
    ckpts = out / "checkpoints"
    assert (ckpts / f"step-{stop_step:08d}.pt").is_file()
    assert not list(ckpts.glob(".*"))
    marker = json.loads((out / "preempted.json").read_text())
    assert marker["global_step"] == stop_step and marker["exit_code"] == EXIT_PREEMPTED

    rerun = run_torchrun(2, *RUN, f"output.dir={out}", "resume=auto")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resumed from {ckpts / f'step-{stop_step:08d}.pt'}" in rerun.stdout
    assert not (out / "preempted.json").exists()
    assert_same_weights(uninterrupted, out)
    assert [r["step"] for r in read_jsonl(out / "steps.jsonl")] == list(range(1, 33))


def test_sigterm_to_torchrun_and_its_workers_together_stops_them_cleanly(tmp_path):
    """What SLURM's --signal=TERM@120 and preemption do: every process of the job step, torchrun
    included, gets SIGTERM. torchrun passes it on and waits; the workers still stop together."""
    out = tmp_path / "run"
    job = start(torchrun_command(2, *RUN, f"output.dir={out}", "resume=auto"))
    wait_for_step(out, 6, job)
    os.killpg(job.pid, signal.SIGTERM)  # the job's session: torchrun and both workers
    output, _ = job.communicate(timeout=120)
    assert job.returncode != 0  # torchrun reports the signal; the marker tells the job script to requeue
    stops = re.findall(r"\[rank (\d)\] fasttrain: preempted by SIGTERM after step (\d+)", output)
    assert sorted(rank for rank, _ in stops) == ["0", "1"], output[-3000:]
    stop_step = int(stops[0][1])
    assert json.loads((out / "preempted.json").read_text())["global_step"] == stop_step
    assert (out / "checkpoints" / f"step-{stop_step:08d}.pt").is_file()


def test_a_worker_killed_under_max_restarts_is_resumed_by_the_restarted_group(uninterrupted, tmp_path):
    out = tmp_path / "run"
    job = start(torchrun_command(2, *RUN, f"output.dir={out}", "resume=auto", launcher_args=("--max-restarts=1",)))
    wait_for_step(out, 6, job)  # past the step-4 checkpoint, mid-epoch 1
    os.kill(child_pids(job.pid)[1], signal.SIGKILL)
    output, _ = job.communicate(timeout=300)
    assert job.returncode == 0, output[-3000:]
    assert re.search(r"resumed from \S+step-0000000[48]\.pt", output), output[-3000:]
    assert_same_weights(uninterrupted, out)


def test_sigusr1_to_a_single_process_exits_75_and_resume_auto_finishes(tmp_path):
    """One process, SIGUSR1 (SLURM's advance warning): the exit code is the process's own. (Bitwise
    equality after such a stop is shown by the two-rank test above.)"""
    small = [*RUN, "data.train_size=512", "train.batch_size=16"]  # 32 steps per epoch
    out = tmp_path / "run"
    job = start([sys.executable, "-m", "fasttrain.run", *small, f"output.dir={out}"])
    wait_for_step(out, 5, job)
    job.send_signal(signal.SIGUSR1)
    output, _ = job.communicate(timeout=120)
    assert job.returncode == EXIT_PREEMPTED, output[-3000:]
    assert "preempted (SIGUSR1)" in output and (out / "preempted.json").is_file()
    rerun = run_fasttrain(*small, f"output.dir={out}", "resume=auto")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resumed from" in rerun.stdout and not (out / "preempted.json").exists()
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


def test_the_agreed_stop_comes_at_the_next_log_interval_without_a_collective_of_its_own(tmp_path):
    """Default (checkpoint.signal_check_every=0): the flag rides in the sums reduced every
    train.log_every steps, so the stop is at a log step, at most one interval after the signal."""
    small = [*RUN, "data.train_size=512", "train.batch_size=16", "train.log_every=5"]  # 32 steps per epoch
    out = tmp_path / "run"
    job = start([sys.executable, "-m", "fasttrain.run", *small, f"output.dir={out}"])
    seen = wait_for_step(out, 5, job)
    job.send_signal(signal.SIGTERM)
    output, _ = job.communicate(timeout=120)
    assert job.returncode == EXIT_PREEMPTED, output[-3000:]
    stop = json.loads((out / "preempted.json").read_text())["global_step"]
    assert stop % 5 == 0 and seen < stop <= seen + 10, (seen, stop)
    assert (out / "checkpoints" / f"step-{stop:08d}.pt").is_file()


def test_signal_check_every_adds_a_host_side_check_between_long_log_intervals(tmp_path):
    small = [*RUN, "data.train_size=512", "train.batch_size=16", "train.log_every=50",
             "checkpoint.signal_check_every=2", "checkpoint.every_steps=6"]
    out = tmp_path / "run"
    job = start([sys.executable, "-m", "fasttrain.run", *small, f"output.dir={out}"])
    _wait_for_file(out / "checkpoints" / "step-00000006.pt", job)
    job.send_signal(signal.SIGTERM)
    output, _ = job.communicate(timeout=120)
    assert job.returncode == EXIT_PREEMPTED, output[-3000:]
    stop = json.loads((out / "preempted.json").read_text())["global_step"]
    assert stop % 2 == 0 and 6 < stop <= 16 and stop < 50, stop  # well before the log interval at 50
