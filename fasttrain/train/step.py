"""The training step: what runs for every batch, and nothing more.

On a GPU a small model's step is a few hundred microseconds of device work, so every op the host
launches per step, every Python call and every host-device sync costs throughput directly. Both
forms of the step here keep their bookkeeping out of the per-step path, behind one contract:

    step(images, labels)       one optimizer step; nothing in it waits for the device
    step.take_sums()           the running sums since the last call, as a device vector (SUMS);
                               called at log intervals and epoch ends only
    step.first_bad_offset()    which step since `start_interval()` first had a nan/inf loss (a host
                               read: only once the sums said that something went wrong)
    step.start_interval()      positions count from here (the epoch loop calls it at each log interval)

`EagerStep` is the tutorial's step: forward under autocast, cross-entropy, backward (DDP averages
the gradients when there are other ranks), optimizer step. Its only bookkeeping is keeping a
reference to each detached loss; the sums are computed from those at the log interval.

`CapturedStep` (train.capture=true) is the same step compiled whole: forward and loss (torch.compile),
backward, the gradient all-reduce (world size > 1: one collective over a flat gradient buffer,
fasttrain.dist.ddp), the optimizer with its learning rate and betas (or momentum) read from device
tensors (fasttrain.train.device_optim), and the running sums in fixed device buffers. On CUDA, after a
few real steps on a side stream (compilation, cuDNN autotuning, NCCL setup), the step is recorded once
as a CUDA graph; every later step is two copies into its static inputs, a fill per changed
hyperparameter and one graph replay. On the CPU the same compiled step runs as it is (there are no
CUDA graphs to replay).
"""

from __future__ import annotations

import itertools
import logging
from typing import Callable, List, Optional, Protocol

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch import nn

from fasttrain.dist.ddp import FlatGradients
from fasttrain.train import cuda_graphs
from fasttrain.train.device_optim import DeviceHyperparameters, device_sgd_step, zero_momentum_buffers
from fasttrain.train.precision import Precision, found_inf

# the running sums' layout (float64, on the device): loss summed over samples of finite losses,
# non-finite losses counted, steps the fp16 GradScaler skipped
SUMS = 3
LOSS_SUM, NONFINITE, SKIPPED = range(SUMS)
# real steps a captured step runs before it records its CUDA graph: the first compiles, the second
# sees the optimizer's state created (another graph), the third runs what will be captured
WARMUP_STEPS = 3


class Step(Protocol):
    """The contract above, which the epoch loop (fasttrain.train.loop) runs either step through."""

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> None: ...

    def take_sums(self) -> torch.Tensor: ...

    def first_bad_offset(self) -> int: ...

    def start_interval(self) -> None: ...


