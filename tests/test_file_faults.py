"""Files and addresses a user gets wrong, each one line on stderr and exit code 2 (issue 22, "Files"):

1. an image the dali loader's decoder refuses though PIL reads it (a GIF saved as .png): named in one
   line mid-epoch, and left out and counted by data.skip_bad_images, which asks DALI's decoder;
2. `fasttrain eval CKPT data.root=<other folder>` whose class folders are not the checkpoint's: refused,
   naming the classes that differ (and both counts);
3. MASTER_PORT already in use, out of range or not a number, and a MASTER_ADDR that does not resolve:
   real processes (a socket this test opens holds the port), world size 1 and 2."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import List

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, launcher_env, run_fasttrain
from fasttrain import cli
from fasttrain.checkpoint import load_checkpoint
from fasttrain.data.loaders.dali import dali_available
from test_folder_data import _overrides, write_folder

needs_dali = pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed")


def one_error_line(result: subprocess.CompletedProcess, *needles: str) -> str:
    """The run must exit 2 with exactly one line on stderr, fasttrain's, naming each needle."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, f"exit {result.returncode}\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr
    assert len(lines) == 1 and "fasttrain: error: " in lines[0], result.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def gif_named_png(path: Path) -> None:
    """A GIF with a .png name: PIL reads it (it goes by the content), DALI's decoder has no GIF codec."""
    pixels = np.random.default_rng(5).integers(0, 256, size=(30, 30, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="GIF")


# --------------------------------------------------------------------------- 1. what DALI cannot decode


@needs_dali
def test_the_dali_loader_names_a_file_its_decoder_refuses_in_one_line(tmp_path):
    root = write_folder(tmp_path / "images", train_per_class=3, val_per_class=1)
    victim = root / "train" / "dog" / "zz_really_a_gif.png"
    gif_named_png(victim)
    run_dir = tmp_path / "run"
    result = run_fasttrain(*_overrides(root, "data.loader=dali", f"output.dir={run_dir}"), timeout=300)
    line = one_error_line(result, f"cannot decode image file {victim}", "DALI", "data.skip_bad_images=true")
    assert (run_dir / "train.log").read_text().splitlines()[-1].endswith(line.removeprefix("fasttrain: error: "))


@needs_dali
@pytest.mark.slow
def test_skip_bad_images_leaves_out_what_the_dali_decoder_refuses(tmp_path):
    from fasttrain.config import load_config
    from fasttrain.data import folder_splits, scan_decoder

    root = write_folder(tmp_path / "images", train_per_class=3, val_per_class=1)
    victim = root / "val" / "frog" / "zz_really_a_gif.png"
    gif_named_png(victim)
    data = load_config(None, _overrides(root, "data.skip_bad_images=true")).data
    cpu = torch.device("cpu")
    assert folder_splits(data, scan_decoder("plain", cpu)).info.skipped_files == 0  # PIL decodes it
    by_dali = folder_splits(data, scan_decoder("dali", cpu))
    assert by_dali.info.skipped_files == 1 and str(victim) not in by_dali.val.paths
    assert by_dali.bad[0].first == str(victim) and "DALI" in by_dali.bad[0].reason
    run_dir = tmp_path / "run"
    result = run_fasttrain(*_overrides(root, "data.loader=dali", "data.skip_bad_images=true",
                                       f"output.dir={run_dir}"), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    skipped = [line for line in (run_dir / "train.log").read_text().splitlines() if str(victim) in line]
    assert len(skipped) == 1 and "1 unreadable image file(s) left out" in skipped[0], skipped


# --------------------------------------------------------------------------- 2. eval on other classes


@pytest.fixture(scope="module")
def folder_checkpoint(tmp_path_factory) -> Path:
    """best.pt of a one-epoch run on a folder of the classes cat, dog, frog."""
    base = tmp_path_factory.mktemp("classes")
    root = write_folder(base / "images", train_per_class=2, val_per_class=1)
    result = run_fasttrain(*_overrides(root, "data.loader=plain", f"output.dir={base / 'run'}"), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return base / "run" / "checkpoints" / "best.pt"


def eval_line(argv: List[str], capsys) -> tuple:
    capsys.readouterr()
    code = cli.main(["eval", *argv])
    captured = capsys.readouterr()
    return code, [line for line in captured.err.splitlines() if line.strip()], captured.out


def test_a_checkpoint_records_its_classes_and_evaluates_on_the_same(folder_checkpoint, capsys):
    assert load_checkpoint(folder_checkpoint)["classes"] == ["cat", "dog", "frog"]
    code, errors, out = eval_line([str(folder_checkpoint)], capsys)
    assert code == 0 and not errors and "test accuracy" in out, errors


@pytest.mark.parametrize("classes,needles", [
    (("cat", "dog", "toad"), ("trained on 3 classes", "holds 3", "only in the checkpoint: frog",
                              "only in the data: toad")),
    (("cat", "dog", "frog", "owl"), ("trained on 3 classes", "holds 4", "only in the data: owl")),
    (("cat", "dog"), ("trained on 3 classes", "holds 2", "only in the checkpoint: frog")),
], ids=["renamed", "one-more", "one-fewer"])
def test_eval_on_a_folder_of_other_classes_is_refused_naming_them(folder_checkpoint, tmp_path, capsys, classes,
                                                                   needles):
    other = write_folder(tmp_path / "other", train_per_class=1, val_per_class=2, classes=classes)
    before = folder_checkpoint.read_bytes()
    code, errors, out = eval_line([str(folder_checkpoint), f"data.root={other}"], capsys)
    assert code == 2 and len(errors) == 1 and errors[0].startswith("fasttrain: error: "), errors
    for needle in (str(folder_checkpoint), *needles):
        assert needle in errors[0], errors[0]
    assert "test accuracy" not in out
    assert folder_checkpoint.read_bytes() == before  # the checkpoint is only read


# --------------------------------------------------------------------------- 3. the rendezvous address

RUN = ["-m", "fasttrain.run", "data.dataset=synthetic", "data.train_size=32", "data.val_size=16", "train.epochs=1",
       "train.device=cpu", "train.batch_size=8", "output.plots=false"]


def launch_rank(rank: int, world: int, run_dir: Path, **env: str) -> subprocess.Popen:
    """One process of a launch set up by hand (as srun or a job script would): RANK, WORLD_SIZE, MASTER_*."""
    environ = launcher_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), **env)
    return subprocess.Popen([sys.executable, *RUN, f"output.dir={run_dir}"], cwd=REPO, env=environ, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(job: subprocess.Popen) -> subprocess.CompletedProcess:
    try:
        out, err = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    return subprocess.CompletedProcess(job.args, job.returncode, out, err)


@pytest.fixture
def held_port():
    """A port something else listens on (another job's rank 0, say): this test's socket."""
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    yield holder.getsockname()[1]
    holder.close()


@pytest.mark.parametrize("world", [1, 2])
def test_master_port_in_use_is_one_line_naming_it_and_the_fix(held_port, tmp_path, world):
    # only rank 0 is started: it serves the store, so it is the one that finds the port taken (a rank 1
    # would connect to the other job's socket, which is not a store; see the report)
    result = finish(launch_rank(0, world, tmp_path / "run", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(held_port)))
    one_error_line(result, f"MASTER_PORT={held_port} is already in use", "MASTER_PORT=<port>", "--master-port")
    assert not (tmp_path / "run").exists()  # nothing claimed or written


@pytest.mark.parametrize("port", ["0", "70000", "abc", "", " 29500x"])
def test_the_launch_environment_reads_a_master_port_only_if_it_is_a_tcp_port(port):
    """What every rank reads first (in this process: the check is the same for any world size; the
    processes below show that each rank of a launch stops on it with the line)."""
    from fasttrain.dist import read_env
    from fasttrain.errors import UserError

    for world in (1, 2):
        environ = {"RANK": "0", "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        with pytest.raises(UserError, match=f"MASTER_PORT={port!r} is not a TCP port \\(1-65535\\): choose a free"):
            read_env(environ)
    assert read_env({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "65535"}).master_port == 65535


# one bad value per world size: each rank's exit, its line and nothing written (the values: the test above)
@pytest.mark.parametrize("world,port", [(1, "0"), (2, "abc")])
def test_a_master_port_that_is_no_port_is_one_line_on_every_rank(tmp_path, port, world):
    jobs = [launch_rank(rank, world, tmp_path / "run", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
            for rank in range(world)]
    for job in jobs:
        one_error_line(finish(job), f"MASTER_PORT='{port}' is not a TCP port (1-65535)", "choose a free port")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("world", [1, 2])
def test_a_master_addr_that_does_not_resolve_is_one_line_on_every_rank(tmp_path, world):
    jobs = [launch_rank(rank, world, tmp_path / "run", MASTER_ADDR="no-such-node.invalid", MASTER_PORT="29577")
            for rank in range(world)]
    for job in jobs:
        one_error_line(finish(job), "MASTER_ADDR='no-such-node.invalid' cannot be resolved", "check MASTER_ADDR")
    assert not (tmp_path / "run").exists()
