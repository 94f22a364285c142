"""Loading a config: a YAML file and `key.sub=value` overrides merged onto the schema, checked, and every
failure turned into one `ConfigError` line (OmegaConf's errors rewritten to name the key and what it
accepts; a file that is no text, a path the file system cannot hold). Also the way back: a Config as a
plain dict (checkpoints) or YAML (config.yaml), and from a checkpoint's dict.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import io
import os
import re
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from fasttrain.config.fields import Choice
from fasttrain.config.keys import choice_type, expected_type, valid_keys
from fasttrain.config.schema import Config
from fasttrain.errors import ConfigError


def _unknown_key(key: str) -> str:
    """The keys a typo most likely meant (a near spelling in its section, or the same name in another section:
    train.lr -> optim.lr); else the section's keys."""
    section, _, name = key.rpartition(".")
    valid = valid_keys(section)
    likely = [f"{section}.{near}" if section else near for near in difflib.get_close_matches(name, valid, n=2)]
    if section:
        likely += [f"{other}.{name}" for other in valid_keys("") if other != section and name in valid_keys(other)]
    if likely:
        return (f"config error: unknown key '{key}'; did you mean {' or '.join(likely)}? (every key: "
                f"python -m fasttrain.run --help)")
    where = f"in '{section}'" if section else "at the top level"
    return f"config error: unknown key '{key}'; valid keys {where}: {', '.join(valid)}"


def _format_omegaconf_error(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None) or ""
    if isinstance(err, ConfigKeyError):
        return _unknown_key(key)
    choice = choice_type(key)
    if choice is not None and isinstance(err, ValidationError):  # a name outside a closed set
        return (f"config error: {key.split('[')[0]}={getattr(err, 'value', None)!r} is not valid: expected one of "
                f"{', '.join(choice.names())}")
    message = (getattr(err, "msg", None) or str(err)).splitlines()[0]
    if key:
        expected = expected_type(key)
        return f"config error: {key}: {message}" + (f" (expected {expected})" if expected else "")
    return f"config error: {message}"



_KEY_RE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_PARSE_ERRORS = (yaml.YAMLError, OmegaConfBaseException, ValueError, TypeError, IndexError, KeyError)


def _parse_overrides(overrides: Sequence[str]) -> Any:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"config error: override '{item}' must look like key.sub=value (e.g. train.epochs=5)")
        key = item.split("=", 1)[0]
        if not _KEY_RE.match(key):
            raise ConfigError(f"config error: override '{_shorten(item)}' has no valid key ('{_shorten(key)}'): "
                              f"keys are dotted names such as train.epochs, and a list is set whole "
                              f"(data.mean=[0.4,0.5,0.5])")
        try:
            OmegaConf.from_dotlist([item])  # one at a time: the error names the override that is wrong
        except _PARSE_ERRORS as err:
            raise ConfigError(f"config error: override '{_shorten(item)}' is not valid YAML "
                              f"({_first_line(err)}): close its brackets and braces, or quote the value "
                              f"(e.g. model.hidden_sizes=[64,32])") from None
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except _PARSE_ERRORS as err:
        raise ConfigError(f"config error: cannot combine overrides {list(overrides)}: {_first_line(err)}") from None


def _first_line(err: BaseException, line: bool = False) -> str:
    """What a parse error says, in one line: YAML's problem (with its line in a file when `line`),
    else the first line of the message, else the error's type."""
    problem = getattr(err, "problem", None)
    if problem:
        mark = getattr(err, "problem_mark", None)
        return f"{problem} at line {mark.line + 1}" if line and mark is not None else str(problem)
    lines = [text.strip() for text in str(err).splitlines() if text.strip()]
    return lines[0] if lines else type(err).__name__


