"""The run's log: rank 0's lines on the console and in train.log (held in memory until the run folder is
accepted, a failed write kept for the ranks to agree on), and a silent logger for the other ranks."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import List, Optional, Tuple

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
