"""A newcomer's first hour: the console script's bench from the project folder, launches that do not fit
the machine said out loud, and DataLoader workers that fit the CPUs."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from fasttrain import cli, dist
from fasttrain.dist import launcher
from fasttrain.config import Config, DataConfig, load_config
from fasttrain.data import build_loaders, resolve_workers
from fasttrain.errors import ConfigError

from conftest import REPO

CONSOLE_SCRIPT = Path(sys.executable).parent / "fasttrain"
# what accelerate's GPU launcher (torchrun underneath) leaves in every process's environment
ACCELERATE_MULTI_GPU = {"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_DYNAMO_BACKEND": "NO",
                        "TORCHELASTIC_RUN_ID": "none", "LOCAL_WORLD_SIZE": "8", "WORLD_SIZE": "8", "RANK": "0",
                        "LOCAL_RANK": "0"}
# its simple launcher (`accelerate launch --cpu`, or one process): no torchrun, ACCELERATE_USE_CPU always set
ACCELERATE_CPU = {"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_DYNAMO_BACKEND": "NO", "ACCELERATE_USE_CPU": "True"}
TORCHRUN = {"TORCHELASTIC_RUN_ID": "none", "LOCAL_WORLD_SIZE": "2", "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}


def without_pythonpath() -> dict:
    """The environment of a user's shell: nothing points Python at the checkout."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def fake_gpus(monkeypatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


# --------------------------------------------------------------------------- fasttrain bench


