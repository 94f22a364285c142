"""One training epoch and one validation pass: the tutorial's train_one_epoch and validate.

Losses and counts accumulate on the device; they are summed over ranks and read by the host once
per log interval and once at the end of the epoch, so the step loop itself has no host-device sync.
A non-finite loss is noted on the device too (the first step it happened at) and is found at that
same read, so a diverged run stops within one log interval, naming the step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from fasttrain.dist import all_reduce_sum_tensor, get_world_size
from fasttrain.errors import UserError
from fasttrain.precision import Precision, found_inf
from fasttrain.optim import Schedule

# the per-rank running sums of an epoch, on the device: [loss sum, samples, skipped steps, non-finite losses]
TOTALS = 4


class TrainingDiverged(UserError):
    """The loss became nan or inf: the run stops (exit 2) and keeps its last good checkpoint."""


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so that a clock read after it means something."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class EpochStats:
    loss: float  # mean training loss per sample, over all ranks (a resumed epoch: the part before the stop too)
    samples: int  # over all ranks, in the whole epoch
    steps: int  # steps done in the epoch
    seconds: float  # wall time of this process's steps, first step included
    last_lr: float
    skipped_steps: int = 0  # fp16 steps the GradScaler skipped (inf/nan gradients)
    first_step_seconds: float = 0.0  # measured apart when asked (compilation happens there)
    data_wait_seconds: float = 0.0  # host time blocked waiting for the next batch (rank 0's view)
    stopped_early: bool = False  # after_step asked to stop before the epoch's end
    timed_samples: int = -1  # samples of the steps this process ran (-1 = samples): what images/s counts
    timed_steps: int = -1  # steps this process ran (-1 = steps)

    def __post_init__(self) -> None:
        self.timed_samples = self.samples if self.timed_samples < 0 else self.timed_samples
        self.timed_steps = self.steps if self.timed_steps < 0 else self.timed_steps

    @property
    def images_per_sec(self) -> float:
        """Throughput over the steady part: the first step is left out when it was timed apart."""
        samples, steps = self.timed_samples, self.timed_steps
        if self.first_step_seconds and steps > 1:
            return samples * (steps - 1) / steps / max(self.seconds - self.first_step_seconds, 1e-9)
        return samples / self.seconds if self.seconds > 0 else 0.0


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
# (global step, steps done in this epoch, the epoch's running sums so far) -> stop the epoch now?
AfterStep = Callable[[int, int, Callable[[], torch.Tensor]], bool]


def raise_if_diverged(reduced: Sequence[float], first_bad_step: torch.Tensor, epoch: int) -> None:
    """`reduced` holds the running sums summed over ranks; its 4th value counts non-finite losses."""
    if reduced[3] > 0:
        step = int(first_bad_step.item())  # host sync, only once it has gone wrong
        where = f"at step {step}" if step else "on another rank"
        raise TrainingDiverged(f"training diverged: the loss became nan/inf {where} (epoch {epoch}); the run stops "
                               f"and keeps its last good checkpoint: lower optim.lr or sched.max_lr, set "
                               f"train.grad_clip, or use train.precision=fp32, then continue with resume=auto")


def train_one_epoch(model: nn.Module, loader: Iterable[Tuple[torch.Tensor, torch.Tensor]],
                    optimizer: torch.optim.Optimizer, schedule: Schedule, precision: Precision, *, epoch: int,
                    global_step: int, max_batches: int = 0, grad_clip: float = 0.0, log_every: int = 50,
                    log_step: Optional[StepLogger] = None, time_first_step: bool = False,
                    tick: Optional[Callable[[], None]] = None, start_step: int = 0,
                    carried: Optional[torch.Tensor] = None, after_step: Optional[AfterStep] = None) -> EpochStats:
    """Train for one epoch; losses are means over the samples of all ranks (collectives every
    `log_every` steps and at the end, which every rank reaches at the same step).

    A resumed epoch starts at `start_step` (the loader already skips those batches) with the running
    sums `carried` from before the stop; `after_step` runs after every step on every rank and may
    stop the epoch (a checkpoint, preemption, train.stop_after_steps)."""
    model.train()
    device = precision.device
    # running sums (see TOTALS) on the device, for the epoch and for the current log interval
    epoch_totals = torch.zeros(TOTALS, device=device, dtype=torch.float64)
    # what this rank had summed before the stop: counted in the epoch's loss, not in its images/s
    before = (torch.zeros(TOTALS, dtype=torch.float64) if carried is None else carried.double()).to(device)
    interval = torch.zeros(TOTALS, device=device, dtype=torch.float64)
    first_bad_step = torch.zeros((), device=device, dtype=torch.int64)  # 0 = none yet
    steps = start_step
    first_step_seconds = 0.0
    last_lr = schedule.lr()
    data_wait = 0.0
    stopped_early = False
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

        steps += 1
        global_step += 1
        batch = labels.shape[0]  # shape is host metadata: no sync
        finite = torch.isfinite(loss)
        # a step the fp16 scaler skipped changed no weight: its inf loss is counted as skipped, not as divergence
        bad = ~finite if skipped is None else ~finite & (skipped == 0)
        first_bad_step = torch.where(bad & (first_bad_step == 0), global_step, first_bad_step)
        interval[0] += torch.where(finite, loss.double(), 0.0) * batch
        interval[1] += batch
        if skipped is not None:
            interval[2] += skipped
        interval[3] += bad.double()
        if tick is not None:
            tick()  # host-only progress (a bar), no device value read
        if time_first_step and steps == start_step + 1:
            synchronize(device)  # host sync, once: the first step holds the compilation
            first_step_seconds = time.perf_counter() - start
        if global_step % log_every == 0:
            epoch_totals += interval
            reduced = all_reduce_sum_tensor(interval.clone()).tolist()  # host sync, once per log interval
            raise_if_diverged(reduced, first_bad_step, epoch)
            now = time.perf_counter()
            if log_step is not None:
                loss_sum, samples = reduced[0], reduced[1]
                log_step(global_step, epoch, loss_sum / max(samples, 1), last_lr, samples / max(now - interval_start, 1e-9))
            interval.zero_()
            interval_start = now
        if after_step is not None and after_step(global_step, steps, lambda: before + epoch_totals + interval):
            stopped_early = True
            break
    epoch_totals += interval
    now_sums, before_sums = all_reduce_sum_tensor(torch.stack([epoch_totals, before])).tolist()  # host sync, per epoch
    raise_if_diverged(now_sums, first_bad_step, epoch)
    synchronize(device)
    seconds = time.perf_counter() - start
    loss_sum, samples, skipped_total = (now_sums[i] + before_sums[i] for i in range(3))
    # every rank skips the same steps (gradients are all-reduced before the inf check): count one rank's
    skipped_steps = int(round(skipped_total / max(get_world_size(), 1)))
    return EpochStats(loss_sum / max(samples, 1), int(samples), steps, seconds, last_lr, skipped_steps,
                      first_step_seconds, data_wait, stopped_early, int(now_sums[1]), steps - start_step)


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
