"""The GPU-resident loader (run here on the CPU, which is the device the trainer would use), and
the DALI loader where it shares its checks:
its crops and flips are torchvision's, with the right distribution, labels stay with their
images, every sample once per epoch across ranks, and evaluation batches equal the plain path's."""

import numpy as np
import pytest
import torch
from torchvision.transforms import functional as TF

from fasttrain.config import load_config
from fasttrain.data import build_eval_loader
from fasttrain.data.loaders.dali import dali_available
from fasttrain.data.loaders.gpu import BatchFormat, CropFlip, GpuLoader, crop_flip
from fasttrain.data.sharding import ShardedBatches

CPU = torch.device("cpu")


@pytest.mark.parametrize("mode,torchvision_mode", [("zeros", "constant"), ("reflect", "reflect")])
def test_crop_and_flip_equal_torchvision_for_every_offset(mode, torchvision_mode):
    images = torch.randint(0, 256, (162, 3, 32, 32), dtype=torch.uint8)
    corners = torch.tensor([(i, j) for i in range(9) for j in range(9)] * 2)
    flips = torch.arange(162) >= 81
    out = crop_flip(images, corners, flips, padding=4, padding_mode=mode)
    for k in range(162):
        ref = TF.crop(TF.pad(images[k], [4], padding_mode=torchvision_mode), int(corners[k, 0]), int(corners[k, 1]),
                      32, 32)
        assert torch.equal(out[k], TF.hflip(ref) if flips[k] else ref), k


def test_reflect_padding_reaches_every_loader_and_is_refused_where_it_cannot_hold():
    """aug.crop_padding_mode=reflect: torchvision's RandomCrop in the plain loader, the mirrored border in the
    gpu and dali loaders (their pixels: test_dali_loader.py); padding must stay below the image side, and the
    DALI folder loader (whose pipeline decodes and pads with zeros only) refuses it in one line."""
    from fasttrain.data import build_loaders
    from fasttrain.data.transforms import train_transform
    from fasttrain.errors import ConfigError

    base = ["data.dataset=synthetic", "data.train_size=64", "data.val_size=32", "train.batch_size=32",
            "aug.crop_padding=2", "aug.crop_padding_mode=reflect"]
    cfg = load_config(None, base)
    crop = train_transform(cfg.data, cfg.aug, 32, 3).transforms[0]
    assert (type(crop).__name__, crop.padding, crop.padding_mode) == ("RandomCrop", 2, "reflect")
    for kind in ("gpu", "dali") if dali_available() else ("gpu",):
        loader, _, _ = build_loaders(load_config(None, [*base, f"data.loader={kind}"]), CPU)
        assert loader._source.reflected if kind == "dali" else loader.padding_mode == "reflect"
    with pytest.raises(ConfigError, match=r"aug.crop_padding=32 is not valid: expected an integer in \[0, 31\] with "
                                          r"aug.crop_padding_mode=reflect"):
        load_config(None, ["aug.crop_padding=32", "aug.crop_padding_mode=reflect"])
    with pytest.raises(ConfigError, match="aug.crop_padding_mode='mirror' is not valid"):
        load_config(None, ["aug.crop_padding_mode=mirror"])


def _probe_images(n):
    """Channel 0 = 100 + column (reveals crop and flip), channel 1 = 10 * label + 5, channel 2 = 255."""
    labels = np.arange(n) % 10
    images = np.zeros((n, 32, 32, 3), dtype=np.uint8)
    images[..., 0] = 100 + np.arange(32)[None, None, :]
    images[..., 1] = (10 * labels + 5)[:, None, None]
    images[..., 2] = 255
    return images, labels


def _raw_batches(loader):
    """Undo normalization (mean 0, std 1 -> x / 255) to get the uint8 pixels back."""
    for images, labels in loader:
        yield (images.float() * 255).round().to(torch.uint8), labels


