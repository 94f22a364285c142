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
