"""Shared test helpers: small generated data in the real layouts, and a way to run the CLI the
way a user does (a real subprocess, exit code, stdout/stderr)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import List

import numpy as np
import pytest

from fasttrain.data.cifar import TEST_FILES, TRAIN_FILES, write_cifar10_layout

REPO = Path(__file__).resolve().parents[1]
# one torch thread per process, this one and every run it starts: the suite runs two tests at once on a 2-core
# machine, and torch's OpenMP threads spin while they wait for a core another process holds (a 16 px CNN run
# under that load: 3.8 s of CPU with one thread, 14 s with two, for the same result)
os.environ.setdefault("OMP_NUM_THREADS", "1")
# the decoded-dataset cache (data.cache_dir's default) of this test session: never the user's ~/.cache, and
# removed when the session ends by the process that made it (pytest-xdist's workers inherit the controller's);
# each session left one behind before, 177 MB where the real CIFAR-10 was decoded into it
_SESSION_CACHE = None
if "FASTTRAIN_CACHE_DIR" not in os.environ:
    _SESSION_CACHE = os.environ["FASTTRAIN_CACHE_DIR"] = tempfile.mkdtemp(prefix="fasttrain-test-cache-")
# the real CIFAR-10 beside the project (developers' and CI machines); absent on a user's fresh clone
REAL_CIFAR_ROOT = Path(os.environ.get("FASTTRAIN_REAL_CIFAR_ROOT", REPO.parent / "shared" / "data"))
# a tiny run on synthetic data: a checkpoint of ~0.6 MB, a second or two on a CPU; no plots (a second of matplotlib
# per run: the tests about plots ask for them)
TINY = ["--config", str(REPO / "configs" / "smoke.yaml"), "data.train_size=64", "data.val_size=32", "model.name=MLP",
        "model.hidden_sizes=[16]", "train.epochs=1", "train.batch_size=32", "data.download=false", "output.plots=false"]
needs_real_cifar = pytest.mark.skipif(not (REAL_CIFAR_ROOT / "cifar-10-batches-py").is_dir(),
                                      reason=f"real CIFAR-10 not found in {REAL_CIFAR_ROOT}/cifar-10-batches-py")


def run_fasttrain(*args: str, module: str = "fasttrain.run", cwd: Path | None = None,
                  timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m fasttrain.run ARGS` (or another module) as a user would launch it."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd or REPO, env=env, text=True,
                          capture_output=True, timeout=timeout)


def free_port() -> int:
    """A TCP port nothing listens on now (for rank 0's store in a launch made by hand)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launcher_env(**extra: str) -> dict:
    """This process's environment without any launcher's variables (torchrun's, SLURM's), plus `extra`: for
    ranks launched by hand (RANK, WORLD_SIZE, MASTER_*, as srun or a job script would), each with its own exit."""
    env = {k: v for k, v in os.environ.items()
           if k not in LAUNCHER_VARIABLES and not k.startswith(("SLURM_", "TORCHELASTIC_"))}
    return dict(env, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **extra)


def run_here(*args: str, module: str = "fasttrain.run") -> subprocess.CompletedProcess:
    """run_in_process for fixtures of a module's scope (where pytest's capsys is not available): the output
    caught by redirecting sys.stdout and sys.stderr around `main(ARGS)`."""
    import contextlib
    import importlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = importlib.import_module(module).main(list(args))
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def run_in_process(capsys, *args: str, module: str = "fasttrain.run") -> subprocess.CompletedProcess:
    """`python -m fasttrain.run ARGS` (or fasttrain.cli) as its `main(ARGS)` in this process, its exit code and
    output as run_fasttrain gives them: the same code path, without the ~3 s of start-up of a process of its own
    (for the tests that are not about the process: its signals, its exit, its launcher)."""
    import importlib

    capsys.readouterr()
    code = importlib.import_module(module).main(list(args))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), code, out, err)


def read_jsonl(path: Path) -> List[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def make_cifar_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, size=n)


def pytest_configure(config):
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


