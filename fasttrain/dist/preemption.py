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
import os
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any, Callable, Dict, Iterator, List, Optional

# torch is imported where it is used: `hold_early_signals` runs before the first heavy import

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later", which a requeued job does
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C: stopped on purpose, not to be requeued
MARKER = "preempted.json"  # in the run folder while the run waits to be resumed
INTERRUPT = "interrupt"  # RunState.stopped_by for a Ctrl-C (SIGINT not in checkpoint.signals)

# What a rank adds to the vector summed over ranks: a preemption counts 1, a Ctrl-C this much, so the
# sum still says which kind came (a Ctrl-C on any rank stops the run as interrupted, not to be requeued)
PREEMPT_CODE, INTERRUPT_CODE = 1.0, float(2**20)

# Every signal that can mean "preempted" (config.SignalName but SIGCONT: a stopped job's resumption,
# sent to every process, and harmless), and with Ctrl-C's what a DataLoader worker must survive
EARLY = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGHUP")
CATCHABLE = EARLY + ("SIGINT",)

_early: Dict[str, Any] = {"received": None, "previous": {}}
# after training ended: the first preemption signal absorbed, and the handlers to put back at release
_ended: Dict[str, Any] = {"received": None, "previous": {}}


class PreemptedBeforeStart(Exception):
    """A configured preemption signal while this process waited for the other ranks to join: there is no
    run folder yet and nothing to save, so the entry point exits with EXIT_PREEMPTED at once (no marker)."""

    def __init__(self, signal_name: str, where: str):
        super().__init__(f"preempted by {signal_name} {where}: nothing to save (no run folder yet)")
        self.signal_name = signal_name


def _record_early(number: int, _frame: Optional[FrameType]) -> None:
    if _early["received"] is None:
        _early["received"] = signal.Signals(number).name


