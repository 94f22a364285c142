"""The tutorial's torchvision transforms, built from the config.

torchvision is imported when a transform is built, not with this module: importing it pulls in
torch._dynamo (about 2 s of startup on a slow CPU) that the gpu and dali loaders never need.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, List

from fasttrain.config import AugConfig, DataConfig
from fasttrain.errors import ConfigError

if TYPE_CHECKING:
    from torchvision import transforms as T


def per_channel(values: List[float], channels: int, key: str) -> List[float]:
    if len(values) == 1:
        return list(values) * channels
    if len(values) != channels:
        raise ConfigError(f"config error: {key}={list(values)} has {len(values)} values but the dataset has "
                          f"{channels} channel(s): give 1 or {channels} values")
    return list(values)


def normalize(data: DataConfig, channels: int) -> "T.Normalize":
    from torchvision import transforms as T

    return T.Normalize(per_channel(data.mean, channels, "data.mean"), per_channel(data.std, channels, "data.std"))


def fit_to_size(image_size: int) -> "T.Compose":
    """Files of any size -> image_size x image_size: the shorter side resized to it, the centre cropped
    (torchvision's evaluation recipe). What the plain loader evaluates folder images with, and what
    the resident loaders store them as, so both see the same pixels."""
    from torchvision import transforms as T

    return T.Compose([T.Resize(image_size), T.CenterCrop(image_size)])


def train_transform(data: DataConfig, aug: AugConfig, image_size: int, channels: int,
                    from_files: bool = False) -> "T.Compose":
    """Augmentations (in the tutorial's order), then ToTensor and Normalize.

    `from_files` (data.dataset=folder: images of any size): with aug.crop_padding > 0, the image is
    first fitted to image_size (fit_to_size) and then RandomCrop-ped with padding, as the resident
    loaders crop it; with aug.crop_padding=0, RandomResizedCrop(image_size), the ImageNet recipe."""
    from torchvision import transforms as T

    steps: list = []
    if from_files and aug.crop_padding == 0:
        steps.append(T.RandomResizedCrop(image_size))
    elif from_files:
        steps.append(fit_to_size(image_size))
    if aug.crop_padding > 0:
        mode = "reflect" if aug.crop_padding_mode == "reflect" else "constant"
        steps.append(T.RandomCrop(image_size, padding=aug.crop_padding, padding_mode=mode))
    if aug.hflip:
        steps.append(T.RandomHorizontalFlip())
    if aug.rotation > 0:
        steps.append(T.RandomRotation(aug.rotation))
    brightness, contrast, saturation, hue = aug.color_jitter
    if any(v > 0 for v in aug.color_jitter):
        steps.append(T.ColorJitter(brightness, contrast, saturation, hue))
    return T.Compose(steps + [T.ToTensor(), normalize(data, channels)])


def eval_transform(data: DataConfig, channels: int, image_size: int = 0) -> "T.Compose":
    """ToTensor and Normalize; images of any size (image_size > 0) are first fitted to image_size."""
    from torchvision import transforms as T

    fit = [fit_to_size(image_size)] if image_size else []
    return T.Compose(fit + [T.ToTensor(), normalize(data, channels)])
