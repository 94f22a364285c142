"""The Python API as the README shows it: `fasttrain.fit(config, model=..., overrides=[...])` from a
script. It takes the command line's path (run folder, checkpoints, resume, torchrun), leaves the process
as it found it, and raises the command line's one-line errors."""

from __future__ import annotations

import json
import logging
import re
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed as torch_dist
import yaml
from torch import nn

import fasttrain
from fasttrain import cli
from fasttrain.checkpoint import load_checkpoint
from fasttrain.config import load_config
from fasttrain.errors import ConfigError, UserError
from fasttrain.observe.logs import LOGGER_NAME
from fasttrain.dist.preemption import CATCHABLE
from fasttrain.config.registry import MODELS

from conftest import REPO, read_jsonl, run_torchrun

# the suite's time budget: every run here trains on 64 images and validates on 32, on the CPU
TINY = ["data.dataset=synthetic", "data.train_size=64", "data.val_size=32", "train.batch_size=32", "train.device=cpu",
        "data.num_workers=0", "data.loader=gpu", "output.plots=false"]


class SmallNet(nn.Module):
    """A user's model: images in, one score per class out (BatchNorm: buffers a checkpoint must carry)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(8))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8 * 4 * 4, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def readme_python_api_example() -> str:
    """The code block of the README's "## Python API" section."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert len(blocks) == 1, "the Python API section holds one example"
    return blocks[0]


def process_state() -> dict:
    """What fit must leave as it found it: signal handlers, fasttrain's log handlers, the process group,
    the model registry."""
    return {"handlers": {name: signal.getsignal(getattr(signal, name)) for name in CATCHABLE},
            "log_handlers": list(logging.getLogger(LOGGER_NAME).handlers),
            "process_group": torch_dist.is_initialized(), "models": MODELS.names(),
            "deterministic": torch.are_deterministic_algorithms_enabled()}


def test_readme_example_trains_the_users_model_into_its_run_folder(tmp_path, monkeypatch):
    """The README's example as written, run as a script's __main__ in a folder with the project's
    configs/smoke.yaml shrunk to the suite's budget (64 train / 32 test images, the resident loader, no plots)."""
    smoke = yaml.safe_load((REPO / "configs" / "smoke.yaml").read_text())
    smoke["data"].update(train_size=64, val_size=32, loader="gpu")
    smoke["train"]["batch_size"] = 32
    smoke["output"] = {"plots": False}
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "smoke.yaml").write_text(yaml.safe_dump(smoke))
    monkeypatch.chdir(tmp_path)
    script: dict = {"__name__": "__main__"}  # a class defined in a script: model.name __main__:TinyNet
    exec(compile(readme_python_api_example(), "README.md", "exec"), script)

    result, net = script["result"], script["net"]
    run_dir = tmp_path / "runs" / "tiny-net"
    assert result.run_dir == run_dir and result.metrics_path == run_dir / "metrics.jsonl"
    assert (result.epoch, result.global_step, result.stopped_by, result.exit_code) == (2, 4, None, 0)
    records = read_jsonl(result.metrics_path)
    assert records == result.history and [r["epoch"] for r in records] == [1, 2]
    assert result.best_val_acc == max(r["val_acc"] for r in records)
    assert result.final_val_acc == records[-1]["val_acc"]
    assert records[result.best_epoch - 1]["val_acc"] == result.best_val_acc
    assert result.last_checkpoint == run_dir / "checkpoints" / "last.pt"
    assert result.best_checkpoint == run_dir / "checkpoints" / "best.pt"
    # what was trained is the user's module, in place, and the run folder says so
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["name"] == "__main__:TinyNet"
    last = load_checkpoint(result.last_checkpoint)
    assert last["config"]["model"]["name"] == "__main__:TinyNet"
    trained = net.state_dict()
    assert last["model"].keys() == trained.keys()
    assert all(torch.equal(last["model"][key], trained[key]) for key in trained)


@pytest.mark.slow  # two compilations on the CPU
def test_compiled_fits_one_after_another_each_compile_their_own_step(tmp_path):
    """A sweep in one process: each compiled run starts from torch.compile's first state. Without that, each
    new model fails the last runs' guards, and past dynamo's recompile limit the step runs eagerly, with only
    a warning. The limit is set to 1 here (torch's own patch: pytest's monkeypatch would delete the setting
    on the way out, as the config module serves it through __getattr__): the second run is the first past it."""
    graphs, limit = [], torch._dynamo.config.recompile_limit
    with torch._dynamo.config.patch(recompile_limit=1):
        for name in ("a", "b"):
            result = fasttrain.fit(model=SmallNet(), overrides=TINY + ["train.compile=default",
                                                                        f"output.dir={tmp_path / name}"])
            graphs.append(read_jsonl(result.metrics_path)[-1]["compiled_graphs"])  # graphs made in this process
    assert torch._dynamo.config.recompile_limit == limit  # put back for the tests after this one
    assert graphs[1] > graphs[0] > 0, graphs


