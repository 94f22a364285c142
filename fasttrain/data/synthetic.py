"""A synthetic dataset of CIFAR shape whose classes are learnable.

Each class has a faint smooth random colour pattern (a 4x4x3 grid upsampled to the image size);
an image is its class pattern plus pixel noise stronger than the pattern. The class survives
crops and flips (the colour balance carries most of the signal), so a short run reaches well
above chance without being trivial, which is what tests and throughput runs need.
Deterministic in `seed`.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np
import torch
import torch.nn.functional as F

NUM_CLASSES = 10
CLASSES = tuple(f"class_{i}" for i in range(NUM_CLASSES))


def make_synthetic(num_images: int, seed: int, image_size: int = 32, channels: int = 3,
                   noise: float = 64.0, contrast: float = 40.0) -> Tuple[np.ndarray, np.ndarray]:
    """(N, H, W, C) uint8 images and (N,) int64 labels; the class patterns depend only on C, H."""
    patterns_gen = torch.Generator().manual_seed(1234)  # same classes for the train and test splits
    grid = torch.rand(NUM_CLASSES, channels, 4, 4, generator=patterns_gen)
    patterns = F.interpolate(grid, size=(image_size, image_size), mode="bilinear", align_corners=False)
    patterns = 128.0 + contrast * (patterns - 0.5)  # (K, C, H, W), a faint pattern around mid-grey

    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, NUM_CLASSES, (num_images,), generator=gen)
    pixels = patterns[labels] + noise * torch.randn(num_images, channels, image_size, image_size, generator=gen)
    images = pixels.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    return images.numpy(), labels.numpy().astype(np.int64)
