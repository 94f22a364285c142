"""The DALI folder loader on the CPU (device_id=None), over a generated folder of JPEGs and PNGs
(RGB, grayscale, palette and RGBA; sizes 20-60 px): every file once per epoch across 1 and 2
ranks in the plan's order, exact evaluation with an uneven split, a resumed epoch, seeded crops
and flips (checked against PIL), normalized output in the requested format, a file that does not
decode named in one line, and the folder-loader benchmark's smoke run.

Each file's red channel is one flat value, 7 x its id, so a decoded image says which file it
came from whatever its crop and flip; green and blue are gradients, so crops and flips show."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_fasttrain
from fasttrain.data.folder import UnreadableImage, scan_split
from fasttrain.data.loaders.gpu import BatchFormat, CropFlip
from fasttrain.data.sharding import ShardedBatches

pytest.importorskip("nvidia.dali")
from fasttrain.data.loaders.dali_folder import DaliFolderLoader  # noqa: E402

CPU = torch.device("cpu")
CLASSES = ("cat", "dog", "frog")
MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)
SIZE = 16
ID_STEP = 7  # red = ID_STEP x file id: 33 files fit in 0..255, JPEG errors (<= 3) round away
# (PIL mode, file suffix) in turn: every kind of file a user's folder holds
KINDS = [("RGB", "jpg"), ("RGB", "png"), ("L", "png"), ("RGBA", "png"), ("P", "png"), ("RGB", "jpeg")]


def _write_image(path: Path, file_id: int, height: int, width: int, mode: str) -> None:
    from PIL import Image

    red = np.full((height, width), ID_STEP * file_id, dtype=np.uint8)
    green = np.broadcast_to(np.linspace(0, 255, width, dtype=np.uint8), (height, width))
    blue = np.broadcast_to(np.linspace(255, 0, height, dtype=np.uint8)[:, None], (height, width))
    rgb = Image.fromarray(np.stack([red, green, blue], axis=-1))
    if mode == "L":
        image = Image.fromarray(red)  # gray = the id's value: decodes to R = G = B = 7 x id
    elif mode == "RGBA":
        image = rgb.convert("RGBA")
        image.putalpha(128)
    elif mode == "P":
        image = Image.fromarray(red).convert("P")  # a palette of one colour, the id's gray
    else:
        image = rgb
    image.save(path, quality=95) if path.suffix != ".png" else image.save(path)


def make_folder(root: Path, per_class: dict) -> Path:
    """root/<split>/<class>/<id>.<suffix>, ids 0.. unique over all splits (at most 36: red = 7 x id)."""
    file_id = 0
    for split, count in per_class.items():
        for label, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for k in range(count):
                mode, suffix = KINDS[file_id % len(KINDS)]
                height, width = 20 + 7 * (file_id % 6), 60 - 5 * (file_id % 5)
                _write_image(root / split / name / f"{file_id:03d}.{suffix}", file_id, height, width, mode)
                file_id += 1
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    # 24 training files (8 per class), 9 for evaluation
    return make_folder(tmp_path_factory.mktemp("images"), {"train": 8, "val": 3})


def _file_ids(index) -> np.ndarray:
    return np.array([int(re.search(r"(\d+)\.\w+$", path).group(1)) for path in index.paths])


def _loader(folder: Path, split: str, batch: int, rank: int = 0, world_size: int = 1, train: bool = True,
            seed: int = 3, hflip: bool = True, dtype=torch.float32, channels_last: bool = False):
    index = scan_split(folder, split)
    batches = ShardedBatches(len(index.paths), batch, shuffle=train, seed=seed, rank=rank, world_size=world_size,
                             exact=not train)
    fmt = BatchFormat(CPU, MEAN, STD, dtype, channels_last)
    return index, DaliFolderLoader(index, batches, fmt, SIZE, train=train, aug=CropFlip(hflip=hflip, seed=seed),
                                   num_threads=2)


def _decoded_ids(images: torch.Tensor) -> list:
    """Which file each image came from: its red channel, un-normalized, is 7 x id everywhere."""
    red = images[:, 0].float().mean(dim=(1, 2)) * STD[0] + MEAN[0]
    return torch.round(red * 255 / ID_STEP).long().tolist()


def _epoch(loader, epoch: int, start_sample: int = 0):
    loader.set_epoch(epoch, start_sample)
    return list(loader)


# --------------------------------------------------------------------------- which samples, in which order
@pytest.mark.parametrize("world_size", [1, 2])
def test_every_file_once_per_epoch_across_ranks_in_the_plans_order(folder, world_size):
    loaders = [_loader(folder, "train", batch=5, rank=r, world_size=world_size) for r in range(world_size)]
    index = loaders[0][0]
    ids = _file_ids(index)
    orders = []
    for epoch in (0, 1):
        seen_ids, seen_labels = [], []
        for _, loader in loaders:
            batches = _epoch(loader, epoch)
            assert len(batches) == len(loader) == loader.batches.batches_left()
            shard = loader.batches.shard().numpy()
            decoded = [i for x, _ in batches for i in _decoded_ids(x)]
            labels = torch.cat([y for _, y in batches])
            assert decoded == ids[shard].tolist()  # the plan's samples, in its order, each image with...
            assert labels.tolist() == index.labels[shard].tolist()  # ...its own label
            seen_ids += decoded
            seen_labels += labels.tolist()
        assert sorted(seen_ids) == sorted(ids.tolist())  # 24 = 2 x (5 x 2) + 4 shared out: nothing left out
        assert sorted(seen_labels) == sorted(index.labels.tolist())  # the index's label multiset
        orders.append(seen_ids)
    assert orders[0] != orders[1]  # a fresh permutation each epoch
    for _, loader in loaders:
        loader.close()


def test_evaluation_is_exact_with_an_uneven_split_and_normalized(folder):
    (index, rank0), (_, rank1) = (_loader(folder, "val", batch=4, rank=r, world_size=2, train=False) for r in (0, 1))
    ids = _file_ids(index)
    first = [_epoch(loader, 0) for loader in (rank0, rank1)]
    sizes = [[y.shape[0] for _, y in batches] for batches in first]
    assert sizes == [[4, 1], [4]]  # 9 files: 5 + 4, nothing padded
    decoded = [i for batches in first for x, _ in batches for i in _decoded_ids(x)]
    assert sorted(decoded) == sorted(ids.tolist())
    for loader, batches in zip((rank0, rank1), first):
        again = _epoch(loader, 1)
        # no randomness: the same pixels every epoch
        assert all(torch.equal(x, xa) and torch.equal(y, ya) for (x, y), (xa, ya) in zip(batches, again))
        for x, y in batches:
            assert x.shape[1:] == (3, SIZE, SIZE) and x.dtype == torch.float32 and y.dtype == torch.int64
    # a flat red channel stays flat through resize and crop: exactly (7 x id / 255 - mean) / std
    x = torch.cat([x for x, _ in first[0]])
    shard = rank0.batches.shard().numpy()
    want = ((torch.tensor(ids[shard], dtype=torch.float32) * ID_STEP / 255 - MEAN[0]) / STD[0])
    png = torch.tensor([index.paths[i].endswith(".png") for i in shard])
    assert torch.allclose(x[png, 0], want[png, None, None].expand(-1, SIZE, SIZE), atol=1e-5)
    assert torch.allclose(x[~png, 0], want[~png, None, None].expand(-1, SIZE, SIZE), atol=3 / 255 / STD[0])  # JPEG
    rank0.close()
    rank1.close()


def test_a_resumed_epoch_yields_exactly_the_batches_not_yet_trained(folder):
    _, loader = _loader(folder, "train", batch=4)
    full = _epoch(loader, 2)
    resumed = _epoch(loader, 2, start_sample=2 * 4)  # two steps of 4 were trained before the stop
    assert len(resumed) == len(full) - 2
    for (x, y), (xf, yf) in zip(resumed, full[2:]):
        assert torch.equal(y, yf) and torch.equal(x, xf)  # same samples, same crops and flips
    loader.close()


def test_a_consumer_stopping_early_does_not_shift_the_next_epoch(folder):
    _, loader = _loader(folder, "train", batch=4)
    reference = _epoch(loader, 1)
    loader.set_epoch(0)
    first = iter(loader)
    next(first)
    first.close()  # e.g. train.limit_train_batches
    after = _epoch(loader, 1)
    assert len(after) == len(reference)
    assert all(torch.equal(x, xr) and torch.equal(y, yr) for (x, y), (xr, yr) in zip(after, reference))
    loader.close()
    assert [y.tolist() for _, y in _epoch(loader, 1)] == [y.tolist() for _, y in reference]  # rebuilt after close


# --------------------------------------------------------------------------- augmentation
def test_crops_and_flips_are_a_function_of_seed_epoch_and_sample(folder):
    index, single = _loader(folder, "train", batch=6)
    _, other_seed = _loader(folder, "train", batch=6, seed=4)
    ranks = [_loader(folder, "train", batch=3, rank=r, world_size=2)[1] for r in (0, 1)]
    by_file = {}
    for x, _ in _epoch(single, 0):
        by_file.update(zip(_decoded_ids(x), x))
    assert len(by_file) == len(index.paths)
    for loader in ranks:  # the same file gets the same crop and flip on 2 ranks as on 1
        for x, _ in _epoch(loader, 0):
            assert all(torch.equal(image, by_file[i]) for i, image in zip(_decoded_ids(x), x))
    others = {i: image for x, _ in _epoch(other_seed, 0) for i, image in zip(_decoded_ids(x), x)}
    textured = [i for i in _file_ids(index) if "RGB" in KINDS[i % len(KINDS)][0]]  # L and P files are flat
    # another seed: other crops
    assert sum(not torch.equal(by_file[i], others[i]) for i in textured) >= len(textured) - 1
    for loader in (single, other_seed, *ranks):
        loader.close()


def _pil_normalized(image, mirror: bool = False) -> torch.Tensor:
    pixels = (np.asarray(image, dtype=np.float32) / 255 - np.array(MEAN)) / np.array(STD)
    tensor = torch.from_numpy(pixels).float().permute(2, 0, 1)
    return tensor.flip(-1) if mirror else tensor


def test_images_are_the_drawn_crop_or_the_centre_resized_as_pil_does(folder):
    """Train: the region epoch_crops drew (area, aspect ratio, position, in the file's own size), resized
    to SIZE and mirrored where drawn; eval: shorter side to SIZE, centre crop. Within JPEG and
    interpolation differences (a few levels of 255) of PIL's bilinear resize of the same region."""
    from PIL import Image

    from fasttrain.data.loaders.dali_folder import epoch_crops

    index, train = _loader(folder, "train", batch=24, seed=8)
    (images, _), = _epoch(train, 0)
    crops, mirrors = epoch_crops(8, 0, len(index.paths), hflip=True)
    _, evaluation = _loader(folder, "val", batch=9, train=False)
    (eval_images, _), = _epoch(evaluation, 0)
    val_paths = scan_split(folder, "val").paths
    errors, whole_errors = [], []
    for image, i in zip(images, train.batches.shard().tolist()):
        pil = Image.open(index.paths[i]).convert("RGB")
        width, height = pil.size
        area, log_ratio, x, y = crops[i].tolist()
        crop_w = min(max(np.sqrt(area * np.exp(log_ratio) * height / width), 1 / width), 1.0) * width
        crop_h = min(max(np.sqrt(area / np.exp(log_ratio) * width / height), 1 / height), 1.0) * height
        left, top = x * (width - crop_w), y * (height - crop_h)
        want = _pil_normalized(pil.resize((SIZE, SIZE), Image.BILINEAR, box=(left, top, left + crop_w, top + crop_h)),
                               bool(mirrors[i]))
        errors.append((image - want)[1:].abs())  # green and blue hold the gradients
        whole = _pil_normalized(pil.resize((SIZE, SIZE), Image.BILINEAR), bool(mirrors[i]))
        whole_errors.append((image - whole)[1:].abs())
    for image, path in zip(eval_images, val_paths):
        pil = Image.open(path).convert("RGB")
        side = min(pil.size)  # shorter side to SIZE, then the centre SIZE x SIZE: the centre square, resized
        left, top = (pil.size[0] - side) / 2, (pil.size[1] - side) / 2
        centre = pil.resize((SIZE, SIZE), Image.BILINEAR, box=(left, top, left + side, top + side))
        errors.append((image - _pil_normalized(centre))[1:].abs())
    assert max(float(e.max()) for e in errors) < 0.15  # ~8 levels of 255 at std 0.2
    assert max(float(e.mean()) for e in errors) < 0.06
    assert max(float(e.mean()) for e in whole_errors) > 0.3  # the check can tell a crop from the whole image
    train.close()
    evaluation.close()


def test_with_crop_padding_the_fitted_image_is_padded_and_cropped_as_the_gpu_loader_does(folder):
    from fasttrain.data.loaders.gpu import crop_flip, epoch_augmentation

    index = scan_split(folder, "train")
    fmt = BatchFormat(CPU, MEAN, STD)
    fitted_loader = DaliFolderLoader(index, ShardedBatches(len(index.paths), 24, False, 0, exact=True), fmt, SIZE,
                                     train=False)
    padded_loader = DaliFolderLoader(index, ShardedBatches(len(index.paths), 24, True, 5), fmt, SIZE, train=True,
                                     aug=CropFlip(crop_padding=3, hflip=True, seed=5))
    (fitted, _), = _epoch(fitted_loader, 0)  # natural order: row i is sample i
    (padded, _), = _epoch(padded_loader, 1)
    corners, flips = epoch_augmentation(5, 1, len(index.paths), 3, hflip=True)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    shard = padded_loader.batches.shard()
    pixels = fitted[shard] * std + mean  # back to 0..1, then the gpu loader's pad (zeros), crop and flip
    want = (crop_flip(pixels, corners[shard], flips[shard], 3) - mean) / std
    torch.testing.assert_close(padded, want, rtol=0, atol=1e-4)
    assert (corners[shard] != 3).any() and flips[shard].any()  # some samples did move and flip
    fitted_loader.close()
    padded_loader.close()


def test_hflip_mirrors_exactly_the_drawn_samples_with_the_same_crops(folder):
    _, flipped = _loader(folder, "train", batch=8, hflip=True)
    _, unflipped = _loader(folder, "train", batch=8, hflip=False)
    mirrored = same = 0
    for (x, y), (xu, yu) in zip(_epoch(flipped, 0), _epoch(unflipped, 0)):
        assert torch.equal(y, yu)
        for image, plain in zip(x, xu):
            if torch.equal(image, plain.flip(-1)) and not torch.equal(image, plain):
                mirrored += 1
            else:
                assert torch.equal(image, plain)
                same += 1
    assert mirrored >= 4 and same >= 4  # about half of 24 each way
    flipped.close()
    unflipped.close()


@pytest.mark.parametrize("dtype,channels_last", [(torch.float32, True), (torch.bfloat16, False),
                                                 (torch.float16, True)])
def test_batches_come_in_the_requested_dtype_and_memory_format(folder, dtype, channels_last):
    _, loader = _loader(folder, "train", batch=10, dtype=dtype, channels_last=channels_last)
    _, reference = _loader(folder, "train", batch=10)
    for (x, y), (xr, yr) in zip(_epoch(loader, 0), _epoch(reference, 0)):
        assert x.shape == xr.shape and x.shape[1:] == (3, SIZE, SIZE) and x.dtype == dtype
        assert x.is_contiguous(memory_format=torch.channels_last) == channels_last
        assert y.dtype == torch.int64 and torch.equal(y, yr)
        torch.testing.assert_close(x.float(), xr, rtol=0, atol=0.05)  # float32 pixels, rounded to dtype
    assert -3 < float(xr.min()) < float(xr.max()) < 5  # pixels in 0..1 normalized by the configured mean/std
    loader.close()
    reference.close()


def test_a_plan_for_another_number_of_samples_is_refused(folder):
    index = scan_split(folder, "val")
    batches = ShardedBatches(len(index.paths) + 1, 4, shuffle=False, seed=0, exact=True)
    with pytest.raises(ValueError, match="plan covers 10 samples but the index holds 9 files"):
        DaliFolderLoader(index, batches, BatchFormat(CPU, MEAN, STD), SIZE, train=False)


@pytest.mark.parametrize("train", [True, False])
def test_a_file_that_cannot_be_decoded_is_named(tmp_path, train):
    index = scan_split(make_folder(tmp_path, {"train": 3}), "train")
    broken = Path(index.paths[6])  # a JPEG cut in half after the scan (a scan may only read headers)
    assert broken.suffix == ".jpg"
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])
    batches = ShardedBatches(len(index.paths), 2, shuffle=train, seed=0, exact=not train)
    loader = DaliFolderLoader(index, batches, BatchFormat(CPU, MEAN, STD), SIZE, train=train)
    loader.set_epoch(0)
    with pytest.raises(UnreadableImage, match=f"data error: cannot decode image file {re.escape(str(broken))} "):
        list(loader)
    loader.close()


