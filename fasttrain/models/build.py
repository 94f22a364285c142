"""The model a config names: a registered builder (the tutorial's, fasttrain.models.tutorial, or one of
yours), `torchvision:<name>` or `package.module:callable` (fasttrain.models.imported); and the summary a
run logs of it.
"""

from __future__ import annotations

from torch import nn

from fasttrain.config import MODELS, TORCHVISION_PREFIX, ModelConfig
from fasttrain.models.imported import check_output, check_parameters, imported_model, torchvision_model


def build_model(cfg: ModelConfig, in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    """The model `cfg.name` names, for inputs of this shape: a registered name, `torchvision:<name>`
    (`torchvision_model`) or `package.module:callable` (`imported_model`). The last two are checked
    against the data (`check_output`) before they are returned."""
    if cfg.name in MODELS or ":" not in cfg.name:
        return MODELS.get(cfg.name)(cfg, in_channels, image_size, num_classes)
    if cfg.name.startswith(TORCHVISION_PREFIX):
        model = torchvision_model(cfg.name[len(TORCHVISION_PREFIX):], cfg.kwargs, in_channels, image_size, num_classes)
    else:
        model = imported_model(cfg.name, cfg.kwargs, in_channels, image_size, num_classes)
    check_parameters(model, cfg.name)
    check_output(model, cfg.name, in_channels, image_size, num_classes)
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def summarize(model: nn.Module, name: str) -> str:
    """A short model summary: top-level children with their parameter counts, and the total."""
    lines = [f"model {name}: {count_parameters(model):,} parameters "
             f"({sum(p.numel() for p in model.parameters() if p.requires_grad):,} trainable)"]
    for child_name, child in model.named_children():
        lines.append(f"  {child_name:<12} {type(child).__name__:<12} {count_parameters(child):>12,}")
    return "\n".join(lines)
