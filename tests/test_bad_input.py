"""Bad input that used to end in a raw traceback (issue 14): each is now one line on stderr,
`fasttrain: error: ...`, naming what is wrong and how to fix it, with exit code 2, and nothing
already saved changes.

Most cases call the entry points in-process (`fasttrain.run.main`, `fasttrain.cli.main`) as the
console script does; two representative ones launch the real command in a subprocess.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Dict, List, Sequence

import pytest
import torch

from conftest import REPO, TINY, run_fasttrain
from fasttrain import cli, run
from fasttrain.checkpoint import save_checkpoint
from fasttrain.config import SEED_MAX



def digest_tree(folder: Path) -> Dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def fails(main: Callable[[List[str]], int], argv: Sequence[str], capsys, *needles: str) -> str:
    """Run an entry point as the console script does; it must exit 2 with one error line naming the problem."""
    capsys.readouterr()
    code = main(list(argv))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, f"exit {code}\n{err[-3000:]}"
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("fasttrain: error: "), err[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert len(lines[0]) < 600, lines[0]  # a line to read, not a dump of the input
    return lines[0]


def train_fails(argv: Sequence[str], capsys, *needles: str) -> str:
    return fails(run.main, argv, capsys, *needles)


def eval_fails(argv: Sequence[str], capsys, *needles: str) -> str:
    return fails(cli.main, ["eval", *argv], capsys, *needles)


pytestmark = pytest.mark.usefixtures("no_plots")  # the runs here are about their input, not plots




# --------------------------------------------------------------------------- 1. the config file


@pytest.mark.parametrize("content,offset", [(b"\x7fELF\x02\x01\x01\x00\x00\x00\xd0\xff", 7),
                                            ("train:\n  epochs: 1  # caf\xe9\n".encode("latin-1"), 25)],
                         ids=["binary", "latin-1"])
def test_a_config_file_that_is_not_utf8_text_is_one_line(tmp_path, capsys, content, offset):
    bad = tmp_path / "recipe.yaml"
    bad.write_bytes(content)
    train_fails(["--config", str(bad)], capsys, f"config error: '{bad}' is not a text YAML file",
                f"at offset {offset}", "UTF-8")
    assert os.listdir(tmp_path) == ["recipe.yaml"]


def test_a_binary_config_file_from_the_command_line(tmp_path):
    bad = tmp_path / "model.pt"
    torch.save({"weights": torch.zeros(4)}, bad)
    result = run_fasttrain("--config", str(bad), f"output.dir={tmp_path / 'run'}")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"fasttrain: error: config error: '{bad}' is not a text YAML file")
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- 2. overrides


@pytest.mark.parametrize("override,expected", [
    ("model.hidden_sizes=[64",
     "override 'model.hidden_sizes=[64' is not valid YAML (did not find expected ',' or ']')"),
    ("train.epochs={", "override 'train.epochs={' is not valid YAML"),
    ("optim.betas=[0.9, 0.99", "override 'optim.betas=[0.9, 0.99' is not valid YAML"),
    ("data.mean[0]=0.4", "override 'data.mean[0]=0.4' has no valid key"),
    ("[train=1", "override '[train=1' has no valid key"),
])
def test_a_malformed_override_names_the_override(override, expected, tmp_path, capsys):
    line = train_fails([*TINY, "train.epochs=1", override, f"output.dir={tmp_path / 'run'}"], capsys, expected)
    assert "quote" in line or "dotted names" in line  # and says how to fix it
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override,expected", [
    ("data.mean={}", "data.mean={...} is not valid: expected List[float] (a list is written [a, b])"),
    ("model.hidden_sizes=[[64]]", "model.hidden_sizes=[[64]] is not valid: expected List[int] (one value per item)"),
])
def test_a_list_key_given_a_mapping_or_nested_lists(override, expected, tmp_path, capsys):
    train_fails([*TINY, override, f"output.dir={tmp_path / 'run'}"], capsys, expected)


def test_a_malformed_override_to_eval_names_the_override(earlier, capsys):
    eval_fails([str(earlier / "checkpoints" / "last.pt"), "train.device=cpu", "train.eval_batch_size={"], capsys,
               "override 'train.eval_batch_size={' is not valid YAML")


# --------------------------------------------------------------------------- 3. seeds


@pytest.mark.parametrize("override", ["train.seed=99999999999999999999999", "train.seed=-1",
                                      f"data.subset_seed={SEED_MAX + 1}", "data.subset_seed=-5"])
def test_a_seed_out_of_range_names_the_accepted_range(override, tmp_path, capsys):
    key, value = override.split("=")
    train_fails([*TINY, override, f"output.dir={tmp_path / 'run'}"], capsys,
                f"{key}={value} is not valid: expected an integer in [0, 2147483647]")
    assert not (tmp_path / "run").exists()


def test_a_collective_timeout_too_large_names_the_accepted_range(tmp_path, capsys):
    train_fails([*TINY, "dist.timeout_s=99999999999999999999999", f"output.dir={tmp_path / 'run'}"], capsys,
                "dist.timeout_s=99999999999999999999999 is not valid: expected an integer in [1, 1000000000]")


def _dali_installed() -> bool:
    from fasttrain.data.loaders.dali import dali_available

    return dali_available()


@pytest.mark.parametrize("loader", ["plain", "gpu", pytest.param("dali", marks=pytest.mark.skipif(
    not _dali_installed(), reason="NVIDIA DALI is not installed"))])
def test_the_largest_seed_trains_with_every_loader_and_overrides_may_come_before_config(loader, tmp_path):
    """SEED_MAX reaches every seeded generator (weights, shuffles, augmentation, subsets, DALI's own);
    the overrides are given before --config, as users type them."""
    out = tmp_path / "run"
    argv = [f"train.seed={SEED_MAX}", f"data.subset_seed={SEED_MAX}", f"data.loader={loader}", "--config", str(REPO / "configs" / "smoke.yaml"),
            "data.train_size=64", "data.val_size=32", "model.name=MLP", "model.hidden_sizes=[16]", "train.epochs=1",
            "train.batch_size=32", f"output.dir={out}"]
    assert run.main(argv) == 0
    saved = torch.load(out / "checkpoints" / "last.pt", weights_only=False)["config"]
    assert saved["train"]["seed"] == SEED_MAX and saved["data"]["subset_seed"] == SEED_MAX
    assert saved["data"]["loader"] == loader and saved["model"]["name"] == "MLP"


# --------------------------------------------------------------------------- 4. run folder names


@pytest.mark.parametrize("key,expected", [("output.dir", "output.dir holds a name of 300 bytes"),
                                          ("output.name", "output.name holds a name of 300 bytes")])
def test_a_run_folder_name_too_long_for_the_file_system(key, expected, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # output.name makes runs/<name> here
    value = str(tmp_path / ("r" * 300)) if key == "output.dir" else "r" * 300
    train_fails([*TINY, f"{key}={value}"], capsys, expected, "allows 255", f"use a shorter {key}")
    assert os.listdir(tmp_path) == []


def test_a_run_folder_path_too_long_for_the_file_system(tmp_path, capsys):
    deep = tmp_path.joinpath(*["d" * 200] * 21)  # every name fits; the whole path is over PATH_MAX (4096)
    train_fails([*TINY, f"output.dir={deep}"], capsys, "output.dir makes a run folder path of",
                "use a shorter output.dir")
    assert os.listdir(tmp_path) == []


def test_a_name_the_file_system_refuses_where_the_run_folder_is_made_is_one_line(tmp_path, capsys, monkeypatch):
    """A name the file system refuses although the config check passed (another file system below a
    mount point, say) still ends in one line where the folder is first touched."""
    monkeypatch.setattr("fasttrain.config.load._check_output_dir", lambda run_dir, key: None)
    train_fails([*TINY, f"output.dir={tmp_path / ('r' * 300)}"], capsys, "File name too long")
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------- 5. hand-made checkpoints


BAD_VALUES = [
    ("config", None, "config is None, expected a dict of config sections"),
    ("config", 5, "config is 5, expected a dict of config sections"),
    ("config", {"optim": 5}, "config is {'optim': 5}, expected a dict of config sections"),
    ("config", {"model": {"name": "Nope"}}, "its config: model.name='Nope' is not valid: expected one of"),
    ("config", {"train": {"epoch": 3}}, "its config: unknown key 'train.epoch'"),
    ("epoch", "abc", "epoch is 'abc', expected an integer >= 0"),
    ("epoch", -1, "epoch is -1, expected an integer >= 0"),
    ("model", "x", "model is 'x', expected a state dict of named tensors"),
    ("model", {"layers.1.weight": [1.0]}, "model is {'layers.1.weight': [1.0]}, expected a state dict"),
    ("optimizer", None, "optimizer is None, expected an optimizer state dict"),
    ("scheduler", [], "scheduler is [], expected a scheduler state dict"),
    ("history", 5, "history is 5, expected a list of dicts"),
    ("global_step", "x", "global_step is 'x', expected an integer >= 0"),
    ("step_in_epoch", 1.5, "step_in_epoch is 1.5, expected an integer >= 0"),
    ("best_val_acc", None, "best_val_acc is None, expected a number"),
    ("val_acc", "high", "val_acc is 'high', expected a number"),
    ("world_size", 0, "world_size is 0, expected an integer >= 1"),
    ("batch_size", "64", "batch_size is '64', expected an integer >= 1"),
    ("ranks", [1], "ranks is [1], expected a list of per-rank states"),
    ("ema", {"updates": -1, "weights": {}}, "ema is {'updates': -1, 'weights': {}}, expected the EMA's updates"),
    ("lookahead", {"weights": [1]}, "lookahead is {'weights': [1]}, expected lookahead's slow weights"),
]


def _hand_made(earlier: Path, folder: Path, key: str, value, name: str = "bad.pt") -> Path:
    state = torch.load(earlier / "checkpoints" / "last.pt", weights_only=False)
    state[key] = value
    path = folder / name
    save_checkpoint(state, path)  # crafted with a matching content hash: the checks below must catch it
    return path


@pytest.mark.parametrize("key,value,expected", BAD_VALUES, ids=[f"{k}={v!r}"[:40] for k, v, _ in BAD_VALUES])
def test_eval_of_a_checkpoint_holding_a_wrong_type_is_one_line(earlier, tmp_path, capsys, key, value, expected):
    bad = _hand_made(earlier, tmp_path, key, value)
    eval_fails([str(bad)], capsys, f"checkpoint {bad} is not a valid fasttrain checkpoint ({expected}",
               "use a checkpoint written by fasttrain")


RESUMED = [BAD_VALUES[i] for i in (0, 3, 5, 7, 9, 11)]  # load_checkpoint checks for every reader: a sample here


@pytest.mark.parametrize("key,value,expected", RESUMED, ids=[f"{k}={v!r}"[:40] for k, v, _ in RESUMED])
def test_resume_from_a_checkpoint_holding_a_wrong_type_is_one_line(earlier, tmp_path, capsys, key, value, expected):
    before = digest_tree(earlier)
    bad = _hand_made(earlier, tmp_path, key, value)
    train_fails([*TINY, "train.epochs=2", f"resume={bad}", f"output.dir={tmp_path / 'run'}"], capsys,
                f"checkpoint {bad} is not a valid fasttrain checkpoint ({expected}")
    assert digest_tree(earlier) == before


def test_resume_auto_skips_a_checkpoint_holding_a_wrong_type(earlier, tmp_path, capsys):
    """As a truncated file is: a warning names it, and the run continues from the newest good one."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(earlier, copy)
    newest = max((copy / "checkpoints").glob("step-*.pt"))
    _hand_made(earlier, newest.parent, "global_step", "x", name=newest.name)
    capsys.readouterr()
    assert run.main([*TINY, "train.epochs=2", "resume=auto", f"output.dir={copy}"]) == 0
    out = capsys.readouterr().out
    assert (f"warning: checkpoint {newest} is not a valid fasttrain checkpoint (global_step is 'x', expected an "
            f"integer >= 0): use a checkpoint written by fasttrain; skipping it") in out
    resumed = json.loads((copy / "env.json").read_text())["resumed_from"]
    assert (resumed["checkpoint"], resumed["epoch"]) == (str(copy / "checkpoints" / "last.pt"), 1)


def test_eval_of_a_hand_made_checkpoint_from_the_command_line(earlier, tmp_path):
    bad = _hand_made(earlier, tmp_path, "epoch", "abc")
    result = run_fasttrain("eval", str(bad), "--json", module="fasttrain.cli")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"fasttrain: error: checkpoint {bad} is not a valid fasttrain checkpoint (epoch is 'abc', expected an "
        f"integer >= 0): use a checkpoint written by fasttrain"]


def test_a_checkpoint_path_too_long_for_the_file_system(tmp_path, capsys):
    eval_fails([str(tmp_path / ("c" * 300 + ".pt"))], capsys, "cannot be read (File name too long)")


# --------------------------------------------------------------------------- 6. argument order


@pytest.mark.parametrize("order", ["json first", "json between overrides"])
def test_eval_takes_json_and_overrides_in_any_order(earlier, capsys, order):
    ckpt = str(earlier / "checkpoints" / "last.pt")
    argv = (["eval", "--json", ckpt, "train.device=cpu", "train.eval_batch_size=8"] if order == "json first"
            else ["eval", ckpt, "train.device=cpu", "--json", "train.eval_batch_size=8"])
    capsys.readouterr()
    assert cli.main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["checkpoint"] == ckpt and result["total"] == 32


def test_an_override_before_config_is_applied(tmp_path, capsys):
    train_fails(["train.log_every=0", *TINY, f"output.dir={tmp_path / 'run'}"], capsys,
                "train.log_every=0 is not valid")