# --------------------------------------------------------------------------- the benchmark
@pytest.mark.slow
def test_folder_loader_benchmark_smoke_prints_its_table(tmp_path):
    result = run_fasttrain("--smoke", "--out", str(tmp_path / "bench"), module="benchmarks.folder_loaders",
                           timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    table = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| loader") and len(table) >= 2 + 3 + 1  # header, rule, 3 DataLoader rows, DALI CPU
    assert any("DALI" in line and "cpu" in line for line in table)
    assert all(float(line.split("|")[3].replace(",", "")) > 0 for line in table[2:])


def test_reflect_padding_is_refused_by_the_dali_folder_loader_and_taken_by_the_plain_one(folder, tmp_path):
    """DALI's slice pads decoded images with a constant only: aug.crop_padding_mode=reflect with the DALI folder
    loader is one line before training; the plain folder loader takes it (torchvision's RandomCrop), and a
    padding as wide as the fitted side is refused once the folder's side is known."""
    from fasttrain.config import load_config
    from fasttrain.data import build_loaders
    from fasttrain.errors import ConfigError

    base = ["data.dataset=folder", f"data.root={folder}", f"data.image_size={SIZE}", "data.num_workers=0",
            "train.batch_size=4", "aug.crop_padding_mode=reflect"]
    with pytest.raises(ConfigError, match="aug.crop_padding_mode=reflect needs data.loader=plain or gpu"):
        build_loaders(load_config(None, [*base, "data.loader=dali", "aug.crop_padding=2"]), CPU)
    train, _, _ = build_loaders(load_config(None, [*base, "data.loader=plain", "aug.crop_padding=2"]), CPU)
    train.set_epoch(0)
    images, _ = next(iter(train))
    assert images.shape == (4, 3, SIZE, SIZE)
    from PIL import Image

    for split, name in [(s, c) for s in ("train", "val") for c in CLASSES[:2]]:  # all 8x8: data.image_size=0 takes it
        (tmp_path / split / name).mkdir(parents=True)
        Image.new("RGB", (8, 8), (10, 20, 30)).save(tmp_path / split / name / "0.png")
    unsized = [f"data.root={tmp_path}" if arg.startswith("data.root") else arg for arg in base
               if not arg.startswith("data.image_size")]
    with pytest.raises(ConfigError, match=r"aug.crop_padding=8 is not valid: expected an integer in \[0, 7\] "
                                          r"with aug.crop_padding_mode=reflect \(images of 8 px\)"):
        build_loaders(load_config(None, [*unsized, "data.loader=plain", "train.batch_size=2", "aug.crop_padding=8"]),
                      CPU)
