"""A newcomer's second hour (issue 25): habits from other tools get a pointer, the console script imports a
model from the current folder as `python -m fasttrain.run` does, a wrong import path fails before the data,
a broken torchvision is named as such, and the log says what happened without noise."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from conftest import run_in_process
from fasttrain import cli, run
from fasttrain.errors import UserError, broken_torchvision

CONSOLE_SCRIPT = Path(sys.executable).parent / "fasttrain"
TINY = ["data.dataset=synthetic", "data.train_size=64", "data.val_size=32", "model.name=MLP", "model.hidden_sizes=[16]",
        "train.batch_size=16", "train.epochs=1", "train.device=cpu", "train.log_every=2", "output.plots=false"]


@pytest.mark.parametrize("argv, says", [
    (["--epochs", "5"], "--epochs is not an option: settings are overrides written as train.epochs=5"),
    (["--lr=0.01"], "--lr=0.01 is not an option: settings are overrides written as optim.lr=0.01"),
    (["--batch-size", "64", "train.epochs=2"], "written as train.batch_size=64"),
    (["--frobnicate", "1"], "--frobnicate is not an option: settings are overrides written as key.sub=value "
                            "(every key: --help)"),
])
def test_a_flag_from_another_tool_names_the_override_it_means(capsys, argv, says):
    with pytest.raises(SystemExit) as stop:
        run.main(argv)
    assert stop.value.code == 2 and says in capsys.readouterr().err


def test_a_wrong_import_path_fails_before_any_data_is_read(capsys, tmp_path):
    """The data folder does not exist either: the model's error comes first, so nothing was decoded."""
    result = run_in_process(capsys, "model.name=no_such_package.nets:Net", "data.dataset=cifar10",
                            f"data.root={tmp_path / 'absent'}", f"output.dir={tmp_path / 'run'}")
    assert result.returncode == 2
    assert "model.name='no_such_package.nets:Net': no module named 'no_such_package'" in result.stderr
    assert "CIFAR-10" not in result.stderr and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_the_console_script_trains_and_evaluates_a_model_of_the_current_folder(tmp_path):
    import subprocess

    package = tmp_path / "mynets"
    package.mkdir()
    (package / "__init__.py").write_text(textwrap.dedent("""
        from torch import nn

        def tiny(num_classes, in_channels, image_size):
            return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size ** 2, num_classes))
    """))
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"}  # a user's shell
    trained = subprocess.run([str(CONSOLE_SCRIPT), "train", *TINY, "model.name=mynets:tiny", "output.dir=runs/own"],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert trained.returncode == 0, trained.stderr[-2000:]
    # a file never chooses the code that runs: the user names the model again
    evaluated = subprocess.run([str(CONSOLE_SCRIPT), "eval", "runs/own/checkpoints/last.pt", "model.name=mynets:tiny",
                                "train.device=cpu"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert "runs/own/checkpoints/last.pt (epoch 1, trained weights): test accuracy" in evaluated.stdout


def test_one_process_logs_its_weights_digest_without_comparing_ranks_and_counts_one_epoch(capsys, tmp_path):
    result = run_in_process(capsys, *TINY, "data.loader=gpu", f"output.dir={tmp_path / 'run'}")
    assert result.returncode == 0, result.stderr
    assert "| loader gpu (the split resident in cpu memory) |" in result.stdout  # where the data is, here
    assert "final weights: sha256 " in result.stdout and "identical on all" not in result.stdout
    assert "| 1 epoch in " in result.stdout


def test_eval_names_the_epoch_a_mid_epoch_checkpoint_was_in(capsys, tmp_path):
    out = tmp_path / "run"
    stopped = run_in_process(capsys, *TINY, "train.stop_after_steps=2", f"output.dir={out}")
    assert stopped.returncode == 0, stopped.stderr
    checkpoint = next((out / "checkpoints").glob("*.pt"))
    evaluated = run_in_process(capsys, "eval", str(checkpoint), module="fasttrain.cli")
    assert evaluated.returncode == 0, evaluated.stderr
    assert f"{checkpoint} (epoch 1, step 2, trained weights)" in evaluated.stdout  # not "epoch 0"


def test_bench_help_names_the_command_it_was_given_as(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["bench", "--help"])
    assert stop.value.code == 0 and capsys.readouterr().out.startswith("usage: fasttrain bench")


def test_a_broken_torchvision_is_named_not_reported_as_a_failed_download(monkeypatch, tmp_path):
    import torchvision.datasets

    assert broken_torchvision(RuntimeError("CUDA out of memory")) is None
    message = "operator torchvision::nms does not exist"

    def broken(*args, **kwargs):
        raise RuntimeError(message)

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", broken)
    from fasttrain.data.cifar import _ensure_present

    with pytest.raises(UserError) as err:
        _ensure_present(tmp_path, download=True)
    said = str(err.value)
    assert said.startswith("torchvision ") and "does not work with torch " in said and message in said
    assert "download" not in said.split("(")[0] and "\n" not in said


@pytest.mark.parametrize("how", ["as printed", "--resume"])
def test_a_stopped_run_resumes_from_its_folder_alone(capsys, tmp_path, how):
    """The run was configured on the command line only; its stop line says how to continue. Run as printed (no
    --config), or as `--resume RUN_DIR`, it takes the run's own config.yaml and finishes the same run."""
    out = tmp_path / "run"
    stopped = run_in_process(capsys, *TINY, "train.epochs=2", "train.stop_after_steps=3", f"output.dir={out}")
    assert stopped.returncode == 0, stopped.stderr
    hint = stopped.stdout.split("continue with ", 1)[1].split()[:2]
    assert hint == ["resume=auto", f"output.dir={out}"]
    argv = hint if how == "as printed" else ["--resume", str(out)]
    resumed = run_in_process(capsys, *argv)
    assert resumed.returncode == 0, resumed.stderr
    assert f"fasttrain: config from {out / 'config.yaml'} (the run being resumed" in resumed.stdout
    assert "| 2 epochs in " in resumed.stdout and "resumed from" in resumed.stdout


def test_resume_of_a_folder_that_is_no_run_is_one_line(capsys, tmp_path):
    result = run_in_process(capsys, "--resume", str(tmp_path))
    assert result.returncode == 2
    assert f"--resume {tmp_path}: no run folder there (it holds no config.yaml)" in result.stderr


def test_under_torchrun_the_launchers_summary_names_fasttrains_error():
    from conftest import run_torchrun

    result = run_torchrun(2, "--config", "configs/smoke.yaml", "train.epocs=3", timeout=300)
    assert result.returncode != 0
    summary = result.stderr.split("Root Cause", 1)[-1]
    assert "fasttrain: error: config error: unknown key 'train.epocs'; did you mean train.epochs?" in summary
    assert "To enable traceback" not in summary


def test_plot_draws_a_run_stopped_before_its_first_epoch_ended(capsys, tmp_path):
    from PIL import Image

    out = tmp_path / "run"
    stopped = run_in_process(capsys, *TINY, "train.stop_after_steps=3", "train.log_every=1", f"output.dir={out}")
    assert stopped.returncode == 0 and not (out / "metrics.jsonl").is_file()  # no epoch ended
    drawn = run_in_process(capsys, "plot", str(out), module="fasttrain.cli")
    assert drawn.returncode == 0, drawn.stderr
    assert Image.open(out / "curves.png").format == "PNG" and Image.open(out / "throughput.png").format == "PNG"


def test_a_rejected_run_leaves_no_empty_runs_folder(capsys, tmp_path):
    out = tmp_path / "runs" / "first"
    result = run_in_process(capsys, "train.device=cpu", f"data.root={tmp_path / 'absent'}", f"output.dir={out}")
    assert result.returncode == 2 and "CIFAR-10 not found" in result.stderr
    assert list(tmp_path.iterdir()) == []  # neither runs/first nor runs/


def test_a_failed_download_leaves_no_folders_behind(monkeypatch, tmp_path):
    """torchvision makes data/MNIST/raw before it fetches a byte; the network fails (here: by hand, tests never
    download); the folders it made go again, a folder that was there stays."""
    import torchvision.datasets

    from fasttrain.data.mnist import load_mnist

    def no_network(root, train, download):
        (Path(root) / "MNIST" / "raw").mkdir(parents=True)
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(torchvision.datasets, "MNIST", no_network)
    (tmp_path / "kept").mkdir()
    with pytest.raises(UserError, match="MNIST not found or unreadable"):
        load_mnist(str(tmp_path / "kept" / "data"), True, download=True)
    assert [p.name for p in tmp_path.rglob("*")] == ["kept"]


def test_the_progress_line_estimates_the_whole_run_and_says_how_to_run_a_short_one(monkeypatch):
    """From the second log interval: the rest of the run's steps at the pace since the first (compilation left
    out), in each line and once in the log, with the hint when it is long; by hand, a clock that moves 10 s
    between intervals of 10 steps (1 s a step)."""
    import io

    from fasttrain.observe import progress

    now = [0.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: now[0])
    lines = []
    display = progress.Progress(True, stream=io.StringIO(), log=lines.append, run_steps=1000, short_hint="try X")
    display.start_epoch(1, 10, 100)
    for step in (10, 20):
        for _ in range(10):
            display.tick()
        now[0] = step  # 1 s a step
        display.interval(step, 2.0, 0.1, 100.0)
    assert "run eta" not in lines[0]  # one interval: no pace yet
    assert lines[1] == "estimate: 16m20s more for the run's other 980 of 1,000 steps at 1 s a step (validation " \
                       "not counted); try X"
    assert lines[2].endswith("| run eta 16m20s")
    assert [progress.duration(s) for s in (12, 425, 7980)] == ["12s", "7m05s", "2h13m"]


def test_the_first_command_a_reader_meets_is_the_short_run_and_make_smoke_runs_it():
    """The README's set-up block and tour start with configs/smoke.yaml, which stays a run of about half a minute
    on a CPU (synthetic data, no download, a few epochs); `make smoke` runs that config. (Its run itself is
    exercised by the suite's launches of configs/smoke.yaml.)"""
    from conftest import REPO
    from fasttrain.config import load_config

    readme = (REPO / "README.md").read_text()
    setup, tour = readme.split("```bash\n")[1], readme.split("## 60-second tour\n\n```bash\n")[1]
    assert setup.startswith("make smoke ") and tour.startswith("python -m fasttrain.run --config configs/smoke.yaml ")
    makefile = (REPO / "Makefile").read_text()
    assert "smoke: $(TRAIN_STAMP)\n\t$(BIN)/python -m fasttrain.run --config configs/smoke.yaml " in makefile
    smoke = load_config(str(REPO / "configs" / "smoke.yaml"))
    assert smoke.data.dataset == "synthetic" and smoke.train.device == "cpu" and smoke.train.epochs <= 3
    assert smoke.data.train_size * smoke.train.epochs <= 10_000  # images trained: ~30 s on a laptop's CPU


def test_a_test_that_kills_its_worker_is_named_by_make_tests_options(tmp_path):
    """`make test`'s pytest options (the Makefile's PYTEST_ARGS): a test process that dies is reported with the
    test it was running, once, and the session ends normally, not in xdist's INTERNALERROR."""
    import re
    import subprocess

    from conftest import REPO

    args = re.search(r"^PYTEST_ARGS \?= (.*)$", (REPO / "Makefile").read_text(), re.MULTILINE).group(1).split()
    (tmp_path / "test_dies.py").write_text("import os\n\ndef test_fine():\n    pass\n\ndef test_dies():\n    os._exit(3)\n")
    (tmp_path / "test_other.py").write_text("def test_other():\n    pass\n")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args, str(tmp_path)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stdout[-2000:]
    assert "INTERNALERROR" not in done.stdout + done.stderr
    assert done.stdout.count("crashed while running 'test_dies.py::test_dies'") >= 1
    assert re.search(r"1 failed, 2 passed", done.stdout), done.stdout[-1000:]


def test_a_cpu_run_drops_torchs_note_that_there_is_no_cuda_runtime(caplog):
    """Logged by torch.utils.cpp_extension when torch.compile builds a CPU kernel on a machine with a CUDA
    toolkit and no GPU; once the run has chosen the CPU it is noise. Only that message: the logger's others stay."""
    import logging

    from fasttrain.dist.device import _NoCudaRuntimeNote, quiet_on_cpu

    torch_logger = logging.getLogger("torch.utils.cpp_extension")
    before = list(torch_logger.filters)
    try:
        # an earlier run in this test process may have installed it: start from a logger without it
        torch_logger.filters[:] = [f for f in before if not isinstance(f, _NoCudaRuntimeNote)]
        with caplog.at_level(logging.WARNING, logger="torch.utils.cpp_extension"):
            torch_logger.warning("No CUDA runtime is found, using CUDA_HOME='%s'", "/usr/local/cuda")
        assert len(caplog.records) == 1  # torch's own behaviour, without the filter
        caplog.clear()
        quiet_on_cpu(__import__("torch").device("cpu"))
        quiet_on_cpu(__import__("torch").device("cpu"))  # once per process, however many runs
        assert sum(isinstance(f, _NoCudaRuntimeNote) for f in torch_logger.filters) == 1
        with caplog.at_level(logging.WARNING, logger="torch.utils.cpp_extension"):
            torch_logger.warning("No CUDA runtime is found, using CUDA_HOME='%s'", "/usr/local/cuda")
            torch_logger.warning("something else")
        assert [r.getMessage() for r in caplog.records] == ["something else"]
    finally:
        torch_logger.filters[:] = before


def test_a_run_folders_config_does_not_choose_code_to_import(capsys, tmp_path):
    """A hand-made (or copied) run folder whose config.yaml names a model by import path: resuming from the folder
    alone imports nothing until the command line names that model itself."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("model:\n  name: os_helpers.evil:Net\n")
    refused = run_in_process(capsys, "--resume", str(out), "train.device=cpu")
    assert refused.returncode == 2
    assert "names its model by import (model.name='os_helpers.evil:Net') and fasttrain imports no code" in refused.stderr
    assert "no module named" not in refused.stderr  # refused before any import was tried