def test_fit_twice_in_one_process_leaves_no_handlers_and_resume_auto_continues(tmp_path):
    """A script that fits, then fits again with resume=auto and the same module: the second run continues
    the first (stopped by train.stop_after_steps after epoch 1) and ends with the weights of one
    uninterrupted run, bit for bit. After each fit the process is as it was before the first."""
    before = process_state()
    torch.manual_seed(0)
    net = SmallNet()
    torch.manual_seed(0)
    straight_net = SmallNet()  # the same initial weights
    run_dir, straight_dir = tmp_path / "stopped", tmp_path / "straight"
    common = TINY + ["train.epochs=2"]

    first = fasttrain.fit(model=net, overrides=common + [f"output.dir={run_dir}", "train.stop_after_steps=2"])
    assert (first.epoch, first.global_step, first.stopped_by, first.exit_code) == (1, 2, "stop_after_steps", 0)
    assert process_state() == before

    second = fasttrain.fit(model=net, overrides=common + [f"output.dir={run_dir}", "resume=auto"])
    assert process_state() == before
    assert (second.epoch, second.global_step, second.stopped_by) == (2, 4, None)
    assert [r["epoch"] for r in read_jsonl(second.metrics_path)] == [1, 2]
    resumed_from = json.loads((run_dir / "env.json").read_text())["resumed_from"]
    assert (resumed_from["epoch"], resumed_from["global_step"]) == (1, 2)

    fasttrain.Trainer(None, common + [f"output.dir={straight_dir}"]).fit(straight_net)
    assert process_state() == before
    resumed, straight = net.state_dict(), straight_net.state_dict()
    assert all(torch.equal(resumed[key], straight[key]) for key in straight)


