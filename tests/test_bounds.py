"""Bounds and types (issue 22): values that were accepted and then forked for minutes, filled memory,
trained on inf, or ended in a traceback are each one `config error: ...` line when the config is loaded,
before the run folder exists; an own model that fails to import or build is one line naming it; and
nothing from the standard library (`os:system`) is ever called as a model."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from torch import nn

import fasttrain
from conftest import REPO, run_fasttrain
from fasttrain import api
from fasttrain.config import (HIDDEN_MAX, IMAGE_SIDE_MAX, SPLIT_MAX, SYNTHETIC_MAX, Config, ModelConfig,
                              load_config)
from fasttrain.errors import ConfigError
from fasttrain.models import build_model
from fasttrain.models.imported import imported_model
from fasttrain.config.registry import MODELS

CPUS = os.cpu_count() or 1
# a run of seconds should a value get through (as before this change): one short epoch of a tiny MLP
TINY = ["data.dataset=synthetic", "data.train_size=64", "data.val_size=32", "model.name=MLP", "model.hidden_sizes=[16]",
        "train.epochs=1", "train.batch_size=32", "train.device=cpu", "data.num_workers=0"]


def refused(*overrides: str) -> str:
    """load_config must refuse the overrides with one config error line; that line."""
    with pytest.raises(ConfigError) as err:
        load_config(None, list(overrides))
    message = str(err.value)
    assert message.startswith("config error: ") and "\n" not in message, message
    assert len(message) < 600, message
    return message


# --------------------------------------------------------------------------- numbers


@pytest.mark.parametrize("overrides,expected", [
    (["data.num_workers=100000"],
     f"data.num_workers=100000 is not valid: expected an integer in [-1, {4 * CPUS}] (4 x os.cpu_count() = 4 x "
     f"{CPUS} on this machine; -1 = auto): set data.num_workers=-1"),
    (["model.name=MLP", "model.hidden_sizes=[64,1000000000000]"],
     "model.hidden_sizes=[64, 1000000000000] is not valid: expected a non-empty list of integers in [1, 65536]"),
    (["data.dataset=synthetic", f"data.train_size={10**12}"],
     f"data.train_size={10**12} is not valid: expected an integer in [0, {SYNTHETIC_MAX}] with data.dataset="
     f"synthetic"),
    (["data.dataset=synthetic", f"data.val_size={10**12}"], "16 GiB budget of a split): set a smaller data.val_size"),
    ([f"data.train_size={10**12}"], f"data.train_size={10**12} is not valid: expected an integer in [0, 100000000] "
                                    f"(0 = all"),
    (["aug.crop_padding=1000000"], "aug.crop_padding=1000000 is not valid: expected an integer in [0, 32] (the image "
                                   "side of data.dataset=cifar10): set a smaller aug.crop_padding, or 0 for no crop"),
    (["data.dataset=mnist", "aug.crop_padding=29"], "expected an integer in [0, 28] (the image side of data.dataset="
                                                    "mnist)"),
    (["data.dataset=folder", "data.image_size=64", "aug.crop_padding=65"],
     "aug.crop_padding=65 is not valid: expected an integer in [0, 64] (data.image_size=64)"),
    (["data.dataset=folder", "aug.crop_padding=1025"], "expected an integer in [0, 1024] (the largest data.image_size"),
    (["data.image_size=4096"], "data.image_size=4096 is not valid: expected an integer in [0, 1024]"),
    (["optim.lr=inf"], "optim.lr=inf is not valid: expected a float in (0, 1000]"),
    (["optim.lr=nan"], "optim.lr=nan is not valid: expected a float in (0, 1000]"),
    (["sched.max_lr=inf"], "sched.max_lr=inf is not valid: expected a float in (0, 1000]"),
    (["sched.max_lr=nan"], "sched.max_lr=nan is not valid: expected a float in (0, 1000]"),
    (["optim.weight_decay=inf"], "optim.weight_decay=inf is not valid: expected a float in [0, 10]"),
    (["optim.weight_decay=nan"], "optim.weight_decay=nan is not valid: expected a float in [0, 10]"),
    (["data.mean=[.nan]"], "data.mean=[nan] is not valid: expected floats in [-255, 255]"),
    (["data.std=[.inf]"], "data.std=[inf] is not valid: expected floats in (0, 255]"),
    (["aug.color_jitter=[0.4,.inf,0,0]"], "aug.color_jitter=[0.4, inf, 0.0, 0.0] is not valid: expected 4 values in "
                                         "[0, 10]"),
], ids=["num_workers", "hidden_sizes", "synthetic-train", "synthetic-val", "train_size", "crop-cifar", "crop-mnist",
        "crop-image_size", "crop-folder", "image_size", "lr-inf", "lr-nan", "max_lr-inf", "max_lr-nan", "wd-inf",
        "wd-nan", "mean-nan", "std-inf", "jitter-inf"])
def test_a_value_past_its_bound_is_one_line_naming_key_value_and_range(overrides, expected):
    assert expected in refused(*overrides)


def test_the_bounds_are_inclusive_and_what_a_real_run_needs_is_accepted():
    accepted = [f"data.num_workers={4 * CPUS}", "model.name=MLP", f"model.hidden_sizes=[{HIDDEN_MAX}]",
                "aug.crop_padding=32", "optim.lr=10", "sched.max_lr=1000", "optim.weight_decay=10"]
    load_config(None, accepted)
    load_config(None, ["data.dataset=synthetic", f"data.train_size={SYNTHETIC_MAX}", f"data.val_size={SYNTHETIC_MAX}"])
    load_config(None, ["data.dataset=folder", f"data.image_size={IMAGE_SIDE_MAX}", f"aug.crop_padding={IMAGE_SIDE_MAX}"])
    load_config(None, [f"data.train_size={SPLIT_MAX}"])
    # one past each bound
    refused(f"data.num_workers={4 * CPUS + 1}")
    refused("model.name=MLP", f"model.hidden_sizes=[{HIDDEN_MAX + 1}]")
    refused("data.dataset=synthetic", f"data.train_size={SYNTHETIC_MAX + 1}")
    refused("aug.crop_padding=33")
    refused(f"data.image_size={IMAGE_SIDE_MAX + 1}")


def _numeric_keys():
    defaults = Config()
    for top in dataclasses.fields(Config):
        section = getattr(defaults, top.name)
        if dataclasses.is_dataclass(section):
            for f in dataclasses.fields(section):
                value = getattr(section, f.name)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    yield f"{top.name}.{f.name}", value


def test_every_number_key_has_an_upper_bound():
    unbounded = []
    for key, default in _numeric_keys():
        # a float key takes no inf; an int key no 10**12 (or 10**12 x its default, past any bound a real run has)
        huge = "inf" if isinstance(default, float) else str(10**12 * max(default, 1))
        try:
            load_config(None, [f"{key}={huge}"])
        except ConfigError as err:
            message = str(err)
            assert message.startswith(f"config error: {key}={huge} is not valid: expected ") and "\n" not in message
            if " in [" in message or " in (" in message:  # the range it accepts, both ends
                continue
        unbounded.append(key)
    assert unbounded == []


def test_readme_lists_the_range_of_every_number_key():
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("### Ranges"):readme.index("## How the code is laid out")]
    for key, _ in _numeric_keys():
        row = next((line for line in section.splitlines() if line.startswith(f"| `{key}` |")), None)
        assert row is not None, f"{key} missing from the README's ranges"
        field = next(f for f in dataclasses.fields(getattr(Config(), key.split(".")[0])) if f.name == key.split(".")[1])
        accepted = field.metadata.get("range")
        if accepted is not None and accepted.high is not None:  # the README says what the config checks
            assert accepted.expected() in row, (row, accepted.expected())


@pytest.mark.parametrize("override", ["optim.lr=inf", "sched.max_lr=inf"])
def test_the_command_line_refuses_them_before_the_run_folder_exists(tmp_path, override):
    run_dir = tmp_path / "run"
    result = run_fasttrain(*TINY, override, f"output.dir={run_dir}", timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"fasttrain: error: config error: {override.split('=')[0]}="), \
        result.stderr[-2000:]
    assert not run_dir.exists()


# --------------------------------------------------------------------------- model.kwargs of a built-in model


def test_model_kwargs_given_to_a_built_in_model_are_refused_but_reach_one_you_register(tmp_path):
    assert refused("model.kwargs.width=64") == (
        "config error: model.kwargs={'width': 64} is not valid with model.name='CIFAR10_CNN': the built-in models "
        "accept no model.kwargs (set model.hidden_sizes or model.dropout instead), only torchvision:<name> and "
        "package.module:callable models take them; remove model.kwargs")
    assert "model.name='MLP'" in refused("model.name=MLP", "model.kwargs.depth=3")

    @MODELS.register("KwargsNet")
    def kwargs_net(cfg: ModelConfig, in_channels: int, image_size: int, num_classes: int) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size ** 2, cfg.kwargs["width"]),
                             nn.Linear(cfg.kwargs["width"], num_classes))

    try:  # a builder of your own gets the whole ModelConfig: model.kwargs are its to read
        cfg = load_config(None, ["model.name=KwargsNet", "model.kwargs.width=7"])
        assert build_model(cfg.model, 3, 32, 10)[1].out_features == 7
    finally:
        MODELS.unregister("KwargsNet")


# --------------------------------------------------------------------------- own models that fail


USER_MODULES = {
    "raises_at_import": 'raise RuntimeError("needs a GPU at import\\nsecond line")\n',
    "exits_at_import": "import sys\nsys.exit(3)\n",
    "broken_syntax": "def net(:\n    pass\n",
    "nets_of_mine": '''
        import torch
        from torch import nn
        from os import system  # re-exported: a builtin
        from subprocess import call  # re-exported: a standard-library function


        class NoParameters(nn.Module):
            def forward(self, x):
                return torch.zeros(x.shape[0], 10)


        class Checked(nn.Module):
            def __init__(self, num_classes, width=8):
                super().__init__()
                if width < 1:
                    raise ValueError(f"width must be >= 1, got {width}\\nsecond line")
                self.head = nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))

            def forward(self, x):
                return self.head(x)


        class Unchecked(nn.Module):
            def __init__(self, num_classes, width=8):
                super().__init__()
                self.conv = nn.Conv2d(3, width, 3)  # torch raises a RuntimeError for a negative width


        class NotAModule:
            def __init__(self, **kwargs):
                self.kwargs = kwargs


        net = Checked(10)  # an instance: callable, but not a class or a function
    ''',
}


@pytest.fixture
def user_code(tmp_path, monkeypatch):
    folder = tmp_path / "user_code"
    folder.mkdir()
    for name, text in USER_MODULES.items():
        (folder / f"{name}.py").write_text(textwrap.dedent(text))
    monkeypatch.syspath_prepend(str(folder))
    yield folder
    for name in USER_MODULES:
        sys.modules.pop(name, None)


def build_refused(name: str, **kwargs) -> str:
    with pytest.raises(ConfigError) as err:
        build_model(ModelConfig(name=name, kwargs=kwargs), 3, 32, 10)
    message = str(err.value)
    assert message.startswith(f"config error: model.name={name!r}") and "\n" not in message, message
    return message


@pytest.mark.parametrize("name,kwargs,expected", [
    ("raises_at_import:net", {}, "importing module 'raises_at_import' failed: RuntimeError: needs a GPU at import "
                                 "(fix that module, or name another)"),
    ("exits_at_import:net", {}, "importing module 'exits_at_import' failed: SystemExit: 3"),
    ("broken_syntax:net", {}, "importing module 'broken_syntax' failed: SyntaxError: "),
    ("nets_of_mine:NoParameters", {}, "has no trainable parameters (0 parameters, none requiring gradients)"),
    ("nets_of_mine:Checked", {"width": -5}, "called with num_classes=10, width=-5: ValueError: width must be >= 1, "
                                            "got -5 (model.kwargs sets the arguments)"),
    ("nets_of_mine:Unchecked", {"width": -5}, "called with num_classes=10, width=-5: RuntimeError: Trying to create "
                                              "tensor with negative dimension -5"),
    ("nets_of_mine:NotAModule", {}, "is a class that is not an nn.Module subclass (nets_of_mine.NotAModule)"),
    ("nets_of_mine:net", {}, "is a Checked, not a class or a Python function"),
], ids=["import-raises", "import-exits", "syntax-error", "no-parameters", "value-error", "runtime-error",
        "not-a-module-class", "an-instance"])
def test_an_own_model_that_fails_is_one_line_naming_it_and_the_error(user_code, name, kwargs, expected):
    assert expected in build_refused(name, **kwargs)


def test_the_command_line_reports_a_module_that_fails_to_import_in_one_line(user_code, tmp_path):
    run_dir = tmp_path / "run"
    env_path = os.pathsep.join([str(REPO), str(user_code)])

    result = subprocess.run([sys.executable, "-m", "fasttrain.run", *TINY, "model.name=broken_syntax:net",
                             f"output.dir={run_dir}"], cwd=REPO, env=dict(os.environ, PYTHONPATH=env_path), text=True,
                            capture_output=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fasttrain: error: config error: model.name='broken_syntax:net': "
                                                   "importing module 'broken_syntax' failed: SyntaxError: "), lines
    assert not run_dir.exists()


# --------------------------------------------------------------------------- nothing from the standard library runs


@pytest.mark.parametrize("name", ["os:system", "subprocess:call", "builtins:eval", "os.path:join"])
def test_a_standard_library_callable_is_refused_when_the_config_is_loaded(name, tmp_path):
    marker = tmp_path / "ran"
    message = refused(f"model.name={name}", f"model.kwargs.command='touch {marker}'")
    assert message == (f"config error: model.name={name!r} is not valid: {name.split('.')[0].split(':')[0]!r} is a "
                       f"Python standard-library module, which holds no model; name a class (an nn.Module subclass) "
                       f"or function in a module of your own")
    assert not marker.exists()


def test_os_system_with_a_command_in_model_kwargs_never_runs_it(tmp_path):
    marker = tmp_path / "ran"
    kwargs = {"command": f"touch {marker}"}
    with pytest.raises(ConfigError, match=r"^config error: model.name='os:system' is not valid: 'os' is a Python "
                                          r"standard-library module"):
        ModelConfig(name="os:system", kwargs=kwargs)
    # and where the model is built, for a ModelConfig changed after it was checked
    with pytest.raises(ConfigError, match="'os' is a Python standard-library module"):
        imported_model("os:system", kwargs, 3, 32, 10)
    assert not marker.exists()


def test_os_system_from_the_command_line_never_runs_it(tmp_path):
    marker, run_dir = tmp_path / "ran", tmp_path / "run"
    result = run_fasttrain(*TINY, "model.name=os:system", f"model.kwargs.command=touch {marker}",
                           f"output.dir={run_dir}", timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.startswith("fasttrain: error: config error: model.name='os:system' is not valid")
    assert not marker.exists() and not run_dir.exists()


@pytest.mark.parametrize("name,expected", [
    ("nets_of_mine:system", "is a builtin_function_or_method, not a class or a Python function"),
    ("nets_of_mine:call", "is the standard-library function subprocess.call"),
])
def test_a_standard_library_callable_re_exported_by_your_module_is_refused_before_it_is_called(user_code, tmp_path,
                                                                                               name, expected):
    marker = tmp_path / "ran"
    kwargs = {"command": f"touch {marker}"} if name.endswith("system") else {"args": ["touch", str(marker)]}
    message = build_refused(name, **kwargs)
    assert expected in message and "name an nn.Module subclass, or a function of your own" in message
    assert not marker.exists()


# --------------------------------------------------------------------------- the Python API


def test_fit_takes_overrides_none_as_no_overrides(monkeypatch):
    monkeypatch.setattr(api.Trainer, "fit", lambda self, model=None: self.config)  # the config fit would train
    cfg = load_config(None, ["train.epochs=3"])
    assert fasttrain.fit(cfg, overrides=None).train.epochs == 3
    assert api.config_from(None, None).train.epochs == Config().train.epochs