# The order in which the two test processes of `make test` take the modules: the longest first. pytest-xdist
# hands out whole modules (--dist loadscope) in collection order (--no-loadscope-reorder; its own order is by
# number of tests, which put the two smoke runs of the benchmarks, ~50 s each, last on one process while the
# other sat idle: 93 s apart at the end). Longest first leaves short modules for the end. Wall seconds each
# took on the 2-core dev machine with a cold compile cache; a module not listed follows in collection order.
LONGEST_FIRST = [
    "test_preemption.py",       # 98 s
    "test_step.py",             # 96
    "test_distributed.py",      # 70
    "test_resume.py",           # 62
    "test_benchmarks.py",       # 58
    "test_gpu_check.py",        # 52
    "test_time_to_accuracy.py",  # 50
    "test_signal_edges.py",     # 44
    "test_accuracy_tools.py",   # 44
    "test_speed_features.py",   # 39
    "test_api.py",              # 39
    "test_second_hour.py",      # 35
    "test_real_data.py",        # 38 where the real CIFAR-10 is
    "test_own_models.py",       # 33
    "test_training.py",         # 27
]


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each module keeps its own order


def pytest_unconfigure(config):
    if _SESSION_CACHE is not None:
        shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


@pytest.fixture
def tiny_cifar_root(tmp_path: Path) -> Path:
    """A data.root holding cifar-10-batches-py/ in the standard layout: 5 x 20 train, 30 test images."""
    folder = tmp_path / "data" / "cifar-10-batches-py"
    for i, name in enumerate(TRAIN_FILES):
        write_cifar10_layout(folder, *make_cifar_images(20, seed=i), name=name)
    write_cifar10_layout(folder, *make_cifar_images(30, seed=99), name=TEST_FILES[0])
    return tmp_path / "data"


