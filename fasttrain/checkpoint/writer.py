"""Checkpoint writes off the critical path (rank 0 only).

A save first copies the state to host memory (`host_copy`: the tensors of the weights, optimizer state and
averages are the live ones, which the next step changes in place), then a background thread serializes
and writes it atomically (`io.write_serialized`) while training goes on. One write at a time: the next
save, and the end of the run, wait for the previous one first and raise its error there, where the
ranks agree on it (`manager`). A save that ends the run (preemption, Ctrl-C, a planned stop, the last
epoch) is written before it returns. A kill during a background write leaves a temporary file and the
previous checkpoint, as a kill during any write does.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, List, Optional

import torch

from fasttrain.checkpoint.io import map_leaves, serialize, write_serialized
from fasttrain.errors import UserError


def host_copy(value: Any) -> Any:
    """`value` with every tensor copied to host memory and every container rebuilt: nothing in the copy
    is shared with the running job (a history list it appends to, a parameter it steps)."""
    return map_leaves(value, _to_host)


def _to_host(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)  # a device tensor: read back (host sync, per save)
    return value


class CheckpointWriter:
    """Writes checkpoints now, or from a thread; `wait()` ends the pending write and raises its error."""

    def __init__(self) -> None:
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None

    def write(self, state: Any, paths: List[Path], background: bool) -> None:
        self.wait()  # one write at a time, in order: a later last.pt never loses to an earlier one
        if not background:
            write_serialized(serialize(state), paths)
            return
        copy = host_copy(state)
        self._thread = threading.Thread(target=self._write, args=(copy, paths), name="fasttrain-checkpoint",
                                        daemon=True)  # an exiting process is not held by it: the caller waits
        self._thread.start()

    def _write(self, state: Any, paths: List[Path]) -> None:
        try:
            write_serialized(serialize(state), paths)
        except BaseException as err:  # noqa: BLE001 - handed to the main thread, raised at the next wait
            self._error = err

    @property
    def pending(self) -> bool:
        return self._thread is not None

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if isinstance(error, UserError):
            raise error
        if error is not None:
            raise UserError(f"a checkpoint written in the background failed ({type(error).__name__}: {error}); "
                            f"earlier checkpoints are untouched: set checkpoint.background=false to write in the "
                            f"foreground and see where") from error
