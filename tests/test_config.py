"""Configs: shipped recipes load, bad input stops with exit 2 and one line naming the key."""

import pytest
import yaml

from conftest import REPO, run_fasttrain, run_in_process
from fasttrain.config import load_config
from fasttrain.errors import ConfigError


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_is_valid(path):
    load_config(str(path))


def test_cifar10_cnn_recipe_is_the_tutorials_case_study():
    cfg = load_config(str(REPO / "configs" / "cifar10_cnn.yaml"))
    assert (cfg.model.name, cfg.train.batch_size, cfg.train.epochs) == ("CIFAR10_CNN", 128, 100)
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay) == ("adamw", 1e-3, 0.01)
    assert (cfg.sched.name, cfg.sched.max_lr) == ("onecycle", 0.01)
    assert (cfg.aug.crop_padding, cfg.aug.hflip) == (4, True)
    assert cfg.data.mean == [0.5, 0.5, 0.5] and cfg.data.std == [0.5, 0.5, 0.5]


@pytest.mark.parametrize("written,meant", [("off", "off"), ("no", "off"), ("false", "off"), ("", ""), ("null", ""),
                                           ("/tmp/cache", "/tmp/cache")])
def test_folder_or_off_keys_read_yamls_booleans_as_off(written, meant, tmp_path):
    """YAML reads `off` as a boolean: it must not become a folder named 'False' (in the override and in a file)."""
    cfg = load_config(None, [f"train.compile_cache={written}", f"data.cache_dir={written}"])
    assert (cfg.train.compile_cache, cfg.data.cache_dir) == (meant, meant)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"train:\n  compile_cache: {written or 'null'}\ndata:\n  cache_dir: {written or 'null'}\n")
    cfg = load_config(str(recipe))
    assert (cfg.train.compile_cache, cfg.data.cache_dir) == (meant, meant)
    with pytest.raises(ConfigError, match="train.compile_cache=true is not valid: expected a folder"):
        load_config(None, ["train.compile_cache=yes"])


def test_overrides_are_typed_and_win_over_the_file():
    cfg = load_config(str(REPO / "configs" / "smoke.yaml"), ["train.epochs=7", "optim.lr=3e-4", "data.mean=[0.4]"])
    assert cfg.train.epochs == 7 and cfg.optim.lr == pytest.approx(3e-4) and cfg.data.mean == [0.4]


@pytest.mark.parametrize("override,expected", [
    ("train.epocs=3", "unknown key 'train.epocs'; did you mean train.epochs? (every key: python -m fasttrain.run "
                      "--help)"),
    ("trian.epochs=3", "unknown key 'trian'; did you mean train?"),
    ("train.lr=0.1", "unknown key 'train.lr'; did you mean optim.lr?"),  # the same name in another section
    ("train.zzz=1", "unknown key 'train.zzz'; valid keys in 'train': epochs, batch_size"),  # nothing near: the list
    ("zzz=1", "unknown key 'zzz'; valid keys at the top level: data, aug, model"),
    ("train.epochs=ten", "train.epochs: Value 'ten'"),
    ("train.epochs=0", "train.epochs=0.0 is not valid: expected a number in (0, 100000]"),
    ("model.name=ResNet", "model.name='ResNet' is not valid: expected one of SimpleModel, MLP"),
    ("optim.name=lamb", "optim.name='lamb' is not valid: expected one of sgd, adam, adamw"),
    ("sched.name=poly", "sched.name='poly' is not valid: expected one of none, step"),
    ("data.dataset=imagenet", "data.dataset='imagenet' is not valid: expected one of cifar10, mnist, synthetic"),
    ("train.device=gpu0", "train.device='gpu0' is not valid"),
    ("optim.lr=-0.1", "optim.lr=-0.1 is not valid: expected a float in (0, 1000]"),
    ("train.epochs", "override 'train.epochs' must look like key.sub=value"),
    ("model.kwargs=[1]", "model.kwargs=[...] is not valid: expected Dict[str, Any] (a mapping is written {name: value})"),
    ("train.label_smoothing=1.0", "train.label_smoothing=1.0 is not valid: expected a fraction in [0, 1)"),
    ("train.ema_decay=1", "train.ema_decay=1.0 is not valid: expected a fraction in [0, 1)"),
    ("train.ema_every=0", "train.ema_every=0 is not valid: expected an integer in [1, 1000000000]"),
    ("train.lookahead_k=-2", "train.lookahead_k=-2 is not valid: expected an integer in [0, 1000000000] (0 = off)"),
    ("train.lookahead_alpha=0", "train.lookahead_alpha=0.0 is not valid: expected a fraction in (0, 1]"),
    ("train.tta=mirror", "train.tta='mirror' is not valid: expected one of none, flip, flip_shift"),
    ("train.eval_every=0", "train.eval_every=0 is not valid: expected an integer in [1, 100000]"),
    ("train.target_acc=94", "train.target_acc=94.0 is not valid: expected a fraction in [0, 1] (0 = off)"),
    ("checkpoint.every_epochs=0", "checkpoint.every_epochs=0 is not valid: expected an integer in [1, 100000]"),
    ("optim.bn_bias_lr_scale=0", "optim.bn_bias_lr_scale=0.0 is not valid: expected a float in (0, 1000]"),
])
def test_bad_values_raise_a_config_error_naming_the_key(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(str(REPO / "configs" / "smoke.yaml"), [override])
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def _assert_one_line_error(result, *needles):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fasttrain: error: "), result.stderr
    for needle in needles:
        assert needle in lines[0]


def test_cli_unknown_key_exits_2_with_one_line(tmp_path):
    result = run_fasttrain("--config", "configs/smoke.yaml", "train.epocs=2", f"output.dir={tmp_path / 'run'}")
    _assert_one_line_error(result, "train.epocs", "epochs")
    assert not (tmp_path / "run").exists()  # stopped before any work


# the entry point in this process (run_in_process) from here on: the same code; one real process above shows the exit
def test_cli_wrong_type_exits_2(capsys):
    _assert_one_line_error(run_in_process(capsys, "--config", "configs/smoke.yaml", "train.batch_size=big"),
                           "train.batch_size", "expected int")


def test_cli_bad_value_exits_2(capsys):
    _assert_one_line_error(run_in_process(capsys, "--config", "configs/smoke.yaml", "data.loader=turbo"),
                           "data.loader='turbo'", "plain")


def test_cli_missing_config_file_exits_2(capsys):
    _assert_one_line_error(run_in_process(capsys, "--config", "configs/nope.yaml"), "configs/nope.yaml", "not found")


def test_cli_unknown_key_in_yaml_file_exits_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"train": {"epochs": 1, "learning_rate": 0.1}}))
    _assert_one_line_error(run_in_process(capsys, "--config", str(bad)), "train.learning_rate")