def _loader(images, labels, rank=0, world=1, batch=100, kind="gpu", **kw):
    batches = ShardedBatches(len(labels), batch, shuffle=True, seed=3, rank=rank, world_size=world)
    if kind == "dali":
        pytest.importorskip("nvidia.dali")
        from fasttrain.data.loaders.dali import DaliLoader as cls
    else:
        cls = GpuLoader
    return cls(images, labels, batches, BatchFormat(CPU, [0.0] * 3, [1.0] * 3),
               CropFlip(kw.get("crop_padding", 0), kw.get("hflip", False), seed=3, alternate=kw.get("alternate", False)))


@pytest.mark.parametrize("kind", ["gpu", "dali"])
def test_augmentation_distribution_and_label_pairing(kind):
    images, labels = _probe_images(4500)
    loader = _loader(images, labels, kind=kind, crop_padding=4, hflip=True)
    # the 162 possible outputs (corner i, j in 0..8, flip or not) of channels 0 and 2, by torchvision
    base = torch.from_numpy(images[0]).permute(2, 0, 1)[[0, 2]]
    params = [(i, j, f) for i in range(9) for j in range(9) for f in (False, True)]
    refs = []
    for i, j, f in params:
        crop = TF.crop(TF.pad(base, [4]), i, j, 32, 32)
        refs.append(TF.hflip(crop) if f else crop)
    refs = torch.stack(refs)  # (162, 2, 32, 32)
    drawn = []
    for pixels, batch_labels in _raw_batches(loader):
        matches = (pixels[:, None, [0, 2]] == refs[None]).flatten(2).all(2)  # (B, 162)
        assert (matches.sum(1) == 1).all()  # each output is exactly one of torchvision's crops; zeros outside
        drawn += [params[k] for k in matches.float().argmax(1).tolist()]
        inside = pixels[:, 2] == 255
        expected = (10 * batch_labels + 5).to(torch.uint8)[:, None, None].expand_as(inside)
        assert torch.equal(pixels[:, 1][inside], expected[inside])  # the label travels with its image
        assert (pixels[:, 1][~inside] == 0).all()
    assert len(drawn) == 4500
    rows = np.bincount([i for i, _, _ in drawn], minlength=9)
    cols = np.bincount([j for _, j, _ in drawn], minlength=9)
    flips = sum(f for _, _, f in drawn)
    # RandomCrop(32, padding=4): offsets -4..4 uniform (500 each); RandomHorizontalFlip: half (2250)
    assert np.all(np.abs(rows - 500) < 100) and np.all(np.abs(cols - 500) < 100), (rows, cols)
    assert abs(flips - 2250) < 150


@pytest.mark.parametrize("kind", ["gpu", "dali"])
def test_alternating_flips_mirror_each_image_in_exactly_every_other_epoch(kind):
    """aug.flip_alternate: over 4 epochs each image comes mirrored in epochs 0 and 2 or in 1 and 3, never by a
    coin; about half the images start mirrored."""
    n = 400
    images = np.zeros((n, 32, 32, 3), dtype=np.uint8)
    images[..., 0] = 100 + np.arange(32)[None, None, :]  # the first column reads 131 when mirrored
    labels = np.arange(n)  # the label is the sample's index
    loader = _loader(images, labels, batch=50, kind=kind, hflip=True, alternate=True)
    mirrored = np.zeros((4, n), dtype=bool)
    for epoch in range(4):
        loader.set_epoch(epoch)
        for pixels, batch_labels in _raw_batches(loader):
            mirrored[epoch, batch_labels.numpy()] = (pixels[:, 0, 0, 0] == 131).numpy()
    assert (mirrored[1] == ~mirrored[0]).all() and (mirrored[2] == mirrored[0]).all()
    assert (mirrored[3] == mirrored[1]).all()
    assert 150 < mirrored[0].sum() < 250
    coin = _loader(images, labels, batch=50, kind=kind, hflip=True)  # the default: a coin per image and epoch
    seen = []
    for epoch in range(2):
        coin.set_epoch(epoch)
        seen.append({int(label): bool(image[0, 0, 0] == 131)
                     for pixels, batch_labels in _raw_batches(coin) for image, label in zip(pixels, batch_labels)})
    assert sum(seen[0][i] == seen[1][i] for i in range(n)) > 100  # a coin repeats itself for about half


