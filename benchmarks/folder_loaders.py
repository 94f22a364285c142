"""The folder loaders alone: images/s of decoding and augmenting a folder of JPEG files, side by side
in one run, no model.

    python -m benchmarks.folder_loaders                          # 2,000 generated JPEGs of 64-160 px
    python -m benchmarks.folder_loaders --out /tmp/jpegs         # generate there once, reuse on later runs
    python -m benchmarks.folder_loaders --smoke                  # a few images: does every row run?

Rows: the plain loader's way (fasttrain.data.folder's FolderDataset: PIL decode, then torchvision's
RandomResizedCrop, flip, ToTensor, Normalize, in a DataLoader with 0, 1, 2 worker processes), then
fasttrain.data.loaders.dali_folder's DaliFolderLoader decoding on the CPU (1 and 2 DALI threads) and, where
CUDA is available, on the GPU (device="mixed"). Every row delivers the same thing: batches of
image_size x image_size float images and int64 labels on the benchmark's device (the GPU when
there is one), random resized crops and flips included, each sample once per epoch in the same
ShardedBatches order. Timing is benchmarks.measure's: warm-up batches (worker start-up, pipeline
build, first allocations) left out, then windows of at least --min-seconds between device
synchronizations; the figure is the median window. DataLoader workers persist across epochs.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from benchmarks.measure import Windows, measure
from benchmarks.report import environment, table
from fasttrain.data.loaders.dali import dali_available
from fasttrain.data.loaders.plain import FolderDataset, FolderPlainLoader
from fasttrain.data.folder import FolderIndex, scan_split
from fasttrain.data.loaders.gpu import BatchFormat, CropFlip
from fasttrain.data.sharding import ShardedBatches

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's, as a user's photos would use
CLASSES = 10


@dataclass(frozen=True)
class Setup:
    images: int
    min_side: int
    max_side: int
    image_size: int
    batch_size: int
    workers: Sequence[int]
    dali_threads: Sequence[int]
    warmup: int  # batches before timing
    windows: int
    min_seconds: float


FULL = Setup(2000, 64, 160, 64, 128, (0, 1, 2), (1, 2), warmup=20, windows=3, min_seconds=4.0)
SMOKE = Setup(24, 40, 72, 32, 8, (0, 1, 2), (1, 2), warmup=2, windows=1, min_seconds=0.05)


# --------------------------------------------------------------------------- the generated folder
def write_jpeg_folder(root: Path, count: int, min_side: int, max_side: int, seed: int = 0) -> Path:
    """root/train/class_<k>/<n>.jpg: `count` photos-like JPEGs (smooth colour fields with grain) of
    random sides in min_side..max_side, spread over CLASSES classes."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for n in range(count):
        width, height = rng.integers(min_side, max_side + 1, size=2)
        field = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((int(width), int(height)),
                                                                                       Image.BICUBIC)
        grain = rng.normal(0, 12, (int(height), int(width), 3))
        pixels = np.clip(np.asarray(field, dtype=np.float32) + grain, 0, 255).astype(np.uint8)
        folder = root / "train" / f"class_{n % CLASSES}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"{n:05d}.jpg", quality=90)
    return root


# --------------------------------------------------------------------------- the loaders
def _plan(index: FolderIndex, setup: Setup) -> ShardedBatches:
    return ShardedBatches(len(index.paths), setup.batch_size, shuffle=True, seed=0, drop_last=True)


def _endless(loader, device: torch.device) -> Iterator:
    """The loader's batches epoch after epoch, on `device`, until the benchmark stops asking; then its
    workers or pipeline are ended (closing the generator runs the finally)."""
    try:
        for epoch in itertools.count():
            loader.set_epoch(epoch)
            for images, labels in loader:
                # decoded on the CPU for a GPU run: the copy to the GPU is part of the loader's cost
                yield images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
    finally:
        loader.close()


def plain_batches(index: FolderIndex, setup: Setup, workers: int, device: torch.device) -> Iterator:
    from torchvision import transforms as T

    transform = T.Compose([T.RandomResizedCrop(setup.image_size), T.RandomHorizontalFlip(), T.ToTensor(),
                           T.Normalize(MEAN, STD)])
    loader = FolderPlainLoader(FolderDataset(index, transform, seed=0), _plan(index, setup), workers,
                               pin_memory=device.type == "cuda", persistent_workers=True, device=device)
    return _endless(loader, device)


