"""The run's metric files: metrics.jsonl and metrics.csv (one record per epoch), steps.jsonl (one per log
interval), optional TensorBoard events; and the peak memory an epoch's record carries. Each file is flushed
at every record, so that a killed run keeps its history."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Dict, List

from fasttrain.errors import UserError


class JsonLines:
    """Append-only JSON lines file, flushed after every record so a killed run keeps its history."""

    def __init__(self, path: Path):
        self.path = path

    def write(self, record: Dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


class CsvRows:
    """metrics.csv: the epoch records as a table, one fixed set of columns, flushed every row."""

    def __init__(self, path: Path, columns: List[str], rows: List[Dict[str, Any]] = ()):
        """Start the file with the header and `rows` (a resumed run's history up to its checkpoint)."""
        self.path, self.columns = path, columns
        with open(path, "w", newline="") as f:
            csv.writer(f).writerow(columns)
        for row in rows:
            self.write(row)

    def write(self, record: Dict[str, Any]) -> None:
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerow(["" if record.get(c) is None else record.get(c) for c in self.columns])


class TensorBoard:
    """Epoch and log-interval scalars as TensorBoard events, when output.tensorboard is on."""

    def __init__(self, log_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("output.tensorboard=true needs the tensorboard package: pip install tensorboard "
                            "(or pip install 'fasttrain[tensorboard]'), or set output.tensorboard=false") from None
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def scalars(self, prefix: str, values: Dict[str, Any], step: int) -> None:
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"{prefix}/{key}", value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def peak_memory_mb(device) -> float:
    """Peak memory since the last reset: CUDA memory allocated by tensors, or the process's peak RSS on CPUs."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