def test_cli_invalid_yaml_exits_2(tmp_path, capsys):
    bad = tmp_path / "broken.yaml"
    bad.write_text("train:\n  epochs: [1,\n")
    _assert_one_line_error(run_in_process(capsys, "--config", str(bad)), "not valid YAML")


def test_help_lists_every_config_key_with_its_default():
    result = run_fasttrain("train", "--help", module="fasttrain.cli")
    assert result.returncode == 0
    for key in ("data.dataset = 'cifar10'", "data.root = './data'", "model.name = 'CIFAR10_CNN'", "train.epochs = 100",
                "optim.lr = 0.001", "sched.name = 'onecycle'", "output.dir"):
        assert key in result.stdout


def test_console_script_lists_its_subcommands():
    result = run_fasttrain("--help", module="fasttrain.cli")
    assert result.returncode == 0
    for command in ("train", "eval", "bench", "plot", "convert-checkpoint"):
        assert f"  {command} " in result.stdout
    bench = run_fasttrain("bench", "--help", module="fasttrain.cli")
    assert bench.returncode == 0 and "--preset" in bench.stdout
    unknown = run_fasttrain("fit", module="fasttrain.cli")
    assert unknown.returncode == 2 and "unknown command 'fit'" in unknown.stderr


@pytest.mark.slow
def test_a_train_command_exits_with_its_code_after_printing_everything(tmp_path):
    """`fasttrain train` and `python -m fasttrain.run` end with os._exit once the run is complete (see
    run.exit_now): the code is still the run's own, 0 or 2, and the last line is printed and logged."""
    tiny = ["--config", "configs/smoke.yaml", "data.train_size=128", "data.val_size=64", "train.epochs=1"]
    done = run_fasttrain("train", *tiny, f"output.dir={tmp_path / 'done'}", module="fasttrain.cli")
    assert done.returncode == 0, done.stderr[-2000:]
    last_two = done.stdout.splitlines()[-2:]
    assert last_two[0].startswith("done: best val_acc") and last_two[1].startswith("time: "), last_two
    assert " time: " in (tmp_path / "done" / "train.log").read_text().splitlines()[-1]
    refused = run_fasttrain("train", *tiny, f"output.dir={tmp_path / 'done'}", module="fasttrain.cli")
    assert refused.returncode == 2 and refused.stderr.splitlines()[-1].startswith("fasttrain: error: ")


def test_run_folder_is_named_by_output_name_or_config_and_time():
    assert load_config(str(REPO / "configs" / "smoke.yaml"), ["output.name=baseline"]).output.dir == "runs/baseline"
    assert load_config(str(REPO / "configs" / "smoke.yaml")).output.dir.startswith("runs/smoke-")
    with pytest.raises(ConfigError, match="output.name"):
        load_config(None, ["output.name=a/b"])


def test_readme_config_reference_lists_every_key():
    from fasttrain.config import Config, all_keys

    readme = (REPO / "README.md").read_text()
    for key, _, _ in all_keys(Config()):
        assert f"| `{key}` |" in readme, f"{key} missing from README"


def test_the_fast_recipe_is_the_case_study_with_only_speed_keys_its_batch_and_accuracy_tools_changed():
    from fasttrain.config import all_keys

    case = dict((k, v) for k, v, _ in all_keys(load_config(str(REPO / "configs" / "cifar10_cnn.yaml"))))
    fast = dict((k, v) for k, v, _ in all_keys(load_config(str(REPO / "configs" / "cifar10_cnn_fast.yaml"))))
    speed_keys = {"data.loader", "data.drop_last", "data.num_workers", "train.precision", "train.channels_last",
                  "train.compile", "train.capture", "train.log_every", "output.dir"}
    accuracy_tools = {"train.label_smoothing", "train.tta", "train.ema_decay", "train.ema_every", "train.lookahead_k",
                      "train.lookahead_alpha", "optim.decay_bn_bias", "optim.bn_bias_lr_scale"}
    changed = {k for k in case if case[k] != fast[k]} - speed_keys - accuracy_tools
    assert changed == {"train.batch_size"}, changed  # the same model, optimizer, peak lr and warm-up
    assert fast["train.batch_size"] >= 512 and fast["train.capture"] and fast["train.compile"] == "default"
