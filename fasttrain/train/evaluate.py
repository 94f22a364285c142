"""Evaluate a saved checkpoint on the test split, with the config it was trained with.

Runs on one process or under torchrun (every test image is counted once across ranks). A checkpoint of
a run that kept an EMA of its weights is evaluated with the averaged weights, as its validation was
(`train.ema_decay=0` evaluates the trained ones); `train.tta` applies as in training, and can be set
here (`train.tta=flip`).

A checkpoint is data: the model it names is built only when that is no import of code. A registered
name or torchvision:<name> is built as saved; a `package.module:callable` (your own model) must be
named again on the command line (`model.name=...`), so that a file never chooses code to run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from fasttrain import config as config_mod
from fasttrain import dist
from fasttrain.train.build import model_on_device
from fasttrain.checkpoint import load_checkpoint, load_model_state
from fasttrain.checkpoint.validate import portable_config
from fasttrain.config import TORCHVISION_PREFIX
from fasttrain.models.imported import SCRIPT_MODULE
from fasttrain.data import build_eval_loader
from fasttrain.errors import UserError
from fasttrain.train.precision import build_precision
from fasttrain.train.validation import EvalStats, validate


@dataclass(frozen=True)
class CheckpointEvaluation:
    stats: EvalStats  # on the test split
    checkpoint: dict
    weights: str  # "ema" (the averaged weights) or "trained"
    tta: str  # the test-time augmentation used


def evaluate_checkpoint(path: str, overrides: Sequence[str] = ()) -> CheckpointEvaluation:
    """The checkpoint's accuracy and loss on the test split. Overrides such as data.root=... or
    train.device=cpu apply on top of the checkpoint's own config."""
    ckpt = load_checkpoint(path)
    _refuse_imports_named_by_the_file(path, ckpt["config"], overrides)
    try:
        cfg = config_mod.from_dict(portable_config(ckpt["config"]), overrides)
    except UserError as err:
        raise UserError(f"checkpoint {path}: {err}") from None
    ctx = dist.setup(cfg.train.device, cfg.dist.backend, cfg.dist.timeout_s, cfg.train.precision, cfg.train.compile)
    try:
        precision = build_precision(cfg.train.precision, ctx.device, cfg.train.tf32)
        loader, info = build_eval_loader(cfg, ctx.device, ctx.rank, ctx.world_size, precision.input_dtype)
        _check_classes(path, ckpt, info.classes, cfg.data.root)
        model = model_on_device(cfg, info, ctx.device)
        weights = dict(ckpt["model"])
        which = "ema" if cfg.train.ema_decay > 0 and "ema" in ckpt else "trained"
        if which == "ema":
            weights.update(ckpt["ema"]["weights"])  # the averaged parameters; buffers are the trained model's
        load_model_state(model, weights, str(path))
        return CheckpointEvaluation(validate(model, loader, precision, cfg.train.tta), ckpt, which, str(cfg.train.tta))
    finally:
        dist.teardown()


def _check_classes(path: str, ckpt: dict, classes: Sequence[str], root: str) -> None:
    """Label i must mean the same class for the model and the data: an accuracy over other classes, or the
    same ones in another order, would be a number about nothing. Checkpoints record their classes (from
    this version on); an older one without them is checked by its model's output size as it loads."""
    saved = ckpt.get("classes")
    if saved is None or list(saved) == list(classes):
        return
    only_model = [name for name in saved if name not in classes]
    only_data = [name for name in classes if name not in saved]
    if only_model or only_data:
        differ = "; ".join(part for part in (f"only in the checkpoint: {', '.join(only_model)}" if only_model else "",
                                             f"only in the data: {', '.join(only_data)}" if only_data else "") if part)
    else:
        differ = f"the same names in another order: {', '.join(saved)} vs {', '.join(classes)}"
    raise UserError(f"checkpoint {path} was trained on {len(saved)} classes and data.root={root} holds "
                    f"{len(classes)} ({differ}): evaluate on data with the checkpoint's class folders (the same "
                    f"names), or train a model on these classes")


def _refuse_imports_named_by_the_file(path: str, saved: dict, overrides: Sequence[str]) -> None:
    name = str(saved.get("model", {}).get("name", ""))
    if ":" not in name or name.startswith((TORCHVISION_PREFIX, f"{SCRIPT_MODULE}:")):
        return  # a registered model, torchvision's, or a script's class (refused with its own line): no import
    if any(override.split("=", 1)[0].strip() == "model.name" for override in overrides):
        return  # the user chose the model to build, on the command line
    raise UserError(f"checkpoint {path} names its model by import (model.name={name!r}) and fasttrain imports no "
                    f"code that a file names: if you trust that module, name it yourself: fasttrain eval {path} "
                    f"model.name={name}")