def test_the_dali_folder_loader_alternates_its_flips_too_and_keeps_its_crops():
    from fasttrain.data.loaders.dali_folder import epoch_crops

    draws = [epoch_crops(5, epoch, 300, hflip=True, alternate=True) for epoch in range(3)]
    mirrors = [mirror.astype(bool) for _, mirror in draws]
    assert (mirrors[1] == ~mirrors[0]).all() and (mirrors[2] == mirrors[0]).all() and 100 < mirrors[0].sum() < 200
    assert all(np.array_equal(crops, epoch_crops(5, epoch, 300, hflip=True)[0]) for epoch, (crops, _) in enumerate(draws))


def test_alternating_flips_need_a_loader_that_draws_them():
    from fasttrain.data import build_loaders
    from fasttrain.errors import ConfigError

    cfg = load_config(None, ["data.dataset=synthetic", "data.train_size=64", "data.val_size=32", "data.loader=plain",
                             "train.batch_size=32", "aug.flip_alternate=true"])
    with pytest.raises(ConfigError, match="aug.flip_alternate=true needs data.loader=gpu or dali"):
        build_loaders(cfg, CPU, 0, 1, torch.float32)
    with pytest.raises(ConfigError, match="aug.hflip=false turns them off"):
        load_config(None, ["aug.flip_alternate=true", "aug.hflip=false"])


@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_sample_once_per_epoch_across_ranks(world):
    n = 1000
    images = np.zeros((n, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(n)  # the label is the sample's index
    for epoch in (0, 1):
        seen = []
        for rank in range(world):
            loader = _loader(images, labels, rank, world, batch=64, crop_padding=4, hflip=True)
            loader.set_epoch(epoch)
            steps = 0
            for _, batch_labels in loader:
                seen += batch_labels.tolist()
                steps += 1
            assert steps == len(loader)
        assert sorted(seen) == list(range(n))


def test_delivers_the_requested_dtype_and_memory_format():
    images, labels = _probe_images(64)
    batches = ShardedBatches(64, 32, shuffle=True, seed=0)
    loader = GpuLoader(images, labels, batches, BatchFormat(CPU, [0.5] * 3, [0.5] * 3, torch.bfloat16, True),
                       CropFlip(4, True))
    x, y = next(iter(loader))
    assert x.dtype == torch.bfloat16 and x.is_contiguous(memory_format=torch.channels_last)
    assert x.shape == (32, 3, 32, 32) and y.dtype == torch.int64


def test_evaluation_batches_equal_the_plain_loaders(tmp_path):
    base = ["data.dataset=synthetic", "data.val_size=100", "train.eval_batch_size=32", "data.num_workers=0",
            "data.mean=[0.4914,0.4822,0.4465]", "data.std=[0.2470,0.2435,0.2616]", f"output.dir={tmp_path}"]
    plain, _ = build_eval_loader(load_config(None, base + ["data.loader=plain"]), CPU)
    gpu, _ = build_eval_loader(load_config(None, base + ["data.loader=gpu"]), CPU)
    pairs = list(zip(plain, gpu))
    assert len(pairs) == 4
    for (xp, yp), (xg, yg) in pairs:
        assert torch.equal(yp, yg)
        torch.testing.assert_close(xg, xp, rtol=0, atol=1e-5)


@pytest.mark.parametrize("loader", ["plain", "gpu"])
def test_synthetic_images_come_at_a_smaller_side_on_request(loader):
    """data.image_size up to 32 makes synthetic data of that side (the quick CPU runs of the tests use 16)."""
    cfg = load_config(None, ["data.dataset=synthetic", "data.image_size=16", "data.val_size=40", f"data.loader={loader}",
                             "train.device=cpu", "train.batch_size=8", "data.num_workers=0"])
    loader, info = build_eval_loader(cfg, CPU)
    images, labels = next(iter(loader))
    assert images.shape == (8, 3, 16, 16) and labels.shape == (8,) and info.image_size == 16