def _shorten(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else f"{text[:limit // 2]}...{text[-limit // 4:]} ({len(text)} characters)"


def _read_yaml_text(path: str) -> str:
    """The text of a config file: UTF-8 without NUL bytes (a binary file is not a recipe)."""
    file = Path(path)
    try:
        if not file.is_file():
            raise ConfigError(f"config error: config file '{path}' not found (see configs/ for the shipped recipes)")
        data = file.read_bytes()
    except OSError as err:  # unreadable, or a path too long for the file system
        raise ConfigError(f"config error: cannot read config file '{_shorten(path)}' ({err.strerror or err}): "
                          f"give the path of a readable .yaml file (see configs/)") from None
    bad = data.find(b"\0")  # NUL is valid UTF-8 but never text
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        bad = err.start if bad < 0 else min(bad, err.start)
    if bad < 0:
        return text
    raise ConfigError(f"config error: '{path}' is not a text YAML file (byte {data[bad]:#04x} at offset {bad} is "
                      f"not UTF-8 text): give a YAML recipe saved as UTF-8, such as configs/cifar10_cnn.yaml")


def _check_output_dir(run_dir: str, key: str) -> None:
    """A run folder whose name the file system can hold: each part within NAME_MAX, the whole
    (with the files fasttrain writes inside it) within PATH_MAX. Checked before any work."""
    path = Path(os.path.abspath(run_dir))
    existing = next((p for p in [path, *path.parents] if _exists(p)), Path("/"))
    name_max = _pathconf(existing, "PC_NAME_MAX", 255)
    path_max = _pathconf(existing, "PC_PATH_MAX", 4096)
    for part in path.parts:
        if len(os.fsencode(part)) > name_max:
            raise ConfigError(f"config error: {key} holds a name of {len(os.fsencode(part))} bytes "
                              f"('{_shorten(part, 40)}'); this file system allows {name_max} per folder name: "
                              f"use a shorter {key}")
    inside = 128  # room for the files a run writes inside it (checkpoints/.step-NNNNNNNN.pt.XXXXXXXX.tmp, ...)
    if len(os.fsencode(str(path))) + inside >= path_max:
        raise ConfigError(f"config error: {key} makes a run folder path of {len(os.fsencode(str(path)))} bytes "
                          f"('{_shorten(str(path), 60)}'); this file system allows {path_max - inside - 1} for "
                          f"a run folder (its files need the rest of {path_max}): use a shorter {key}")


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # ENAMETOOLONG and the like: not an existing folder
        return False


def _pathconf(path: Path, name: str, default: int) -> int:
    try:
        value = os.pathconf(path, name)
    except (OSError, ValueError):
        return default
    return value if value and value > 0 else default


def load_config(path: Optional[str], overrides: Sequence[str] = ()) -> Config:
    """YAML file (optional) + overrides -> validated Config. Raises ConfigError (exit 2)."""
    schema = OmegaConf.structured(Config)
    layers = [schema]
    if path is not None:
        text = _read_yaml_text(path)
        try:
            loaded = OmegaConf.load(io.StringIO(text))
        except (yaml.YAMLError, OmegaConfBaseException, ValueError) as err:
            raise ConfigError(f"config error: '{path}' is not valid YAML: {_first_line(err, line=True)}") from None
        if not OmegaConf.is_dict(loaded):
            raise ConfigError(f"config error: '{path}' must hold a mapping of sections (data:, model:, ...)")
        layers.append(loaded)
    layers.append(_parse_overrides(overrides))
    cfg = _build(layers)
    key = "output.dir"
    if not cfg.output.dir:
        stem = Path(path).stem if path else "run"
        cfg.output.dir = str(Path("runs") / (cfg.output.name or f"{stem}-{datetime.datetime.now():%Y%m%d-%H%M%S}"))
        key = "output.name" if cfg.output.name else "output.dir"
    _check_output_dir(cfg.output.dir, key)
    return cfg


def to_dict(cfg: Config) -> dict:
    """Plain Python values only (a Choice becomes its name): checkpoints load with weights_only=True."""
    def plain(value: Any) -> Any:
        if isinstance(value, Choice):
            return value.value
        return [plain(item) for item in value] if isinstance(value, list) else value

    return dataclasses.asdict(cfg, dict_factory=lambda items: {key: plain(value) for key, value in items})


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def from_dict(data: dict, overrides: Sequence[str] = ()) -> Config:
    """Rebuild a Config from a saved dict (a checkpoint's), applying overrides on top."""
    try:
        saved = OmegaConf.create(data)
    except OmegaConfBaseException as err:
        raise ConfigError(_format_omegaconf_error(err)) from None
    return _build([OmegaConf.structured(Config), saved, _parse_overrides(overrides)])


def _build(layers: List[Any]) -> Config:
    """The schema merged with the layers (file, saved dict, overrides) -> validated Config."""
    try:
        for layer in layers[1:]:
            _compile_false_is_off(layer)
        merged = OmegaConf.merge(*layers)
        _check_list_items(merged)
        cfg = OmegaConf.to_object(merged)
    except ConfigError:
        raise
    except OmegaConfBaseException as err:
        # to_object wraps errors raised in __post_init__; surface ours unchanged
        cause = err.__cause__ or err.__context__
        if isinstance(cause, ConfigError):
            raise cause from None
        raise ConfigError(_format_omegaconf_error(err)) from None
    except (TypeError, ValueError) as err:  # OmegaConf's merge of a mapping into a list key, or the reverse
        key, given = _container_mismatch(layers[1:])
        if not key:
            raise ConfigError(f"config error: {_first_line(err)}") from None
        written = "a list is written [a, b]" if given == "{...}" else "a mapping is written {name: value}"
        raise ConfigError(f"config error: {key}={given} is not valid: expected {expected_type(key)} "
                          f"({written})") from None
    assert isinstance(cfg, Config)
    return cfg


# keys that take a folder, '' (the default place) or off: YAML reads `off` (and no, false) as a boolean, and
# an empty override (key=) as null, which would otherwise reach the field as the folder "False" or fail
FOLDER_OR_OFF = (("train", "compile_cache"), ("data", "cache_dir"))


def _compile_false_is_off(layer: Any) -> None:
    """YAML's `compile: false` (or no, 0, null) means off; the CompileMode field takes names only. And the
    folder-or-off keys: a YAML boolean false is `off`, null is '' (the default place)."""
    if not OmegaConf.is_dict(layer):
        return
    train = layer.get("train")
    if OmegaConf.is_dict(train) and "compile" in train and not OmegaConf.is_interpolation(train, "compile"):
        if str(train.compile).lower() in ("false", "no", "none", "0"):
            train.compile = "off"
    for section_name, key in FOLDER_OR_OFF:
        section = layer.get(section_name)
        if not OmegaConf.is_dict(section) or key not in section or OmegaConf.is_interpolation(section, key):
            continue
        value = section[key]
        if value is False:
            section[key] = "off"
        elif value is None:
            section[key] = ""
        elif value is True:
            raise ConfigError(f"config error: {section_name}.{key}=true is not valid: expected a folder, '' (the "
                              f"default place) or off")


def _check_list_items(merged: Any) -> None:
    """OmegaConf checks a typed list's scalar items but lets a nested list or mapping through."""
    for section, values in OmegaConf.to_container(merged).items():
        for key, value in (values.items() if isinstance(values, dict) else ()):
            if isinstance(value, list) and any(isinstance(item, (list, dict)) for item in value):
                raise ConfigError(f"config error: {section}.{key}={value} is not valid: expected "
                                  f"{expected_type(f'{section}.{key}')} (one value per item)")


def _container_mismatch(layers: Sequence[Any]) -> Tuple[str, str]:
    """(the first dotted key whose default is a list that a layer sets to a mapping, or whose default
    is a mapping that a layer sets to a list; how the given value is shown), ('', '') if none."""
    defaults = to_dict(Config())
    for layer in layers:
        for section, values in OmegaConf.to_container(layer).items():
            if isinstance(values, dict) and isinstance(defaults.get(section), dict):
                for key, value in values.items():
                    default = defaults[section].get(key)
                    if isinstance(value, dict) and isinstance(default, list):
                        return f"{section}.{key}", "{...}"
                    if isinstance(value, list) and isinstance(default, dict):
                        return f"{section}.{key}", "[...]"
    return "", ""

