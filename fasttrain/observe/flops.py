"""FLOPs per image counted on the model, and known devices' peaks: the inputs of MFU."""

from __future__ import annotations

import copy
from typing import Optional, Tuple

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

# Dense peak TFLOP/s from the vendors' datasheets, by the precision the step runs in
# ("tf32" = fp32 with TF32 tensor cores allowed). Matched by substring of the device name.
PEAK_TFLOPS = {
    "H200": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H100": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},  # SXM; PCIe is lower
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "L40S": {"bf16": 362.1, "fp16": 362.1, "tf32": 183.0, "fp32": 91.6},
    "RTX 4090": {"bf16": 165.2, "fp16": 165.2, "tf32": 82.6, "fp32": 82.6},
}


def flops_per_image(model: nn.Module, input_shape: Tuple[int, int, int]) -> float:
    """Forward + backward FLOPs of one image, counted on the model itself (a CPU copy)."""
    probe = copy.deepcopy(model).float().cpu().train()
    x = torch.randn(2, *input_shape)
    with FlopCounterMode(display=False) as counter:
        probe(x).sum().backward()
    return counter.get_total_flops() / 2


def peak_flops(device: torch.device, precision: str, tf32: bool, override_tflops: Optional[float] = None) -> Optional[float]:
    """The device's dense peak FLOP/s for this precision, or None when unknown (the CPU, unlisted GPUs)."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    key = "tf32" if precision == "fp32" and tf32 else precision
    for card, peaks in PEAK_TFLOPS.items():
        if card in name:
            return peaks[key] * 1e12
    return None
