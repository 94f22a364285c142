"""Write a small image folder to train on: ROOT/{train,val}/{circle,square,triangle}/*.jpg|png.

    python examples/make_shapes_folder.py data/shapes            # 3 classes, 300 train and 50 val images each
    python examples/make_shapes_folder.py data/shapes --train 200 --val 50

Each image is one drawn shape (its class) of random size, place and colours on a noisy background,
40 to 96 pixels a side and not always square, every other one a JPEG, the rest PNG: the layout and
the kinds of files a user's own folder has, and classes a small network learns in a few epochs.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("circle", "square", "triangle")


def draw(shape: str, rng: np.random.Generator) -> Image.Image:
    width, height = (int(side) for side in rng.integers(40, 97, size=2))
    background = rng.integers(0, 256, size=3)
    noise = rng.normal(0, 12, size=(height, width, 3))
    image = Image.fromarray(np.clip(background + noise, 0, 255).astype(np.uint8))
    side = min(width, height)
    radius = rng.uniform(0.25, 0.45) * side
    cx, cy = rng.uniform(radius, width - radius), rng.uniform(radius, height - radius)
    # the shape's colour is far from the background's, so that every image shows its class
    colour = tuple(int(c) for c in (background + 128 + rng.integers(-40, 41, size=3)) % 256)
    pen = ImageDraw.Draw(image)
    if shape == "circle":
        pen.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=colour)
    elif shape == "square":
        pen.rectangle([cx - radius, cy - radius, cx + radius, cy + radius], fill=colour)
    else:
        pen.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=colour)
    return image


def write(root: Path, train: int, val: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for split, count in (("train", train), ("val", val)):
        for shape in CLASSES:
            folder = root / split / shape
            folder.mkdir(parents=True, exist_ok=True)
            for n in range(count):
                suffix = ".jpg" if n % 2 == 0 else ".png"
                draw(shape, rng).save(folder / f"{shape}-{n:04d}{suffix}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python examples/make_shapes_folder.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path, help="the folder to write (train/ and val/ go inside it)")
    parser.add_argument("--train", type=int, default=300, help="training images per class (default 300)")
    parser.add_argument("--val", type=int, default=50, help="validation images per class (default 50)")
    args = parser.parse_args(argv)
    if args.train < 1 or args.val < 1:
        parser.error("--train and --val need at least 1 image per class")
    write(args.root, args.train, args.val)
    print(f"wrote {3 * (args.train + args.val)} images of {len(CLASSES)} classes to {args.root}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
