"""The `gpu` loader: the whole split resident on the device as uint8, augmented in whole batches.

The split is copied to the device once. Each epoch, this rank's sample order comes from the same
`ShardedBatches` plan as the plain loader (one host->device copy of the index list per epoch),
and every sample's crop offset and flip are drawn once per epoch from (seed, epoch) for the whole
split, so augmentation is a function of (seed, epoch, index) whatever the world size. When the
epoch starts, this rank's whole shard is gathered in its order, cropped and flipped (one gather,
zeros or the mirrored image outside it, as RandomCrop(padding=p, padding_mode=...)) and normalized into the requested dtype and
memory format, in chunks, as airbench does; a batch is then two slices of that epoch tensor, views
that launch nothing. No per-sample Python, no host round trip and no device op per step.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Iterator, Sequence, Tuple

import numpy as np
import torch

from fasttrain.data.sharding import ShardedBatches, ShardLoader

# samples augmented and normalized at a time when an epoch starts (temporaries ~ 8192 x 3x40x40 floats)
EPOCH_CHUNK = 8192


def crop_flip(images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, padding: int,
              padding_mode: str = "zeros") -> torch.Tensor:
    """Batched RandomCrop(size, padding, padding_mode) + horizontal flip of uint8 NCHW images.

    `offsets` (B, 2) are the crop's top-left corner in the padded image, in 0..2*padding (torchvision's
    i, j); `flips` (B,) bool. Output pixels that fall in the padding are zero (`zeros`) or the image
    mirrored at its edge without repeating the edge pixel (`reflect`, padding < the image side).
    """
    batch, channels, height, width = images.shape
    mode = "reflect" if padding_mode == "reflect" else "constant"
    padded = torch.nn.functional.pad(images, (padding, padding, padding, padding), mode=mode)
    device = images.device
    rows = offsets[:, 0:1] + torch.arange(height, device=device)  # (B, H) rows of the padded image
    cols = torch.arange(width, device=device).expand(batch, width)
    cols = torch.where(flips[:, None], width - 1 - cols, cols) + offsets[:, 1:2]  # flip = read columns backwards
    b = torch.arange(batch, device=device)[:, None, None, None]
    c = torch.arange(channels, device=device)[None, :, None, None]
    return padded[b, c, rows[:, None, :, None], cols[:, None, None, :]]


def epoch_augmentation(seed: int, epoch: int, num_samples: int, padding: int, hflip: bool,
                       alternate: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Every sample's crop corner (i, j in 0..2*padding, as torchvision's RandomCrop draws them) and
    flip for one epoch, drawn on the host from (seed, epoch). Shared by the gpu and dali loaders.
    `alternate` (aug.flip_alternate): each sample flipped every other epoch instead (alternating_flips)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch + 7_919)
    corners = torch.randint(0, 2 * padding + 1, (num_samples, 2), generator=gen)
    if hflip and alternate:
        return corners, alternating_flips(seed, epoch, num_samples)
    flips = torch.rand(num_samples, generator=gen) < 0.5 if hflip else torch.zeros(num_samples, dtype=torch.bool)
    return corners, flips


def alternating_flips(seed: int, epoch: int, num_samples: int) -> torch.Tensor:
    """Each sample mirrored in every other epoch, starting in epoch 0 or 1 as one coin per sample drawn from the
    seed alone (the speed records' flips: every image is seen both ways within any two epochs)."""
    # a stream of its own: the per-epoch draws use seed * 1_000_003 + epoch + a positive constant
    start = torch.randint(0, 2, (num_samples,), generator=torch.Generator().manual_seed(seed * 1_000_003 - 1))
    return (start + epoch) % 2 == 1


@dataclass(frozen=True)
class BatchFormat:
    """What the gpu and dali loaders deliver: batches on `device`, normalized per channel by `mean` and
    `std` (of pixels in [0, 1]), in `dtype`, channels_last or not."""
    device: torch.device
    mean: Sequence[float]
    std: Sequence[float]
    dtype: torch.dtype = torch.float32
    channels_last: bool = False


@dataclass(frozen=True)
class CropFlip:
    """Their augmentation, drawn per sample from (seed, epoch): a crop of the image padded by `crop_padding`
    (0 = none) with zeros or its mirror image (`padding_mode`), and a horizontal flip with probability 1/2
    when `hflip` (every other epoch when `alternate`)."""
    crop_padding: int = 0
    hflip: bool = False
    seed: int = 0
    alternate: bool = False
    padding_mode: str = "zeros"


class GpuLoader(ShardLoader):
    """Loader contract as in `fasttrain.data.sharding`: (images, labels) on the device, set_epoch, len."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, batches: ShardedBatches, fmt: BatchFormat,
                 aug: CropFlip = CropFlip()):
        device, mean, std = fmt.device, fmt.mean, fmt.std
        # one copy of the split to the device, as uint8 NCHW; the cached arrays are read-only and are
        # only read here (.contiguous() after the permute copies, on the CPU too)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            self.images = torch.from_numpy(images).to(device).permute(0, 3, 1, 2).contiguous()
        self.labels = torch.tensor(labels, dtype=torch.int64, device=device)
        self.batches = batches
        self.device = device
        mean_t = torch.tensor(list(mean), dtype=torch.float32, device=device)  # one value per channel
        std_t = torch.tensor(list(std), dtype=torch.float32, device=device)
        # normalize as one multiply-add: x/255 -> (x/255 - mean)/std
        self.scale = (1.0 / (255.0 * std_t)).view(1, -1, 1, 1)
        self.shift = (-mean_t / std_t).view(1, -1, 1, 1)
        self.dtype = fmt.dtype
        self.memory_format = torch.channels_last if fmt.channels_last else torch.contiguous_format
        self.crop_padding, self.hflip, self.seed, self.alternate = aug.crop_padding, aug.hflip, aug.seed, aug.alternate
        self.padding_mode = aug.padding_mode

    @property
    def num_samples(self) -> int:
        return int(self.labels.shape[0])

    def _normalize(self, images: torch.Tensor) -> torch.Tensor:
        out = images.float().mul_(self.scale).add_(self.shift)
        return out.to(dtype=self.dtype, memory_format=self.memory_format)

    def epoch_tensors(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """This rank's samples of the current epoch, in order, augmented and normalized: (images, labels)."""
        shard = self.batches.shard().to(self.device)  # this rank's order: one copy per epoch
        augment = self.crop_padding > 0 or self.hflip
        if augment:
            corners, flips = epoch_augmentation(self.seed, self.batches.epoch, self.num_samples, self.crop_padding,
                                                self.hflip, self.alternate)
            corners, flips = corners.to(self.device), flips.to(self.device)
        _, channels, height, width = self.images.shape
        # a fresh tensor each epoch: batches an earlier epoch handed out stay valid while someone holds them
        images = torch.empty((shard.shape[0], channels, height, width), dtype=self.dtype, device=self.device,
                             memory_format=self.memory_format)
        for start in range(0, shard.shape[0], EPOCH_CHUNK):  # chunks bound the temporaries (padded, float32)
            index = shard[start : start + EPOCH_CHUNK]
            chunk = self.images[index]
            if augment:
                chunk = crop_flip(chunk, corners[index], flips[index], self.crop_padding, self.padding_mode)
            images[start : start + EPOCH_CHUNK] = self._normalize(chunk)
        return images, self.labels[shard]

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        images, labels = self.epoch_tensors()
        size = self.batches.batch_size
        for start in range(0, labels.shape[0], size):
            yield images[start : start + size], labels[start : start + size]  # views: nothing launched