class EagerStep:
    """forward, loss, backward, optimizer step; the losses are kept (detached) for the sums.

    `sum_over_ranks`: 0 backpropagates the batch's mean loss; N > 0 its sum over the global batch (train.loss_reduction
    =sum): the mean times the local batch times N, since DDP then averages the ranks' gradients. The logged loss is
    the mean either way."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, precision: Precision,
                 grad_clip: float = 0.0, label_smoothing: float = 0.0, sum_over_ranks: int = 0):
        self.model = model  # DDP-wrapped only when there are other ranks to average gradients with
        self.label_smoothing = label_smoothing
        self.sum_over_ranks = sum_over_ranks
        self.optimizer = optimizer
        self.precision = precision
        self.scaler = precision.scaler  # a pass-through unless fp16
        self.grad_clip = grad_clip
        self.params = [p for p in model.parameters() if p.requires_grad]
        self._losses: List[torch.Tensor] = []
        self._skipped: List[torch.Tensor] = []
        self._sizes: List[int] = []
        self._bad: List[torch.Tensor] = []  # per take since start_interval(): which losses were bad

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        with self.precision.autocast():
            loss = F.cross_entropy(self.model(images), labels, label_smoothing=self.label_smoothing)
        self.optimizer.zero_grad(set_to_none=True)
        objective = loss * (labels.shape[0] * self.sum_over_ranks) if self.sum_over_ranks else loss
        self.scaler.scale(objective).backward()
        if self.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.scaler.step(self.optimizer)  # fused kernels: under fp16 the inf check stays on the device
        if self.scaler.is_enabled():
            skipped = found_inf(self.scaler, self.optimizer)
            if skipped is not None:
                self._skipped.append(skipped)
            self.scaler.update()
        self._losses.append(loss.detach())  # a reference, not a device op: summed at the log interval
        self._sizes.append(labels.shape[0])  # host metadata, no sync

    def take_sums(self) -> torch.Tensor:
        """The sums (see SUMS) of the steps since the last call, on the device; no host sync."""
        device = self.precision.device
        sums = torch.zeros(SUMS, dtype=torch.float64, device=device)
        if not self._losses:
            return sums
        losses = torch.stack(self._losses).double()
        finite = torch.isfinite(losses)
        bad = ~finite
        if self._skipped:
            # a step the fp16 scaler skipped changed no weight: its inf loss is counted as skipped
            skipped = torch.stack(self._skipped).reshape(-1) > 0
            bad = bad & ~skipped
            sums[SKIPPED] = skipped.sum()
        kept = torch.where(finite, losses, 0.0)
        start = 0
        for size, run in itertools.groupby(self._sizes):  # equal batch sizes but maybe an epoch's last one
            count = len(list(run))
            sums[LOSS_SUM] += kept[start : start + count].sum() * size
            start += count
        sums[NONFINITE] = bad.sum()
        self._bad.append(bad)
        self._losses, self._skipped, self._sizes = [], [], []
        return sums

    def first_bad_offset(self) -> int:
        """1-based position, since start_interval(), of the first non-finite loss (0: none)."""
        if not self._bad:
            return 0
        where = torch.nonzero(torch.cat(self._bad)).flatten()  # host sync: only once the run has diverged
        return int(where[0]) + 1 if where.numel() else 0

    def start_interval(self) -> None:
        self._bad = []


def _quiet_profiler_notice(record: logging.LogRecord) -> bool:
    """Dynamo announces, once per process, that it drops the profiler ranges in optimizer.step()
    while compiling it: expected here, and not something a user can act on."""
    return not str(record.msg).startswith("Profiler record function")


class CapturedStep(cuda_graphs.GraphCapture):
    """The whole step compiled, and on CUDA replayed as one CUDA graph (train.capture=true)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, precision: Precision,
                 grad_clip: float = 0.0, compile_mode: Optional[str] = None, world_size: int = 1,
                 label_smoothing: float = 0.0, sum_loss: bool = False):
        if precision.scaler.is_enabled():
            raise ValueError("a captured step does not support fp16's GradScaler (config validation says so)")
        self.model = model  # the plain module: compiled here, never DDP-wrapped
        self.optimizer = optimizer
        self.label_smoothing = label_smoothing
        self.sum_over_ranks = world_size if sum_loss else 0  # as EagerStep's: the global batch's summed loss
        # SGD is stepped by device_sgd_step (torch's SGD takes no device momentum); Adam/AdamW by their own step
        self.sgd = isinstance(optimizer, torch.optim.SGD)
        self.momentum_on = [group.get("momentum", 0) != 0 for group in optimizer.param_groups]
        if self.sgd:
            zero_momentum_buffers(optimizer)
            # the schedulers' check that optimizer.step() ran before their first step: device_sgd_step runs in
            # its place (every step of this object steps the weights before the schedule moves on)
            optimizer._opt_called = True  # type: ignore[attr-defined]
        self.precision = precision
        self.device = precision.device
        self.grad_clip = grad_clip
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.hyper = DeviceHyperparameters(optimizer, self.device)
        self.grads = FlatGradients(self.params, world_size) if world_size > 1 else None
        if self.grads is not None:
            for tensor in itertools.chain(model.parameters(), model.buffers()):
                torch_dist.broadcast(tensor.data, src=0)  # rank 0's weights everywhere, as DDP starts
        self.sums = torch.zeros(SUMS, dtype=torch.float64, device=self.device)
        self.first_bad = torch.zeros((), dtype=torch.int64, device=self.device)  # 0 = none this interval
        self.counter = torch.zeros((), dtype=torch.int64, device=self.device)  # steps this interval
        logging.getLogger("torch._dynamo.variables.ctx_manager").addFilter(_quiet_profiler_notice)
        self._forward_loss = torch.compile(self._forward_loss_eager, mode=compile_mode)
        self._update = torch.compile(self._update_eager, mode=compile_mode)
        self.on_cuda = self.device.type == "cuda"
        self.steps_run = 0
        self.graph: Optional["torch.cuda.CUDAGraph"] = None
        self.replay: Optional[Callable[[], None]] = None
        self.static_images: Optional[torch.Tensor] = None
        self.static_labels: Optional[torch.Tensor] = None

    # ------------------------------------------------------------------ the step's body

    def _forward_loss_eager(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with self.precision.autocast():
            return F.cross_entropy(self.model(images), labels, label_smoothing=self.label_smoothing)

    def _update_eager(self, loss: torch.Tensor, batch_size: int) -> None:
        if self.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.params, self.grad_clip, foreach=True)
        if self.sgd:
            device_sgd_step(self.optimizer, self.momentum_on)
        else:
            self.optimizer.step()
        finite = torch.isfinite(loss)
        self.counter += 1
        self.sums[LOSS_SUM] += torch.where(finite, loss.double(), 0.0) * batch_size
        self.sums[NONFINITE] += (~finite).double()
        self.first_bad.copy_(torch.where(~finite & (self.first_bad == 0), self.counter, self.first_bad))

    def _body(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if self.grads is not None:
            self.grads.zero()
        loss = self._forward_loss(images, labels)
        # the batch is one shape here (drop_last): a constant in the compiled graph
        (loss * (labels.shape[0] * self.sum_over_ranks) if self.sum_over_ranks else loss).backward()
        if self.grads is not None:
            self.grads.all_reduce()
        self.hyper.swap_in()
        try:
            self._update(loss.detach(), labels.shape[0])
        finally:
            self.hyper.swap_out()

    # ------------------------------------------------------------------ running it

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.hyper.refresh()
        if not self.on_cuda:
            self._body(images, labels)
            if self.grads is None:
                self.optimizer.zero_grad(set_to_none=True)  # the next backward writes fresh gradients
            return
        if self.replay is not None:
            self._copy_in(images, labels)
            self.replay()
            return
        if self.steps_run < WARMUP_STEPS:
            with self._side_stream():  # real steps, where CUDA graph capture wants its warm-up
                if self.grads is None:
                    self.optimizer.zero_grad(set_to_none=True)
                self._body(images, labels)
        else:
            self.static_images = images.clone(memory_format=torch.preserve_format)
            self.static_labels = labels.clone()
            if self.grads is None:
                self.optimizer.zero_grad(set_to_none=True)  # gradients come from the graph's own memory pool
            self.replay = self._record(lambda: self._body(self.static_images, self.static_labels))
            self.replay()  # the capture recorded this batch's step without running it
        self.steps_run += 1

    def _copy_in(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """The batch into the graph's static inputs (the graph reads them from fixed addresses). A batch of
        another shape would broadcast into them silently (a batch of 1 fills every row) and train on a batch
        that does not exist; another dtype would be cast. Both are checked on the host: shape and dtype are
        tensor metadata, no device sync."""
        for name, static, batch in (("images", self.static_images, images), ("labels", self.static_labels, labels)):
            if batch.shape != static.shape or batch.dtype != static.dtype:
                raise ValueError(f"the captured step was recorded for {name} of shape {tuple(static.shape)} "
                                 f"({static.dtype}) but got {tuple(batch.shape)} ({batch.dtype}): every training "
                                 f"batch of a captured step must have the first one's shape (data.drop_last=true, "
                                 f"which train.compile sets)")
        self.static_images.copy_(images)
        self.static_labels.copy_(labels)

    # ------------------------------------------------------------------ the contract's reads

    def take_sums(self) -> torch.Tensor:
        sums = self.sums.clone()
        self.sums.zero_()
        return sums

    def first_bad_offset(self) -> int:
        return int(self.first_bad.item())  # host sync: only once the run has diverged

    def start_interval(self) -> None:
        self.first_bad.zero_()
        self.counter.zero_()
