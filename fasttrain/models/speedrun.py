"""SpeedNet: the speed-run network of the CIFAR-10 records (airbench94's architecture, written from the
paper's description, arXiv 2404.00498), registered as `model.name=SpeedNet`.

    whitening  2x2 convolution, 24 channels: the eigenvectors of the training images' 2x2 patch covariance,
               each scaled by 1/sqrt(eigenvalue + eps), and their negations; set from the data (init_from_data),
               never trained (its bias trains for the first WHITEN_BIAS_EPOCHS epochs, then stays)
    GELU
    3 blocks   conv3x3 -> max-pool 2 -> BatchNorm -> GELU -> conv3x3 -> BatchNorm -> GELU, widths 64, 256, 256
    head       max-pool to 1x1, a linear layer without bias, a fixed output scale of 1/9

Convolutions have no bias and start as identity (dirac) filters on their first input channels; BatchNorm
has frozen unit weights and trainable biases, momentum 0.6 in the records' sense (PyTorch's 0.4), eps 1e-12.

`init_from_data` is the data hook any model may define (fasttrain.train.build calls it with a sample of
normalized training images before training starts); here it sets the whitening filters. `freeze_after_epochs`
is the other hook: parameters trained for the first epochs only (fasttrain.train.optim holds their learning
rate at 0 from then on); here the whitening bias.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from fasttrain.config import MODELS, ModelConfig

WIDTHS = (64, 256, 256)
WHITEN_EPS = 5e-4  # added to each eigenvalue: directions of almost no variance are not blown up to unit scale
BN_MOMENTUM = 0.4  # PyTorch's convention (weight of the new batch): the records' 0.6 is the old statistics' weight
BN_EPS = 1e-12
WHITEN_BIAS_EPOCHS = 3  # the records train the whitening bias for the first 3 epochs, then freeze it
OUTPUT_SCALE = 1 / 9


class Whitening(nn.Conv2d):
    """2x2 patches -> 2 x (in_channels x 4) channels: whitened patch coordinates and their negations (so that
    the GELU after it keeps both signs). The filters are data, not parameters: set by `init_from_data`."""

    def __init__(self, in_channels: int, eps: float = WHITEN_EPS):
        patch = in_channels * 2 * 2
        super().__init__(in_channels, 2 * patch, kernel_size=2, padding=0, bias=True)
        self.eps = eps
        self.weight.requires_grad_(False)

    @torch.no_grad()
    def init_from_data(self, images: torch.Tensor) -> None:
        """Filters from `images` (N, C, H, W), normalized as training sees them: the patch covariance's
        eigenvectors (float64 on the CPU, so every rank and device gets the same filters), scaled by
        1/sqrt(eigenvalue + eps), then their negations. The bias is zeroed."""
        c = self.in_channels
        # every 2x2 patch as a row of C*2*2 values, in the weight's (channel, row, column) order
        patches = images.detach().to("cpu", torch.float64).unfold(2, 2, 1).unfold(3, 2, 1)  # N, C, H-1, W-1, 2, 2
        rows = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, c * 4)
        centred = rows - rows.mean(dim=0)
        covariance = centred.T @ centred / (rows.shape[0] - 1)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)  # ascending
        filters = (eigenvectors / torch.sqrt(eigenvalues + self.eps)).T.flip(0)  # largest variance first
        filters = filters.reshape(c * 4, c, 2, 2)
        self.weight.copy_(torch.cat([filters, -filters]).to(self.weight.dtype))
        self.bias.zero_()


def _conv(in_channels: int, out_channels: int) -> nn.Conv2d:
    """3x3, no bias; the first `in_channels` filters pass their own input channel through (dirac)."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False)
    with torch.no_grad():
        nn.init.dirac_(conv.weight[:min(in_channels, out_channels)])
    return conv


def _norm(channels: int) -> nn.BatchNorm2d:
    norm = nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)
    norm.weight.requires_grad_(False)  # stays 1: the scale is the next convolution's to learn
    return norm


class SpeedBlock(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(_conv(in_channels, out_channels), nn.MaxPool2d(2), _norm(out_channels), nn.GELU(),
                         _conv(out_channels, out_channels), _norm(out_channels), nn.GELU())


class SpeedNet(nn.Module):
    freeze_after_epochs = {"whiten.bias": WHITEN_BIAS_EPOCHS}

    def __init__(self, in_channels: int, num_classes: int, widths: Sequence[int] = WIDTHS):
        super().__init__()
        self.whiten = Whitening(in_channels)
        self.activation = nn.GELU()
        channels = [self.whiten.out_channels, *widths]
        self.blocks = nn.Sequential(*(SpeedBlock(a, b) for a, b in zip(channels, channels[1:])))
        self.pool = nn.AdaptiveMaxPool2d(1)  # 3x3 -> 1x1 on 32 px images, as the records' final max-pool
        self.head = nn.Linear(widths[-1], num_classes, bias=False)

    def init_from_data(self, images: torch.Tensor) -> None:
        self.whiten.init_from_data(images)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.activation(self.whiten(x)))
        return self.head(self.pool(x).flatten(1)) * OUTPUT_SCALE


@MODELS.register("SpeedNet")
def speednet(cfg: ModelConfig, in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    # three halvings after the 2x2 whitening (side - 1): 32 px -> 31 -> 15 -> 7 -> 3
    if image_size - 1 < 8:
        from fasttrain.errors import ConfigError

        raise ConfigError(f"config error: model.name=SpeedNet needs images of at least 9 px (three 2x2 max-pools "
                          f"after a 2x2 convolution); these are {image_size} px")
    return SpeedNet(in_channels, num_classes)
