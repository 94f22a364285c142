"""data.dataset=folder: the user's own JPEG and PNG files in train/<class>/ and val/<class>/ folders.

A user's folder is generated per test module: 3 classes, 10 training and 7 validation images per
class (21: an odd total, so 2 ranks evaluate unequal shares), JPEG and PNG, RGB and grayscale, of
different, non-square sizes. The CLI trains on it (one process, and two under torchrun); the plain,
gpu (and, where DALI is installed, dali) loaders are built as a run builds them and must cover the
same images each epoch; every bad input stops with one line naming what is wrong."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import read_jsonl, run_fasttrain, run_ranks
from fasttrain import run
from fasttrain.config import load_config
from fasttrain.data import build_eval_loader, build_loaders, folder_splits, resolve_loader
from fasttrain.data.loaders.dali import dali_available
from fasttrain.data.folder import UnreadableImage, scan_split
from fasttrain.errors import ConfigError, UserError

CPU = torch.device("cpu")
CLASSES = ("cat", "dog", "frog")
TRAIN_PER_CLASS, VAL_PER_CLASS = 10, 7
# (suffix, PIL mode) in turn: what a user's folder holds
KINDS = [(".jpg", "RGB"), (".png", "RGB"), (".jpeg", "RGB"), (".png", "L"), (".JPG", "RGB")]


def _write_image(path: Path, seed: int, width: int, height: int, mode: str) -> None:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    image.convert(mode).save(path)


def write_folder(root: Path, train_per_class: int = TRAIN_PER_CLASS, val_per_class: int = VAL_PER_CLASS,
                 classes=CLASSES, square: int = 0) -> Path:
    """root/{train,val}/<class>/NNN.<suffix>; sizes 20-47 px, non-square unless `square` gives one side."""
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for n in range(count):
                suffix, mode = KINDS[n % len(KINDS)]
                width, height = (square, square) if square else (20 + (7 * n + c) % 28, 20 + (5 * n + 3 * c) % 28)
                _write_image(root / split / name / f"{n:03d}{suffix}", 1000 * c + n + (0 if split == "train" else 500),
                             width, height, mode)
    return root


@pytest.fixture(scope="module")
def image_root(tmp_path_factory) -> Path:
    return write_folder(tmp_path_factory.mktemp("images"))


def _overrides(root: Path, *extra: str) -> list:
    return ["data.dataset=folder", f"data.root={root}", "data.image_size=32", "data.num_workers=0",
            "model.name=CNN", "train.device=cpu", "train.batch_size=8", "train.epochs=1", "output.plots=false", *extra]


def _config(root: Path, *extra: str):
    return load_config(None, _overrides(root, *extra))


def _truncate_jpeg(path: Path) -> None:
    """Rewrite `path` as a 64 px JPEG cut after two thirds of its bytes: its header (about 600 bytes)
    is whole, so the scan passes it, but its pixels cannot all be decoded."""
    _write_image(path, 7, 64, 64, "RGB")
    data = path.read_bytes()
    path.write_bytes(data[: 2 * len(data) // 3])
    scan_split(str(path.parents[2]), path.parents[1].name)  # header-only scan: no error


def _labels(loader) -> list:
    return [label for _, labels in loader for label in labels.tolist()]


# --------------------------------------------------------------------------- the CLI, as a user runs it


def test_cli_trains_and_evaluates_on_a_folder_leaving_out_an_unreadable_file(image_root, tmp_path):
    # a copy of the folder with one file that is not an image: skipped and counted, not a stop
    root = write_folder(tmp_path / "images")
    (root / "train" / "dog" / "broken.jpg").write_bytes(b"not a jpeg at all")
    run_dir = tmp_path / "run"
    # in this process: the run is the subject, not the process (the next tests launch real ones)
    assert run.main(_overrides(root, "data.loader=auto", "data.skip_bad_images=true", f"output.dir={run_dir}")) == 0
    history = read_jsonl(run_dir / "metrics.jsonl")
    assert [h["epoch"] for h in history] == [1]
    assert history[0]["val_total"] == len(CLASSES) * VAL_PER_CLASS
    assert np.isfinite(history[0]["train_loss"]) and np.isfinite(history[0]["val_loss"])
    # auto on the CPU: the decoded folder (a few hundred kB) fits in memory, so each file is decoded once
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())["data"]
    assert (saved["loader"], saved["image_size"], saved["skip_bad_images"]) == ("gpu", 32, True)
    log = (run_dir / "train.log").read_text()
    skipped = [line for line in log.splitlines() if "broken.jpg" in line]
    assert len(skipped) == 1 and " 1 " in skipped[0], log[-2000:]


@pytest.mark.slow
def test_two_ranks_evaluate_every_folder_image_exactly_once_with_workers_decoding(image_root, tmp_path):
    run_dir = tmp_path / "run"
    result = run_ranks(2, *_overrides(image_root, "data.loader=plain", "data.num_workers=1",
                                      f"output.dir={run_dir}"))
    assert result.returncode == 0, result.stderr[-3000:]
    history = read_jsonl(run_dir / "metrics.jsonl")
    assert [(h["epoch"], h["world_size"]) for h in history] == [(1, 2)]
    # 21 images over 2 ranks: 11 + 10, nothing padded or dropped
    assert history[0]["val_total"] == len(CLASSES) * VAL_PER_CLASS


def test_a_file_that_fails_to_decode_in_a_worker_stops_the_run_with_one_line(tmp_path):
    root = write_folder(tmp_path / "images", train_per_class=4, val_per_class=2)
    # its header reads (the scan passes it), its pixels do not (the worker fails)
    victim = root / "train" / "frog" / "000.jpg"
    _truncate_jpeg(victim)
    result = run_fasttrain(*_overrides(root, "data.loader=plain", "data.num_workers=1",
                                       f"output.dir={tmp_path / 'run'}"))
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and str(victim) in errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr


# --------------------------------------------------------------------------- the loader contract


@pytest.mark.parametrize("world", [1, 2])
def test_every_loader_covers_the_same_images_each_epoch(image_root, world):
    index = scan_split(str(image_root), "train")
    val_index = scan_split(str(image_root), "val")
    for name in ("plain", "gpu") + (("dali",) if dali_available() else ()):
        cfg = _config(image_root, f"data.loader={name}")
        epoch_labels, eval_labels = [], []
        for rank in range(world):  # the ranks' plans, built one after the other as each rank builds its own
            train, val, info = build_loaders(cfg, CPU, rank, world)
            assert (info.in_channels, info.image_size, info.classes) == (3, 32, CLASSES)
            train.set_epoch(2)
            images, _ = next(iter(train))
            assert images.shape == (8, 3, 32, 32) and images.dtype == torch.float32, name
            epoch_labels += _labels(train)
            eval_labels += _labels(val)
            train.close()
            val.close()
        # 30 images in global batches of 8 x world: the last, short one is shared out, nothing dropped
        assert collections.Counter(epoch_labels) == collections.Counter(index.labels.tolist()), name
        assert sorted(eval_labels) == sorted(val_index.labels.tolist()), name


def test_plain_and_gpu_evaluate_the_same_pixels(image_root):
    # both fit each file to 32 px the same way (shorter side resized, centre cropped)
    plain, _ = build_eval_loader(_config(image_root, "data.loader=plain"), CPU)
    gpu, _ = build_eval_loader(_config(image_root, "data.loader=gpu"), CPU)
    for (x_plain, y_plain), (x_gpu, y_gpu) in zip(plain, gpu, strict=True):
        assert torch.equal(y_plain, y_gpu)
        torch.testing.assert_close(x_plain, x_gpu, atol=1e-5, rtol=0)


@pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed")
def test_dali_crops_training_images_as_the_gpu_loader_does_with_crop_padding(image_root):
    """aug.crop_padding=4 (the default): the DALI folder loader pads and crops the fitted image with the
    gpu loader's draws, so both train on nearly the same pixels. They are not equal: DALI resizes the
    files itself, the gpu loader stored PIL's resize, and these test images are noise (measured: 0.065
    mean difference); a random resized crop instead differs everywhere (measured: 0.44)."""
    batches = {}
    for name in ("gpu", "dali"):
        train, val, _ = build_loaders(_config(image_root, f"data.loader={name}", "aug.crop_padding=4"), CPU)
        train.set_epoch(1)
        batches[name] = next(iter(train))
        train.close()
        val.close()
    (x_gpu, y_gpu), (x_dali, y_dali) = batches["gpu"], batches["dali"]
    assert torch.equal(y_gpu, y_dali)
    assert (x_gpu - x_dali).abs().mean() < 0.15  # normalized pixels span 2


def test_plain_folder_augmentation_is_seeded_per_sample_and_resumes_mid_epoch(image_root):
    cfg = _config(image_root, "data.loader=plain", "aug.crop_padding=0")  # RandomResizedCrop
    first, _, _ = build_loaders(cfg, CPU)
    second, _, _ = build_loaders(cfg, CPU)
    first.set_epoch(3)
    second.set_epoch(3, start_sample=16)  # a checkpoint taken after two batches
    whole = list(first)
    resumed = list(second)
    assert len(resumed) == len(whole) - 2
    for (x_whole, y_whole), (x_resumed, y_resumed) in zip(whole[2:], resumed, strict=True):
        assert torch.equal(y_whole, y_resumed) and torch.equal(x_whole, x_resumed)
    first.set_epoch(4)
    assert not torch.equal(next(iter(first))[0], whole[0][0])  # a new epoch draws new crops


def test_subsets_are_seeded_and_the_same_for_every_loader(image_root):
    cfg = _config(image_root, "data.train_size=12", "data.val_size=9", "data.subset_seed=5")
    splits = folder_splits(cfg.data)
    assert (len(splits.train.paths), len(splits.val.paths)) == (12, 9)
    for name in ("plain", "gpu"):
        train, val, _ = build_loaders(_config(image_root, f"data.loader={name}", "data.train_size=12",
                                              "data.val_size=9", "data.subset_seed=5"), CPU)
        assert sorted(_labels(train)) == sorted(splits.train.labels.tolist())
        assert _labels(val) == splits.val.labels.tolist()  # evaluation keeps the files' order
    other = folder_splits(_config(image_root, "data.train_size=12", "data.subset_seed=6").data)
    assert other.train.paths != splits.train.paths


def test_scan_order_is_classes_then_files_sorted(image_root):
    index = scan_split(str(image_root), "train")
    assert index.classes == CLASSES
    assert index.labels.dtype == np.int64 and len(index.paths) == len(index.labels) == 30
    assert list(index.paths) == sorted(index.paths)  # class folders and names sort alike here
    assert index.labels.tolist() == [c for c in range(3) for _ in range(TRAIN_PER_CLASS)]


def test_image_size_0_takes_the_images_common_square_size(tmp_path):
    square = write_folder(tmp_path / "square", train_per_class=2, val_per_class=1, square=24)
    cfg = load_config(None, ["data.dataset=folder", f"data.root={square}", "data.loader=plain"])
    assert folder_splits(cfg.data).info.image_size == 24
    assert resolve_loader(cfg, CPU) == ("plain", "as configured")


# --------------------------------------------------------------------------- bad input: one line each


def _one_line_error(root: Path, *extra: str, split: str = "") -> str:
    """The error a run would stop with (load_config, then the folder's scan), checked to be one line."""
    with pytest.raises(UserError) as caught:
        if split:
            scan_split(str(root), split)
        else:
            folder_splits(load_config(None, ["data.dataset=folder", f"data.root={root}", *extra]).data)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_missing_root_or_split_folder(tmp_path):
    assert "is not a folder" in _one_line_error(tmp_path / "nowhere", "data.image_size=32")
    root = tmp_path / "images"
    (root / "train" / "cat").mkdir(parents=True)
    assert f"{root / 'val'} is missing" in _one_line_error(root, split="val")


def test_split_without_class_folders_or_a_class_without_images(tmp_path):
    root = tmp_path / "images"
    (root / "train").mkdir(parents=True)
    _write_image(root / "train" / "loose.jpg", 0, 20, 20, "RGB")  # images straight in train/: no classes
    assert "holds no class folders" in _one_line_error(root, split="train")
    (root / "train" / "cat").mkdir()
    _write_image(root / "train" / "cat" / "a.png", 0, 20, 20, "RGB")
    (root / "train" / "dog").mkdir()
    (root / "train" / "dog" / "notes.txt").write_text("not an image")
    assert f"class folder {root / 'train' / 'dog'} holds no" in _one_line_error(root, split="train")


def test_class_folders_that_differ_between_train_and_val_are_named(tmp_path):
    root = write_folder(tmp_path / "images", train_per_class=1, val_per_class=1)
    (root / "val" / "frog").rename(root / "val" / "toad")
    message = _one_line_error(root, "data.image_size=32")
    assert "only in train/: frog" in message and "only in val/: toad" in message


def test_unreadable_files_are_counted_and_the_first_named_or_skipped(tmp_path):
    root = write_folder(tmp_path / "images", train_per_class=3, val_per_class=1)
    (root / "train" / "cat" / "zz_empty.png").write_bytes(b"")
    (root / "train" / "dog" / "bad.jpg").write_bytes(b"\xff\xd8 not really")
    message = _one_line_error(root, split="train")
    assert "2 file(s)" in message and str(root / "train" / "cat" / "zz_empty.png") in message
    assert "data.skip_bad_images=true" in message
    skipped = folder_splits(load_config(None, ["data.dataset=folder", f"data.root={root}", "data.image_size=32",
                                               "data.skip_bad_images=true"]).data)
    assert len(skipped.train.paths) == 9 and skipped.info.skipped_files == 2
    assert [(bad.count, bad.first) for bad in skipped.bad] == [(2, str(root / "train" / "cat" / "zz_empty.png"))]


def test_a_truncated_jpeg_is_found_by_the_decode_check_of_skip_bad_images(tmp_path):
    root = write_folder(tmp_path / "images", train_per_class=2, val_per_class=2)
    victim = root / "val" / "cat" / "000.jpg"
    _truncate_jpeg(victim)
    cfg = _config(root, "data.skip_bad_images=true", "data.loader=plain")
    assert folder_splits(cfg.data).info.skipped_files == 1
    assert len(_labels(build_eval_loader(cfg, CPU)[0])) == 5
    # without the option the scan passes it (header only) and decoding names it, in the main process too
    loader, _ = build_eval_loader(_config(root, "data.loader=plain"), CPU)
    with pytest.raises(UnreadableImage, match="cannot decode image file .*000.jpg"):
        _labels(loader)


def test_image_size_0_with_images_of_different_sizes_asks_for_one(image_root):
    with pytest.raises(ConfigError, match=r"data.image_size=0 needs every image square and of one size.*"
                                          r"set data.image_size"):
        folder_splits(load_config(None, ["data.dataset=folder", f"data.root={image_root}"]).data)


def test_image_size_of_an_array_dataset_must_be_its_own():
    cfg = load_config(None, ["data.dataset=synthetic", "data.image_size=64", "data.loader=plain", "train.device=cpu"])
    with pytest.raises(ConfigError, match="data.image_size=64 but the synthetic images are 32 px"):
        build_eval_loader(cfg, CPU)
    with pytest.raises(ConfigError, match="data.image_size"):
        load_config(None, ["data.image_size=-1"])
