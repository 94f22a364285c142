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
from typing import TYPE_CHECKING, Any, Dict, List, Optional

import torch
from torch import nn

if TYPE_CHECKING:
    from fasttrain.config import TrainConfig


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
    the trained weights are set to the slow ones; the optimizer's own state is kept. The slow copy holds the
    trainable parameters and the floating-point buffers (BatchNorm's running statistics), so that the
    statistics a model is evaluated with belong to the weights it is reset to, as the speed records keep them.

    `power` > 0 (train.lookahead_power): alpha moves from 1 at step 0 (the slow weights follow the trained ones)
    to `alpha` at the last of `total_steps` as 1 - (1 - alpha) (step / total_steps) ** power: the speed records'
    form (alpha 1 - 0.95 ** 5, power 3). A host float per sync: no device work is added.

    `start_step` > 0 (train.lookahead_start, in epochs): no sync up to that step; the first sync after it takes
    the slow weights as a copy of the trained ones (the records start in the fourth epoch). 0: from the first
    step, the slow weights starting as the initial ones.

    `end` (train.lookahead_end): fast keeps the trained weights; slow sets them to the slow ones at the last of
    `total_steps` (the steps since the last sync are dropped); epoch does so at the end of every epoch of
    `steps_per_epoch` steps as well, once lookahead has started (the records' loop)."""

    def __init__(self, model: nn.Module, k: int, alpha: float, power: float = 0.0, total_steps: int = 0,
                 end: str = "fast", start_step: int = 0, steps_per_epoch: int = 0):
        self.k, self.alpha, self.power, self.total_steps = k, alpha, power, total_steps
        self.end, self.start_step, self.steps_per_epoch = end, start_step, steps_per_epoch
        # the first sync after start_step (which copies instead of moving); 0 when the copy is the initial one
        self.first_sync = (start_step // k + 1) * k if start_step > 0 else 0
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        self.trainable = len(named)  # then the buffers
        named += [(name, b) for name, b in model.named_buffers() if b.is_floating_point()]
        self.names = [name for name, _ in named]
        self.params = [t for _, t in named]
        self.slow = [t.detach().clone(memory_format=torch.preserve_format) for t in self.params]

    def alpha_at(self, global_step: int) -> float:
        if not self.power or self.total_steps <= 0:
            return self.alpha
        done = min(global_step, self.total_steps) / self.total_steps
        return 1 - (1 - self.alpha) * done ** self.power

    def after_step(self, global_step: int) -> None:
        """The host's side of a step (no device value read): a sync every k steps once started, and the reset
        to the slow weights at the ends `end` asks for."""
        if global_step < self.first_sync:
            return
        if global_step == self.first_sync:
            self.take()
        elif global_step % self.k == 0:
            self.update(global_step)
        last = global_step == self.total_steps
        epoch_end = self.steps_per_epoch > 0 and global_step % self.steps_per_epoch == 0
        if (self.end == "slow" and last) or (self.end == "epoch" and (last or epoch_end)):
            self.reset()

    @torch.no_grad()
    def update(self, global_step: int = 0) -> None:
        torch._foreach_lerp_(self.slow, self.params, self.alpha_at(global_step))  # two launches per sync (no_grad)
        torch._foreach_copy_(self.params, self.slow)

    @torch.no_grad()
    def take(self) -> None:
        torch._foreach_copy_(self.slow, self.params)  # one launch, once

    @torch.no_grad()
    def reset(self) -> None:
        torch._foreach_copy_(self.params, self.slow)  # one launch per epoch at most

    @property
    def slow_buffers(self) -> List[torch.Tensor]:
        """The slow running statistics: per rank under DDP (each rank's statistics are its own batches') until
        the epoch's end averages them with the model's (fasttrain.train.session); checkpoints keep each rank's."""
        return self.slow[self.trainable:]

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
            self.lookahead.after_step(global_step)
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
                    average.take()
                else:
                    average.load_state_dict({"updates": 0, "weights": {
                        name: p.detach() for name, p in average.model.named_parameters()}})
        return missing


def build_averages(model: nn.Module, train: "TrainConfig", steps_per_epoch: int) -> Averages:
    """The averages train.ema_* and train.lookahead_* ask for, over a run of `steps_per_epoch` steps an epoch."""
    ema = WeightEMA(model, train.ema_decay, train.ema_every) if train.ema_decay > 0 else None
    lookahead = (Lookahead(model, train.lookahead_k, train.lookahead_alpha, train.lookahead_power,
                           train.total_steps(steps_per_epoch), str(train.lookahead_end),
                           train.lookahead_start_step(steps_per_epoch), steps_per_epoch)
                 if train.lookahead_k > 0 else None)
    return Averages(ema, lookahead)
