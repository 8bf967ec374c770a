"""Every registered backbone's CPU speed: images/s of a forward pass at its own input size (run by hand).

For the backbone guide in the README; figures go to bench/RESULTS-backbones.md.
Each backbone of ``trainer.model.backbones.REGISTRY`` is built as the trainer
builds it (``Backbone.build(size, None)``: ``keras.applications`` without its
top, random weights, which cost the same to run as ImageNet's), then called as
one graph function (``tf.function``, ``training=False``, as the trainer's
feature extraction and evaluation do) on random float images in [0, 255] at
batch 32. One warm-up batch (tracing, allocation) is not timed; then batches
run until at least ``--batches`` batches and ``--seconds`` seconds have
passed. images/s is 32 divided by the median batch time, which a shared
machine disturbs least. Parameters are the backbone's (no head); blocks are
what ``--search-space``'s ``finetune_depth`` counts.

Usage::

    nice -n 5 .venv/bin/python bench/bench_backbones.py [--only NAME ...] [--json out.json]

No network: no weights are downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BATCH = 32


def measure(name: str, batches: int, seconds: float) -> dict:
    import numpy as np
    import tensorflow as tf

    from trainer.model.backbones import get_backbone

    backbone = get_backbone(name)
    size = backbone.default_size
    started = time.perf_counter()
    model = backbone.build((size, size), None)
    built_s = time.perf_counter() - started
    forward = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
    images = tf.constant(np.random.default_rng(0).uniform(0, 255, (BATCH, size, size, 3)).astype("float32"))
    started = time.perf_counter()
    forward(images).numpy()  # warm-up: trace and first run
    warmup_s = time.perf_counter() - started
    times = []
    began = time.perf_counter()
    while len(times) < batches or time.perf_counter() - began < seconds:
        t0 = time.perf_counter()
        forward(images).numpy()
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    return {"backbone": name, "app": backbone.app, "input_size": size, "parameters": int(model.count_params()),
            "blocks": backbone.num_blocks(), "images_per_s": BATCH / median,
            "best_images_per_s": BATCH / min(times), "batches": len(times), "median_batch_s": median,
            "build_s": built_s, "warmup_s": warmup_s, "load_after": os.getloadavg()[0]}


def main(argv=None) -> int:
    from preprocessing.console import import_tensorflow_quietly
    from trainer.model.backbones import REGISTRY

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=sorted(REGISTRY), help="these backbones (default: all)")
    parser.add_argument("--batches", type=int, default=5, help="timed batches at least (default %(default)s)")
    parser.add_argument("--seconds", type=float, default=10.0, help="timed seconds at least (default %(default)s)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    import_tensorflow_quietly(False, runs_on="the benchmark")  # the CUDA probe's lines too
    import keras
    import tensorflow as tf

    rows = []
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, TensorFlow {tf.__version__}, "
          f"Keras {keras.__version__}, load {os.getloadavg()[0]:.1f} at start; batch {BATCH}", flush=True)
    print(f"{'backbone':<20} {'size':>4} {'params':>7} {'blocks':>6} {'images/s':>9} {'best':>7} {'batches':>7} "
          f"{'load':>5}", flush=True)
    for name in args.only or list(REGISTRY):
        row = measure(name, args.batches, args.seconds)
        rows.append(row)
        print(f"{name:<20} {row['input_size']:>4} {row['parameters'] / 1e6:>6.1f}M {row['blocks']:>6} "
              f"{row['images_per_s']:>9.1f} {row['best_images_per_s']:>7.1f} {row['batches']:>7} "
              f"{row['load_after']:>5.1f}", flush=True)
        keras.backend.clear_session()
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"batch": BATCH, "cpus": os.cpu_count(), "tensorflow": tf.__version__, "rows": rows}, handle,
                      indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
