"""Optimizers and learning-rate schedules, each stepped at the cadence it is defined for.

OneCycleLR is defined over optimizer steps, so it steps after every batch; ReduceLROnPlateau
reacts to the validation loss, so it steps after validation; StepLR, ExponentialLR and
CosineAnnealingLR are defined in epochs and step once per epoch. (The tutorial built a
OneCycleLR and then stepped a cosine schedule once per epoch; fasttrain steps what it builds.)

Both are registries (`optim.name`, `sched.name`): a new optimizer or schedule is one function
decorated with `@OPTIMIZERS.register(name)` or `@SCHEDULES.register(name)`, of the shape of the
built-in ones below.
"""

from __future__ import annotations

from typing import Any, Dict, List, NamedTuple, Optional

import torch
from torch import nn
from torch.optim import lr_scheduler

from fasttrain.config import CAPTURABLE_OPTIMIZERS, OptimConfig, SchedConfig
from fasttrain.config.schema import total_steps
from fasttrain.config.registry import OPTIMIZERS, SCHEDULES


def _fused_supported(device: torch.device) -> bool:
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    except ImportError:  # an older torch: its own default kernels
        return False
    return device.type in _get_fused_kernels_supported_devices()


def peak_lr(optim: OptimConfig, sched: SchedConfig) -> float:
    """The learning rate at the schedule's peak (of the weights' group): what optim.decoupled_decay divides by."""
    return sched.max_lr if sched.name in ("onecycle", "triangle") else optim.lr


# A model may train some parameters for its first epochs only (SpeedNet: its whitening bias, 3 epochs):
# `freeze_after_epochs = {"parameter name": epochs}` on the model. Each such parameter gets a param group of its
# own carrying FREEZE_KEY, and the schedule holds that group's learning rate at 0 from that epoch on (Schedule):
# no recompile of a compiled step, nothing changes shape, and a resume lands in the same state.
FREEZE_KEY = "freeze_after_epochs"
# optim.bn_bias_scope=norm: the layers whose parameters it means (BatchNorm and InstanceNorm derive from _NormBase)
NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def _frozen_later(model: nn.Module) -> Dict[str, float]:
    declared = dict(getattr(model, FREEZE_KEY, None) or {})
    names = {name for name, p in model.named_parameters() if p.requires_grad}
    unknown = sorted(set(declared) - names)
    if unknown:
        raise ValueError(f"{type(model).__name__}.{FREEZE_KEY} names {', '.join(map(repr, unknown))}, which it has "
                         f"no trainable parameter of (its names: model.named_parameters())")
    if any(not (float(epochs) > 0) for epochs in declared.values()):
        raise ValueError(f"{type(model).__name__}.{FREEZE_KEY}: every count of epochs must be > 0, got {declared}")
    return {name: float(epochs) for name, epochs in declared.items()}


