"""What a run leaves behind and prints: the log, metrics.jsonl (per epoch), steps.jsonl (per
log interval) and the one summary line per epoch."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any, Dict

LOGGER_NAME = "fasttrain"


def setup_logging(run_dir: Path | None) -> logging.Logger:
    """Log to stdout, and to run_dir/train.log when given."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.handlers.clear()
    logger.setLevel(logging.INFO)
    logger.propagate = False
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(console)
    if run_dir is not None:
        file = logging.FileHandler(run_dir / "train.log")
        file.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        logger.addHandler(file)
    return logger


def close_logging() -> None:
    logger = logging.getLogger(LOGGER_NAME)
    for handler in list(logger.handlers):
        handler.close()
        logger.removeHandler(handler)


class JsonLines:
    """Append-only JSON lines file, flushed after every record so a killed run keeps its history."""

    def __init__(self, path: Path):
        self.path = path

    def write(self, record: Dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def epoch_line(record: Dict[str, Any], epochs: int) -> str:
    return (f"epoch {record['epoch']:>3}/{epochs} | train_loss {record['train_loss']:.4f} | "
            f"val_loss {record['val_loss']:.4f} | val_acc {100 * record['val_acc']:.2f}% | lr {record['lr']:.3g} | "
            f"{record['images_per_sec']:,.0f} img/s | {record['epoch_seconds']:.1f}s"
            + (f" | {record['skipped_steps']} fp16 steps skipped" if record.get("skipped_steps") else "")
            + (" | best" if record.get("is_best") else ""))
