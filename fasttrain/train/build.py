"""A run's parts from its Config: data, model, optimizer, schedule, precision and the step.

`model_on_device` is shared with evaluation (fasttrain.train.evaluate); `build_parts` adds what training
needs: the compiled model, DDP where there are other ranks (`fasttrain.dist.ddp`), the optimizer, the schedule
and the step (`fasttrain.train.step`: eager, or the whole step captured). Both take an optional `model`, a
module the caller built (`fasttrain.fit(model=...)`), which then replaces the config's model once it
is checked against the data as an imported model.name is (`fasttrain.models.imported.check_output`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from torch import nn

from fasttrain import dist
from fasttrain.config import Config
from fasttrain.data import DatasetInfo, Loader, build_loaders
from fasttrain.dist.ddp import wrap_ddp
from fasttrain.dist.device import seed_everything
from fasttrain.errors import UserError
from fasttrain.models import build_model, check_output, summarize
from fasttrain.observe import timing
from fasttrain.observe.flops import flops_per_image, peak_flops
from fasttrain.train.averaging import Averages, build_averages
from fasttrain.train.optim import Schedule, build_optimizer, peak_lr
from fasttrain.train.precision import Precision, build_precision
from fasttrain.train.step import CapturedStep, EagerStep, Step
from fasttrain.train.validation import Evaluator


def model_on_device(cfg: Config, info: DatasetInfo, device: torch.device,
                    model: Optional[nn.Module] = None) -> nn.Module:
    """cfg.model for `info`'s images and classes, or `model` (built by the caller, moved in place) once it
    fits them; on `device`, channels_last when train.channels_last."""
    if model is None:
        model = build_model(cfg.model, info.in_channels, info.image_size, info.num_classes).to(device)
    else:
        if not any(p.requires_grad for p in model.parameters()):
            raise UserError(f"model {cfg.model.name} has no trainable parameters: give fasttrain.fit a module whose "
                            f"parameters require gradients")
        # the checks of an imported model.name (one forward, on the CPU, nothing changed), then the device
        check_output(model.cpu(), cfg.model.name, info.in_channels, info.image_size, info.num_classes)
        model = model.to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


DATA_INIT_IMAGES = 5000  # the training images a model's data hook sees (SpeedNet's whitening: the records' count)


def init_from_data(model: nn.Module, cfg: Config, logger: logging.Logger) -> None:
    """The data hook: a model (registered, imported or given to fit) with an `init_from_data(images)` method gets
    a seeded sample of normalized training images (fasttrain.data.training_sample) before its first step, on
    the model's device, the same on every rank. A resumed run calls it too; the checkpoint's weights then
    replace what it set."""
    hook = getattr(model, "init_from_data", None)
    if not callable(hook):
        return
    from fasttrain.data import training_sample

    sample = training_sample(cfg.data, DATA_INIT_IMAGES, cfg.train.seed)
    hook(sample.to(next(model.parameters()).device))
    logger.info(f"model {cfg.model.name}: init_from_data on {len(sample):,} training images")


@dataclass
class Parts:
    """What a run is built from. `model` is the plain module (checkpoints, weight digests);
    `step` runs one optimizer step on it (`fasttrain.train.step`: eager, with the model compiled and
    DDP-wrapped as configured, or captured); `averages` are the weight averages kept beside it
    (`fasttrain.train.averaging`; empty when none); `evaluator` runs validation over the model, or over
    the EMA's copy when there is one (`fasttrain.train.validation`: compiled when compiling, captured on
    CUDA when the step is, never DDP: ranks may run different numbers of eval batches)."""
    model: nn.Module
    step: Step  # EagerStep | CapturedStep
    evaluator: Evaluator
    averages: Averages
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    precision: Precision
    train_loader: Loader
    val_loader: Loader
    flops_per_image: float = 0.0  # forward + backward, counted on the model
    peak_flops: Optional[float] = None  # the device's, for this precision; None when unknown
    steps_per_epoch: int = 0  # optimizer steps in a whole epoch (train.limit_train_batches applied)
    classes: Tuple[str, ...] = ()  # the dataset's class names, label i = classes[i]: saved in checkpoints


def build_parts(cfg: Config, ctx: dist.Dist, logger: logging.Logger, model: Optional[nn.Module] = None) -> Parts:
    """The run's parts; `model`, when given, is trained in place of the config's (cfg.model.name names it)."""
    device = ctx.device
    precision = build_precision(cfg.train.precision, device, cfg.train.tf32, cfg.train.deterministic)
    seed_everything(cfg.train.seed)  # same seed on every rank: identical initial weights
    train_loader, val_loader, info = build_loaders(cfg, device, ctx.rank, ctx.world_size, precision.input_dtype)
    clock = timing.clock()
    clock.startup_done("data")
    skipped = train_loader.num_samples - train_loader.batches.used_samples
    logger.info(f"data {info.name}: {train_loader.num_samples:,} train / {val_loader.num_samples:,} test images of "
                f"{info.in_channels}x{info.image_size}x{info.image_size}, {info.num_classes} classes | loader "
                f"{cfg.data.loader}" + (f", {train_loader.num_workers} workers" if cfg.data.loader == "plain" else "")
                # "gpu" names where the split lives on a GPU machine: say where it lives here
                + (f" (the split resident in {device.type} memory)" if cfg.data.loader == "gpu" else "")
                + f" | batch {cfg.train.batch_size} per process x {ctx.world_size} = "
                f"{cfg.train.batch_size * ctx.world_size} per step"
                + (f" | {skipped} images per epoch left out (drop_last, or fewer than one per rank)" if skipped else ""))
    model = model_on_device(cfg, info, device, model)
    init_from_data(model, cfg, logger)
    logger.info(summarize(model, cfg.model.name))
    compiled = cfg.train.compile != "off"
    compile_mode = None if cfg.train.compile == "default" else cfg.train.compile
    torch.manual_seed(cfg.train.seed + ctx.rank)  # per-rank streams for dropout; data randomness is seeded apart
    optimizer = build_optimizer(cfg.optim, model, device, capture=cfg.train.capture,
                                peak=peak_lr(cfg.optim, cfg.sched))
    if compiled or cfg.train.capture:
        # each compiled run starts from torch.compile's first state, as in a new process: one process running
        # fit() again and again (a sweep, a notebook, the test suite) fails the last runs' guards with each new
        # model, and at dynamo's recompile limit (8 per function) it would run the step eagerly from then on,
        # with other numerics and speed and only a warning. Other compiled code of the process recompiles once.
        torch._dynamo.reset()
    step: Step
    if cfg.train.capture:
        step = CapturedStep(model, optimizer, precision, cfg.train.grad_clip, compile_mode, ctx.world_size,
                            cfg.train.label_smoothing, sum_loss=cfg.train.loss_reduction == "sum")
    else:
        # train batches have one shape (drop_last), so the compiled model does not recompile per epoch
        train_model: nn.Module = torch.compile(model, mode=compile_mode) if compiled else model
        if ctx.world_size > 1:
            # only where there are gradients to average: world size 1 pays nothing for a wrapper
            train_model = wrap_ddp(train_model, model, device, compiled)
        step = EagerStep(train_model, optimizer, precision, cfg.train.grad_clip, cfg.train.label_smoothing,
                         sum_over_ranks=ctx.world_size if cfg.train.loss_reduction == "sum" else 0)
    # after the step: a captured step with other ranks has broadcast rank 0's weights, which the averages copy
    steps_per_epoch = min(len(train_loader), cfg.train.limit_train_batches or len(train_loader))
    averages = build_averages(model, cfg.train, steps_per_epoch)
    evaluator = Evaluator(averages.ema.averaged if averages.ema else model, precision, cfg.train.tta,
                          # the eval batch function mutates its sums: no CUDA graphs of torch.compile's own there
                          None if compile_mode == "reduce-overhead" else compile_mode, compiled,
                          pad_to=eval_batch_size(cfg), capture=cfg.train.capture)
    schedule = Schedule(cfg.sched, optimizer, cfg.train.epochs, steps_per_epoch)
    logger.info(f"optim {cfg.optim.name} lr {cfg.optim.lr:g} wd {cfg.optim.weight_decay:g} | sched {cfg.sched.name} "
                f"({'per batch' if schedule.per_batch else 'per epoch'}) | {cfg.train.epochs:g} epochs x "
                f"{steps_per_epoch} steps" + (f" = {cfg.train.total_steps(steps_per_epoch)} steps" if
                                              cfg.train.epochs != cfg.train.epoch_count() else ""))
    logger.info(f"speed: precision {cfg.train.precision}, channels_last {str(cfg.train.channels_last).lower()}, "
                f"compile {cfg.train.compile}, capture {str(cfg.train.capture).lower()}"
                + (", deterministic algorithms" if cfg.train.deterministic else "")
                + (" (whole step as one CUDA graph)" if cfg.train.capture and device.type == "cuda" else
                   " (whole step compiled)" if cfg.train.capture else "")
                + (f", tf32 {str(cfg.train.tf32).lower()}" if device.type == "cuda" else "")
                + (f" | DDP over {ctx.world_size} ranks" if ctx.world_size > 1 and not cfg.train.capture else ""))
    flops = flops_per_image(model, (info.in_channels, info.image_size, info.image_size))
    peak = peak_flops(device, cfg.train.precision, cfg.train.tf32, cfg.train.peak_tflops or None)
    logger.info(f"model cost: {flops / 1e6:,.1f} MFLOP per image (forward + backward); MFU "
                + (f"against {peak / 1e12:,.1f} TFLOP/s per device" if peak else "not reported (peak FLOP/s of "
                   "this device unknown: set train.peak_tflops)"))
    if averages or cfg.train.label_smoothing or cfg.train.tta != "none":
        logger.info("accuracy tools: " + ", ".join(_accuracy_tools(cfg)))
    clock.startup_done("model")
    return Parts(model, step, evaluator, averages, optimizer, schedule, precision, train_loader, val_loader, flops,
                 peak, steps_per_epoch, tuple(info.classes))


def eval_batch_size(cfg: Config) -> int:
    return cfg.train.eval_batch_size or cfg.train.batch_size


def _accuracy_tools(cfg: Config) -> List[str]:
    train = cfg.train
    tools = []
    if train.label_smoothing:
        tools.append(f"label smoothing {train.label_smoothing:g}")
    if train.ema_decay:
        tools.append(f"EMA of the weights (decay {train.ema_decay:g} every {train.ema_every} step(s); validation "
                     f"and best.pt use it)")
    if train.lookahead_k:
        start = ""
        if train.lookahead_start >= train.epochs:  # a recipe run shorter than its lookahead's start: said, not refused
            start = f", from epoch {train.lookahead_start:g}: never in this run of {train.epochs:g} epochs"
        elif train.lookahead_start:
            start = f", from epoch {train.lookahead_start:g}"
        tools.append(f"lookahead (k {train.lookahead_k}, alpha {train.lookahead_alpha:g}{start})")
    if train.tta != "none":
        tools.append(f"test-time augmentation {train.tta}")
    return tools
