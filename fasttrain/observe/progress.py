"""What rank 0 prints while it trains: the progress display of an epoch's steps and one summary line
per epoch."""

from __future__ import annotations

import sys
import time
from typing import Any, Dict


def epoch_line(record: Dict[str, Any], epochs: float) -> str:
    validated = (f"val_loss {record['val_loss']:.4f} | val_acc {100 * record['val_acc']:.2f}%"
                 if record.get("val_acc") is not None else "not validated (train.eval_every)")
    return (f"epoch {record['epoch']:>3}/{epochs:g} | train_loss {record['train_loss']:.4f} | "
            f"{validated} | lr {record['lr']:.3g} | {record['images_per_sec']:,.0f} img/s"
            + (f" | MFU {100 * record['mfu']:.1f}%" if record.get("mfu") is not None else "")
            + f" | {record['epoch_seconds']:.1f}s"
            + (f" | {record['skipped_steps']} fp16 steps skipped" if record.get("skipped_steps") else "")
            + (" | best" if record.get("is_best") else ""))


LONG_RUN_SECONDS = 600  # an estimate above this on a machine without a GPU comes with how to run something short


def duration(seconds: float) -> str:
    """12s, 7m05s, 2h13m."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """Rank 0's view of an epoch: a tqdm bar on a terminal, else one clean line per log interval
    (through `log`, so it reaches train.log too).

    `tick()` runs every step and touches no device value; `interval()` receives the numbers the
    trainer already read at its log interval, so the bar adds no host-device sync.
    """

    def __init__(self, enabled: bool, stream=None, log=None, run_steps: int = 0, short_hint: str = ""):
        """`run_steps`: the whole run's optimizer steps, for its time estimate; `short_hint`: said once with the
        estimate when it is long (a CPU: how to run something short)."""
        self.enabled = enabled
        self.run_steps, self.short_hint = run_steps, short_hint
        self.first_interval: "tuple | None" = None  # (global step, time): the steps after it are steady
        self.estimated = False
        self.stream = stream if stream is not None else sys.stdout
        self.log = log or (lambda line: print(line, file=self.stream, flush=True))
        self.use_bar = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.bar = None
        self.epoch = self.total = self.done = 0
        self.started = 0.0

    def start_epoch(self, epoch: int, epochs: float, total_steps: int, done: int = 0) -> None:
        """`done`: steps of this epoch trained before a resume."""
        self.epoch, self.total, self.done = epoch, total_steps, done
        self.started = time.perf_counter()
        if self.use_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=done, desc=f"epoch {epoch}/{epochs:g}", file=self.stream,
                            leave=False, dynamic_ncols=True, unit="step")

    def tick(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)

    def run_eta(self, step: int) -> str:
        """The rest of the run's steps at the pace since the first log interval this process saw (its compilation
        and warm-up left out; validation not counted); "" until there is such a pace. Said once in the log too."""
        now = time.perf_counter()
        if self.first_interval is None or step <= self.first_interval[0]:
            self.first_interval = self.first_interval or (step, now)
            return ""
        per_step = (now - self.first_interval[1]) / (step - self.first_interval[0])
        left = per_step * max(self.run_steps - step, 0)
        if not self.estimated and self.enabled:
            self.estimated = True
            self.log(f"estimate: {duration(left)} more for the run's other {max(self.run_steps - step, 0):,} of "
                     f"{self.run_steps:,} steps at {per_step:.3g} s a step (validation not counted)"
                     + (f"; {self.short_hint}" if self.short_hint and left > LONG_RUN_SECONDS else ""))
        return f" | run eta {duration(left)}"

    def interval(self, step: int, loss: float, lr: float, images_per_sec: float) -> None:
        run_eta = self.run_eta(step) if self.run_steps else ""
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {loss:.4f}, {images_per_sec:,.0f} img/s, lr {lr:.3g}{run_eta.replace(' |', ',')}",
                                     refresh=False)
        elif self.enabled:
            elapsed = time.perf_counter() - self.started
            eta = elapsed / max(self.done, 1) * (self.total - self.done)
            self.log(f"  epoch {self.epoch} step {self.done}/{self.total} (global {step}) | loss {loss:.4f} | "
                     f"lr {lr:.3g} | {images_per_sec:,.0f} img/s | epoch eta {eta:.0f}s{run_eta}")

    def end_epoch(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
