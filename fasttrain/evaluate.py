"""Evaluate a saved checkpoint on the test split, with the config it was trained with."""

from __future__ import annotations

from typing import Sequence

from fasttrain import config as config_mod
from fasttrain.checkpoint import load_checkpoint, load_model_state
from fasttrain.data import build_eval_loader
from fasttrain.device import resolve_device
from fasttrain.engine import EvalStats, validate
from fasttrain.errors import UserError
from fasttrain.models import build_model


def evaluate_checkpoint(path: str, overrides: Sequence[str] = ()) -> tuple[EvalStats, dict]:
    """(stats on the test split, the checkpoint). Overrides such as data.root=... or
    train.device=cpu apply on top of the checkpoint's own config."""
    ckpt = load_checkpoint(path)
    try:
        cfg = config_mod.from_dict(ckpt["config"], overrides)
    except UserError as err:
        raise UserError(f"checkpoint {path}: {err}") from None
    device = resolve_device(cfg.train.device)
    loader, info = build_eval_loader(cfg, device)
    model = build_model(cfg.model, info.in_channels, info.image_size, info.num_classes).to(device)
    load_model_state(model, ckpt["model"], str(path))
    return validate(model, loader, device), ckpt