def param_groups(cfg: OptimConfig, model: nn.Module, peak: Optional[float] = None) -> List[Dict[str, Any]]:
    """The trainable parameters as optimizer param groups: one group, or with optim.decay_bn_bias=false or
    optim.bn_bias_lr_scale != 1 two, the second holding every 1-d parameter (BatchNorm weights and biases,
    every bias; optim.bn_bias_scope=norm: the normalization layers' parameters only), without weight decay
    and/or with its learning rate scaled. `lr_scale` rides in the group:
    the schedules read it (a checkpoint keeps it with the group). With optim.decoupled_decay each group's
    weight decay is optim.weight_decay / its peak learning rate (`peak` x lr_scale; `peak` defaults to
    optim.lr), so that lr x weight_decay, the fraction SGD and AdamW take off each weight per step, is
    optim.weight_decay at the peak in every group. A parameter the model trains for its first epochs only
    (FREEZE_KEY) comes last, in a group of its own with the settings it would have had."""
    later = _frozen_later(model)
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    params = [p for name, p in named if name not in later]
    peak = cfg.lr if peak is None else peak
    split = not (cfg.decay_bn_bias and cfg.bn_bias_lr_scale == 1.0)
    # optim.bn_bias_scope: every 1-d parameter, or the normalization layers' own
    norm_params = {id(p) for m in model.modules() if isinstance(m, NORM_LAYERS) for p in m.parameters(recurse=False)}

    def special(p: nn.Parameter) -> bool:
        return id(p) in norm_params if cfg.bn_bias_scope == "norm" else p.ndim <= 1

    def group(members: List[nn.Parameter], one_d: bool) -> Dict[str, Any]:
        scale = cfg.bn_bias_lr_scale if one_d and split else 1.0
        decayed = cfg.decay_bn_bias or not one_d
        weight_decay = (cfg.weight_decay / (peak * scale) if cfg.decoupled_decay else cfg.weight_decay) if decayed else 0.0
        entry: Dict[str, Any] = {"params": members, "lr_scale": scale, "weight_decay": weight_decay}
        if scale != 1.0:
            entry["lr"] = cfg.lr * scale
        return entry

    if not split:
        groups = [group(params, one_d=False)] if params else []
    else:
        matrices = [p for p in params if not special(p)]
        vectors = [p for p in params if special(p)]
        groups = ([group(matrices, one_d=False)] if matrices else []) + ([group(vectors, one_d=True)] if vectors else [])
    for name, p in named:
        if name in later:
            groups.append({**group([p], one_d=special(p)), FREEZE_KEY: later[name]})
    return groups


def build_optimizer(cfg: OptimConfig, model: nn.Module, device: torch.device | None = None,
                    capture: bool = False, peak: Optional[float] = None) -> torch.optim.Optimizer:
    """The configured optimizer over `param_groups`, with the fewest kernel launches per step that its
    device allows.

    Eager steps use the fused kernels (CUDA and CPU): one launch for every parameter's update, and
    under fp16 the GradScaler's inf check runs inside that kernel instead of syncing every step.
    A captured step (train.capture) takes the learning rate, betas and momentum as device tensors
    (`device_optim.DeviceHyperparameters`), so that a compiled or CUDA-graph step reads the schedule's values
    from memory instead of baking them in: Adam on CUDA the multi-tensor path with `capturable=True`
    (the fused kernel takes its betas as host floats); on the CPU, where `capturable` is not supported
    outside compiled code, the single-tensor path, which takes tensor hyperparameters as they are; SGD
    keeps torch's state layout but is stepped by `device_optim.device_sgd_step`. `peak`: the schedule's
    peak learning rate (`peak_lr`), which optim.decoupled_decay divides the decay by."""
    groups = param_groups(cfg, model, peak)
    device = device or torch.device("cpu")
    if capture:
        if cfg.name not in CAPTURABLE_OPTIMIZERS:  # config validation refuses this; a direct caller gets the same
            raise ValueError(f"train.capture=true supports optim.name={', '.join(CAPTURABLE_OPTIMIZERS)}")
        if cfg.name == "sgd":
            kernels = {"foreach": True}  # stepped by fasttrain's own update (fasttrain.train.device_optim)
        else:
            kernels = {"foreach": True, "capturable": True} if device.type == "cuda" else {"foreach": False}
    else:
        kernels = {"fused": True} if _fused_supported(device) else {}
    optimizer = OPTIMIZERS.get(cfg.name)(cfg, groups, kernels)
    for group in optimizer.param_groups:
        group.setdefault("lr_scale", 1.0)  # a registered optimizer that rebuilt its groups
    return optimizer


# --------------------------------------------------------------------------- the registered optimizers
# each: (optim config, the param groups to train (see param_groups), kernels) -> the optimizer, where
# `kernels` holds the launch choices build_optimizer made for this device and step (fused, or foreach and
# capturable): keyword arguments to pass on to an optimizer that takes them


@OPTIMIZERS.register("sgd")
def sgd(cfg: OptimConfig, params: List[Dict[str, Any]], kernels: Dict[str, bool]) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                           weight_decay=cfg.weight_decay, **kernels)


@OPTIMIZERS.register("adam")
def adam(cfg: OptimConfig, params: List[Dict[str, Any]], kernels: Dict[str, bool]) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, **kernels)


