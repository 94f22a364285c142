"""Optimizers and learning-rate schedules, each stepped at the cadence it is defined for.

OneCycleLR is defined over optimizer steps, so it steps after every batch; ReduceLROnPlateau
reacts to the validation loss, so it steps after validation; StepLR, ExponentialLR and
CosineAnnealingLR are defined in epochs and step once per epoch. (The tutorial built a
OneCycleLR and then stepped a cosine schedule once per epoch; fasttrain steps what it builds.)
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.optim import lr_scheduler

from fasttrain.config import OptimConfig, SchedConfig


def _fused_supported(device: torch.device) -> bool:
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    except ImportError:  # an older torch: its own default kernels
        return False
    return device.type in _get_fused_kernels_supported_devices()


def build_optimizer(cfg: OptimConfig, model: nn.Module, device: torch.device | None = None,
                    capture: bool = False) -> torch.optim.Optimizer:
    """The configured optimizer, with the fewest kernel launches per step that its device allows.

    Eager steps use the fused kernels (CUDA and CPU): one launch for every parameter's update, and
    under fp16 the GradScaler's inf check runs inside that kernel instead of syncing every step.
    A captured step (train.capture) takes the learning rate and betas as device tensors (see
    `step.DeviceHyperparameters`), so that a compiled or CUDA-graph step reads the schedule's values
    from memory instead of baking them in: on CUDA the multi-tensor path with `capturable=True` (the
    fused kernel takes its betas as host floats); on the CPU, where `capturable` is not supported
    outside compiled code, the single-tensor path, which takes tensor hyperparameters as they are."""
    params = [p for p in model.parameters() if p.requires_grad]
    device = device or torch.device("cpu")
    if capture:
        if cfg.name == "sgd":  # config validation refuses this; a direct caller gets the same message
            raise ValueError("train.capture=true supports optim.name=adam and adamw")
        kernels = {"foreach": True, "capturable": True} if device.type == "cuda" else {"foreach": False}
    else:
        kernels = {"fused": True} if _fused_supported(device) else {}
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay, **kernels)
    kind = torch.optim.Adam if cfg.name == "adam" else torch.optim.AdamW
    return kind(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, **kernels)


# the kernel choices of a param group: this run's, whatever a checkpoint was written with
_KERNEL_FLAGS = ("foreach", "fused", "capturable", "differentiable")


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """`optimizer.load_state_dict`, then the state put in the form this run's kernels need.

    A checkpoint carries the param groups' kernel flags of the run that wrote it; load_state_dict
    would take them over (an eager run resumed as a captured one would lose `capturable`). The
    step counters live on the parameter's device for fused and capturable kernels, on the CPU
    otherwise. And each moment takes its parameter's memory layout: a checkpoint from a contiguous
    run resumed with train.channels_last=true has contiguous moments, which CUDA's fused AdamW
    refuses (it needs matching strides; the CPU kernel does not check)."""
    own_flags = [{k: group[k] for k in _KERNEL_FLAGS if k in group} for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, flags in zip(optimizer.param_groups, own_flags):
        group.update(flags)
        on_device = bool(group.get("fused") or group.get("capturable"))
        for param in group["params"]:
            param_state = optimizer.state.get(param)
            if not param_state:
                continue
            for key, value in list(param_state.items()):
                if not isinstance(value, torch.Tensor):
                    continue
                if key == "step":
                    param_state[key] = (value.to(dtype=torch.float32, device=param.device) if on_device
                                        else value.to("cpu"))
                elif value.shape == param.shape and value.stride() != param.stride():
                    param_state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


class Schedule:
    """A scheduler and the moment it must be stepped: after each batch, or after each epoch."""

    def __init__(self, cfg: SchedConfig, optimizer: torch.optim.Optimizer, epochs: int, steps_per_epoch: int):
        self.name = cfg.name
        self.optimizer = optimizer
        self.scheduler: Optional[object]
        if cfg.name == "onecycle":
            self.scheduler = lr_scheduler.OneCycleLR(
                optimizer, max_lr=cfg.max_lr, total_steps=epochs * steps_per_epoch, pct_start=cfg.pct_start,
                div_factor=cfg.div_factor, final_div_factor=cfg.final_div_factor)
        elif cfg.name == "step":
            self.scheduler = lr_scheduler.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma)
        elif cfg.name == "exponential":
            self.scheduler = lr_scheduler.ExponentialLR(optimizer, gamma=cfg.gamma)
        elif cfg.name == "cosine":
            self.scheduler = lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.t_max or epochs, eta_min=cfg.eta_min)
        elif cfg.name == "plateau":
            self.scheduler = lr_scheduler.ReduceLROnPlateau(
                optimizer, mode="min", factor=cfg.plateau_factor, patience=cfg.plateau_patience, min_lr=cfg.min_lr)
        else:
            self.scheduler = None

    @property
    def per_batch(self) -> bool:
        return self.name == "onecycle"

    def after_batch(self) -> None:
        if self.per_batch:
            self.scheduler.step()  # type: ignore[union-attr]

    def after_epoch(self, val_loss: float) -> None:
        if self.scheduler is None or self.per_batch:
            return
        if self.name == "plateau":
            self.scheduler.step(val_loss)  # type: ignore[union-attr]
        else:
            self.scheduler.step()  # type: ignore[union-attr]

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def state_dict(self) -> dict:
        return self.scheduler.state_dict() if self.scheduler is not None else {}  # type: ignore[union-attr]

    def load_state_dict(self, state: dict) -> None:
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state)  # type: ignore[union-attr]