def run_torchrun(nproc: int, *args: str, module: str = "fasttrain.run", timeout: int = 600) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=N -m MODULE ARGS` (a script path in ARGS when module
    is empty): real processes, gloo on CPU."""
    torchrun = Path(sys.executable).parent / "torchrun"
    launcher = [str(torchrun)] if torchrun.exists() else [sys.executable, "-m", "torch.distributed.run"]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    target = ["-m", module] if module else []
    return subprocess.run([*launcher, "--standalone", f"--nproc_per_node={nproc}", *target, *args], cwd=REPO,
                          env=env, text=True, capture_output=True, timeout=timeout)


def run_ranks(world: int, *args: str, module: str = "fasttrain.run", timeout: int = 600) -> subprocess.CompletedProcess:
    """`world` real processes of `python -m MODULE ARGS` (a script path in ARGS when module is empty), gloo on
    CPU, each given RANK, WORLD_SIZE, MASTER_ADDR/PORT as a job script or srun gives them: the same
    multi-process DDP as under torchrun, without the launcher's process and rendezvous (~3 s of CPU and of
    waiting per launch). For the tests about DDP's arithmetic, not about torchrun (those use run_torchrun).
    Exit code: 0 when every rank exited 0, else the first other one; the ranks' output in rank order."""
    port = str(free_port())
    target = ["-m", module] if module else []
    ranks = [subprocess.Popen([sys.executable, *target, *args], cwd=REPO, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE,
                              env=launcher_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                                               LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
             for rank in range(world)]
    try:
        outputs = [rank.communicate(timeout=timeout) for rank in ranks]
    finally:
        for rank in ranks:
            if rank.poll() is None:
                rank.kill()
    codes = [rank.returncode for rank in ranks]
    return subprocess.CompletedProcess(args, next((c for c in codes if c != 0), 0),
                                       "".join(out for out, _ in outputs), "".join(err for _, err in outputs))


def torchrun_command(nproc: int, *args: str, launcher_args: tuple = (), module: str = "fasttrain.run") -> List[str]:
    torchrun = Path(sys.executable).parent / "torchrun"
    launcher = [str(torchrun)] if torchrun.exists() else [sys.executable, "-m", "torch.distributed.run"]
    return [*launcher, "--standalone", f"--nproc_per_node={nproc}", *launcher_args, "-m", module, *args]


def as_a_terminal_job() -> None:
    """In a job's process before it runs (preexec_fn): Ctrl-C's default action, as a terminal's foreground job
    has it. A test run that a shell started in the background (no job control) ignores SIGINT, and its children
    inherit that; fasttrain keeps an ignored SIGINT ignored (run.py), so the Ctrl-C tests would test nothing."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(command: List[str]) -> subprocess.Popen:
    """A training job in its own session (as a scheduler would start it), output captured."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.Popen(command, cwd=REPO, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=as_a_terminal_job)


def child_pids(pid: int) -> List[int]:
    """The direct children of a process (torchrun's workers), from /proc."""
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                children.append(int(entry.name))
    return sorted(children)


def wait_for_step(run_dir: Path, step: int, job: subprocess.Popen, timeout: float = 300) -> int:
    """Block until the run has logged `step` (train.log_every=1) and return the newest logged step."""
    import time

    deadline = time.monotonic() + timeout
    steps = run_dir / "steps.jsonl"
    while time.monotonic() < deadline:
        if job.poll() is not None:
            raise AssertionError(f"the job ended before step {step}:\n{job.stdout.read()[-3000:]}")
        if steps.is_file():
            logged = [json.loads(line)["step"] for line in steps.read_text().splitlines() if line.strip()]
            if logged and logged[-1] >= step:
                return logged[-1]
        time.sleep(0.02)
    raise AssertionError(f"step {step} not reached in {timeout}s")


def logged_steps(run_dir: Path) -> List[int]:
    """The steps steps.jsonl has logged so far (complete lines only: the run may be writing the next one)."""
    steps = run_dir / "steps.jsonl"
    lines = steps.read_text().split("\n")[:-1] if steps.is_file() else []
    return [json.loads(line)["step"] for line in lines if line.strip()]


@contextmanager
def frozen(*pids: int):
    """SIGSTOP the processes, SIGCONT them on leaving: what a test reads (the newest logged step) and the
    signals it sends meanwhile meet the run at one known point, however loaded the machine is (a stopped
    process gets its pending signals when it continues)."""
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


def final_weights(run_dir: Path) -> dict:
    import torch

    return torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)["model"]


def assert_same_weights(run_a: Path, run_b: Path) -> None:
    """Bit for bit: every parameter and buffer of the two runs' final checkpoints."""
    import torch

    a, b = final_weights(run_a), final_weights(run_b)
    assert a.keys() == b.keys()
    differing = [name for name in a if not torch.equal(a[name], b[name])]
    assert not differing, f"weights differ in {differing[:5]}"


def random_batches(n: int = 6, seed: int = 0, device: str = "cpu", side: int = 32) -> list:
    """`n` batches of 32 random images (3 x side x side) and labels, the same for a seed on every device."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(32, 3, side, side, generator=gen).to(device),
             torch.randint(0, 10, (32,), generator=gen).to(device)) for _ in range(n)]


def sgd_losses(model, batches, precision_name: str = "fp32", steps: int = 6) -> List[float]:
    """The losses of `steps` plain SGD steps of `model` over `batches` under a precision (on the batches' device):
    two precisions or memory formats from the same weights compared step by step."""
    import torch
    import torch.nn.functional as F

    from fasttrain.train.precision import build_precision

    precision = build_precision(precision_name, batches[0][0].device, tf32=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for images, labels in batches[:steps]:
        with precision.autocast():
            loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.fixture(scope="module")
def no_plots():
    """For a module whose runs are about something else: skip drawing curves.png (half a tiny run's
    time). A module asks for it with `pytestmark = pytest.mark.usefixtures("no_plots")`."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("fasttrain.train.lifecycle.plot_run", lambda run_dir: [], raising=False)
        yield


@pytest.fixture(scope="module")
def earlier(tmp_path_factory, no_plots) -> Path:
    """A finished tiny run with a checkpoint after every step: the base of hand-made checkpoints."""
    from fasttrain import run

    out = tmp_path_factory.mktemp("earlier") / "run"
    assert run.main([*TINY, "checkpoint.every_steps=1", f"output.dir={out}"]) == 0
    return out
