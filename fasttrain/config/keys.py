"""The schema's keys, for what the config tells its user: the keys of a section, a key's declared type and
closed set (for the error messages of load.py), and one line per key for `fasttrain train --help`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, List, Optional

from fasttrain.config import schema
from fasttrain.config.fields import Choice, help_line
from fasttrain.config.schema import Config


def section_default(section: str) -> Any:
    """The default dataclass instance of a section ('' = the whole Config), or None."""
    obj: Any = Config()
    for part in [p for p in section.split(".") if p]:
        if not dataclasses.is_dataclass(obj) or not hasattr(obj, part):
            return None
        obj = getattr(obj, part)
    return obj if dataclasses.is_dataclass(obj) else None


def valid_keys(section: str) -> List[str]:
    obj = section_default(section)
    return [f.name for f in dataclasses.fields(obj)] if obj is not None else []


def expected_type(full_key: str) -> str:
    section, _, name = full_key.split("[")[0].rpartition(".")
    obj = section_default(section)
    if obj is None:
        return ""
    for f in dataclasses.fields(obj):
        if f.name == name:
            return str(f.type).replace("typing.", "")
    return ""


def choice_type(full_key: str) -> Optional[type]:
    """The Choice enum behind a key (or behind its list's items), else None."""
    declared = expected_type(full_key) if full_key else ""
    # the declared types are strings (postponed annotations), named as schema.py imports them
    found = vars(schema).get(declared.removeprefix("List[").removesuffix("]"))
    return found if isinstance(found, type) and issubclass(found, Choice) else None


def describe_keys() -> List[str]:
    """One line per config key with its type, default and doc: the `--help` reference."""
    lines = []
    defaults = Config()
    for key, value, doc in all_keys(defaults):
        shown = ("null" if value is None else repr(value) if isinstance(value, str)
                 else str(value).lower() if isinstance(value, bool) else str(value))
        lines.append(f"  {key} = {shown}    {doc}")
    return lines


def all_keys(cfg: Config) -> List[tuple]:
    """(dotted key, value, doc) for every leaf key: section keys, then top-level ones (resume)."""
    keys = []
    for top in dataclasses.fields(Config):
        value = getattr(cfg, top.name)
        if dataclasses.is_dataclass(value):
            keys += [(f"{top.name}.{f.name}", getattr(value, f.name), help_line(f)) for f in dataclasses.fields(value)]
        else:
            keys.append((top.name, value, help_line(top)))
    return keys
