"""What the serving graph's upload normalisation costs: the old decode against the new, per image.

The export's signature used ``tf.io.decode_image(channels=3)`` then the resize
(``preprocessing.tfrecords.decode_and_resize``); it now reads the header,
refuses oversized images, applies EXIF orientation and composites alpha
(``preprocessing.graph_decode.decode_and_resize_upload``). Both run here as
``tf.function``s on the same encoded photos, interleaved in rounds so that
background load falls on both alike; the table gives per-image p50/p95 and
the ratio of the medians.

``python bench/bench_decode.py [--photos DIR] [--count 64] [--size 224] [--rounds 5]``

Without ``--photos`` it draws JPEGs of camera-like sizes (1024x768, and one
in four with an EXIF rotation) so it needs nothing outside the repository.
"""

from __future__ import annotations

import argparse
import glob
import io
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def drawn_photos(count: int) -> list[bytes]:
    import random

    from PIL import Image

    from preprocessing.sample_data import draw_image

    rng = random.Random(0)
    out = []
    for i in range(count):
        image = draw_image(("circle", "square", "triangle")[i % 3], rng, 1024, 768)
        exif = Image.Exif()
        if i % 4 == 0:
            exif[0x0112] = 6
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90, exif=exif.tobytes())
        out.append(buffer.getvalue())
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/bench_decode.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", help="a folder of photos (searched recursively for .jpg/.jpeg/.png)")
    parser.add_argument("--count", type=int, default=64)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)

    import tensorflow as tf

    from preprocessing import graph_decode, tfrecords

    if args.photos:
        paths = sorted(p for p in glob.glob(os.path.join(args.photos, "**", "*"), recursive=True)
                       if p.lower().endswith((".jpg", ".jpeg", ".png")))[: args.count]
        photos = [open(p, "rb").read() for p in paths]
        source = f"{len(photos)} photos from {args.photos}"
    else:
        photos = drawn_photos(args.count)
        source = f"{len(photos)} drawn 1024x768 JPEGs (a quarter EXIF-rotated)"
    size = (args.size, args.size)
    spec = [tf.TensorSpec([], tf.string)]
    old = tf.function(lambda b: tfrecords.decode_and_resize(b, size), input_signature=spec)
    new = tf.function(lambda b: graph_decode.decode_and_resize_upload(b, size, "stretch"), input_signature=spec)
    for fn in (old, new):
        fn(tf.constant(photos[0]))
    times: dict[str, list[float]] = {"old": [], "new": []}
    for _ in range(args.rounds):
        for name, fn in (("old", old), ("new", new)):
            for photo in photos:
                started = time.perf_counter()
                fn(tf.constant(photo)).numpy()
                times[name].append(time.perf_counter() - started)

    def pct(values, q):
        values = sorted(values)
        return values[min(len(values) - 1, int(q * len(values)))] * 1000

    print(f"{source}; resized to {args.size}x{args.size}; {args.rounds} interleaved rounds; "
          f"TensorFlow {tf.__version__}\n")
    print("| decode | p50 ms | p95 ms |")
    print("|---|---|---|")
    for name, label in (("old", "tf.io.decode_image + resize (before)"),
                        ("new", "graph_decode: header check, EXIF, alpha + resize (now)")):
        print(f"| {label} | {pct(times[name], 0.5):.2f} | {pct(times[name], 0.95):.2f} |")
    ratio = statistics.median(times["new"]) / statistics.median(times["old"])
    added = (statistics.median(times["new"]) - statistics.median(times["old"])) * 1000
    print(f"\nnew / old at the median: {ratio:.2f}x ({added:+.2f} ms per image)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
