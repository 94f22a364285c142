"""Bring your own model: `model.name=torchvision:<name>` or `model.name=package.module:callable`
(with `model.kwargs`) trains through the CLI, its checkpoint evaluates and resumes, and every way of
naming it wrong is one line and exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO, assert_same_weights, read_jsonl
from fasttrain import cli, run
from fasttrain.config import ModelConfig, load_config
from fasttrain.errors import ConfigError
from fasttrain.models import build_model

# one short epoch on synthetic CIFAR-shaped data, on the CPU
SHORT = ["data.dataset=synthetic", "data.train_size=64", "data.val_size=32", "train.batch_size=32",
         "train.epochs=1", "train.device=cpu", "data.num_workers=0", "data.loader=gpu", "output.plots=false"]

# a user's model file: a class with the shape arguments and a width of its own, BatchNorm included (so
# that the build-time check's forward would show in the running statistics if it leaked)
MY_NETS = '''
    import torch
    from torch import nn

    calls = []  # the keyword arguments each builder was called with


    class WideNet(nn.Module):
        def __init__(self, in_channels, num_classes, width=8):
            super().__init__()
            calls.append({"in_channels": in_channels, "num_classes": num_classes, "width": width})
            self.features = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                          nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.head = nn.Linear(width, num_classes)

        def forward(self, x):
            return self.head(self.features(x))


    def from_kwargs_only(**options):
        calls.append(options)
        return nn.Sequential(nn.Flatten(), nn.LazyLinear(options.get("classes", 10)))


    def returns_a_list(num_classes):
        return [nn.Linear(3, num_classes)]


    def ignores_num_classes():
        return nn.Sequential(nn.Flatten(), nn.LazyLinear(1000))  # ImageNet's 1000 outputs on 10 classes
'''


def widenet_parameters(width: int, in_channels: int = 3, classes: int = 10) -> int:
    conv, bn, head = width * in_channels * 9 + width, 2 * width, width * classes + classes
    return conv + bn + head


@pytest.fixture
def my_nets(tmp_path, monkeypatch):
    """my_nets.py in a folder of its own, importable here (sys.path) and by subprocesses (PYTHONPATH)."""
    folder = tmp_path / "user_code"
    folder.mkdir()
    (folder / "my_nets.py").write_text(textwrap.dedent(MY_NETS))
    monkeypatch.syspath_prepend(str(folder))
    yield folder
    sys.modules.pop("my_nets", None)  # the next test writes its own copy


def fasttrain(*args: str, module: str = "fasttrain.run", pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    """The CLI as a user runs it, with the user's own code folder on PYTHONPATH."""
    paths = [str(REPO)] + ([str(pythonpath)] if pythonpath else [])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths), OMP_NUM_THREADS="2")
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, text=True, capture_output=True,
                          timeout=300)


# --------------------------------------------------------------------------- training, eval and resume