@OPTIMIZERS.register("adamw")
def adamw(cfg: OptimConfig, params: List[Dict[str, Any]], kernels: Dict[str, bool]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, **kernels)


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


# --------------------------------------------------------------------------- the registered schedules
# each: (sched config, optimizer, train.epochs, optimizer steps per epoch) -> Stepping: the scheduler
# and the moment it must be stepped. train.epochs may be fractional (9.9): a per-batch schedule spans
# total_steps(epochs, steps per epoch) = round(epochs x steps per epoch) steps

EVERY_BATCH, EVERY_EPOCH, ON_VAL_LOSS = "batch", "epoch", "val_loss"


class Stepping(NamedTuple):
    scheduler: Optional[Any]  # a torch.optim.lr_scheduler scheduler; None keeps the learning rate
    every: str = EVERY_EPOCH  # after each optimizer step (batch), each epoch, or validation (val_loss: given the loss)


@SCHEDULES.register("none")
def constant(cfg: SchedConfig, optimizer: torch.optim.Optimizer, epochs: float, steps_per_epoch: int) -> Stepping:
    return Stepping(None)


@SCHEDULES.register("step")
def step_lr(cfg: SchedConfig, optimizer: torch.optim.Optimizer, epochs: float, steps_per_epoch: int) -> Stepping:
    return Stepping(lr_scheduler.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma))


@SCHEDULES.register("exponential")
def exponential(cfg: SchedConfig, optimizer: torch.optim.Optimizer, epochs: float, steps_per_epoch: int) -> Stepping:
    return Stepping(lr_scheduler.ExponentialLR(optimizer, gamma=cfg.gamma))


@SCHEDULES.register("cosine")
def cosine(cfg: SchedConfig, optimizer: torch.optim.Optimizer, epochs: float, steps_per_epoch: int) -> Stepping:
    return Stepping(lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.t_max or epochs, eta_min=cfg.eta_min))


@SCHEDULES.register("plateau")
def plateau(cfg: SchedConfig, optimizer: torch.optim.Optimizer, epochs: float, steps_per_epoch: int) -> Stepping:
    floors = [cfg.min_lr * group.get("lr_scale", 1.0) for group in optimizer.param_groups]
    return Stepping(lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=cfg.plateau_factor,
                                                   patience=cfg.plateau_patience, min_lr=floors), ON_VAL_LOSS)


@SCHEDULES.register("onecycle")
def onecycle(cfg: SchedConfig, optimizer: torch.optim.Optimizer, epochs: float, steps_per_epoch: int) -> Stepping:
    # one peak per param group: optim.bn_bias_lr_scale scales the 1-d parameters' whole cycle
    peaks = [cfg.max_lr * group.get("lr_scale", 1.0) for group in optimizer.param_groups]
    return Stepping(lr_scheduler.OneCycleLR(optimizer, max_lr=peaks, total_steps=total_steps(epochs, steps_per_epoch),
                                            pct_start=cfg.pct_start, div_factor=cfg.div_factor,
                                            final_div_factor=cfg.final_div_factor), EVERY_BATCH)


class Triangle(lr_scheduler.LRScheduler):
    """Linear from start_factor x peak up to the peak over the first pct_start of the steps, then linear down to
    end_factor x peak at the last step (the CIFAR-10 speed records' schedule: 0.2, 23%, 0.07). One peak per param
    group. The closed form reads `total_steps` and `last_epoch` only, so a resume that changes the steps per
    epoch moves it to the same point of training (fasttrain.checkpoint.state)."""

    def __init__(self, optimizer: torch.optim.Optimizer, peaks: List[float], total_steps: int, pct_start: float,
                 start_factor: float, end_factor: float):
        self.peaks, self.total_steps = list(peaks), total_steps
        self.pct_start, self.start_factor, self.end_factor = pct_start, start_factor, end_factor
        super().__init__(optimizer)

    def factor(self, step: int) -> float:
        last = max(self.total_steps - 1, 1)
        top = self.pct_start * last
        if step <= top:
            return self.start_factor + (1 - self.start_factor) * step / top
        return 1 + (self.end_factor - 1) * min(step - top, last - top) / (last - top)

    def get_lr(self) -> List[float]:
        return [peak * self.factor(self.last_epoch) for peak in self.peaks]