def dali_batches(index: FolderIndex, setup: Setup, threads: int, decode_on: torch.device,
                 device: torch.device) -> Iterator:
    from fasttrain.data.loaders.dali_folder import DaliFolderLoader

    loader = DaliFolderLoader(index, _plan(index, setup), BatchFormat(decode_on, MEAN, STD), setup.image_size,
                              train=True, aug=CropFlip(hflip=True, seed=0), num_threads=threads)
    return _endless(loader, device)


def loader_rows(index: FolderIndex, setup: Setup, device: torch.device) -> List[Tuple[str, str, Iterator]]:
    """(loader, where it decodes, endless batch stream) for every row this machine can run."""
    rows = [(f"plain: PIL + torchvision, DataLoader num_workers={n}", "cpu", plain_batches(index, setup, n, device))
            for n in setup.workers]
    if dali_available():
        cpu = torch.device("cpu")
        rows += [(f"DALI DaliFolderLoader, {n} thread{'s' if n > 1 else ''}", "cpu",
                  dali_batches(index, setup, n, cpu, device)) for n in setup.dali_threads]
        if device.type == "cuda":
            threads = max(setup.dali_threads)
            gpu = f"gpu (mixed): {torch.cuda.get_device_name(device)}"
            rows.append((f"DALI DaliFolderLoader, {threads} threads", gpu, dali_batches(index, setup, threads, device,
                                                                                      device)))
    return rows


# --------------------------------------------------------------------------- main
def cpu_share() -> int:
    try:
        return len(os.sched_getaffinity(0))  # a container's or taskset's share, not the host's count
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.folder_loaders", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="the generated folder (kept, and reused when it holds as many "
                        "images); default: a temporary folder, removed at the end")
    parser.add_argument("--images", type=int, help=f"JPEGs to generate (default {FULL.images})")
    parser.add_argument("--batch-size", type=int, help=f"default {FULL.batch_size}")
    parser.add_argument("--image-size", type=int, help=f"side of the delivered crops (default {FULL.image_size})")
    parser.add_argument("--min-seconds", type=float, help=f"each timed window runs at least this long "
                        f"(default {FULL.min_seconds:g})")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where batches are delivered (default: cuda when available)")
    parser.add_argument("--smoke", action="store_true", help="a few images and a short window: every row runs")
    args = parser.parse_args(argv)
    given = {"images": args.images, "batch_size": args.batch_size, "image_size": args.image_size,
             "min_seconds": args.min_seconds}
    setup = replace(SMOKE if args.smoke else FULL, **{k: v for k, v in given.items() if v is not None})
    device = torch.device(args.device)

    root = args.out or Path(tempfile.mkdtemp(prefix="folder_loaders_"))
    try:
        if not (root / "train").is_dir() or sum(1 for _ in (root / "train").rglob("*.jpg")) != setup.images:
            shutil.rmtree(root / "train", ignore_errors=True)
            write_jpeg_folder(root, setup.images, setup.min_side, setup.max_side)
        index = scan_split(root, "train")
        env = environment(device, 1, "none")
        mib = sum(os.path.getsize(p) for p in index.paths) / 2**20
        print(f"device {device} ({env['device']}), {cpu_share()} CPU cores | torch {env['torch']} | torchvision "
              f"{env['torchvision']} | DALI {env['dali'] or 'not installed'} | python {env['python']}\n"
              f"{len(index.paths)} JPEGs of {setup.min_side}-{setup.max_side} px ({mib:.1f} MiB) -> random resized "
              f"crops of {setup.image_size} px + flip, batch {setup.batch_size} | {setup.warmup} warm-up batches, "
              f"{setup.windows} windows of >= {setup.min_seconds:g} s, median", flush=True)
        results = []
        for name, decode_on, stream in loader_rows(index, setup, device):
            result = measure(name, lambda: next(stream), lambda batch: batch[1].sum(), setup.batch_size, device,
                             Windows(setup.warmup, setup.windows, min_seconds=setup.min_seconds))
            stream.close()  # loader.close(): ends the DataLoader's workers / shuts the DALI pipeline down
            results.append((name, decode_on, result.images_per_sec))
            print(f"  {name} ({decode_on}): {result.images_per_sec:,.0f} img/s", flush=True)
    finally:
        if args.out is None:
            shutil.rmtree(root, ignore_errors=True)
    print()
    print(table(["loader", "decodes on", "images/s", "vs DataLoader, 0 workers"],
                ([name, decode_on, f"{rate:,.0f}", f"{rate / results[0][2]:.2f}x"] for name, decode_on, rate in results),
                "llrr"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
