"""One training epoch and one validation pass: the tutorial's train_one_epoch and validate.

Losses and counts accumulate on the device; they are summed over ranks and read by the host once
per log interval and once at the end of the epoch, so the step loop itself has no host-device sync.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from fasttrain.dist import all_reduce_sum_tensor, get_world_size
from fasttrain.precision import Precision, found_inf
from fasttrain.optim import Schedule


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so that a clock read after it means something."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class EpochStats:
    loss: float  # mean training loss per sample, over all ranks
    samples: int  # over all ranks
    steps: int
    seconds: float  # wall time of the epoch's steps, first step included
    last_lr: float
    skipped_steps: int = 0  # fp16 steps the GradScaler skipped (inf/nan gradients)
    first_step_seconds: float = 0.0  # measured apart when asked (compilation happens there)
    data_wait_seconds: float = 0.0  # host time blocked waiting for the next batch (rank 0's view)

    @property
    def images_per_sec(self) -> float:
        """Throughput over the steady part: the first step is left out when it was timed apart."""
        if self.first_step_seconds and self.steps > 1:
            return self.samples * (self.steps - 1) / self.steps / max(self.seconds - self.first_step_seconds, 1e-9)
        return self.samples / self.seconds if self.seconds > 0 else 0.0


def train_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, optimizer: torch.optim.Optimizer,
               precision: Precision, grad_clip: float = 0.0) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """One optimizer step. Returns the loss and, under fp16, whether the scaler skipped the step
    (both device tensors: nothing here waits for the device)."""
    scaler = precision.scaler
    with precision.autocast():
        loss = F.cross_entropy(model(images), labels)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()  # under DDP the gradients are averaged over ranks here
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    skipped = found_inf(scaler, optimizer)
    scaler.update()
    return loss.detach(), skipped


# (global step, epoch, mean loss over the interval, lr, images/s over the interval)
StepLogger = Callable[[int, int, float, float, float], None]


def train_one_epoch(model: nn.Module, loader: Iterable[Tuple[torch.Tensor, torch.Tensor]],
                    optimizer: torch.optim.Optimizer, schedule: Schedule, precision: Precision, *, epoch: int,
                    global_step: int, max_batches: int = 0, grad_clip: float = 0.0, log_every: int = 50,
                    log_step: Optional[StepLogger] = None, time_first_step: bool = False,
                    tick: Optional[Callable[[], None]] = None) -> EpochStats:
    """Train for one epoch; losses are means over the samples of all ranks (collectives every
    `log_every` steps and at the end, which every rank reaches at the same step)."""
    model.train()
    device = precision.device
    # [loss sum, sample count, skipped steps] on the device, for the epoch and the current log interval
    epoch_totals = torch.zeros(3, device=device, dtype=torch.float64)
    interval = torch.zeros(3, device=device, dtype=torch.float64)
    steps = 0
    first_step_seconds = 0.0
    last_lr = schedule.lr()
    data_wait = 0.0
    batches = iter(loader)
    synchronize(device)
    start = interval_start = time.perf_counter()
    while not (max_batches and steps >= max_batches):
        fetch_start = time.perf_counter()
        batch = next(batches, None)
        data_wait += time.perf_counter() - fetch_start  # host time blocked on the loader
        if batch is None:
            break
        images, labels = batch
        last_lr = schedule.lr()  # a Python float: no device sync
        loss, skipped = train_step(model, images, labels, optimizer, precision, grad_clip)
        schedule.after_batch()

        batch = labels.shape[0]  # shape is host metadata: no sync
        interval[0] += loss.double() * batch
        interval[1] += batch
        if skipped is not None:
            interval[2] += skipped
        steps += 1
        global_step += 1
        if tick is not None:
            tick()  # host-only progress (a bar), no device value read
        if time_first_step and steps == 1:
            synchronize(device)  # host sync, once: the first step holds the compilation
            first_step_seconds = time.perf_counter() - start
        if global_step % log_every == 0:
            epoch_totals += interval
            loss_sum, samples, _ = all_reduce_sum_tensor(interval.clone()).tolist()  # host sync, once per log interval
            now = time.perf_counter()
            if log_step is not None:
                log_step(global_step, epoch, loss_sum / max(samples, 1), last_lr, samples / max(now - interval_start, 1e-9))
            interval.zero_()
            interval_start = now
    epoch_totals += interval
    loss_sum, samples, skipped_total = all_reduce_sum_tensor(epoch_totals).tolist()  # host sync, once per epoch
    synchronize(device)
    seconds = time.perf_counter() - start
    # every rank skips the same steps (gradients are all-reduced before the inf check): count one rank's
    skipped_steps = int(round(skipped_total / max(get_world_size(), 1)))
    return EpochStats(loss_sum / max(samples, 1), int(samples), steps, seconds, last_lr, skipped_steps,
                      first_step_seconds, data_wait)


@dataclass
class EvalStats:
    loss: float  # mean loss per sample
    accuracy: float  # fraction in [0, 1]
    correct: int
    total: int


@torch.no_grad()
def validate(model: nn.Module, loader: Iterable[Tuple[torch.Tensor, torch.Tensor]], precision: Precision) -> EvalStats:
    """Loss and accuracy over this rank's share of the split, summed over all ranks: every image
    counted once. Pass the unwrapped model: ranks may run different numbers of batches."""
    model.eval()
    totals = torch.zeros(3, device=precision.device, dtype=torch.float64)  # [loss sum, correct, total]
    for images, labels in loader:
        with precision.autocast():
            logits = model(images)
        totals[0] += F.cross_entropy(logits, labels, reduction="sum").double()
        totals[1] += (logits.argmax(dim=1) == labels).sum()
        totals[2] += labels.shape[0]
    loss_sum, correct, total = all_reduce_sum_tensor(totals).tolist()  # host sync, once per validation
    correct, total = int(correct), int(total)
    return EvalStats(loss_sum / max(total, 1), correct / max(total, 1), correct, total)