class SevenScores(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3 * 32 * 32, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


@pytest.mark.parametrize("config, model, overrides, error, says", [
    (None, None, ["train.epocs=5"], ConfigError, "config error: unknown key 'train.epocs'; did you mean train.epochs?"),
    (None, None, "train.epochs=5", ConfigError, "overrides must be a list of key.sub=value strings"),
    (42, None, [], ConfigError, "config must be the path of a YAML recipe, a fasttrain.config.Config or None"),
    (None, "resnet", [], UserError, "model must be a torch.nn.Module (an instance), not str"),
    (None, SmallNet, [], UserError, "model=SmallNet is a class: pass a module, model=SmallNet()"),
    (None, SevenScores(), [], ConfigError, "gives logits of shape (2, 7) for a batch of 2x3x32x32 images, "
                                           "expected (2, 10)"),
    (None, nn.Linear(10, 10), [], ConfigError, "fails on a batch of 2x3x32x32 images: RuntimeError: "),
], ids=["config key", "overrides string", "config type", "not a module", "a class", "wrong classes", "wrong input"])
def test_bad_input_raises_the_command_lines_one_line_error(tmp_path, config, model, overrides, error, says):
    before = process_state()
    run_dir = tmp_path / "run"
    if isinstance(overrides, list):
        overrides = overrides + TINY + [f"output.dir={run_dir}"]
    with pytest.raises(error) as raised:
        fasttrain.fit(config, model=model, overrides=overrides)
    message = str(raised.value)
    assert "\n" not in message and says in message, message
    assert process_state() == before
    assert not run_dir.exists()  # a rejected run removes the folder it created


def test_a_config_error_is_the_one_the_command_line_prints(tmp_path):
    overrides = TINY + [f"output.dir={tmp_path / 'run'}", "train.batch_size=0"]
    with pytest.raises(ConfigError) as from_fit:
        fasttrain.fit(config=str(REPO / "configs" / "smoke.yaml"), overrides=overrides)
    with pytest.raises(ConfigError) as from_cli:
        load_config(str(REPO / "configs" / "smoke.yaml"), overrides)
    assert str(from_fit.value) == str(from_cli.value)


def test_fit_refuses_a_process_group_it_did_not_make(tmp_path):
    torch_dist.init_process_group("gloo", store=torch_dist.HashStore(), rank=0, world_size=1)
    try:
        with pytest.raises(UserError, match="a process group is already initialized in this process"):
            fasttrain.fit(model=SmallNet(), overrides=TINY + [f"output.dir={tmp_path / 'run'}"])
    finally:
        torch_dist.destroy_process_group()


def test_eval_rebuilds_an_importable_model_and_names_one_it_cannot(tmp_path, monkeypatch, capsys):
    """`fasttrain eval` on fit's checkpoints: a class in an importable module is rebuilt from the
    checkpoint's model.name and scores what training recorded; a class defined in the script that
    trained it is one line that says how to name an importable copy, and naming one works."""
    (tmp_path / "usernets.py").write_text(textwrap.dedent('''
        from torch import nn

        class Net(nn.Module):
            def __init__(self, num_classes: int):
                super().__init__()
                self.layers = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, num_classes))

            def forward(self, x):
                return self.layers(x)
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    import usernets

    monkeypatch.setitem(sys.modules, "usernets", usernets)  # forgotten again when the test ends

    importable = fasttrain.fit(model=usernets.Net(10), overrides=TINY + ["train.epochs=1",
                                                                       f"output.dir={tmp_path / 'importable'}"])
    assert importable.config.model.name == "usernets:Net"
    assert cli.main(["eval", str(importable.best_checkpoint), "model.name=usernets:Net", "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert evaluated["val_acc"] == evaluated["recorded_val_acc"] == importable.best_val_acc

    script_class = type("Net", (SmallNet,), {"__module__": "__main__"})  # what `class Net` in a script makes
    in_script = fasttrain.fit(model=script_class(), overrides=TINY + ["train.epochs=1",
                                                                     f"output.dir={tmp_path / 'script'}"])
    capsys.readouterr()
    assert cli.main(["eval", str(in_script.best_checkpoint)]) == 2
    assert capsys.readouterr().err == ("fasttrain: error: model.name='__main__:Net' is a class that was defined in "
                                       "the script that trained it (fasttrain.fit), which cannot be imported here: "
                                       "name an importable copy of it, model.name=package.module:Net\n")
    # the fix the line gives: the same class, importable (this module is, under pytest)
    assert cli.main(["eval", str(in_script.best_checkpoint), "model.name=test_api:SmallNet", "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert evaluated["val_acc"] == evaluated["recorded_val_acc"] == in_script.best_val_acc


@pytest.mark.slow
def test_fit_under_torchrun_trains_one_model_over_the_ranks(tmp_path):
    """A script launched as `torchrun --nproc_per_node=2 script.py`: each rank calls fit with a module
    whose initial weights differ per rank; DDP starts all from rank 0's and they end identical."""
    script = tmp_path / "train_script.py"
    run_dir = tmp_path / "run"
    script.write_text(textwrap.dedent(f'''
        import json, os, sys
        import torch
        sys.path.insert(0, {str(REPO / "tests")!r})
        import fasttrain
        from fasttrain.dist import weights_digest
        from test_api import SmallNet

        torch.manual_seed(int(os.environ["RANK"]))  # different initial weights on each rank
        net = SmallNet()
        result = fasttrain.fit(model=net, overrides={TINY + ["train.epochs=2", f"output.dir={run_dir}"]!r})
        # a file per rank: two processes printing to one pipe can interleave their lines
        with open({str(tmp_path)!r} + f"/rank{{os.environ['RANK']}}.json", "w") as out:
            json.dump({{"rank": os.environ["RANK"], "digest": weights_digest(net), "epoch": result.epoch,
                       "best_val_acc": result.best_val_acc}}, out)
    '''))
    result = run_torchrun(2, str(script), module="", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert sorted(r["rank"] for r in ranks) == ["0", "1"]
    assert ranks[0]["digest"] == ranks[1]["digest"]
    assert ranks[0]["best_val_acc"] == ranks[1]["best_val_acc"] and ranks[0]["epoch"] == 2
    assert json.loads((run_dir / "env.json").read_text())["world_size"] == 2
    assert [r["world_size"] for r in read_jsonl(run_dir / "metrics.jsonl")] == [2, 2]


def test_import_fasttrain_imports_no_torch():
    """`import fasttrain` stays light; fit and Trainer come on first use."""
    probe = ("import sys, fasttrain; assert 'torch' not in sys.modules, 'torch imported'; "
             "assert {'fit', 'Trainer', 'FitResult'} <= set(dir(fasttrain)); "
             "from fasttrain import Trainer, fit; assert fit.__module__ == 'fasttrain.api'")
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
