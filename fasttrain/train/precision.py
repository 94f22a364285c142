"""Numerics of the step: autocast dtype, the fp16 GradScaler, TF32 and cuDNN autotuning."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import ContextManager, Optional

import torch

from fasttrain.errors import UserError

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Precision:
    name: str
    device: torch.device
    scaler: torch.amp.GradScaler  # enabled for fp16 only; a pass-through otherwise

    @property
    def autocast_dtype(self) -> Optional[torch.dtype]:
        return AUTOCAST_DTYPES[self.name]

    @property
    def input_dtype(self) -> torch.dtype:
        """What the loaders deliver: the autocast dtype, so no cast happens in the step."""
        return self.autocast_dtype or torch.float32

    def autocast(self) -> ContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)


def build_precision(name: str, device: torch.device, tf32: bool, deterministic: bool = False) -> Precision:
    if name == "fp16" and device.type != "cuda":
        raise UserError(f"train.precision=fp16 needs CUDA (fp16 autocast with a GradScaler) but the device is "
                        f"{device}: use train.precision=bf16 or fp32 on the CPU")
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError(f"train.precision=bf16 is not supported by {torch.cuda.get_device_name(device)}: use "
                        f"train.precision=fp16")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        # fixed input shapes: let cuDNN pick the fastest kernels (its timing-based pick is not repeatable)
        torch.backends.cudnn.benchmark = not deterministic
    scaler = torch.amp.GradScaler(device.type, enabled=name == "fp16")
    return Precision(name, device, scaler)


def found_inf(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> Optional[torch.Tensor]:
    """1.0 on the device when the scaler skipped this step, read after scaler.step() and before
    scaler.update() without a host sync; None when the scaler is off or its internals differ."""
    if not scaler.is_enabled():
        return None
    try:
        per_device = scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"]  # noqa: SLF001
    except (AttributeError, KeyError):
        return None
    return sum(v.float() for v in per_device.values()) if per_device else None
