"""The optimizer inside a captured step (train.capture=true): its hyperparameters as device tensors, and
SGD's update in foreach ops.

A compiled or captured optimizer step reads the learning rate, betas or momentum from device tensors that
the schedule refreshes between steps (`DeviceHyperparameters`); the host's floats stay what checkpoints,
logs and the schedule use. Adam and AdamW step themselves on such tensors; torch's SGD takes no device
momentum, so its update is written out here (`device_sgd_step`), on torch's own state.
"""

from __future__ import annotations

from typing import List, Tuple

import torch


# The capturable Adam update, which compiled optimizers always trace, divides by the step size
# (denom = sqrt(v) / (sqrt(bc2) * -lr/bc1) + eps / (-lr/bc1)): at a learning rate of exactly 0
# (cosine annealing down to eta_min=0) an element with a zero second moment becomes 0/0 = nan. The
# device copy of the learning rate is floored here instead; an update of lr 1e-30 moves no float32
# weight (and the weight decay factor 1 - 1e-30 x wd rounds to 1).
MIN_DEVICE_LR = 1e-30


# the hyperparameters a schedule changes during a run (OneCycle: lr, and beta1 or SGD's momentum), as a
# param group holds them; a group has "betas" (Adam, AdamW) or "momentum" (SGD)
SCHEDULED_KEYS = ("lr", "betas", "momentum")


class DeviceHyperparameters:
    """The learning rate and betas (Adam, AdamW) or momentum (SGD) of each param group as device tensors,
    for a compiled or captured optimizer step: the schedule keeps stepping the groups' Python floats
    (checkpoints, logs and the host never read the device), and `refresh()` fills a tensor only when its
    float changed. The tensors stand in the groups only while the compiled step runs (`swap_in` /
    `swap_out`)."""

    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device):
        self.optimizer = optimizer
        self.keys = [tuple(key for key in SCHEDULED_KEYS if key in group) for group in optimizer.param_groups]
        self.values = [self._floats(group, keys) for group, keys in zip(optimizer.param_groups, self.keys)]
        self.tensors = [[torch.tensor(v, dtype=torch.float32, device=device) for v in values]
                        for values in self.values]
        self._saved: list = []

    @staticmethod
    def _floats(group: dict, keys: Tuple[str, ...]) -> List[float]:
        values: List[float] = []
        for key in keys:
            if key == "lr":
                values.append(max(float(group["lr"]), MIN_DEVICE_LR))
            elif key == "betas":
                values += [float(beta) for beta in group["betas"]]
            else:
                values.append(float(group[key]))
        return values

    def refresh(self) -> None:
        """Host floats -> device tensors; a fill only for a value that changed (OneCycle: lr and beta1)."""
        for i, group in enumerate(self.optimizer.param_groups):
            new = self._floats(group, self.keys[i])
            for tensor, old_value, new_value in zip(self.tensors[i], self.values[i], new):
                if new_value != old_value:
                    tensor.fill_(new_value)  # a device op with a host scalar: no sync
            self.values[i] = new

    def swap_in(self) -> None:
        self._saved = []
        for group, keys, tensors in zip(self.optimizer.param_groups, self.keys, self.tensors):
            self._saved.append({key: group[key] for key in keys})
            position = iter(tensors)
            for key in keys:
                group[key] = (next(position), next(position)) if key == "betas" else next(position)

    def swap_out(self) -> None:
        for group, saved in zip(self.optimizer.param_groups, self._saved):
            group.update(saved)
        self._saved = []


def zero_momentum_buffers(optimizer: torch.optim.Optimizer) -> None:
    """SGD's momentum buffers created as zeros before the first step (torch makes them a copy of the first
    gradient then: with dampening 0, momentum x 0 + gradient is that copy, bit for bit), so that a
    compiled or captured step finds its state in place."""
    for group in optimizer.param_groups:
        if group.get("momentum", 0) == 0:
            continue
        for param in group["params"]:
            state = optimizer.state[param]
            if state.get("momentum_buffer") is None:
                state["momentum_buffer"] = torch.zeros_like(param, memory_format=torch.preserve_format)


@torch.no_grad()
def device_sgd_step(optimizer: torch.optim.Optimizer, momentum_on: List[bool]) -> None:
    """torch's SGD update (weight decay, momentum with dampening, Nesterov) for groups whose "lr" and
    "momentum" are device tensors (swapped in by DeviceHyperparameters), in foreach ops that compile
    into the captured step; the state stays torch's ("momentum_buffer"), so checkpoints move freely
    between the eager and the captured step. `momentum_on`: per group, whether it uses momentum."""
    for group, with_momentum in zip(optimizer.param_groups, momentum_on):
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            continue
        grads = [p.grad for p in params]
        if group["maximize"]:
            grads = torch._foreach_neg(grads)
        if group["weight_decay"] != 0:
            grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
        if with_momentum:
            momentum = group["momentum"]
            buffers = [optimizer.state[p]["momentum_buffer"] for p in params]
            torch._foreach_mul_(buffers, momentum)
            torch._foreach_add_(buffers, grads, alpha=1 - group["dampening"])
            grads = torch._foreach_add(grads, torch._foreach_mul(buffers, momentum)) if group["nesterov"] else buffers
        torch._foreach_add_(params, torch._foreach_mul(grads, -group["lr"]))