def hold_early_signals() -> None:
    """From the first line of the entry point on: a signal that comes before the run's own handlers
    exist (while torch is imported, data load, the model compiles) is recorded instead of killing the
    process. PreemptionWatch then acts on it as if it had come just now (a configured preemption
    signal: stop with the marker and exit 75; Ctrl-C: stop, exit 130); a signal the config does not
    handle gets its default action at that point. Ctrl-C is not held: before training starts there is
    nothing to save, and it stops the process at once (one line, exit 130: run.main)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for name in EARLY:
        number = getattr(signal, name)
        if signal.getsignal(number) in (signal.SIG_IGN,):
            continue  # ignored by whoever started us (nohup): keep it so
        _early["previous"][number] = signal.signal(number, _record_early)


def narrow_early_hold(signal_names: List[str]) -> None:
    """The config is known: the early hold keeps only the signals it names (checkpoint.signals). Any other
    goes back to what it was before the hold (its default action, for a process started normally), now,
    and one that was recorded meanwhile is sent again, so that it does what it would have done."""
    for name in EARLY:
        number = getattr(signal, name)
        if name in signal_names or number not in _early["previous"]:
            continue
        previous = _early["previous"].pop(number)
        if signal.getsignal(number) is _record_early:
            signal.signal(number, previous)
        if _early["received"] == name:
            _early["received"] = None
            os.kill(os.getpid(), number)


def held_signal() -> Optional[str]:
    """The preemption signal recorded by the early hold so far, not consumed (a wait that can be interrupted
    asks this; the run's PreemptionWatch consumes it)."""
    return _early["received"]


def release_early_signals() -> None:
    """The entry point's last step: handlers still recording (no run took them over), and those that absorb
    signals after training ended, go back to what they were, so that a caller of run.main in the same process
    (a test, a notebook) keeps its own."""
    for number, previous in _early["previous"].items():
        if signal.getsignal(number) is _record_early:
            signal.signal(number, previous)
    _early["previous"].clear()
    _early["received"] = None
    for number, previous in _ended["previous"].items():
        if signal.getsignal(number) is _absorb_after_end:
            signal.signal(number, previous)
    _ended["previous"].clear()
    _ended["received"] = None


def _absorb_after_end(number: int, _frame: Optional[FrameType]) -> None:
    if _ended["received"] is None:
        _ended["received"] = signal.Signals(number).name


def signal_after_end() -> Optional[str]:
    """The preemption signal that came after training had ended and was ignored (consumed: reported once)."""
    name, _ended["received"] = _ended["received"], None
    return name


def after_end_line(name: str) -> str:
    return f"{name} came after training had ended: ignored (nothing is left to save; the run finishes its outputs)"


def _early_signal() -> Optional[str]:
    """The signal recorded before the run's handlers existed (consumed: reported once)."""
    name, _early["received"] = _early["received"], None
    return name


def ignore_in_worker(_worker_id: int = 0) -> None:
    """DataLoader `worker_init_fn`: a worker process ignores the signals its parent handles. A job
    scheduler (SLURM at preemption, `kill -TERM -PGID`) or a terminal (Ctrl-C) signals the whole
    process group; a worker that died of it would make the main process fail ("DataLoader worker
    is killed by signal") before it could save. The main process ends its workers itself (the
    loader's shutdown; at interpreter exit `fasttrain.data.loaders.plain` does it before multiprocessing
    would terminate them with a SIGTERM they now ignore)."""
    numbers = [getattr(signal, name) for name in CATCHABLE]
    for number in numbers:
        signal.signal(number, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, numbers)  # held by `signals_held` while this process forked


@contextmanager
def signals_held() -> Iterator[None]:
    """Hold (block) the catchable signals while worker processes are started: a signal sent to the
    process group in that moment stays pending, and is discarded by a worker once it ignores it
    (ignore_in_worker) or delivered to this process when the block ends. Main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    numbers = {getattr(signal, name) for name in CATCHABLE}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, numbers)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class PreemptionWatch:
    """Handlers for the configured signals and for Ctrl-C, and the ranks' agreement on whether one
    arrived.

    A configured signal (checkpoint.signals) means preempted: stop at the next boundary with a
    checkpoint, the marker, exit 75 (requeue). Ctrl-C (SIGINT, unless configured as a preemption
    signal) means the user stops the run: the same graceful stop with a checkpoint, no marker, exit
    130; a second Ctrl-C aborts at once (KeyboardInterrupt) and keeps what was saved before. Ctrl-C is
    handled so with `graceful_interrupt` (the trainer), else left to Python (the benchmarks)."""

    def __init__(self, signal_names: List[str], check_every: int, backend: str, graceful_interrupt: bool = False,
                 announce: Callable[[str], None] = lambda _line: None):
        import torch
        import torch.distributed as torch_dist

        self.check_every = check_every
        self.received: Optional[str] = None
        self.interrupted = False
        self._announce = announce
        self._previous: Dict[int, Any] = {}
        self._flag = torch.zeros(1, dtype=torch.float64)
        # the extra check travels over gloo on the host: an NCCL collective would need a device sync to read
        self._group = None if backend == "gloo" or not check_every else torch_dist.new_group(backend="gloo")
        self._preempting = set(signal_names)
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            # Ctrl-C unless whoever started this process made it ignore SIGINT (a background job of a shell)
            interrupt = graceful_interrupt and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN
            for name in set(signal_names) | ({"SIGINT"} if interrupt else set()):
                number = getattr(signal, name)
                previous = signal.signal(number, self._on_signal)
                self._previous[number] = _early["previous"].get(number, previous)
            early = _early_signal()
            if early is not None:
                self._on_early(early)

    def _on_early(self, name: str) -> None:
        if name in self._preempting:
            self._on_signal(getattr(signal, name), None)
            return
        # recorded before the config was known, and the config does not handle it: what it would have done
        number = getattr(signal, name)
        signal.signal(number, self._previous.get(number, _early["previous"].get(number, signal.SIG_DFL)))
        os.kill(os.getpid(), number)

    def _on_signal(self, number: int, _frame: Optional[FrameType]) -> None:
        name = signal.Signals(number).name
        if name == "SIGINT" and name not in self._preempting:
            if self.interrupted:  # the second Ctrl-C: stop now, keep what is saved
                signal.signal(number, signal.default_int_handler)
                raise KeyboardInterrupt
            self.interrupted = True
            self.received = self.received or name
            self._announce("Ctrl-C: stopping at the next log interval with a checkpoint (resume=auto continues "
                           "it); press Ctrl-C again to stop at once without saving")
            return
        if self.received is None:
            self.received = name  # only a flag: the step loop does the rest

    def flag(self) -> float:
        """This rank's contribution to the sum over ranks (a host float: no device, no collective):
        0, PREEMPT_CODE, or INTERRUPT_CODE for a Ctrl-C."""
        if self.interrupted:
            return INTERRUPT_CODE
        return PREEMPT_CODE if self.received is not None else 0.0

    def agreed_elsewhere(self, total: float = PREEMPT_CODE) -> str:
        """The ranks' sums (`total`) said that some rank was signalled: from now on this rank is stopping
        too. Returns what stops the run: INTERRUPT when any rank had a Ctrl-C, else a signal's name."""
        if total >= INTERRUPT_CODE:
            self.interrupted = True
            self.received = self.received or "SIGINT"
            return INTERRUPT
        self.received = self.received or "a signal on another rank"
        return self.received

    def agreed(self) -> Optional[str]:
        """Collective, on every rank at the same step: what stops the run when any rank got a signal.
        Costs one host-side all_reduce of one number (checkpoint.signal_check_every)."""
        import torch.distributed as torch_dist

        self._flag.fill_(self.flag())
        torch_dist.all_reduce(self._flag, op=torch_dist.ReduceOp.SUM, group=self._group)
        total = float(self._flag.item())
        return self.agreed_elsewhere(total) if total > 0 else None

    def training_ended(self) -> None:
        """Training is over and complete: what is left (the ranks' weight digests, plots, the last lines,
        the time split, the folder's lock) finishes a run that needs nothing more. From now on a preemption
        signal is absorbed: noted (`signal_after_end`, logged by the trainer) and ignored, until the entry
        point ends the process (its handlers are not put back before os._exit) or `release_early_signals`
        restores the caller's. Before, it killed a complete run (-15), leaving the lock and no plots. A
        signal that reached this rank after the ranks' last agreement is noted the same way. Ctrl-C gets
        back its previous handler: the user stops on purpose (exit 130, the lock released)."""
        if self.received in self._preempting:  # came on this rank after the ranks' last look at the flags
            _ended["received"] = _ended["received"] or self.received
        for number, previous in self._previous.items():
            if signal.Signals(number).name in self._preempting:
                signal.signal(number, _absorb_after_end)
                _ended["previous"].setdefault(number, previous)
            else:
                signal.signal(number, previous)
        self._previous.clear()
        self.received = None

    def close(self) -> None:
        """Put the previous handlers back, unless the run is stopping for a signal: then this process
        is about to exit with EXIT_PREEMPTED, and a repeated signal (torchrun forwards one to the
        ranks that are still tearing down) must not turn that into a kill. After `training_ended` there is
        nothing left to put back."""
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
