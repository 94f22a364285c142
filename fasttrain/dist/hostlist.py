"""SLURM node lists, without scontrol (and without importing torch: used by the sbatch scripts).

`python -m fasttrain.dist.hostlist first 'gpu[07-09,12],cpu1'` prints `gpu07`.

The whole list is checked before its first host is taken: a malformed one (`node[01-`, cut short in a
job script or a copy) read leniently names a host that does not exist (`node`), and every rank would
then wait for it until dist.timeout_s. So it is refused with one line instead.
"""

from __future__ import annotations

import re
import sys
from typing import List

_RANGE = r"\d+(?:-\d+)?"
_BRACKET = rf"\[{_RANGE}(?:,{_RANGE})*\]"
_NAME = r"[A-Za-z0-9._-]"
# one host pattern: name characters and bracketed ranges, at least one name character first
# ("rack[1-2]-gpu[01-04]" has two)
_HOST = re.compile(rf"{_NAME}+(?:{_BRACKET}|{_NAME})*")
_EXAMPLE = "e.g. 'gpu[07-09,12],cpu1'"


def _patterns(nodelist: str) -> List[str]:
    """The comma-separated host patterns of a node list (commas inside brackets separate ranges)."""
    patterns, depth, start = [], 0, 0
    for i, char in enumerate(nodelist):
        depth += char == "["
        depth -= char == "]"
        if char == "," and depth == 0:
            patterns.append(nodelist[start:i])
            start = i + 1
    patterns.append(nodelist[start:])
    return patterns


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: 'gpu[07-09,12],cpu1' -> 'gpu07'. ValueError, naming the
    list, when any part of it is not a host name or a well-formed range."""
    text = nodelist.strip()
    if not text:
        raise ValueError(f"cannot read the SLURM node list {nodelist!r}: it is empty ({_EXAMPLE})")
    bad = next((p for p in _patterns(text) if not _HOST.fullmatch(p)), None)
    if bad is not None:
        raise ValueError(f"cannot read the SLURM node list {nodelist!r}: {bad!r} is not a host name or "
                         f"name[ranges] ({_EXAMPLE})")
    ranges = [r for bracket in re.findall(r"\[([^\]]*)\]", text) for r in re.findall(r"(\d+)-(\d+)", bracket)]
    for low, high in ranges:
        if int(high) < int(low):
            raise ValueError(f"cannot read the SLURM node list {nodelist!r}: the range {low}-{high} runs backwards "
                             f"({_EXAMPLE})")
    first = _patterns(text)[0]
    # each bracket's first number, zero padding kept: gpu[07-09] -> gpu07
    return re.sub(r"\[(\d+)[^\]]*\]", lambda m: m.group(1), first)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "first":
        sys.exit("usage: python -m fasttrain.dist.hostlist first NODELIST")
    try:
        print(first_host(sys.argv[2]))
    except ValueError as err:  # one line for the job script's log, no traceback
        sys.exit(f"fasttrain.dist.hostlist: error: {err}")
