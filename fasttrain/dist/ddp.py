"""Gradients averaged over ranks: the DDP wrapper of an eager step, or one flat buffer that a captured step
all-reduces itself.

World size 1 pays for neither: the run wraps nothing when it has no other rank to average with.
"""

from __future__ import annotations

import inspect
from typing import List

import torch
import torch.distributed as torch_dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

DDP_BUCKET_MB = 25  # DDP's default bucket_cap_mb


def wrap_ddp(train_model: nn.Module, model: nn.Module, device: torch.device, compiled: bool) -> nn.Module:
    """DDP without per-forward buffer broadcasts (BatchNorm buffers are averaged at every epoch's
    end), with gradients as views of its buckets (no copy in or out per step).

    Compiled models: `torch._dynamo.config.optimize_ddp` splits the graph at bucket boundaries so
    that an all-reduce can overlap the rest of the backward. When all gradients fit in one bucket
    there is nothing to overlap and the split only adds graphs (CIFAR10_CNN: 2 forward + 2 backward
    instead of 1 + 1) and launches; measured on 2 gloo ranks (benchmarks/ddp_graphs.py,
    benchmarks/RESULTS.md), one graph was as fast or faster. So: off for models whose gradients
    fit in one bucket, PyTorch's default (on) for larger ones."""
    if compiled:
        grad_mb = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad) / 2**20
        torch._dynamo.config.optimize_ddp = grad_mb > DDP_BUCKET_MB
    kwargs: dict = {"gradient_as_bucket_view": True}
    if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters:
        kwargs["forward_sync_buffers"] = False  # torch >= 2.14's name (it still syncs once, at construction)
    else:
        kwargs["broadcast_buffers"] = False
    return DDP(train_model, device_ids=[device.index] if device.type == "cuda" else None, **kwargs)


class FlatGradients:
    """Every gradient as a view of one flat buffer, averaged over ranks with one all_reduce: what DDP
    does with a single bucket, here inside the compiled or captured step. Each view has its
    parameter's strides (channels_last weights included), as fused and foreach kernels expect."""

    def __init__(self, params: List[nn.Parameter], world_size: int):
        self.world_size = world_size
        first = params[0]
        self.buffer = torch.zeros(sum(p.numel() for p in params), dtype=first.dtype, device=first.device)
        offset = 0
        for p in params:
            p.grad = self.buffer.as_strided(p.shape, p.stride(), offset)
            offset += p.numel()

    def zero(self) -> None:
        self.buffer.zero_()  # backward accumulates into the views

    def all_reduce(self) -> None:
        torch_dist.all_reduce(self.buffer)  # sum over ranks ...
        self.buffer.div_(self.world_size)  # ... then the mean, as DDP

