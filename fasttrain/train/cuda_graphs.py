"""The two CUDA-graph moves shared by the captured training step and captured validation.

Warm-up runs go on a side stream (what CUDA graph capture wants before it records: allocations and
cuDNN/Inductor autotuning settled off the main stream), and a recording captures a body without running
it. Both are only called on CUDA; the tests replace them with stand-ins to walk the same control flow on
the CPU.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Tuple

import torch


@contextlib.contextmanager
def side_stream(device: torch.device) -> Iterator[None]:
    """Run the block on a fresh stream that starts after, and is waited for by, the current one."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        yield
    torch.cuda.current_stream(device).wait_stream(side)


def record(body: Callable[[], None]) -> Tuple["torch.cuda.CUDAGraph", Callable[[], None]]:
    """Capture `body` as a CUDA graph (recorded, not run); returns the graph and what replays it."""
    graph = torch.cuda.CUDAGraph()
    # thread_local: CUDA calls of other threads (a DataLoader's pin-memory thread, DALI's workers) must
    # not invalidate the capture; work on the captured stream is recorded whichever thread issues it
    # (the autograd engine's backward included)
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        body()
    return graph, graph.replay


class GraphCapture:
    """What a captured step or pass inherits: its warm-up stream and its recording, on `self.device`; the
    recorded graph is kept in `self.graph` (replays need it alive). Tests override the two methods."""

    device: torch.device
    graph: "torch.cuda.CUDAGraph | None" = None

    def _side_stream(self) -> "contextlib.AbstractContextManager[None]":
        return side_stream(self.device)

    def _record(self, body: Callable[[], None]) -> Callable[[], None]:
        """Capture `body` as a CUDA graph (recorded, not run); returns what replays it."""
        self.graph, replay = record(body)
        return replay