@pytest.mark.skipif(not CONSOLE_SCRIPT.exists(), reason=f"no console script at {CONSOLE_SCRIPT} (not pip-installed)")
@pytest.mark.parametrize("where", ["project folder", "another folder"])
def test_console_script_bench_finds_the_suite(where, tmp_path):
    """`fasttrain bench` as the README runs it: the real console script, no PYTHONPATH. --list runs the
    suite's main() (its imports, argument parsing, presets) in seconds; the full cpu-smoke run is
    test_benchmarks.py's. From another folder it works too while fasttrain is imported from the checkout
    (an editable install, as here and in CI)."""
    cwd = REPO if where == "project folder" else tmp_path
    result = subprocess.run([str(CONSOLE_SCRIPT), "bench", "--list"], cwd=cwd, env=without_pythonpath(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    presets = [line.split(":")[0] for line in result.stdout.splitlines()]
    assert presets == ["cpu", "cpu-smoke", "gpu"]
    assert "benchmarks/out/results.{json,md,png}" in result.stdout


def test_bench_without_a_source_checkout_is_one_line(monkeypatch, tmp_path, capsys):
    """A wheel install run outside a clone: no benchmarks/ beside the package nor in the current folder."""
    wheel, elsewhere = tmp_path / "site-packages", tmp_path / "home"
    wheel.mkdir()
    elsewhere.mkdir()
    monkeypatch.setattr(cli, "_bench_roots", lambda: [wheel, elsewhere])
    path_before = list(sys.path)
    assert cli._bench(["--list"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fasttrain: error: fasttrain bench runs the suite in benchmarks/ "
                                                    "of a source checkout and found none")
    assert str(wheel) in err and str(elsewhere) in err
    assert sys.path == path_before


# --------------------------------------------------------------------------- launcher vs machine


def test_accelerate_gpu_launch_on_a_machine_without_cuda_is_refused(monkeypatch):
    fake_gpus(monkeypatch, 0)
    for device in ("auto", "cpu"):
        with pytest.raises(ConfigError, match=r"launched by accelerate for GPUs \(MULTI_GPU, 8 processes on this "
                                              r"node\) but this machine has no CUDA GPU: on the CPU launch with "
                                              r"torchrun"):
            launcher.check_launch(device, "fp32", "off", ACCELERATE_MULTI_GPU)
    fsdp = dict(ACCELERATE_MULTI_GPU, ACCELERATE_USE_FSDP="true")
    with pytest.raises(ConfigError, match=r"\(FSDP, 8 processes"):
        launcher.check_launch("auto", "fp32", "off", fsdp)
    # said explicitly: the launch stays on the CPU (accelerate's own Accelerator reads the same variable)
    launcher.check_launch("auto", "fp32", "off", dict(ACCELERATE_MULTI_GPU, ACCELERATE_USE_CPU="true"))


def test_torchrun_on_the_cpu_and_one_process_launches_are_fine(monkeypatch):
    fake_gpus(monkeypatch, 0)
    for device in ("auto", "cpu"):
        launcher.check_launch(device, "fp32", "off", TORCHRUN)  # gloo on the CPU: the tests' own launches
        launcher.check_launch(device, "fp32", "off", {})  # python -m fasttrain.run
        launcher.check_launch(device, "fp32", "off", ACCELERATE_CPU)  # accelerate launch --cpu
    # accelerate's simple launcher for one process with a GPU config, on a CPU machine: one CPU process
    launcher.check_launch("auto", "fp32", "off", dict(ACCELERATE_CPU, ACCELERATE_USE_CPU="False"))


def test_more_processes_per_node_than_gpus_is_refused_for_any_launcher(monkeypatch):
    fake_gpus(monkeypatch, 2)
    for env in (TORCHRUN, dict(ACCELERATE_MULTI_GPU, LOCAL_WORLD_SIZE="2")):
        launcher.check_launch("auto", "fp32", "off", env)
        launcher.check_launch("cuda", "fp32", "off", env)
    for env in (dict(TORCHRUN, LOCAL_WORLD_SIZE="4"), ACCELERATE_MULTI_GPU):
        local = env["LOCAL_WORLD_SIZE"]
        with pytest.raises(ConfigError, match=rf"^{local} processes were launched on this node but it has 2 CUDA "
                                              rf"GPU\(s\) and train.device=auto gives each process one: launch at "
                                              rf"most 2 per node"):
            launcher.check_launch("auto", "fp32", "off", env)
    launcher.check_launch("cpu", "fp32", "off", dict(TORCHRUN, LOCAL_WORLD_SIZE="4"))  # CPU processes: any count
    with pytest.raises(ConfigError, match="launched by accelerate for GPUs .* but train.device=cpu"):
        launcher.check_launch("cpu", "fp32", "off", dict(ACCELERATE_MULTI_GPU, LOCAL_WORLD_SIZE="2"))
    with pytest.raises(ConfigError, match=r"launched by accelerate for the CPU .* train.device=auto trains on CUDA"):
        launcher.check_launch("auto", "fp32", "off", ACCELERATE_CPU)


def test_accelerate_precision_and_dynamo_must_agree_with_fasttrains_config():
    bf16 = dict(ACCELERATE_CPU, ACCELERATE_MIXED_PRECISION="bf16")
    with pytest.raises(ConfigError, match=r"accelerate's mixed_precision=bf16 \(ACCELERATE_MIXED_PRECISION\) is "
                                          r"not applied by fasttrain, which trains in train.precision=fp32: keep "
                                          r"mixed_precision 'no' .* and set train.precision=bf16 instead"):
        launcher.check_accelerate_settings("fp32", "off", bf16)
    launcher.check_accelerate_settings("bf16", "off", bf16)  # the same request twice: nothing is ignored
    with pytest.raises(ConfigError, match="mixed_precision=bf16"):
        launcher.check_accelerate_settings(None, None, bf16)  # a caller that cannot tell: accelerate's 'no' only
    with pytest.raises(ConfigError, match=r"mixed_precision=fp8 .* set train.precision \(fp32 \| bf16 \| fp16\)"):
        launcher.check_accelerate_settings("bf16", "off", dict(ACCELERATE_CPU, ACCELERATE_MIXED_PRECISION="fp8"))
    inductor = dict(ACCELERATE_CPU, ACCELERATE_DYNAMO_BACKEND="INDUCTOR")
    with pytest.raises(ConfigError, match=r"dynamo_backend=INDUCTOR \(ACCELERATE_DYNAMO_BACKEND\) is not applied "
                                          r"by fasttrain, which runs with train.compile=off: keep dynamo_backend "
                                          r"'NO' .* set train.compile=default"):
        launcher.check_accelerate_settings("fp32", "off", inductor)
    launcher.check_accelerate_settings("fp32", "default", inductor)  # fasttrain compiles with inductor itself
    with pytest.raises(ConfigError, match="dynamo_backend=AOT_EAGER"):
        launcher.check_accelerate_settings("fp32", "default", dict(ACCELERATE_CPU, ACCELERATE_DYNAMO_BACKEND="AOT_EAGER"))
    launcher.check_accelerate_settings("fp16", "max-autotune", {})  # no accelerate: nothing to agree with


def test_dist_setup_refuses_before_any_process_group(monkeypatch):
    fake_gpus(monkeypatch, 0)
    for name, value in dict(ACCELERATE_MULTI_GPU, MASTER_ADDR="127.0.0.1", MASTER_PORT="1").items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        dist.setup("auto", "auto", 5, precision="fp32", compile_mode="off")
    assert not torch.distributed.is_initialized()


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine this launch is right and would train")
def test_the_readme_accelerate_launch_on_a_cpu_machine_says_so(tmp_path):
    """The README's accelerate command (two processes instead of the config's eight, to be quick): it
    used to train on the CPU at chance; now every process stops before any work, with one line."""
    pytest.importorskip("accelerate")
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env.pop("ACCELERATE_USE_CPU", None)
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
         "launch/accelerate/single_node_multi_gpu.yaml", "--num_processes", "2", "-m", "fasttrain.run",
         "--config", "configs/smoke.yaml", f"output.dir={tmp_path / 'run'}"],
        cwd=REPO, env=env, text=True, capture_output=True, timeout=300)
    assert result.returncode != 0
    # rank 0's line, then the launcher's failure summary naming it as the root cause (torch elastic's error file)
    ours = {line.split("fasttrain: error: ", 1)[1] for line in result.stderr.splitlines() if "fasttrain: error:" in line}
    assert ours == {"launched by accelerate for GPUs (MULTI_GPU, 2 processes on this node) but "
                    "this machine has no CUDA GPU: on the CPU launch with torchrun --standalone --nproc_per_node=N -m "
                    "fasttrain.run ... (or accelerate launch --cpu, one process; export ACCELERATE_USE_CPU=true to "
                    "run this launch on the CPU anyway)"}, result.stderr[-3000:]
    assert result.stderr.split("Root Cause", 1)[-1].count("fasttrain: error: launched by accelerate") == 1
    assert not (tmp_path / "run").exists()  # stopped before the run folder


# --------------------------------------------------------------------------- DataLoader workers


def test_auto_workers_fit_the_cpus_this_process_may_use(monkeypatch):
    assert DataConfig().num_workers == -1
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    for cpus, local, expected in [(2, None, 2), (1, None, 1), (64, None, 4), (8, "2", 4), (2, "2", 1), (2, "4", 0)]:
        monkeypatch.setattr(os, "sched_getaffinity", lambda _pid, n=cpus: set(range(n)))
        if local:
            monkeypatch.setenv("LOCAL_WORLD_SIZE", local)
        assert resolve_workers(-1) == expected, (cpus, local)
        assert resolve_workers(3) == 3 and resolve_workers(0) == 0  # a number given is kept
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert load_config(None, ["data.num_workers=-1"]).data.num_workers == -1
    with pytest.raises(ConfigError, match=r"data.num_workers.*-1 \(auto\)"):
        load_config(None, ["data.num_workers=-2"])


def test_the_default_loader_resolves_its_workers_without_torchs_warning(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    cfg = load_config(None, ["data.dataset=synthetic", "data.train_size=64", "data.val_size=32",
                             "train.batch_size=32", "data.loader=plain"])
    train, val, _ = build_loaders(cfg, torch.device("cpu"))
    expected = min(4, len(os.sched_getaffinity(0)))
    assert train.num_workers == val.num_workers == expected
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        images, _ = next(iter(train))  # the workers start here, and torch checks their number
    assert images.shape == (32, 3, 32, 32)
    assert not [w for w in caught if "worker processes in total" in str(w.message)]
    del train, val


def test_dali_threads_resolve_auto_too(monkeypatch):
    pytest.importorskip("nvidia.dali")
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    cfg = load_config(None, ["data.dataset=synthetic", "data.train_size=64", "data.val_size=32",
                             "train.batch_size=32", "data.loader=dali"])
    train, _, _ = build_loaders(cfg, torch.device("cpu"))
    assert train.num_threads == max(1, min(4, len(os.sched_getaffinity(0))))


def test_resume_treats_the_worker_count_as_neutral():
    from fasttrain.checkpoint import NEUTRAL_KEYS

    assert "data.num_workers" in NEUTRAL_KEYS  # an old run's 4 resumes under today's auto
    assert Config().data.num_workers == -1
