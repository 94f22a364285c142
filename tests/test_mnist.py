"""MNIST through torchvision's reader, on generated files in its raw layout, for the MLP examples."""

import struct

import numpy as np
import pytest

from fasttrain.config import load_config
from fasttrain.data.mnist import load_mnist
from fasttrain.errors import UserError
from fasttrain.train.lifecycle import train


def _write_idx(path, array):
    magic = {1: 0x801, 3: 0x803}[array.ndim]
    with open(path, "wb") as f:
        f.write(struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape) + array.tobytes())


@pytest.fixture
def tiny_mnist_root(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 120), ("t10k", 40)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = (rng.random((n, 28, 28)) * 40).astype(np.uint8)
        images[np.arange(n), 2 * labels + 4, 4:24] = 255  # a learnable stroke per class
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return tmp_path


def test_reads_mnist_as_uint8_hwc(tiny_mnist_root):
    images, labels = load_mnist(str(tiny_mnist_root), train=True)
    assert images.shape == (120, 28, 28, 1) and images.dtype == np.uint8 and labels.shape == (120,)


def test_missing_mnist_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="MNIST not found or unreadable.*data.root"):
        load_mnist(str(tmp_path), train=True, download=False)


@pytest.mark.parametrize("model", ["MLP", "MLPSequential", "SimpleModel", "CNN"])
def test_the_mnist_recipe_trains_the_tutorials_models(tiny_mnist_root, tmp_path, model):
    cfg = load_config("configs/mnist_mlp.yaml", [f"data.root={tiny_mnist_root}", "data.download=false",
                                                  "data.num_workers=0", f"model.name={model}", "train.epochs=3",
                                                  "train.batch_size=20", "train.device=cpu",
                                                  "output.save_checkpoints=false", "output.plots=false",
                                                  f"output.dir={tmp_path / 'run'}"])
    state = train(cfg)
    assert state.history[-1]["val_total"] == 40
    assert state.history[-1]["val_acc"] > 0.3
