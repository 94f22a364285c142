"""Evaluate a saved checkpoint on the test split, with the config it was trained with.

Runs on one process or under torchrun (every test image is counted once across ranks).
"""

from __future__ import annotations

from typing import Sequence

from fasttrain import config as config_mod
from fasttrain import dist
from fasttrain.build import model_on_device
from fasttrain.checkpoint import load_checkpoint, load_model_state
from fasttrain.data import build_eval_loader
from fasttrain.engine import EvalStats, validate
from fasttrain.errors import UserError
from fasttrain.precision import build_precision


def evaluate_checkpoint(path: str, overrides: Sequence[str] = ()) -> tuple[EvalStats, dict]:
    """(stats on the test split, the checkpoint). Overrides such as data.root=... or
    train.device=cpu apply on top of the checkpoint's own config."""
    ckpt = load_checkpoint(path)
    try:
        cfg = config_mod.from_dict(ckpt["config"], overrides)
    except UserError as err:
        raise UserError(f"checkpoint {path}: {err}") from None
    ctx = dist.setup(cfg.train.device, cfg.dist.backend, cfg.dist.timeout_s, cfg.train.precision, cfg.train.compile)
    try:
        precision = build_precision(cfg.train.precision, ctx.device, cfg.train.tf32)
        loader, info = build_eval_loader(cfg, ctx.device, ctx.rank, ctx.world_size, precision.input_dtype)
        model = model_on_device(cfg, info, ctx.device)
        load_model_state(model, ckpt["model"], str(path))
        return validate(model, loader, precision), ckpt
    finally:
        dist.teardown()
