"""What every section of the GPU check is given: the plan (smoke or not, the data, where its runs go,
the budget) and a way to launch `python -m fasttrain.run` as a user does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[2]
FAST = "configs/cifar10_cnn_fast.yaml"


class Skipped(Exception):
    """A section, or a part of one, that cannot run here (no CUDA, no DALI): not a failure."""


@dataclass
class Plan:
    smoke: bool
    device: str
    data_root: Path
    real_data: bool
    out: Path
    budget: float
    started: float
    peer_airbench: Optional[Path] = None  # the record's own script (--peer-airbench): the speedrun section runs it too

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.started)

    def data(self, train_size: int = 0, val_size: int = 0) -> List[str]:
        """Overrides for the data: real CIFAR-10, or synthetic of its shape; sizes 0 = the whole split."""
        if self.real_data:
            return [f"data.root={self.data_root}", "data.download=false", "data.dataset=cifar10",
                    f"data.train_size={train_size}", f"data.val_size={val_size}"]
        return ["data.dataset=synthetic", f"data.train_size={train_size or 50000}", f"data.val_size={val_size or 10000}"]

    def tiny(self) -> List[str]:
        """Smoke sizes: the same code paths on a model and data small enough for a CPU in seconds."""
        if not self.smoke:
            return []
        return ["train.device=cpu", "model.name=MLP", "model.hidden_sizes=[32]", "model.dropout=0.0",
                "train.batch_size=64", "data.num_workers=0", "train.precision=bf16"]

    def sized(self, smoke: Sequence[int], full: Sequence[int] = (0, 0)) -> List[str]:
        """`data()` at the smoke sizes (train, val) under --smoke, else at `full`."""
        return self.data(*(smoke if self.smoke else full))


def launch(module: str, args: Sequence[str], timeout: float, env: Optional[Dict[str, str]] = None
           ) -> subprocess.CompletedProcess:
    """`python -m MODULE ARGS` from the checkout, output merged in order; at least 30 s to finish."""
    full_env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                    PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=full_env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=max(timeout, 30))


def fasttrain_run(args: Sequence[str], timeout: float, env: Optional[Dict[str, str]] = None
                  ) -> subprocess.CompletedProcess:
    """`python -m fasttrain.run ARGS` as a user launches it."""
    return launch("fasttrain.run", args, timeout, env)


def metrics(run_dir: Path) -> List[dict]:
    """A run's metrics.jsonl, one dict per epoch ([] when the run wrote none)."""
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def tail(text: str, lines: int = 6) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def data_name(plan: Plan) -> str:
    return "cifar10" if plan.real_data else "synthetic"
