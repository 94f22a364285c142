"""The tutorial's models, each registered under its name (`model.name`).

Every builder takes the dataset's shape (`in_channels`, `image_size`, `num_classes`) so the
same names work on CIFAR-10 (3x32x32) and MNIST (1x28x28). `CIFAR10_CNN` is the tutorial's
case-study network: three stages of two 3x3 conv-BN-ReLU blocks and a 2x2 max-pool
(32, 64, 128 channels), then Linear(2048, 256) - ReLU - Dropout - Linear(256, 10):
815,018 parameters on CIFAR-10.

`model.name` also takes models from outside the registry (fasttrain.models.build.build_model):
`torchvision:<name>` and `package.module:callable` (fasttrain.models.imported).
"""

from __future__ import annotations

from typing import List, Sequence

import torch
from torch import nn

from fasttrain.config import MODELS, ModelConfig


class SimpleModel(nn.Module):
    """The tutorial's first model: a single linear layer on the flattened image."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.flatten(x))


def mlp_layers(in_features: int, hidden_sizes: Sequence[int], num_classes: int, dropout: float) -> List[nn.Module]:
    """The MLP's layers: Flatten, Linear-ReLU per hidden size, Dropout, Linear. Both versions below
    hold exactly these, in this order, so their state_dict keys differ only by MLP's `layers.` prefix."""
    layers: List[nn.Module] = [nn.Flatten()]
    width = in_features
    for hidden in hidden_sizes:
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    return layers + [nn.Dropout(dropout), nn.Linear(width, num_classes)]


class MLP(nn.Module):
    """The tutorial's multi-layer perceptron, class version."""

    def __init__(self, in_features: int, hidden_sizes: Sequence[int], num_classes: int, dropout: float = 0.0):
        super().__init__()
        self.layers = nn.Sequential(*mlp_layers(in_features, hidden_sizes, num_classes, dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def mlp_sequential(in_features: int, hidden_sizes: Sequence[int], num_classes: int, dropout: float = 0.0) -> nn.Sequential:
    """The tutorial's nn.Sequential version of the MLP (the same layers, no class)."""
    return nn.Sequential(*mlp_layers(in_features, hidden_sizes, num_classes, dropout))


class ConvBlock(nn.Module):
    """The tutorial's reusable block: 3x3 conv (same padding) - BatchNorm - ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        self.bn = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


class CNN(nn.Module):
    """The tutorial's small CNN built from ConvBlocks: two blocks, each followed by a 2x2 pool."""

    def __init__(self, in_channels: int, image_size: int, num_classes: int):
        super().__init__()
        self.features = nn.Sequential(
            ConvBlock(in_channels, 32), nn.MaxPool2d(2),
            ConvBlock(32, 64), nn.MaxPool2d(2),
        )
        side = image_size // 4
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(64 * side * side, 128), nn.ReLU(inplace=True), nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class CIFAR10_CNN(nn.Module):
    """The tutorial's case study (815,018 parameters on 3x32x32 inputs with 10 classes)."""

    def __init__(self, in_channels: int = 3, image_size: int = 32, num_classes: int = 10, dropout: float = 0.5):
        super().__init__()
        self.features = nn.Sequential(
            ConvBlock(in_channels, 32), ConvBlock(32, 32), nn.MaxPool2d(2),
            ConvBlock(32, 64), ConvBlock(64, 64), nn.MaxPool2d(2),
            ConvBlock(64, 128), ConvBlock(128, 128), nn.MaxPool2d(2),
        )
        side = image_size // 8
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(128 * side * side, 256), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(256, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


# --------------------------------------------------------------------------- the registered builders
# each: (model config, in_channels, image_size, num_classes) -> the model; registered in the order
# that `--help` and error messages list them


@MODELS.register("SimpleModel")
def simple_model(cfg: ModelConfig, in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    return SimpleModel(in_channels * image_size * image_size, num_classes)


@MODELS.register("MLP")
def mlp(cfg: ModelConfig, in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    return MLP(in_channels * image_size * image_size, cfg.hidden_sizes, num_classes, cfg.dropout)


@MODELS.register("MLPSequential")
def mlp_sequential_model(cfg: ModelConfig, in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    return mlp_sequential(in_channels * image_size * image_size, cfg.hidden_sizes, num_classes, cfg.dropout)


@MODELS.register("CNN")
def cnn(cfg: ModelConfig, in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    return CNN(in_channels, image_size, num_classes)


@MODELS.register("CIFAR10_CNN")
def cifar10_cnn(cfg: ModelConfig, in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    return CIFAR10_CNN(in_channels, image_size, num_classes, cfg.dropout)
