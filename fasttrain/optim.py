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


def build_optimizer(cfg: OptimConfig, model: nn.Module, device: torch.device | None = None) -> torch.optim.Optimizer:
    """The configured optimizer; Adam/AdamW use the fused kernels on CUDA (one launch per step for
    all parameters); elsewhere PyTorch's default (multi-tensor `foreach` where it helps)."""
    params = [p for p in model.parameters() if p.requires_grad]
    on_cuda = device is not None and device.type == "cuda"
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    kernels = {"fused": True} if on_cuda else {}
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, **kernels)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, **kernels)


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
