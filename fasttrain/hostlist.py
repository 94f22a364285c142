"""SLURM node lists, without scontrol (and without importing torch: used by the sbatch scripts).

`python -m fasttrain.hostlist first 'gpu[07-09,12],cpu1'` prints `gpu07`.
"""

from __future__ import annotations

import re
import sys


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: 'gpu[07-09,12],cpu1' -> 'gpu07'."""
    match = re.match(r"^([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise ValueError(f"cannot read the SLURM node list {nodelist!r}")
    prefix, ranges = match.group(1), match.group(2)
    return prefix if ranges is None else prefix + re.split(r"[-,]", ranges)[0]


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "first":
        sys.exit("usage: python -m fasttrain.hostlist first NODELIST")
    print(first_host(sys.argv[2]))