def test_torchvision_resnet18_trains_with_the_cifar_stem_and_its_checkpoint_evaluates(tmp_path, capsys):
    from fasttrain.observe.flops import flops_per_image
    from fasttrain.models import count_parameters

    # 10 classes, 3x3 conv1: ResNet-18 with the 3x3 stride-1 stem and no max-pool costs 3.33 GFLOP per 32x32
    # image forward + backward (0.56 GMAC forward); torchvision's ImageNet stem would shrink the image 4x first
    # (~0.2 GFLOP). What the run logs as its model and its cost (train.log) are these two numbers.
    model = build_model(ModelConfig(name="torchvision:resnet18"), 3, 32, 10)
    assert count_parameters(model) == 11_173_962
    assert flops_per_image(model, (3, 32, 32)) / 1e6 == pytest.approx(3329.0, abs=0.05)

    # one step of 2 images and 2 to validate (ResNet-18 at 3.3 GFLOP an image is this test's cost), in this
    # process: it is about the model
    run_dir = tmp_path / "run"
    assert run.main([*SHORT, "data.train_size=2", "data.val_size=2", "train.batch_size=2",
                     "model.name=torchvision:resnet18", f"output.dir={run_dir}"]) == 0
    assert len(read_jsonl(run_dir / "metrics.jsonl")) == 1
    trained = torch.load(run_dir / "checkpoints" / "best.pt", map_location="cpu", weights_only=False)["model"]
    assert trained["conv1.weight"].shape == (64, 3, 3, 3) and trained["fc.weight"].shape == (10, 512)
    assert sum(v.numel() for k, v in trained.items() if k in dict(model.named_parameters())) == 11_173_962

    capsys.readouterr()
    assert cli.main(["eval", str(run_dir / "checkpoints" / "best.pt"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["total"] == 2 and out["val_acc"] == out["recorded_val_acc"]


def test_your_own_model_trains_with_its_kwargs_and_evaluates_from_its_checkpoint(my_nets, tmp_path, capsys):
    run_dir = tmp_path / "run"
    # a real process that imports the user's module from PYTHONPATH; channels_last as well: the model is moved
    # like the tutorial's
    result = fasttrain(*SHORT, "model.name=my_nets:WideNet", "model.kwargs.width=24", "train.channels_last=true",
                       f"output.dir={run_dir}", pythonpath=my_nets)
    assert result.returncode == 0, result.stderr
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())["model"]
    assert (saved["name"], saved["kwargs"]) == ("my_nets:WideNet", {"width": 24})
    checkpoint = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=False)
    assert checkpoint["config"]["model"]["kwargs"] == {"width": 24}  # what eval and resume rebuild the model from
    weights = checkpoint["model"]
    assert weights["features.0.weight"].shape == (24, 3, 3, 3)  # width=24 reached the class
    trainable = [k for k in weights if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert sum(weights[k].numel() for k in trainable) == widenet_parameters(24)

    # the checkpoint names its model by import: eval builds it only when the user names it too (in this
    # process, where my_nets is importable as well)
    capsys.readouterr()
    assert cli.main(["eval", str(run_dir / "checkpoints" / "best.pt")]) == 2
    err = capsys.readouterr().err
    assert "fasttrain imports no code that a file names" in err and len(err.strip().splitlines()) == 1
    assert cli.main(["eval", str(run_dir / "checkpoints" / "best.pt"), "model.name=my_nets:WideNet", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["total"] == 32 and out["val_acc"] == out["recorded_val_acc"]


def test_your_own_model_resumes_to_the_same_weights_as_a_straight_run(my_nets, tmp_path):
    args = [*SHORT, "train.epochs=2", "model.name=my_nets:WideNet", "model.kwargs={width: 12}"]
    assert run.main([*args, f"output.dir={tmp_path / 'straight'}"]) == 0
    assert run.main([*args, f"output.dir={tmp_path / 'resumed'}", "train.stop_after_steps=3"]) == 0
    assert run.main([*args, f"output.dir={tmp_path / 'resumed'}", "resume=auto"]) == 0
    assert_same_weights(tmp_path / "straight", tmp_path / "resumed")


# --------------------------------------------------------------------------- what the builders receive


def test_the_shape_arguments_its_signature_names_and_model_kwargs_reach_the_callable(my_nets):
    import my_nets as user_module

    build_model(ModelConfig(name="my_nets:WideNet", kwargs={"width": 4}), 1, 28, 10)
    build_model(ModelConfig(name="my_nets:WideNet", kwargs={"num_classes": 3}), 3, 32, 3)  # model.kwargs win
    build_model(ModelConfig(name="my_nets:from_kwargs_only", kwargs={"classes": 7}), 3, 32, 7)
    assert user_module.calls == [{"in_channels": 1, "num_classes": 10, "width": 4},
                                 {"in_channels": 3, "num_classes": 3, "width": 8},
                                 {"classes": 7}]  # a **catch-all names none of the shape arguments


def test_building_checks_the_output_without_touching_the_weights_buffers_or_random_state(my_nets):
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="my_nets:WideNet"), 3, 32, 10)
    after_build = torch.rand(1)
    torch.manual_seed(0)
    import my_nets as user_module

    plain = user_module.WideNet(3, 10)
    assert torch.equal(torch.rand(1), after_build)  # the check's random batch came from a forked generator
    state, plain_state = model.state_dict(), plain.state_dict()
    assert all(torch.equal(state[key], plain_state[key]) for key in plain_state)  # BatchNorm statistics included
    assert model.training


@pytest.mark.parametrize("channels,size,kernel,stride,maxpool", [
    (3, 32, 3, 1, "Identity"),  # CIFAR-10: the small-image stem
    (1, 28, 3, 1, "Identity"),  # MNIST: the same, taking one channel
    (1, 96, 7, 2, "MaxPool2d"),  # larger images keep the ImageNet stem, taking one channel
])
def test_torchvision_resnets_get_a_stem_for_the_data(channels, size, kernel, stride, maxpool):
    model = build_model(ModelConfig(name="torchvision:resnet18"), channels, size, 10)
    assert (model.conv1.in_channels, model.conv1.kernel_size, model.conv1.stride) == (channels, (kernel,) * 2,
                                                                                      (stride,) * 2)
    assert type(model.maxpool).__name__ == maxpool and model.fc.out_features == 10


def test_other_torchvision_models_take_one_channel_images_in_their_first_convolution():
    model = build_model(ModelConfig(name="torchvision:mobilenet_v3_small"), 1, 28, 10)
    first = model.features[0][0]
    assert (first.in_channels, first.kernel_size, first.stride) == (1, (3, 3), (2, 2))
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


# --------------------------------------------------------------------------- bad input: one line


@pytest.mark.parametrize("name,kwargs,expected", [
    ("torchvision:resnet19", {}, "model.name='torchvision:resnet19': torchvision "),
    ("torchvision:resnet19", {}, "has no classification model 'resnet19'; did you mean resnet18"),
    ("torchvision:resnet18", {"weights": "DEFAULT"}, "model.kwargs.weights='DEFAULT' is not valid"),
    ("torchvision:resnet18", {"widht": 64}, "called with num_classes=10, widht=64: TypeError: ResNet.__init__() got "
                                            "an unexpected keyword argument 'widht'"),
    ("torchvision:googlenet", {}, "returns a GoogLeNetOutputs in training mode"),
    ("torchvision:vit_b_16", {}, "fails on a batch of 2x3x32x32 images: AssertionError: Wrong image height!"),
    ("my_netz:WideNet", {}, "model.name='my_netz:WideNet': no module named 'my_netz'; did you mean my_nets?"),
    ("my_nets.sub:WideNet", {}, "no module named 'my_nets.sub'"),
    ("my_nets:WidNet", {}, "model.name='my_nets:WidNet': 'my_nets' has no attribute 'WidNet'; did you mean WideNet?"),
    ("my_nets:calls", {}, "model.name='my_nets:calls' is not callable (it holds a list)"),
    ("my_nets:WideNet", {"depth": 3}, "called with num_classes=10, in_channels=3, depth=3: TypeError: "),
    ("my_nets:returns_a_list", {}, "returned a list, not a torch.nn.Module"),
    ("my_nets:ignores_num_classes", {}, "gives logits of shape (2, 1000) for a batch of 2x3x32x32 images, expected "
                                        "(2, 10)"),
], ids=["torchvision-name", "torchvision-suggestion", "torchvision-weights", "torchvision-kwargs", "tuple-output",
        "forward-fails", "module", "submodule", "attribute", "not-callable", "kwargs", "not-a-module", "num-classes"])
@pytest.mark.filterwarnings("ignore:The default weight initialization of GoogleNet")  # torchvision's, for googlenet
def test_a_model_that_cannot_be_built_is_one_config_error_line(my_nets, name, kwargs, expected):
    with pytest.raises(ConfigError) as err:
        build_model(ModelConfig(name=name, kwargs=kwargs), 3, 32, 10)
    message = str(err.value)
    assert message.startswith("config error: ") and "\n" not in message
    assert expected in message


def test_the_cli_reports_a_model_it_cannot_find_in_one_line_with_exit_2(my_nets, tmp_path, capsys):
    assert run.main([*SHORT, "model.name=my_nets:WidNet", f"output.dir={tmp_path / 'run'}"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["fasttrain: error: config error: model.name='my_nets:WidNet': 'my_nets' has no attribute "
                     "'WidNet'; did you mean WideNet? (package.module:callable names a class or function in that "
                     "module)"]


@pytest.mark.parametrize("name", ["torchvision:resnet-18", "torchvision:", "my nets:WideNet", "my_nets:", ":WideNet",
                                  "my_nets:WideNet:x", "my_nets.:WideNet"])
def test_the_config_checks_the_syntax_of_a_model_reference_before_importing_anything(name):
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"model.name='{name}'"])
    assert str(err.value) == (f"config error: model.name={name!r} is not valid: expected a registered name "
                              f"(SimpleModel, MLP, MLPSequential, CNN, CIFAR10_CNN, SpeedNet), torchvision:<name> or "
                              f"package.module:callable")


def test_the_config_accepts_references_it_cannot_resolve_yet_and_plain_names_as_before():
    # resolved when the model is built (on every rank, in eval), not when the config is read
    assert load_config(None, ["model.name=somewhere.not_installed:Net"]).model.name == "somewhere.not_installed:Net"
    assert load_config(None, ["model.name=torchvision:resnet19"]).model.name == "torchvision:resnet19"
    with pytest.raises(ConfigError, match=r"^config error: model.name='resnet18' is not valid: expected one of "
                                          r"SimpleModel, MLP, MLPSequential, CNN, CIFAR10_CNN, SpeedNet$"):
        load_config(None, ["model.name=resnet18"])


def _readme_block(heading: str) -> list:
    """The commands of the first ```bash block under `heading` in the README, continuation lines joined."""
    text = (REPO / "README.md").read_text()
    section = text[text.index(heading):]
    block = section[section.index("```bash\n") + len("```bash\n"):]
    block = block[:block.index("```")].replace("\\\n", " ")
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]


@pytest.mark.slow  # the README's ResNet-18 line: 3 steps of 32 images and 150 to validate, at 3.3 GFLOP an image
def test_readme_your_own_model_on_your_own_images_runs_as_written(tmp_path):
    """The README's "Your own model on your own images" block, run line by line from the project's
    folder (only data/ and runs/ moved to tmp_path): a folder of JPEGs and PNGs, a model of your own
    by import path, a torchvision model, and eval of the checkpoint."""
    commands = _readme_block("## Your own model on your own images")
    assert len(commands) == 4
    for command in commands:
        command = (command.replace("data/shapes", str(tmp_path / "shapes")).replace("runs/", f"{tmp_path}/runs/")
                   .replace("output.name=", f"output.dir={tmp_path}/runs/"))
        assert command.startswith("python ")
        command = f"{sys.executable} {command[len('python '):]}" + (" --json" if " eval " in command else "")
        result = subprocess.run(command, shell=True, cwd=REPO, capture_output=True, text=True, timeout=600,
                                env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"))
        assert result.returncode == 0, (command, result.stderr[-3000:])
    tiny = read_jsonl(tmp_path / "runs" / "shapes-tiny" / "metrics.jsonl")
    assert max(record["val_acc"] for record in tiny) > 0.6  # 3 classes: chance is 1/3
    assert yaml.safe_load((tmp_path / "runs" / "shapes-resnet18" / "config.yaml").read_text())["model"]["name"] \
        == "torchvision:resnet18"
    evaluated = json.loads(result.stdout.strip().splitlines()[-1])
    assert evaluated["val_acc"] == evaluated["recorded_val_acc"] == max(record["val_acc"] for record in tiny)
