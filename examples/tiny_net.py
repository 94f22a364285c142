"""A model of your own, for `model.name=examples.tiny_net:TinyNet` (run from the project's folder,
or put this folder on PYTHONPATH): fasttrain passes the `num_classes`, `in_channels` and
`image_size` that the signature names, and `model.kwargs` (`model.kwargs.width=32`) on top."""

from torch import nn


class TinyNet(nn.Module):
    def __init__(self, num_classes: int, in_channels: int = 3, image_size: int = 32, width: int = 16):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(), nn.MaxPool2d(2))
        # the head sees where the edges are, not only which: the shapes differ in their outlines
        self.head = nn.Linear(2 * width * (image_size // 4) ** 2, num_classes)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))
