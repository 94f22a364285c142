"""Where a run's wall time goes, from the process's start to its last line.

One clock per process (`RUN_CLOCK`) charges every moment to exactly one part: `startup` (process start to
the first training step: interpreter and imports, process group and run folder, data, model, restore),
`compile` (the first training steps, timed apart, and the first validation batch: compilation, warm-up,
CUDA graph capture), `steps` (steady training: steps, data waits, log intervals, epoch starts), `eval`
(validation), `checkpoint` (the time training waits for a save: the whole write, or only the copy to
host memory when the file is written in the background) and `end` (after the last epoch: digests, plots,
waiting for a background write). The parts are contiguous intervals of one perf_counter clock, so they add
up to the wall time by construction; `wall_seconds` is also measured on its own (the process's start time
from /proc, against the clock at the last line), which is what the tests compare the sum with.

Only switches at phase boundaries (a few per epoch); nothing here runs per step.
"""

from __future__ import annotations

import os
import time
from typing import Dict, Optional

PARTS = ("startup", "compile", "steps", "eval", "checkpoint", "end")
STARTUP_PARTS = ("imports", "setup", "data", "model", "restore", "other")


def seconds_since_process_start() -> Optional[float]:
    """How long ago this process started (Linux: /proc/self/stat's start time, in clock ticks since boot,
    against CLOCK_BOOTTIME; 10 ms resolution); None where that cannot be read."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # the command name may hold spaces and ')'
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of the whole line
        return max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - started)
    except (OSError, ValueError, IndexError, AttributeError):
        return None


class TimeSplit:
    """The parts of one run's wall time (see the module's docstring)."""

    def __init__(self, origin: Optional[float] = None, origin_note: str = "process start"):
        now = time.perf_counter()
        self.origin = now if origin is None else origin  # a perf_counter value, possibly in the past
        self.origin_note = origin_note
        self.seconds: Dict[str, float] = dict.fromkeys(PARTS, 0.0)
        self.startup: Dict[str, float] = dict.fromkeys(STARTUP_PARTS, 0.0)
        self.current, self.since = "startup", self.origin
        self.startup_mark = self.origin
        self.target: Optional[Dict[str, float]] = None

    @classmethod
    def from_process_start(cls) -> "TimeSplit":
        ago = seconds_since_process_start()
        if ago is None:
            return cls(origin_note="first fasttrain import (the process start time is not readable here)")
        return cls(time.perf_counter() - ago)

    def startup_done(self, part: str) -> None:
        """Charge the start-up time since the previous mark to `part` (imports, setup, data, model, restore)."""
        if self.current != "startup":
            return  # a later build (another fit in the same process) is not start-up
        now = time.perf_counter()
        self.startup[part] += now - self.startup_mark
        self.startup_mark = now

    def switch(self, part: str) -> None:
        """From now on time is charged to `part`."""
        now = time.perf_counter()
        if self.current == "startup":
            self.startup["other"] += now - self.startup_mark
        self.seconds[self.current] += now - self.since
        self.current, self.since = part, now

    def move(self, seconds: float, source: str, target: str) -> None:
        """Re-charge `seconds` already spent in `source` to `target` (compilation inside a timed pass)."""
        if source == self.current:  # charge the running part up to now first
            now = time.perf_counter()
            self.seconds[source] += now - self.since
            self.since = now
        seconds = min(max(seconds, 0.0), self.seconds[source])
        self.seconds[source] -= seconds
        self.seconds[target] += seconds

    def elapsed(self) -> float:
        """Seconds since the origin, now."""
        return time.perf_counter() - self.origin

    def summary(self) -> Dict[str, object]:
        """The split so far (the current part counted up to now), as env.json records it."""
        now = time.perf_counter()
        parts = dict(self.seconds)
        parts[self.current] += now - self.since
        startup = dict(self.startup)
        if self.current == "startup":
            startup["other"] += now - self.startup_mark
        result: Dict[str, object] = {"wall_seconds": round(now - self.origin, 4), "from": self.origin_note,
                                     "parts": {k: round(v, 4) for k, v in parts.items()},
                                     "startup": {k: round(v, 4) for k, v in startup.items()}}
        if self.target is not None:
            result["target"] = self.target
        return result


def describe(summary: Dict[str, object]) -> str:
    """The final log line's words for a summary."""
    parts = summary["parts"]
    startup = summary["startup"]
    inner = ", ".join(f"{name} {seconds:.1f}" for name, seconds in startup.items() if seconds >= 0.05)  # type: ignore[union-attr]
    names = {"startup": "start-up", "compile": "compile and warm-up", "steps": "steady steps", "eval": "evaluation",
             "checkpoint": "checkpoint stalls", "end": "end"}
    shown = [f"{names[name]} {parts[name]:.1f}s" + (f" ({inner})" if name == "startup" and inner else "")  # type: ignore[index]
             for name in PARTS]
    return f"time: {summary['wall_seconds']:.1f}s from {summary['from']} = " + " + ".join(shown)


# The clock of this process's run: python -m fasttrain.run starts it at the process's start; fasttrain.fit
# restarts it when called (`restart`), so a second fit in one process is timed from its own call.
RUN_CLOCK = TimeSplit.from_process_start()


def restart(origin_note: str = "the fit() call") -> TimeSplit:
    global RUN_CLOCK
    RUN_CLOCK = TimeSplit(origin_note=origin_note)
    return RUN_CLOCK


def clock() -> TimeSplit:
    return RUN_CLOCK
