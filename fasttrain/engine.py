"""One training epoch and one validation pass: the tutorial's train_one_epoch and validate.

Losses and counts accumulate on the device; the host reads them once per log interval and once
at the end of the epoch, so the step loop itself has no host-device sync.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from fasttrain.optim import Schedule


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so that a clock read after it means something."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class EpochStats:
    loss: float  # mean training loss per sample
    samples: int
    steps: int
    seconds: float
    last_lr: float

    @property
    def images_per_sec(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0


# (global step, epoch, mean loss over the interval, lr, images/s over the interval)
StepLogger = Callable[[int, int, float, float, float], None]


def train_one_epoch(model: nn.Module, loader: Iterable[Tuple[torch.Tensor, torch.Tensor]],
                    optimizer: torch.optim.Optimizer, schedule: Schedule, device: torch.device, *, epoch: int,
                    global_step: int, max_batches: int = 0, grad_clip: float = 0.0, log_every: int = 50,
                    log_step: Optional[StepLogger] = None) -> EpochStats:
    model.train()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    interval_sum = torch.zeros((), device=device, dtype=torch.float64)
    samples = interval_samples = steps = 0
    last_lr = schedule.lr()
    synchronize(device)
    start = interval_start = time.perf_counter()
    for images, labels in loader:
        if max_batches and steps >= max_batches:
            break
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        last_lr = schedule.lr()  # a Python float: no device sync
        optimizer.step()
        schedule.after_batch()

        batch = labels.shape[0]  # shape is host metadata: no sync
        weighted = loss.detach().double() * batch
        loss_sum += weighted
        interval_sum += weighted
        samples += batch
        interval_samples += batch
        steps += 1
        global_step += 1
        if log_step is not None and global_step % log_every == 0:
            interval_loss = interval_sum.item() / interval_samples  # host sync, once per log interval
            now = time.perf_counter()
            log_step(global_step, epoch, interval_loss, last_lr, interval_samples / max(now - interval_start, 1e-9))
            interval_sum.zero_()
            interval_samples = 0
            interval_start = now
    synchronize(device)
    seconds = time.perf_counter() - start
    mean_loss = loss_sum.item() / max(samples, 1)  # host sync, once per epoch
    return EpochStats(mean_loss, samples, steps, seconds, last_lr)


@dataclass
class EvalStats:
    loss: float  # mean loss per sample
    accuracy: float  # fraction in [0, 1]
    correct: int
    total: int


@torch.no_grad()
def validate(model: nn.Module, loader: Iterable[Tuple[torch.Tensor, torch.Tensor]], device: torch.device) -> EvalStats:
    model.eval()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    total = 0
    for images, labels in loader:
        logits = model(images)
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").double()
        correct += (logits.argmax(dim=1) == labels).sum()
        total += labels.shape[0]
    loss, hits = loss_sum.item(), int(correct.item())  # host sync, once per validation
    return EvalStats(loss / max(total, 1), hits / max(total, 1), hits, total)
