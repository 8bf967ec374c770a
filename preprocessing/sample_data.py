"""A small generated photo folder for the demo and the tests.

Each class is a kind of shape drawn in its own colour family on a grey,
cluttered background, at varied sizes, aspect ratios and positions, saved
as JPEG or PNG. The classes are learnable by a small network trained from
scratch in a few epochs, yet no two images are the same. ``broken=True`` adds
a few files the preprocessing job must reject (zero bytes, a truncated JPEG,
text named ``.jpg``), so the demo shows the dead-letter output too.

Layout: ``ROOT/{train,validation,test}/<class>/<image>`` (DESIGN.md section 1).
"""

from __future__ import annotations

import argparse
import io
import os
import random
from dataclasses import dataclass
from typing import Sequence

from PIL import Image, ImageDraw, ImageFilter

from preprocessing import add_version_flag
from preprocessing.console import PROGRAMS, Parser, add_verbose_flag, at_least, fail

CLASSES = ("circle", "square", "triangle", "stripes")
_HUES = {
    "circle": ((200, 40, 40), (255, 110, 80)),
    "square": ((40, 150, 40), (120, 230, 90)),
    "triangle": ((40, 60, 200), (100, 150, 255)),
    "stripes": ((200, 170, 20), (255, 230, 90)),
}


@dataclass(frozen=True)
class SampleSpec:
    """How many images to make, and how."""

    per_class: int = 60
    classes: Sequence[str] = CLASSES
    split: tuple[float, float, float] = (0.7, 0.15, 0.15)
    min_side: int = 64
    max_side: int = 160
    broken: bool = True
    seed: int = 0


def _colour(rng: random.Random, cls: str) -> tuple[int, int, int]:
    lo, hi = _HUES.get(cls, ((0, 0, 0), (255, 255, 255)))
    return tuple(rng.randint(a, b) for a, b in zip(lo, hi))


def draw_image(cls: str, rng: random.Random, width: int, height: int) -> Image.Image:
    """One synthetic image of ``cls``."""
    grey = rng.randint(70, 190)
    bg = tuple(max(0, min(255, grey + rng.randint(-12, 12))) for _ in range(3))
    image = Image.new("RGB", (width, height), bg)
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(2, 6)):  # background clutter, colourless so the class colour stays the cue
        x0, y0 = rng.randrange(width), rng.randrange(height)
        x1, y1 = x0 + rng.randint(3, width // 4 + 3), y0 + rng.randint(3, height // 4 + 3)
        draw.line((x0, y0, x1, y1), fill=(rng.randint(30, 230),) * 3, width=2)
    side = min(width, height)
    r = rng.uniform(0.3, 0.45) * side
    cx = rng.uniform(r, width - r)
    cy = rng.uniform(r, height - r)
    colour = _colour(rng, cls)
    if cls == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif cls == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif cls == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    elif cls == "stripes":
        step = max(3, int(r / 3))
        for x in range(int(cx - r), int(cx + r), step * 2):
            draw.rectangle((x, cy - r, x + step, cy + r), fill=colour)
    else:
        draw.text((cx, cy), cls, fill=colour)
    if rng.random() < 0.5:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2)))
    return image


def _split_of(index: int, count: int, split: Sequence[float]) -> str:
    n_train = round(count * split[0])
    n_val = round(count * split[1])
    if index < n_train:
        return "train"
    if index < n_train + n_val:
        return "validation"
    return "test"


def generate(root: str, spec: SampleSpec = SampleSpec()) -> dict[str, int]:
    """Write the sample folder under ``root``; returns counts per split (valid images only)."""
    rng = random.Random(spec.seed)
    counts = {"train": 0, "validation": 0, "test": 0}
    for cls in spec.classes:
        for index in range(spec.per_class):
            split = _split_of(index, spec.per_class, spec.split)
            folder = os.path.join(root, split, cls)
            os.makedirs(folder, exist_ok=True)
            width = rng.randint(spec.min_side, spec.max_side)
            height = rng.randint(spec.min_side, spec.max_side)
            image = draw_image(cls, rng, width, height)
            if rng.random() < 0.7:
                image.save(os.path.join(folder, f"{cls}_{index:04d}.jpg"), quality=90)
            else:
                image.save(os.path.join(folder, f"{cls}_{index:04d}.png"))
            counts[split] += 1
    if spec.broken:
        _write_broken(os.path.join(root, "train", spec.classes[0]))
    return counts


def _write_broken(folder: str) -> None:
    """Files a careful job must reject with a reason, not crash on or drop."""
    os.makedirs(folder, exist_ok=True)
    open(os.path.join(folder, "broken_empty.jpg"), "wb").close()
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 20, 30)).save(buf, format="JPEG")
    with open(os.path.join(folder, "broken_truncated.jpg"), "wb") as handle:
        handle.write(buf.getvalue()[: len(buf.getvalue()) // 3])
    with open(os.path.join(folder, "broken_not_an_image.jpg"), "w") as handle:
        handle.write("this is a text file with an image's name\n")


def main(argv: Sequence[str] | None = None) -> int:
    prog = PROGRAMS["preprocessing.sample_data"]
    parser = Parser(
        prog=prog,
        description="Write a small generated image dataset (split folders, a few broken files).",
    )
    parser.add_argument("root", help="folder to write (created; must not exist or be empty)")
    parser.add_argument("--per-class", type=at_least(1), default=SampleSpec.per_class,
                        help="images per class (default %(default)s)")
    parser.add_argument("--seed", type=int, default=SampleSpec.seed)
    parser.add_argument("--no-broken", action="store_true", help="leave out the deliberately broken files")
    add_verbose_flag(parser)
    add_version_flag(parser)
    args = parser.parse_args(argv)
    try:
        if os.path.exists(args.root) and not os.path.isdir(args.root):
            raise NotADirectoryError(f"{args.root} exists and is not a folder")
        if os.path.isdir(args.root) and os.listdir(args.root):
            raise FileExistsError(f"{args.root} is not empty; name a new folder")
        counts = generate(args.root, SampleSpec(per_class=args.per_class, seed=args.seed, broken=not args.no_broken))
    except OSError as error:
        if args.verbose:
            raise
        return fail(prog, error)
    print(f"wrote {sum(counts.values())} images to {args.root} ({counts})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
