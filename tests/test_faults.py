"""Bad input and numerical faults: a clear one-line error, exit code 2, and nothing already saved lost.

Every case runs the command line's entry point against a finished earlier run; after each, that run's
files are byte for byte what they were. A few cases run it as its own process (what a user sees: exit
code and stderr); the others call `fasttrain.run.main` in this one, the same code without the 3 s of
start-up a process costs.
"""

from __future__ import annotations

import hashlib
import math
import os
import resource
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List

import pytest
import torch

from conftest import REPO, make_cifar_images, read_jsonl, run_fasttrain, run_in_process, write_cifar10_layout

# a small MLP on synthetic data: a checkpoint of ~2.5 MB (weights + AdamW state)
EARLIER = ["--config", "configs/smoke.yaml", "data.train_size=256", "data.val_size=64", "model.name=MLP",
           "model.hidden_sizes=[64]", "train.epochs=1", "train.batch_size=64", "checkpoint.every_steps=2",
           "output.plots=false"]


def digest_tree(folder: Path) -> Dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def earlier(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("earlier") / "run"
    result = run_fasttrain(*EARLIER, f"output.dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@dataclass
class Case:
    name: str
    args: Callable[[Path, Path], List[str]]  # (earlier run folder, scratch folder) -> command line
    expect: str  # the error must say this
    module: str = "fasttrain.run"
    file_size_limit: int = 0  # RLIMIT_FSIZE for the process (bytes): a disk that fills up
    process: bool = False  # a process of its own (always for another module or a file size limit)


def _file(scratch: Path, name: str, text: str) -> Path:
    path = scratch / name
    path.write_text(text)
    return path


def _corrupt_cifar(scratch: Path) -> Path:
    folder = scratch / "data" / "cifar-10-batches-py"
    for i, name in enumerate(["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5"]):
        write_cifar10_layout(folder, *make_cifar_images(10, seed=i), name=name)
    write_cifar10_layout(folder, *make_cifar_images(10, seed=9), name="test_batch")
    batch = folder / "data_batch_2"
    batch.write_bytes(batch.read_bytes()[:1000])
    return scratch / "data"


def _truncated_copy(earlier: Path, scratch: Path) -> Path:
    copy = scratch / "truncated.pt"
    data = (earlier / "checkpoints" / "last.pt").read_bytes()
    copy.write_bytes(data[: len(data) // 3])
    return copy


def _foreign_checkpoint(scratch: Path) -> Path:
    path = scratch / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, path)
    return path


def _all_corrupt_copy(earlier: Path, scratch: Path) -> Path:
    copy = scratch / "copy"
    shutil.copytree(earlier, copy)
    for ckpt in (copy / "checkpoints").glob("*.pt"):
        ckpt.write_bytes(b"not a checkpoint")
    return copy


def _full_disk_copy(earlier: Path, scratch: Path) -> Path:
    copy = scratch / "copy"
    shutil.copytree(earlier, copy)
    return copy


RUN = ["--config", "configs/smoke.yaml"]
CASES = [
    Case("unknown key", lambda e, s: [*RUN, "train.epoch=3"], "unknown key 'train.epoch'", process=True),
    Case("wrong type", lambda e, s: [*RUN, "train.epochs=three"], "train.epochs"),
    Case("out of range", lambda e, s: [*RUN, "train.batch_size=0"], "train.batch_size=0 is not valid"),
    Case("unknown model", lambda e, s: [*RUN, "model.name=ResNet9000"], "model.name='ResNet9000' is not valid"),
    Case("unknown optimizer", lambda e, s: [*RUN, "optim.name=lamb"], "optim.name='lamb' is not valid"),
    Case("unknown loader", lambda e, s: [*RUN, "data.loader=turbo"], "data.loader='turbo' is not valid"),
    Case("unknown scheduler", lambda e, s: [*RUN, "sched.name=warmup"], "sched.name='warmup' is not valid"),
    Case("override without '='", lambda e, s: [*RUN, "train.epochs"], "must look like key.sub=value"),
    Case("missing config file", lambda e, s: ["--config", str(s / "nope.yaml")], "nope.yaml' not found"),
    Case("invalid YAML", lambda e, s: ["--config", str(_file(s, "bad.yaml", "train: [1, 2\n"))], "not valid YAML"),
    Case("negative checkpoint interval", lambda e, s: [*RUN, "checkpoint.every_steps=-1"], "checkpoint.every_steps"),
    Case("unknown preemption signal", lambda e, s: [*RUN, "checkpoint.signals=[SIGFOO]"], "checkpoint.signals"),
    Case("normalize mean of 2 values", lambda e, s: [*RUN, "data.mean=[0.5,0.5]"], "data.mean"),
    Case("missing dataset", lambda e, s: [*RUN, "data.dataset=cifar10", f"data.root={s / 'none'}",
                                          "data.download=false", f"output.dir={s / 'out'}"], "CIFAR-10 not found",
         process=True),
    Case("corrupt dataset file", lambda e, s: [*RUN, "data.dataset=cifar10", f"data.root={_corrupt_cifar(s)}",
                                               "data.download=false", f"output.dir={s / 'out'}"],
         "data_batch_2 is truncated or corrupt"),
    Case("resume from a missing file", lambda e, s: [*EARLIER, f"resume={s / 'gone.pt'}", f"output.dir={s / 'out'}"],
         "gone.pt not found"),
    Case("resume from a truncated file", lambda e, s: [*EARLIER, f"resume={_truncated_copy(e, s)}",
                                                       f"output.dir={s / 'out'}"], "truncated or corrupt"),
    Case("resume from a file that is not a fasttrain checkpoint",
         lambda e, s: [*EARLIER, f"resume={_foreign_checkpoint(s)}", f"output.dir={s / 'out'}"],
         "not a fasttrain checkpoint"),
    Case("resume a checkpoint of another model", lambda e, s: [*EARLIER, "model.hidden_sizes=[32]",
                                                               f"resume={e / 'checkpoints' / 'last.pt'}",
                                                               f"output.dir={s / 'out'}"],
         "shapes differ: layers.1.weight (64, 3072) vs model (32, 3072)", process=True),
    Case("resume with another optimizer", lambda e, s: [*EARLIER, "optim.name=sgd",
                                                         f"resume={e / 'checkpoints' / 'last.pt'}",
                                                         f"output.dir={s / 'out'}"],
         "was trained with optim.name=adamw but this run has optim.name=sgd"),
    Case("fresh run in a folder with checkpoints", lambda e, s: [*EARLIER, f"output.dir={e}"],
         "already holds checkpoints of an earlier run: continue it with resume=auto"),
    Case("resume=auto with only broken checkpoints", lambda e, s: [*EARLIER, "resume=auto",
                                                                   f"output.dir={_all_corrupt_copy(e, s)}"],
         "no usable checkpoint in"),
    Case("output.dir is a file", lambda e, s: [*EARLIER, f"output.dir={_file(s, 'taken', 'x')}"], "is a file"),
    Case("output.dir not writable", lambda e, s: [*EARLIER, f"output.dir={_file(s, 'file', 'x') / 'run'}"],
         "is not writable"),
    Case("disk full while saving", lambda e, s: [*EARLIER, "train.epochs=2", "resume=auto",
                                                 f"output.dir={_full_disk_copy(e, s)}"],
         "could not write checkpoint", file_size_limit=1_000_000),
    Case("fp16 on the CPU", lambda e, s: [*RUN, "train.precision=fp16", f"output.dir={s / 'out'}"],
         "train.precision=fp16 needs CUDA"),
    Case("cuda without CUDA", lambda e, s: [*RUN, "train.device=cuda", f"output.dir={s / 'out'}"],
         "CUDA is not available"),
    Case("evaluate a truncated checkpoint", lambda e, s: [str(_truncated_copy(e, s))], "truncated or corrupt",
         module="fasttrain.cli eval"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_one_clear_line_with_exit_2_and_damages_nothing(case, earlier, tmp_path, capsys):
    before = digest_tree(earlier)
    args = case.args(earlier, tmp_path)
    module, *command = case.module.split()
    limit = case.file_size_limit

    def fill_up_at_limit() -> None:  # in the child: writes past `limit` bytes fail, as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    if limit:
        copy = Path(args[-1].split("=", 1)[1])
        saved = digest_tree(copy / "checkpoints")
        result = subprocess.run([sys.executable, "-m", module, *command, *args], cwd=REPO, text=True,
                                capture_output=True, timeout=600, preexec_fn=fill_up_at_limit,
                                env={**os.environ, "PYTHONPATH": str(REPO)})
        assert digest_tree(copy / "checkpoints") == saved  # the checkpoints it resumed from are intact
    elif case.process or module != "fasttrain.run":
        result = run_fasttrain(*command, *args, module=module)
    else:
        result = run_in_process(capsys, *args)
    assert result.returncode == 2, f"exit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    error_lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert error_lines and error_lines[-1].startswith("fasttrain: error: "), result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert case.expect in error_lines[-1], error_lines[-1]
    assert digest_tree(earlier) == before  # the earlier run is untouched


def _main(capsys, *args: str):
    result = run_in_process(capsys, *args)
    return result.returncode, result.stderr


@pytest.mark.parametrize("every_steps,found_by", [(0, "the loss became nan/inf"), (2, "the weights hold nan/inf")])
def test_a_diverging_run_stops_naming_the_step_and_keeps_its_last_good_checkpoint(tmp_path, capsys, every_steps,
                                                                                 found_by):
    """SGD at lr 10 diverges within a few steps: found at the next log interval (the loss) or, sooner,
    by the check every checkpoint makes of the weights before it is written."""
    out = tmp_path / "run"
    code, err = _main(capsys, "--config", "configs/smoke.yaml", "data.train_size=512", "optim.name=sgd", "optim.lr=10",
                      "sched.name=none", "train.epochs=2", "train.log_every=1",
                      f"checkpoint.every_steps={every_steps}", f"output.dir={out}")
    assert code == 2, err[-2000:]
    error = err.strip().splitlines()[-1]
    assert error.startswith(f"fasttrain: error: training diverged: {found_by} at step "), error
    bad_step = int(error.split("at step ")[1].split()[0].rstrip(";"))
    logged = read_jsonl(out / "steps.jsonl")
    assert logged and max(r["step"] for r in logged) <= bad_step
    assert all(math.isfinite(r["loss"]) for r in logged)  # a nan/inf interval is not logged as a loss
    kept = sorted((out / "checkpoints").glob("*.pt"))
    if every_steps:
        assert kept, "the good checkpoints before the divergence are kept"
    for path in kept:
        ckpt = torch.load(path, weights_only=False)
        assert ckpt["global_step"] < bad_step
        assert all(torch.isfinite(t).all() for t in ckpt["model"].values() if t.is_floating_point())


def test_divergence_found_at_a_log_interval_still_names_the_exact_step(tmp_path, capsys):
    """The loss is checked where the sums are read (every train.log_every steps), not every step;
    the step named is still the first one whose loss was nan/inf, as a check at every step finds."""
    named = []
    for log_every in (1, 4):
        code, err = _main(capsys, "--config", "configs/smoke.yaml", "data.train_size=512", "optim.name=sgd",
                          "optim.lr=10", "sched.name=none", "train.epochs=2", f"train.log_every={log_every}",
                          "output.save_checkpoints=false", f"output.dir={tmp_path / str(log_every)}")
        assert code == 2, err[-2000:]
        error = err.strip().splitlines()[-1]
        assert "training diverged: the loss became nan/inf at step " in error, error
        named.append(int(error.split("at step ")[1].split()[0]))
    assert named[0] == named[1] and named[0] % 4 != 0, named  # found mid-interval, and named exactly
