"""The tutorial's training loop, kept as the reference every fasttrain speed figure is compared to.

Deliberately plain and independent of fasttrain's trainer: a torchvision-style CIFAR-10 dataset
with PIL transforms, `DataLoader(batch_size=128, shuffle=True, num_workers=4, pin_memory=True)`,
fp32, eager, and `running_loss += loss.item()` after every step, exactly as the tutorial does.
"""

from __future__ import annotations

from typing import Callable, Iterator, Tuple

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms


class CIFAR10Arrays(Dataset):
    """What torchvision.datasets.CIFAR10 does per item: uint8 HWC array -> PIL image -> transform."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        return self.transform(Image.fromarray(self.images[index])), int(self.labels[index])


def tutorial_loader(images: np.ndarray, labels: np.ndarray, batch_size: int = 128, num_workers: int = 4,
                    pin_memory: bool = True) -> DataLoader:
    transform = transforms.Compose([
        transforms.RandomCrop(32, padding=4),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    ])
    return DataLoader(CIFAR10Arrays(images, labels, transform), batch_size=batch_size, shuffle=True,
                      num_workers=num_workers, pin_memory=pin_memory, persistent_workers=num_workers > 0)


def tutorial_steps(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                   device: torch.device) -> Iterator[float]:
    """The tutorial's train_one_epoch, one step at a time, epoch after epoch; yields the running loss."""
    criterion = nn.CrossEntropyLoss()
    model.train()
    running_loss = 0.0
    while True:
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            optimizer.zero_grad()
            outputs = model(images)
            loss = criterion(outputs, labels)
            loss.backward()
            optimizer.step()
            running_loss += loss.item()  # a host-device sync every step, as in the tutorial
            yield loss.item()


def tutorial_eval_loader(images: np.ndarray, labels: np.ndarray, batch_size: int = 128,
                         num_workers: int = 4) -> DataLoader:
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
    return DataLoader(CIFAR10Arrays(images, labels, transform), batch_size=batch_size, shuffle=False,
                      num_workers=num_workers)


def tutorial_fit(model: nn.Module, train_loader: DataLoader, test_loader: DataLoader, epochs: int,
                 device: torch.device, max_lr: float = 0.01) -> float:
    """The tutorial's train_model on the case study: AdamW (lr 1e-3, wd 0.01) with OneCycleLR(max_lr)
    stepped every batch, a validation pass after every epoch (as the tutorial keeps its best
    checkpoint by it); returns the last epoch's test accuracy."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr, total_steps=epochs * len(train_loader))
    criterion = nn.CrossEntropyLoss()
    accuracy = 0.0
    for _ in range(epochs):
        model.train()
        running_loss = 0.0
        for images, labels in train_loader:
            images, labels = images.to(device), labels.to(device)
            optimizer.zero_grad()
            loss = criterion(model(images), labels)
            loss.backward()
            optimizer.step()
            scheduler.step()
            running_loss += loss.item()  # per step, as the tutorial does
        model.eval()
        correct = total = 0
        with torch.no_grad():
            for images, labels in test_loader:
                images, labels = images.to(device), labels.to(device)
                correct += (model(images).argmax(dim=1) == labels).sum().item()
                total += labels.shape[0]
        accuracy = correct / max(total, 1)
    return accuracy
