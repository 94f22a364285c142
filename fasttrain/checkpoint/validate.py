"""A checkpoint's contents checked key by key before anything reads them: each key fasttrain writes has
the type it is written with, the weights are finite, and the saved config is one this fasttrain accepts.
`checkpoint_problem` says what is wrong in words; fasttrain.checkpoint.io.load_checkpoint refuses such a
file with it.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from fasttrain.config import WORKERS_PER_CPU, Config, from_dict
from fasttrain.errors import UserError

CONFIG_SECTIONS = tuple(f.name for f in dataclasses.fields(Config) if dataclasses.is_dataclass(f.default_factory))


def _shown(value: Any) -> str:
    """A value as an error message shows it: short, one line."""
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, (dict, list, tuple)) and len(repr(value)) > 40:
        return f"a {type(value).__name__} of {len(value)} items"
    text = repr(value).replace("\n", " ")
    return text if len(text) <= 40 else text[:37] + "..."


def _is_int(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_tensor_dict(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())


def _is_rank_state(value: Any) -> bool:
    """One rank's entry of `ranks`, as state.capture writes it and state.restore reads it."""
    if not isinstance(value, dict) or not {"rng", "buffers", "epoch_totals"} <= value.keys():
        return False
    rng = value["rng"]
    numpy_rng = rng.get("numpy") if isinstance(rng, dict) else None
    return (isinstance(rng, dict) and isinstance(rng.get("python"), tuple) and isinstance(numpy_rng, dict)
            and isinstance(numpy_rng.get("key"), torch.Tensor) and _is_int(numpy_rng.get("pos"), 0)
            and isinstance(rng.get("torch"), torch.Tensor) and _is_tensor_dict(value["buffers"])
            and (value["epoch_totals"] is None or isinstance(value["epoch_totals"], torch.Tensor))
            and _is_tensor_dict(value.get("lookahead_buffers", {})))


# key -> (the check, what it must be); the optional keys are checked when present
_CHECKS: Dict[str, Tuple[Callable[[Any], bool], str]] = {
    "model": (_is_tensor_dict, "a state dict of named tensors"),
    "optimizer": (lambda v: isinstance(v, dict) and isinstance(v.get("state"), dict)
                  and isinstance(v.get("param_groups"), list) and all(isinstance(g, dict) for g in v["param_groups"]),
                  "an optimizer state dict (state, param_groups)"),
    "scheduler": (lambda v: isinstance(v, dict), "a scheduler state dict"),
    "epoch": (lambda v: _is_int(v, 0), "an integer >= 0"),
    "config": (lambda v: isinstance(v, dict) and all(isinstance(k, str) for k in v)
               and all(isinstance(v[k], dict) for k in CONFIG_SECTIONS if k in v),
               "a dict of config sections (data, model, optim, train, ...)"),
    "global_step": (lambda v: _is_int(v, 0), "an integer >= 0"),
    "step_in_epoch": (lambda v: _is_int(v, 0), "an integer >= 0"),
    "sample_in_epoch": (lambda v: _is_int(v, 0), "an integer >= 0"),
    "best_epoch": (lambda v: _is_int(v, 0), "an integer >= 0"),
    "best_val_acc": (_is_number, "a number"),
    "val_acc": (_is_number, "a number"),
    "val_loss": (_is_number, "a number"),
    "world_size": (lambda v: _is_int(v, 1), "an integer >= 1"),
    "batch_size": (lambda v: _is_int(v, 1), "an integer >= 1"),
    "history": (lambda v: isinstance(v, list) and all(isinstance(r, dict) for r in v), "a list of dicts"),
    "classes": (lambda v: isinstance(v, list) and all(isinstance(c, str) for c in v), "a list of class names"),
    "ranks": (lambda v: v is None or (isinstance(v, list) and all(_is_rank_state(r) for r in v)),
              "a list of per-rank states (rng, buffers, epoch_totals) or None"),
    "scaler": (lambda v: v is None or isinstance(v, dict), "a GradScaler state dict or None"),
    "ema": (lambda v: isinstance(v, dict) and _is_int(v.get("updates"), 0) and _is_tensor_dict(v.get("weights")),
            "the EMA's updates and weights"),
    "lookahead": (lambda v: isinstance(v, dict) and _is_tensor_dict(v.get("weights")), "lookahead's slow weights"),
}


def checkpoint_problem(state: Dict[str, Any]) -> Optional[str]:
    """What is wrong with a checkpoint dict, in words ("epoch is 'abc', expected an integer >= 0"), or
    None when every key present has the type fasttrain writes and its config is one fasttrain accepts."""
    for key, (ok, expected) in _CHECKS.items():
        if key in state and not ok(state[key]):
            return f"{key} is {_shown(state[key])}, expected {expected}"
    broken = next((name for name, tensor in state["model"].items()
                   if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())), None)
    if broken:
        return f"its weight {broken} holds nan/inf (saved from a diverged run)"
    try:
        from_dict(portable_config(state["config"]))  # the saved config itself: known keys, accepted values
    except UserError as err:
        return f"its config: {str(err).removeprefix('config error: ')}"
    except Exception as err:  # noqa: BLE001 - untrusted data: OmegaConf may refuse it in other ways
        return f"its config cannot be read ({type(err).__name__})"
    return None


def portable_config(saved: Dict[str, Any]) -> Dict[str, Any]:
    """A checkpoint's config as this machine can use it: a worker count above this machine's bound (the
    file came from a larger machine; a key that never changes what is computed) becomes -1, auto."""
    data = saved.get("data")
    workers = data.get("num_workers") if isinstance(data, dict) else None
    if isinstance(workers, int) and workers > WORKERS_PER_CPU * (os.cpu_count() or 1):
        return {**saved, "data": {**data, "num_workers": -1}}
    return saved
