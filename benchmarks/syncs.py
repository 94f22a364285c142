"""Counting host-device syncs in a real run, and where in the step loop they happen.

`sync_report(cfg)` trains `cfg` with `fasttrain.train.lifecycle.train` (schedule, logging, progress,
checkpoints and the preemption watch all active) while every sync is recorded with its position:
inside a step, or after step k. On CUDA the detector is PyTorch's own
(`torch.cuda.set_sync_debug_mode("warn")`: every synchronizing CUDA call warns); on the CPU, where
nothing synchronizes, it counts every host read of a tensor value (`item`, `tolist`, `bool()`,
`float()`, `int()`, an index, `cpu()`, `numpy()`), each of which would wait for the device queue
on a GPU. Reads at log intervals (the sums, once) and between epochs are expected; anything inside
a step or between log intervals is a hidden sync.
"""

from __future__ import annotations

import contextlib
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Iterator, List, Tuple

import torch
from torch.overrides import TorchFunctionMode

from fasttrain.train import lifecycle
from fasttrain.config import Config

HOST_READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy"}


@dataclass
class SyncLog:
    steps_done: int = 0
    in_step: bool = False
    steps_per_epoch: int = 0
    # (steps done so far, inside a step?, what, where in fasttrain)
    syncs: List[Tuple[int, bool, str, str]] = field(default_factory=list)

    def record(self, what: str) -> None:
        frames = [f for f in traceback.extract_stack()[:-2] if "/fasttrain/" in f.filename]
        where = f"{frames[-1].filename.split('/fasttrain/')[-1]}:{frames[-1].lineno}" if frames else "?"
        self.syncs.append((self.steps_done, self.in_step, what, where))


class _HostReads(TorchFunctionMode):
    def __init__(self, log: SyncLog):
        super().__init__()
        self.log = log

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_READS:
            self.log.record(name)
        return func(*args, **(kwargs or {}))


class _CountedStep:
    """The run's step, unchanged, with the log told when a step starts and ends."""

    def __init__(self, step, log: SyncLog):
        self._step, self._log = step, log

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self._log.in_step = True
        try:
            self._step(images, labels)
        finally:
            self._log.in_step = False
            self._log.steps_done += 1

    def __getattr__(self, name: str):
        return getattr(self._step, name)


@contextlib.contextmanager
def _counted_steps(log: SyncLog) -> Iterator[None]:
    """train() builds its parts with lifecycle.build_parts: hand it the step wrapped."""
    original = lifecycle.build_parts

    def build(cfg, ctx, logger, model=None):
        parts = original(cfg, ctx, logger, model)
        parts.step = _CountedStep(parts.step, log)
        log.steps_per_epoch = parts.steps_per_epoch
        return parts

    lifecycle.build_parts = build
    try:
        yield
    finally:
        lifecycle.build_parts = original


@contextlib.contextmanager
def _cuda_sync_warnings(log: SyncLog) -> Iterator[None]:
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if "synchroniz" in str(message):
                log.record(str(message).splitlines()[0][:80])
            else:
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(previous)
            warnings.showwarning = shown


@dataclass
class SyncReport:
    detector: str  # "cuda sync debug mode" or "host reads of tensors"
    steps: int
    in_steps: List[tuple]  # syncs inside a step
    between_log_intervals: List[tuple]  # after step k, k not a boundary (warm-up steps excepted)
    at_boundaries: int  # the expected ones: log intervals, checkpoint steps, epoch ends

    @property
    def hidden(self) -> int:
        return len(self.in_steps) + len(self.between_log_intervals)


def sync_report(cfg: Config, skip_first_steps: int = 0) -> SyncReport:
    """Train `cfg` and sort its syncs. `skip_first_steps`: steps whose syncs are expected (compilation,
    warm-up and CUDA graph capture of a captured step)."""
    log = SyncLog()
    on_cuda = cfg.train.device.startswith("cuda") or (cfg.train.device == "auto" and torch.cuda.is_available())
    detector = _cuda_sync_warnings(log) if on_cuda else _HostReads(log)
    with _counted_steps(log), detector:
        lifecycle.train(cfg)
    def boundary(k: int) -> bool:  # where the loop reads its sums, saves, or ends an epoch: syncs allowed
        return (k % cfg.train.log_every == 0 or (cfg.checkpoint.every_steps and k % cfg.checkpoint.every_steps == 0)
                or (log.steps_per_epoch and k % log.steps_per_epoch == 0))

    late = [s for s in log.syncs if s[0] >= skip_first_steps]
    return SyncReport("cuda sync debug mode" if on_cuda else "host reads of tensors", log.steps_done,
                      [s for s in late if s[1]], [s for s in late if not s[1] and not boundary(s[0])],
                      sum(1 for s in late if not s[1] and s[0] and boundary(s[0])))