@SCHEDULES.register("triangle")
def triangle(cfg: SchedConfig, optimizer: torch.optim.Optimizer, epochs: float, steps_per_epoch: int) -> Stepping:
    peaks = [cfg.max_lr * group.get("lr_scale", 1.0) for group in optimizer.param_groups]
    return Stepping(Triangle(optimizer, peaks, total_steps(epochs, steps_per_epoch), cfg.pct_start, cfg.start_factor,
                             cfg.end_factor), EVERY_BATCH)


class Schedule:
    """The registered schedule `cfg.name` and the moment it must be stepped: after each batch, after
    each epoch, or after validation with its loss. It also holds at 0 the learning rate of each param group a
    model trains for its first epochs only (FREEZE_KEY), from that epoch's first step on, whatever the
    schedule sets (`steps_done`: the optimizer steps done in this run's steps per epoch, put back by `position`
    on resume)."""

    def __init__(self, cfg: SchedConfig, optimizer: torch.optim.Optimizer, epochs: float, steps_per_epoch: int):
        self.name = cfg.name
        self.optimizer = optimizer
        self.scheduler, self.every = SCHEDULES.get(cfg.name)(cfg, optimizer, epochs, steps_per_epoch)
        if self.every not in (EVERY_BATCH, EVERY_EPOCH, ON_VAL_LOSS):
            raise ValueError(f"sched.name={cfg.name!r} steps every {self.every!r}: expected "
                             f"{EVERY_BATCH}, {EVERY_EPOCH} or {ON_VAL_LOSS}")
        # (group index, the first step it no longer trains in): epochs x steps per epoch, rounded to a step. An
        # index, not the group: loading a checkpoint's optimizer state replaces the group dicts
        self.freezes = [(i, round(group[FREEZE_KEY] * steps_per_epoch))
                        for i, group in enumerate(optimizer.param_groups) if FREEZE_KEY in group]
        self.steps_done = 0
        self.position(0)

    @property
    def per_batch(self) -> bool:
        return self.every == EVERY_BATCH

    def position(self, steps_done: int) -> None:
        """At `steps_done` optimizer steps (0, or where a resumed run stands): the frozen groups' learning rates."""
        self.steps_done = steps_done
        self._hold_frozen()

    def _hold_frozen(self) -> None:
        for index, first_frozen_step in self.freezes:
            if self.steps_done >= first_frozen_step:
                self.optimizer.param_groups[index]["lr"] = 0.0  # a host float: the captured step's device copy follows it (device_optim)

    def after_batch(self) -> None:
        if self.per_batch:
            self.scheduler.step()  # type: ignore[union-attr]
        self.steps_done += 1
        if self.freezes:
            self._hold_frozen()

    def after_epoch(self, val_loss: Optional[float]) -> None:
        """After each epoch; `val_loss` is None for an epoch that was not validated (train.eval_every), which
        a schedule stepped on the validation loss skips."""
        if self.scheduler is None or self.per_batch:
            return
        if self.every == ON_VAL_LOSS:
            if val_loss is not None:
                self.scheduler.step(val_loss)  # type: ignore[union-attr]
        else:
            self.scheduler.step()  # type: ignore[union-attr]
        if self.freezes:
            self._hold_frozen()  # a schedule that sets every group's rate anew (cosine's floor) leaves it 0

    def lr(self) -> float:
        """The learning rate of the weights (the first param group; 1-d parameters may have theirs scaled)."""
        return float(self.optimizer.param_groups[0]["lr"])

    def state_dict(self) -> dict:
        return self.scheduler.state_dict() if self.scheduler is not None else {}  # type: ignore[union-attr]

    def load_state_dict(self, state: dict) -> None:
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state)  # type: ignore[union-attr]
