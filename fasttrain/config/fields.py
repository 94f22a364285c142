"""The machinery of a config key: what it accepts and its help line, declared once on its field.

`setting(...)` declares a dataclass field with its help line (`fasttrain train --help`) and what it
accepts: a registry's names, or a `Range` of numbers. A `Section` checks both once OmegaConf has filled
it, then its own `check()`. A closed set of names is a `Choice` enum instead, which OmegaConf itself
checks. Every failure is one `ConfigError` line naming the key and what it accepts.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, List, Optional, Sequence

from fasttrain.config.registry import Registry
from fasttrain.errors import ConfigError


class Choice(str, enum.Enum):
    """A closed set of names for one config key. OmegaConf accepts only a member's name there, and a
    member compares, hashes, prints and serialises as that name (`PrecisionName.bf16 == "bf16"`), so
    YAML, logs, checkpoints and code read the same. Open sets (models, datasets, optimizers,
    schedules) are registries instead: anyone can add to those."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    def __repr__(self) -> str:
        return repr(self.value)

    @classmethod
    def names(cls) -> List[str]:
        return [member.value for member in cls]


def choices(name: str, names: Sequence[str]) -> Any:
    """A Choice enum named `name`. The functional form: compile modes are not Python identifiers
    (reduce-overhead). Its module is the package's face, where it is re-exported: a pickled member names
    the same class as it did before the config became a package."""
    return Choice(name, [(n, n) for n in names], module="fasttrain.config", qualname=name)


@dataclass(frozen=True)
class Range:
    """The values a number key accepts: `low`/`high` inclusive, `above`/`below` exclusive; `what` and
    `note` complete the error's "expected ..." ("an integer >= 0 (0 = all)")."""
    what: str
    low: Optional[float] = None
    high: Optional[float] = None
    above: Optional[float] = None
    below: Optional[float] = None
    note: str = ""
    said: str = ""  # the whole "expected ..." where the bounds alone would say it less clearly

    def holds(self, value: float) -> bool:
        if isinstance(value, float) and not math.isfinite(value):  # nan passes no comparison, inf an open bound
            return False
        return ((self.low is None or value >= self.low) and (self.high is None or value <= self.high)
                and (self.above is None or value > self.above) and (self.below is None or value < self.below))

    def expected(self) -> str:
        if self.said:
            return self.said

        def shown(bound: float) -> str:
            return str(int(bound)) if float(bound).is_integer() else f"{bound:g}"

        start = ("[", self.low) if self.low is not None else ("(", self.above) if self.above is not None else None
        end = ("]", self.high) if self.high is not None else (")", self.below) if self.below is not None else None
        if start and end:
            text = f"{self.what} in {start[0]}{shown(start[1])}, {shown(end[1])}{end[0]}"
        elif start:
            text = f"{self.what} {'>=' if start[0] == '[' else '>'} {shown(start[1])}"
        else:
            assert end is not None
            text = f"{self.what} {'<=' if end[0] == ']' else '<'} {shown(end[1])}"
        return text + (f" ({self.note})" if self.note else "")


def setting(default: Any, doc: str, choices: Optional[Registry] = None, **accepts: Any) -> Any:
    """A dataclass field with a help line (shown by `fasttrain train --help`) and what it accepts,
    checked by `Section`: a registry's names (`choices`: the help line starts with them, read when
    shown, since the entries' modules import the config), or a range of numbers (`accepts`: the fields
    of `Range`, `what` defaulting to "an integer" or "a float" after the default's type)."""
    accepted = None
    if accepts:
        what = accepts.pop("what", "") or ("an integer" if isinstance(default, int) else "a float")
        accepted = Range(what, **accepts)
    metadata = {"doc": doc, "choices": choices, "range": accepted}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def help_line(f: dataclasses.Field) -> str:
    """A field's help line: its registry's names first, where it has one."""
    doc, registry = f.metadata.get("doc", ""), f.metadata.get("choices")
    if registry is None:
        return doc
    return " | ".join(registry.names()) + (f" {doc}" if doc else "")


def require(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"config error: {key}={value!r} is not valid: expected {expected}")


def require_one_of(key: str, value: str, names: Sequence[str]) -> None:
    require(value in names, key, value, "one of " + ", ".join(names))


class Section:
    """One config section (`key`: its name in YAML). Once OmegaConf has filled it, each field's
    registry and range (declared with `setting`) are checked, then `check()`: what one field
    cannot say alone."""

    key: ClassVar[str] = ""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value, registry, accepted = getattr(self, f.name), f.metadata.get("choices"), f.metadata.get("range")
            if registry is not None:
                self.check_name(f"{self.key}.{f.name}", value, registry)
            if accepted is not None:
                require(accepted.holds(value), f"{self.key}.{f.name}", value, accepted.expected())
        self.check()

    def check_name(self, key: str, value: str, registry: Registry) -> None:
        """A registry key's value: one of the registered names (ModelConfig accepts import paths too)."""
        require_one_of(key, value, registry.names())

    def check(self) -> None:
        pass
