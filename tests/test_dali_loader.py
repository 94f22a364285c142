"""The DALI loader, on the CPU (device_id=None): the same batches as the gpu loader (whose crops
and flips are checked against torchvision), every sample once per epoch across 2 gloo ranks under
torchrun, and a clear error when DALI is not installed."""

import json
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, run_ranks
from fasttrain.config import load_config
from fasttrain.data import build_loaders
from fasttrain.data.loaders.gpu import BatchFormat, CropFlip, GpuLoader
from fasttrain.data.sharding import ShardedBatches
from fasttrain.errors import UserError

CPU = torch.device("cpu")


def _pair(n=300, batch=64, **kw):
    from fasttrain.data.loaders.dali import DaliLoader

    images = np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(n) % 10
    fmt = BatchFormat(CPU, [0.5, 0.5, 0.5], [0.25, 0.25, 0.25], kw.get("dtype", torch.float32),
                      kw.get("channels_last", False))
    aug = CropFlip(kw.get("crop_padding", 4), kw.get("hflip", True), 5, padding_mode=kw.get("padding_mode", "zeros"))
    make = lambda: ShardedBatches(n, batch, True, 5)  # noqa: E731
    return DaliLoader(images, labels, make(), fmt, aug), GpuLoader(images, labels, make(), fmt, aug)


@pytest.mark.parametrize("dtype,channels_last,padding_mode", [(torch.float32, False, "zeros"),
                                                              (torch.float32, True, "zeros"),
                                                              (torch.bfloat16, True, "zeros"),
                                                              (torch.float32, False, "reflect")])
def test_dali_batches_equal_the_gpu_loaders_pixel_for_pixel(dtype, channels_last, padding_mode):
    pytest.importorskip("nvidia.dali")
    dali, gpu = _pair(dtype=dtype, channels_last=channels_last, padding_mode=padding_mode)
    for epoch in (0, 1):
        dali.set_epoch(epoch)
        gpu.set_epoch(epoch)
        pairs = list(zip(dali, gpu))
        assert len(pairs) == len(dali) == 5
        for (xd, yd), (xg, yg) in pairs:
            assert torch.equal(yd, yg)  # same samples, same order, labels with their images
            assert xd.dtype == dtype and xd.shape == xg.shape
            assert xd.is_contiguous(memory_format=torch.channels_last) == channels_last
            torch.testing.assert_close(xd.float(), xg.float(), rtol=0, atol=1e-5 if dtype == torch.float32 else 2e-2)


def test_a_consumer_stopping_early_does_not_shift_the_next_epoch():
    pytest.importorskip("nvidia.dali")
    dali, gpu = _pair()
    dali.set_epoch(0)
    first = iter(dali)
    next(first)
    first.close()  # e.g. train.limit_train_batches
    dali.set_epoch(1)
    gpu.set_epoch(1)
    assert all(torch.equal(yd, yg) for (_, yd), (_, yg) in zip(dali, gpu))


@pytest.fixture(scope="module")
def two_ranks():
    """One launch of 2 gloo ranks: an epoch of each loader (203 samples, global batch 32)."""
    from fasttrain.data.loaders.dali import dali_available

    kinds = ["plain", "gpu"] + (["dali"] if dali_available() else [])
    result = run_ranks(2, str(REPO / "tests" / "epoch_coverage.py"), ",".join(kinds), "203", "16", "1", module="")
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kind", ["plain", "gpu", "dali"])
@pytest.mark.slow
def test_every_sample_once_per_epoch_across_two_ranks(two_ranks, kind):
    if kind == "dali":
        pytest.importorskip("nvidia.dali")
    ranks = two_ranks[kind]
    assert [r["steps"] for r in ranks] == [r["len"] for r in ranks] == [7, 7]  # 203 = 6 x 32 + 11 shared out
    assert sorted(ranks[0]["indices"] + ranks[1]["indices"]) == list(range(203))


def test_missing_dali_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # as if not installed
    cfg = load_config(None, ["data.dataset=synthetic", "data.loader=dali", f"output.dir={tmp_path}"])
    with pytest.raises(UserError, match=r"data.loader=dali needs NVIDIA DALI.*pip install nvidia-dali-cuda130"):
        build_loaders(cfg, CPU)


def test_auto_on_the_cpu_picks_dali_else_the_resident_loader_and_plain_for_rotation(tmp_path, monkeypatch):
    from fasttrain.data.loaders import dali as dali_module
    from fasttrain.data import resolve_loader

    cfg = load_config(None, ["data.loader=auto", f"output.dir={tmp_path}"])
    assert resolve_loader(cfg, CPU)[0] == ("dali" if dali_module.dali_available() else "gpu")
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    assert resolve_loader(cfg, CPU)[0] == "gpu"
    cfg = load_config(None, ["data.loader=auto", "aug.rotation=10", f"output.dir={tmp_path}"])
    assert resolve_loader(cfg, CPU) == ("plain", "aug.rotation / aug.color_jitter are only implemented by the plain loader")


@pytest.mark.parametrize("kind", ["gpu", "dali"])
def test_a_resumed_epoch_continues_with_the_batches_not_yet_trained(kind):
    if kind == "dali":
        pytest.importorskip("nvidia.dali")
    dali, gpu = _pair()
    loader = dali if kind == "dali" else gpu
    loader.set_epoch(1)
    full = list(loader)
    loader.set_epoch(1, start_sample=2 * 64)  # two steps of 64 were trained before the stop
    resumed = list(loader)
    assert len(resumed) == len(full) - 2
    for (x, y), (xf, yf) in zip(resumed, full[2:]):
        assert torch.equal(y, yf) and torch.equal(x, xf)
