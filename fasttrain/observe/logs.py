"""What a run leaves behind and prints: the log, metrics.jsonl and metrics.csv (per epoch),
steps.jsonl (per log interval), optional TensorBoard events, the progress display and the one
summary line per epoch."""

from __future__ import annotations

import csv
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

LOGGER_NAME = "fasttrain"


class _HeldRecords(logging.Handler):
    """Log records kept in memory until the run folder is accepted (then written to train.log)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: List[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def setup_logging(run_dir: Path | None, hold: bool = False) -> logging.Logger:
    """Log to stdout, and to run_dir/train.log when given; with `hold`, keep the records for
    `attach_run_log` (a run writes nothing into its folder before it is accepted)."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.handlers.clear()
    logger.setLevel(logging.INFO)
    logger.propagate = False
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(console)
    if run_dir is not None:
        attach_run_log(run_dir)
    elif hold:
        logger.addHandler(_HeldRecords())
    return logger


def attach_run_log(run_dir: Path) -> None:
    """From now on also log to run_dir/train.log (appended: a resumed run continues it), starting
    with the records held so far."""
    logger = logging.getLogger(LOGGER_NAME)
    file = _RunLog(run_dir)
    file.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    for held in [h for h in logger.handlers if isinstance(h, _HeldRecords)]:
        for record in held.records:
            file.handle(record)
        logger.removeHandler(held)
    logger.addHandler(file)


class _RunLog(logging.FileHandler):
    """train.log. A write that fails (the folder made read-only or removed, a full disk) is kept, not
    printed as logging's traceback: the trainer reads it at its next log interval (`run_log_failure`)
    and every rank stops with one line. Nothing more is written to the file after a failure."""

    def __init__(self, run_dir: Path):
        super().__init__(run_dir / "train.log")
        self.run_dir = run_dir
        self.failure: Optional[OSError] = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.failure is None:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        err = sys.exc_info()[1]
        if not isinstance(err, OSError):
            super().handleError(record)  # a record that does not format: logging's own report
            return
        self.failure = err

    def flush(self) -> None:
        try:
            super().flush()
        except OSError as err:
            self.failure = self.failure or err

    def close(self) -> None:
        try:
            super().close()
        except OSError as err:  # the last flush: what it could not write is lost with the folder
            self.failure = self.failure or err


def run_log_failure() -> Optional[Tuple[Path, OSError]]:
    """(run folder, error) when a write to train.log has failed, else None."""
    for handler in logging.getLogger(LOGGER_NAME).handlers:
        if isinstance(handler, _RunLog) and handler.failure is not None:
            return handler.run_dir, handler.failure
    return None


def silent_logger() -> logging.Logger:
    """A logger that drops everything: what build_parts and the trainer log on ranks other than 0, and
    in the benchmarks, which print their own lines."""
    logger = logging.getLogger(f"{LOGGER_NAME}.silent")
    logger.handlers = [logging.NullHandler()]
    logger.propagate = False
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
            from fasttrain.errors import UserError

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


def epoch_line(record: Dict[str, Any], epochs: int) -> str:
    validated = (f"val_loss {record['val_loss']:.4f} | val_acc {100 * record['val_acc']:.2f}%"
                 if record.get("val_acc") is not None else "not validated (train.eval_every)")
    return (f"epoch {record['epoch']:>3}/{epochs} | train_loss {record['train_loss']:.4f} | "
            f"{validated} | lr {record['lr']:.3g} | {record['images_per_sec']:,.0f} img/s"
            + (f" | MFU {100 * record['mfu']:.1f}%" if record.get("mfu") is not None else "")
            + f" | {record['epoch_seconds']:.1f}s"
            + (f" | {record['skipped_steps']} fp16 steps skipped" if record.get("skipped_steps") else "")
            + (" | best" if record.get("is_best") else ""))


class Progress:
    """Rank 0's view of an epoch: a tqdm bar on a terminal, else one clean line per log interval
    (through `log`, so it reaches train.log too).

    `tick()` runs every step and touches no device value; `interval()` receives the numbers the
    trainer already read at its log interval, so the bar adds no host-device sync.
    """

    def __init__(self, enabled: bool, stream=None, log=None):
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stdout
        self.log = log or (lambda line: print(line, file=self.stream, flush=True))
        self.use_bar = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.bar = None
        self.epoch = self.total = self.done = 0
        self.started = 0.0

    def start_epoch(self, epoch: int, epochs: int, total_steps: int, done: int = 0) -> None:
        """`done`: steps of this epoch trained before a resume."""
        self.epoch, self.total, self.done = epoch, total_steps, done
        self.started = time.perf_counter()
        if self.use_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=done, desc=f"epoch {epoch}/{epochs}", file=self.stream,
                            leave=False, dynamic_ncols=True, unit="step")

    def tick(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)

    def interval(self, step: int, loss: float, lr: float, images_per_sec: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {loss:.4f}, {images_per_sec:,.0f} img/s, lr {lr:.3g}", refresh=False)
        elif self.enabled:
            elapsed = time.perf_counter() - self.started
            eta = elapsed / max(self.done, 1) * (self.total - self.done)
            self.log(f"  epoch {self.epoch} step {self.done}/{self.total} (global {step}) | loss {loss:.4f} | "
                     f"lr {lr:.3g} | {images_per_sec:,.0f} img/s | epoch eta {eta:.0f}s")

    def end_epoch(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
