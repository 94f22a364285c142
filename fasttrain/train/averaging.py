"""Averages of the weights that buy accuracy per step without work per step: an exponential moving
average (train.ema_decay: evaluated, chosen for best.pt and reported by `fasttrain eval` in place of the
trained weights) and lookahead (train.lookahead_k: every k steps the slow weights move part of the way
to the trained ones, and training continues from them).

Both run between steps on the host's cadence, keyed by the global step (so a resumed run updates at the
same steps): one or two foreach kernels over the parameters every N steps, no host read of a device
value. They sit outside the step, so the eager and the captured step share them (on CUDA the graph's
replay and these kernels are ordered on the same stream). Under DDP every rank holds the same parameters
after each step, so every rank computes the same averages and none is communicated.
"""

from __future__ import annotations

import copy
from typing import Any, Dict, List, Optional

import torch
from torch import nn


class WeightEMA:
    """An exponential moving average of the parameters, in a copy of the model (`averaged`) that
    evaluation runs. Its buffers (BatchNorm statistics) are the trained model's, copied in by
    `sync_buffers` before each use: the statistics of the averaged weights would need a pass over the
    data, and copying keeps them identical on every rank once the trainer has averaged them.

    The decay warms up as min(decay, (1 + n) / (10 + n)) over the first updates n, so that the average
    is not held at the initial weights for the ~1 / (1 - decay) updates it would take to forget them."""

    def __init__(self, model: nn.Module, decay: float, every: int):
        self.model, self.decay, self.every = model, decay, every
        self.averaged = copy.deepcopy(model)  # same strides and memory format as the trained weights
        self.averaged.requires_grad_(False)
        self.source = [p for p in model.parameters()]
        self.target = [p for p in self.averaged.parameters()]
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))  # a host float: no sync
        torch._foreach_lerp_(self.target, self.source, 1.0 - decay)  # one kernel launch per update (no_grad)

    @torch.no_grad()
    def sync_buffers(self) -> None:
        for mine, theirs in zip(self.averaged.buffers(), self.model.buffers()):
            mine.copy_(theirs)

    def state_dict(self) -> Dict[str, Any]:
        names = [name for name, _ in self.averaged.named_parameters()]
        return {"updates": self.updates, "weights": {name: p.detach().cpu().clone()
                                                     for name, p in zip(names, self.target)}}

    @torch.no_grad()
    def load_state_dict(self, state: Dict[str, Any]) -> None:
        own = dict(self.averaged.named_parameters())
        for name, value in state["weights"].items():
            own[name].copy_(value)
        self.updates = int(state["updates"])


class Lookahead:
    """Lookahead's slow weights (Zhang et al., 2019): every k steps slow += alpha (trained - slow), then
    the trained weights are set to the slow ones; the optimizer's own state is kept.

    `power` > 0 (train.lookahead_power): alpha moves from 1 at step 0 (the slow weights follow the trained ones)
    to `alpha` at the last of `total_steps` as 1 - (1 - alpha) (step / total_steps) ** power: the speed records'
    form (alpha 1 - 0.95 ** 5, power 3). A host float per sync: no device work is added.

    `end_on_slow` (train.lookahead_end=slow): at the last of `total_steps` the trained weights are set to the slow
    ones as they stand (the steps since the last sync are dropped), as the speed records end their runs."""

    def __init__(self, model: nn.Module, k: int, alpha: float, power: float = 0.0, total_steps: int = 0,
                 end_on_slow: bool = False):
        self.k, self.alpha, self.power, self.total_steps = k, alpha, power, total_steps
        self.end_on_slow = end_on_slow
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.names = [name for name, p in model.named_parameters() if p.requires_grad]
        self.slow = [p.detach().clone(memory_format=torch.preserve_format) for p in self.params]

    def alpha_at(self, global_step: int) -> float:
        if not self.power or self.total_steps <= 0:
            return self.alpha
        done = min(global_step, self.total_steps) / self.total_steps
        return 1 - (1 - self.alpha) * done ** self.power

    @torch.no_grad()
    def update(self, global_step: int = 0) -> None:
        torch._foreach_lerp_(self.slow, self.params, self.alpha_at(global_step))  # two launches per sync (no_grad)
        torch._foreach_copy_(self.params, self.slow)

    @torch.no_grad()
    def end(self) -> None:
        torch._foreach_copy_(self.params, self.slow)  # one launch, once

    def state_dict(self) -> Dict[str, Any]:
        return {"weights": {name: p.detach().cpu().clone() for name, p in zip(self.names, self.slow)}}

    @torch.no_grad()
    def load_state_dict(self, state: Dict[str, Any]) -> None:
        for name, slow in zip(self.names, self.slow):
            slow.copy_(state["weights"][name])


class Averages:
    """The run's weight averages (either may be None), called by the step loop after every optimizer
    step with the global step: lookahead's sync first (when due), then the EMA's update (when due)."""

    def __init__(self, ema: Optional[WeightEMA], lookahead: Optional[Lookahead]):
        self.ema, self.lookahead = ema, lookahead

    def __bool__(self) -> bool:
        return self.ema is not None or self.lookahead is not None

    def after_step(self, global_step: int) -> None:
        if self.lookahead is not None:
            if global_step % self.lookahead.k == 0:
                self.lookahead.update(global_step)
            if global_step == self.lookahead.total_steps and self.lookahead.end_on_slow:
                self.lookahead.end()
        if self.ema is not None and global_step % self.ema.every == 0:
            self.ema.update()

    def state_dict(self) -> Dict[str, Any]:
        """The checkpoint's entries: "ema" and/or "lookahead"."""
        state: Dict[str, Any] = {}
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        if self.lookahead is not None:
            state["lookahead"] = self.lookahead.state_dict()
        return state

    def load(self, ckpt: Dict[str, Any]) -> List[str]:
        """Put back what a checkpoint holds of the averages this run keeps; returns the ones it lacks
        (started from the checkpoint's weights instead)."""
        missing = []
        for key, average in (("ema", self.ema), ("lookahead", self.lookahead)):
            if average is None:
                continue
            if key in ckpt:
                average.load_state_dict(ckpt[key])
            else:
                missing.append(key)
                if isinstance(average, Lookahead):
                    average.slow = [p.detach().clone(memory_format=torch.preserve_format) for p in average.params]
                else:
                    average.load_state_dict({"updates": 0, "weights": {
                        name: p.detach() for name, p in average.model.named_parameters()}})
        return missing


def build_averages(model: nn.Module, ema_decay: float, ema_every: int, lookahead_k: int,
                   lookahead_alpha: float, lookahead_power: float = 0.0, total_steps: int = 0,
                   lookahead_end_on_slow: bool = False) -> Averages:
    ema = WeightEMA(model, ema_decay, ema_every) if ema_decay > 0 else None
    lookahead = (Lookahead(model, lookahead_k, lookahead_alpha, lookahead_power, total_steps, lookahead_end_on_slow)
                 if lookahead_k > 0 else None)
    return Averages(ema, lookahead)
