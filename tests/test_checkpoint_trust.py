"""A checkpoint is data, never code (issue 22): every checkpoint fasttrain writes loads with
torch.load(weights_only=True); a file that would run code when unpickled, or that names code to
import, is refused with one line and runs nothing; a changed bit is caught by the content hash;
NaN weights are refused; an older checkpoint converts once, by a command the user types; files get
the umask's mode."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, TINY
from fasttrain import cli, run
from fasttrain.checkpoint import load_checkpoint, save_checkpoint
from fasttrain.checkpoint.digest import DIGEST_KEY



pytestmark = pytest.mark.usefixtures("no_plots")  # the runs here are about their input, not plots




class RunsCode:
    """Unpickling this calls os.system: what a hostile .pt does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def one_line_error(capsys, code: int, *needles: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err[-3000:]
    assert len(lines) == 1 and lines[0].startswith("fasttrain: error: ") and "Traceback" not in err, err[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("recipe", [
    ["optim.name=adamw", "sched.name=onecycle"],
    ["optim.name=sgd", "optim.nesterov=true", "optim.momentum=0.9", "sched.name=cosine", "train.ema_decay=0.9",
     "train.lookahead_k=2", "optim.decay_bn_bias=false"],
    ["optim.name=adam", "sched.name=plateau"],
    ["optim.name=sgd", "sched.name=step"],
], ids=["adamw-onecycle", "sgd-cosine-ema-lookahead", "adam-plateau", "sgd-step"])
def test_every_checkpoint_a_run_writes_loads_as_data_only(tmp_path, recipe):
    out = tmp_path / "run"
    assert run.main([*TINY, "checkpoint.every_steps=1", *recipe, f"output.dir={out}"]) == 0
    files = sorted((out / "checkpoints").glob("*.pt"))
    assert {p.name for p in files} >= {"last.pt", "best.pt", "step-00000001.pt"}
    for path in files:
        state = torch.load(path, map_location="cpu", weights_only=True)  # raises if anything needs pickle
        assert isinstance(state[DIGEST_KEY], str) and len(state[DIGEST_KEY]) == 64
        load_checkpoint(path)  # and fasttrain's own checks, hash included


def test_a_checkpoint_that_runs_code_when_unpickled_is_refused_by_eval_and_resume(earlier, tmp_path, capsys):
    marker = tmp_path / "code-ran"
    state = torch.load(earlier / "checkpoints" / "last.pt", weights_only=True)
    state["versions"] = RunsCode(marker)
    hostile = tmp_path / "hostile.pt"
    torch.save(state, hostile)

    one_line_error(capsys, cli.main(["eval", str(hostile)]), "holds Python objects, not only data",
                   f"fasttrain convert-checkpoint {hostile}")
    one_line_error(capsys, run.main([*TINY, f"resume={hostile}", f"output.dir={tmp_path / 'resumed'}"]),
                   "holds Python objects")
    # resume=auto in a folder whose every checkpoint is such a file: refused, nothing changed
    folder = tmp_path / "folder"
    shutil.copytree(earlier, folder)
    for path in (folder / "checkpoints").glob("*.pt"):
        shutil.copyfile(hostile, path)
    before = {p.name: p.read_bytes() for p in (folder / "checkpoints").iterdir()}
    one_line_error(capsys, run.main([*TINY, "train.epochs=2", "resume=auto", f"output.dir={folder}"]),
                   "no usable checkpoint")
    assert {p.name: p.read_bytes() for p in (folder / "checkpoints").iterdir()} == before
    assert not marker.exists(), "unpickling the checkpoint ran its code"


def test_a_model_the_checkpoint_names_by_import_is_not_imported_by_eval(earlier, tmp_path, capsys, monkeypatch):
    """The checkpoint's config names a module whose import runs code: eval imports it only when the user
    names it on the command line too. (Standard-library callables such as os:system are refused even
    then: tests/test_bounds.py.)"""
    marker = tmp_path / "code-ran"
    (tmp_path / "trojan_nets.py").write_text(f"open({str(marker)!r}, 'w').close()\nNet = None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    state = load_checkpoint(earlier / "checkpoints" / "last.pt")
    state["config"]["model"] = {**state["config"]["model"], "name": "trojan_nets:Net"}
    crafted = tmp_path / "crafted.pt"
    save_checkpoint(state, crafted)  # a valid hash: the file is well formed, its config names code
    one_line_error(capsys, cli.main(["eval", str(crafted)]), "names its model by import (model.name='trojan_nets:Net')",
                   "fasttrain imports no code that a file names",
                   f"fasttrain eval {crafted} model.name=trojan_nets:Net")
    assert not marker.exists()
    # named by the user, it is imported (and refused there: Net is no model)
    one_line_error(capsys, cli.main(["eval", str(crafted), "model.name=trojan_nets:Net"]), "trojan_nets:Net")
    assert marker.exists()


def test_a_flipped_bit_is_refused(earlier, tmp_path, capsys):
    source = earlier / "checkpoints" / "last.pt"
    data = bytearray(source.read_bytes())
    weights = load_checkpoint(source)["model"]
    # flip a bit inside the largest tensor's bytes, so that the file still parses
    largest = max(weights.values(), key=lambda t: t.numel())
    raw = largest.contiguous().view(torch.uint8).numpy().tobytes()
    where = data.find(raw[:64])
    assert where > 0
    data[where + 17] ^= 0x04
    flipped = tmp_path / "flipped.pt"
    flipped.write_bytes(bytes(data))
    one_line_error(capsys, cli.main(["eval", str(flipped)]), "does not match its content hash")
    one_line_error(capsys, run.main([*TINY, f"resume={flipped}", f"output.dir={tmp_path / 'r'}"]),
                   "does not match its content hash")


def test_nan_weights_are_refused(earlier, tmp_path, capsys):
    state = load_checkpoint(earlier / "checkpoints" / "last.pt")
    name = next(iter(state["model"]))
    state["model"][name] = torch.full_like(state["model"][name], float("nan"))
    crafted = tmp_path / "nan.pt"
    save_checkpoint(state, crafted)
    one_line_error(capsys, cli.main(["eval", str(crafted)]), f"its weight {name} holds nan/inf")
    out = tmp_path / "resumed"
    one_line_error(capsys, run.main([*TINY, "train.epochs=2", f"resume={crafted}", f"output.dir={out}"]),
                   "holds nan/inf")
    assert not out.exists()


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_checkpoints_get_the_mode_the_umask_allows(tmp_path, umask, mode):
    target = tmp_path / "c.pt"
    code = ("import torch; from fasttrain.checkpoint import save_checkpoint; "
            f"save_checkpoint({{'weights': torch.zeros(2)}}, __import__('pathlib').Path({str(target)!r}))")
    # the shell sets the umask (preexec_fn can deadlock a child forked from a threaded pytest)
    done = subprocess.run(["sh", "-c", f'umask {umask:03o} && exec "$0" -c "$1"', sys.executable, code], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(target.stat().st_mode) == mode


def _as_an_older_fasttrain_wrote_it(state: dict) -> dict:
    """The layout before issue 22: NumPy's RNG state as np.random.get_state()'s tuple, no content hash."""
    state = {key: value for key, value in state.items() if key != DIGEST_KEY}
    for rank in state["ranks"]:
        rank["rng"]["numpy"] = np.random.get_state()
    state["versions"]["torch"] = torch.__version__  # a TorchVersion object, as it was saved then
    return state


def test_an_older_checkpoint_is_refused_until_the_user_converts_it(earlier, tmp_path, capsys):
    original = load_checkpoint(earlier / "checkpoints" / "last.pt")
    older = tmp_path / "run" / "checkpoints" / "last.pt"
    older.parent.mkdir(parents=True)
    torch.save(_as_an_older_fasttrain_wrote_it(original), older)
    old_bytes = older.read_bytes()
    one_line_error(capsys, cli.main(["eval", str(older)]), f"fasttrain convert-checkpoint {older}")

    assert cli.main(["convert-checkpoint", str(older)]) == 0
    assert "data only, with a content hash" in capsys.readouterr().out
    assert (older.parent / "last.pt.orig").read_bytes() == old_bytes  # nothing is lost
    converted = load_checkpoint(older)
    assert all(torch.equal(converted["model"][k], original["model"][k]) for k in original["model"])
    assert converted["ranks"][0]["rng"]["numpy"]["key"].shape == (624,)
    assert cli.main(["eval", str(older), "--json"]) == 0
    # the converted file continues the run
    out = tmp_path / "resumed"
    assert run.main([*TINY, "train.epochs=2", f"resume={older}", f"output.dir={out}"]) == 0
    assert load_checkpoint(out / "checkpoints" / "last.pt")["epoch"] == 2
    # a second conversion would overwrite the kept original: refused
    one_line_error(capsys, cli.main(["convert-checkpoint", str(older)]), "last.pt.orig exists already")


def test_a_checkpoint_from_a_machine_with_more_cpus_still_loads_and_evaluates(earlier, tmp_path, capsys):
    """data.num_workers is bounded by this machine's CPUs; a checkpoint written with 4 workers per CPU
    of a larger machine is still a valid checkpoint here (eval uses auto workers)."""
    state = load_checkpoint(earlier / "checkpoints" / "last.pt")
    state["config"]["data"]["num_workers"] = 4 * (os.cpu_count() or 1) + 4
    moved = tmp_path / "from-a-larger-machine.pt"
    save_checkpoint(state, moved)
    load_checkpoint(moved)
    assert cli.main(["eval", str(moved), "--json"]) == 0
