"""Preemption: a signal sets a flag; the ranks agree on it at a step boundary and stop together.

A signal handler must not save (it can run in the middle of a step, or of a collective), so it
only records which signal came. The ranks agree on the flag without a collective of its own:
each rank adds it to the vector of running sums that is summed over ranks every `train.log_every`
steps anyway (and at every epoch's end), so they learn together, at the same step, that one of
them was signalled. The stop comes at most `train.log_every` steps after the signal (at
`train.log_every=50` and 10k steps/s, 5 ms; on a CPU at 0.1 s a step, 5 s), well inside the
advance warning a scheduler gives (SLURM scripts here: 120 s). Where log intervals are long,
`checkpoint.signal_check_every=N` adds a one-integer all_reduce over a CPU (gloo) group every N
steps. The trainer then saves one checkpoint with every rank's state and exits with
EXIT_PREEMPTED, which SLURM scripts turn into `scontrol requeue`; the requeued job's
`resume=auto` continues from it.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later", which a requeued job does
MARKER = "preempted.json"  # in the run folder while the run waits to be resumed


class PreemptionWatch:
    """Handlers for the configured signals, and the ranks' agreement on whether one arrived."""

    def __init__(self, signal_names: List[str], check_every: int, backend: str):
        self.check_every = check_every
        self.received: Optional[str] = None
        self._previous: Dict[int, Any] = {}
        self._flag = torch.zeros(1, dtype=torch.int32)
        # the extra check travels over gloo on the host: an NCCL collective would need a device sync to read
        self._group = None if backend == "gloo" or not check_every else dist.new_group(backend="gloo")
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for name in signal_names:
                number = getattr(signal, name)
                self._previous[number] = signal.signal(number, self._on_signal)

    def _on_signal(self, number: int, _frame: Optional[FrameType]) -> None:
        if self.received is None:
            self.received = signal.Signals(number).name  # only a flag: the step loop does the rest

    def flag(self) -> bool:
        """This rank's flag (a host bool: no device, no collective)."""
        return self.received is not None

    def agreed_elsewhere(self) -> str:
        """The ranks' sums said that some rank was signalled: from now on this rank is stopping too."""
        self.received = self.received or "a signal on another rank"
        return self.received

    def agreed(self) -> Optional[str]:
        """Collective, on every rank at the same step: the signal's name when any rank got one.
        Costs one host-side all_reduce of one integer (checkpoint.signal_check_every)."""
        self._flag.fill_(1 if self.received else 0)
        dist.all_reduce(self._flag, op=dist.ReduceOp.SUM, group=self._group)
        if int(self._flag.item()) == 0:
            return None
        self.received = self.received or "a signal on another rank"
        return self.received

    def close(self) -> None:
        """Put the previous handlers back, unless the run is stopping for a signal: then this process
        is about to exit with EXIT_PREEMPTED, and a repeated signal (torchrun forwards one to the
        ranks that are still tearing down) must not turn that into a kill."""
        if self.received is not None:
            return
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()


def write_marker(run_dir: Path, signal_name: str, global_step: int, checkpoint: Optional[Path]) -> Path:
    """`preempted.json`: tells a job script that this run stopped to be continued (and from where)."""
    path = run_dir / MARKER
    record = {"signal": signal_name, "global_step": global_step, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "checkpoint": str(checkpoint) if checkpoint else None, "exit_code": EXIT_PREEMPTED}
    path.write_text(json.dumps(record) + "\n")
    return path


def clear_marker(run_dir: Path) -> None:
    (run_dir / MARKER).unlink(missing_ok=True)
