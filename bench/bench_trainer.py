"""Trainer benchmarks (run by hand; figures go to bench/RESULTS-trainer.md).

Two questions:

1. Does the input pipeline keep training fed? ``trainer.data.records.image_dataset``
   (interleaved shards, parallel parse + ``tfrecords.decode_and_resize``,
   batch, prefetch; optionally the training augmentation) is timed on its own
   and compared with the rate a MobileNetV2 fine-tune step consumes batches of
   the same size. Target: input at least 3x faster than consumption. Training
   is also timed fed by the pipeline and fed from one batch held in memory:
   equal step times mean the input is not the bottleneck.
2. What do cached bottleneck features buy? One epoch of the head on cached
   features against one epoch through the frozen backbone. Target >= 100x.
   And ``--only-finetune-cache``: a fine-tune step on augmented images against
   one on the cached activations below the unfrozen blocks.
   Both of the cache's forms are timed: ``trainer.data.features.FeatureCache``
   (the trainer's cache: unpooled feature maps on disk, the head pools) and
   globally pooled features in memory (the smallest form of the same data).

Clocks stop at the last batch (``on_train_batch_end`` of the last step, or the
arrival of the last element), never after teardown: deleting an autotuned
tf.data iterator can take seconds and is not part of an epoch.

Usage::

    .venv/bin/python bench/bench_trainer.py [--data DATA_224] [--json out.json]

Without ``--data`` the clothing-small photos are turned into 224x224 TFRecords
with the project's preprocessing job in a temporary folder first.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

CLOTHING = os.path.join(os.path.dirname(REPO), "shared", "datasets", "clothing-small")
WEIGHTS = os.path.join(os.path.dirname(REPO), "shared", "weights", "mobilenet_v2_1.0_224_imagenet_notop.weights.h5")
SIZE = (224, 224)


def log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)


def machine() -> dict:
    model = ""
    with open("/proc/cpuinfo") as handle:
        for line in handle:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    busy = subprocess.run(["ps", "-eo", "pid,pcpu,args", "--sort=-pcpu"], capture_output=True, text=True).stdout
    others = [line.split(None, 1)[1][:120] for line in busy.splitlines()[1:]
              if len(line.split()) > 2 and int(line.split()[0]) != os.getpid() and float(line.split()[1]) >= 5.0]
    import tensorflow as tf

    return {"nproc": os.cpu_count(), "cpu_model": model, "platform": platform.platform(),
            "tensorflow": tf.__version__, "loadavg_start": os.getloadavg(), "busy_processes_start": others}


def build_data(workdir: str) -> str:
    out = os.path.join(workdir, "clothing224")
    log(f"building 224x224 TFRecords of {CLOTHING} with the preprocessing job -> {out}")
    subprocess.run([sys.executable, "-m", "preprocessing", "--input", CLOTHING, "--output", out,
                    "--image-size", "224", "--num-shards", "8", "--progress-seconds", "0"], check=True, cwd=REPO)
    return out


class BatchClock:
    """A Keras callback's worth of timestamps: epoch starts and every batch end."""

    def __new__(cls):
        import keras

        class _Clock(keras.callbacks.Callback):
            def __init__(self):
                super().__init__()
                self.epochs = []  # [(start, [batch end times])]

            def on_epoch_begin(self, epoch, logs=None):
                self.epochs.append((time.perf_counter(), []))

            def on_train_batch_end(self, batch, logs=None):
                self.epochs[-1][1].append(time.perf_counter())

            def epoch_seconds(self) -> list[float]:
                return [ends[-1] - start for start, ends in self.epochs if ends]

            def step_seconds(self, skip: int = 3) -> list[float]:
                start, ends = self.epochs[-1]
                times = [start, *ends]
                return [b - a for a, b in zip(times, times[1:])][skip:]

        return _Clock()


def time_to_last_element(dataset) -> tuple[float, int, int, float]:
    """(seconds to the last batch, batches, images, seconds to the first batch) of one pass."""
    start = time.perf_counter()
    first = None
    batches = images = 0
    iterator = iter(dataset)
    last = start
    for images_batch, _ in iterator:
        last = time.perf_counter()
        if first is None:
            first = last - start
        batches += 1
        images += int(images_batch.shape[0])
    elapsed = last - start
    del iterator  # teardown is outside the clock
    return elapsed, batches, images, first or 0.0


def classifier(backbone, weights: str, num_classes: int, depth: int):
    """The trainer's model shape: [0, 255] -> backbone preprocessing -> MobileNetV2 -> pool -> dropout -> softmax."""
    import keras

    from trainer.model.classifier import BackbonePreprocess, set_finetune_depth

    backbone_model = backbone.build(SIZE, weights)
    inputs = keras.Input((*SIZE, 3), name="image")
    x = BackbonePreprocess(backbone.preprocess)(inputs)
    x = backbone_model(x, training=False)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(0.2)(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    trainable = set_finetune_depth(backbone_model, backbone, depth)
    model.compile(keras.optimizers.Adam(1e-4), "sparse_categorical_crossentropy", metrics=["accuracy"])
    return model, trainable


def bench_input(info, batch_size: int, augmenter) -> dict:
    from trainer.data.records import image_dataset

    results = {}
    for name, aug in (("plain", None), ("augmented", augmenter)):
        runs = []
        for _ in range(2):
            dataset = image_dataset(info, "train", SIZE, batch_size, shuffle=True, seed=0, augmenter=aug)
            runs.append(time_to_last_element(dataset))
        elapsed, batches, images, first = min(runs)
        results[name] = {"seconds": elapsed, "batches": batches, "images": images, "first_batch_s": first,
                         "images_per_s": images / elapsed, "batches_per_s": batches / elapsed,
                         "all_runs_s": [r[0] for r in runs]}
        log(f"input ({name}): {images} images in {elapsed:.2f}s = {images / elapsed:.0f} images/s, "
            f"{batches / elapsed:.2f} batches/s (first batch after {first:.2f}s; runs {[round(r[0], 2) for r in runs]})")
    return results


def bench_finetune(info, backbone, weights: str, batch_size: int, depth: int, steps: int, augmenter) -> dict:
    import keras
    import tensorflow as tf

    from trainer.data.records import image_dataset

    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    model, trainable = classifier(backbone, weights, info.num_classes, depth)
    batch = next(iter(image_dataset(info, "train", SIZE, batch_size, shuffle=True, seed=1)))
    in_memory = tf.data.Dataset.from_tensors(batch).repeat(steps)
    clock = BatchClock()
    model.fit(in_memory, epochs=1, verbose=0, callbacks=[clock])
    memory_steps = clock.step_seconds()
    clock = BatchClock()
    fed = image_dataset(info, "train", SIZE, batch_size, shuffle=True, seed=2, augmenter=augmenter).take(steps)
    model.fit(fed, epochs=1, verbose=0, callbacks=[clock])
    fed_steps = clock.step_seconds()
    result = {"depth": depth, "trainable_layers": trainable, "steps_timed": len(memory_steps),
              "step_s_in_memory": statistics.median(memory_steps), "step_s_fed_by_pipeline": statistics.median(fed_steps),
              "images_per_s_in_memory": batch_size / statistics.median(memory_steps)}
    log(f"fine-tune step, top {depth} blocks ({trainable} layers trainable), batch {batch_size}: "
        f"{result['step_s_in_memory']:.3f}s from memory, {result['step_s_fed_by_pipeline']:.3f}s fed by the "
        f"pipeline (median of {len(memory_steps)} steps)")
    return result


def bench_frozen_epoch(info, backbone, weights: str, batch_size: int) -> dict:
    import keras

    from trainer.data.records import image_dataset

    keras.backend.clear_session()
    model, _ = classifier(backbone, weights, info.num_classes, depth=0)
    clock = BatchClock()
    model.fit(image_dataset(info, "train", SIZE, batch_size, shuffle=True, seed=0), epochs=1, verbose=0,
              callbacks=[clock])
    seconds = clock.epoch_seconds()[0]
    log(f"epoch through the frozen backbone: {info.size('train')} images in {seconds:.1f}s")
    return {"seconds": seconds, "images": info.size("train")}


def _head_epochs(head, dataset, epochs: int) -> list[float]:
    clock = BatchClock()
    head.fit(dataset, epochs=epochs, verbose=0, callbacks=[clock])
    return clock.epoch_seconds()


def bench_cached_epochs(info, backbone, weights: str, batch_size: int, cache_root: str, epochs: int = 4) -> dict:
    import keras
    import numpy as np
    import tensorflow as tf

    from trainer.data.features import FeatureCache

    keras.backend.clear_session()
    cache = FeatureCache(cache_root, backbone, weights, SIZE, info, batch_size=64)
    built = cache.ensure(("train",))
    disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(cache.split_path("train")) for f in fs)
    log(f"feature cache built in {built.get('train', 0):.1f}s, {disk / 2**20:.0f} MiB on disk")

    maps = cache.dataset("train", batch_size, shuffle=True, seed=0)
    feature_shape = tuple(maps.element_spec[0].shape[1:])
    features = keras.Input(feature_shape)
    x = keras.layers.GlobalAveragePooling2D()(features)
    x = keras.layers.Dropout(0.2)(x)
    head = keras.Model(features, keras.layers.Dense(info.num_classes, activation="softmax")(x))
    head.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy", metrics=["accuracy"])
    unpooled = _head_epochs(head, maps, epochs)
    log(f"head epochs on the FeatureCache (unpooled {feature_shape}, from disk): {[round(s, 3) for s in unpooled]}s")

    pooled_x, pooled_y = [], []
    for maps_batch, labels in cache.dataset("train", 256):
        pooled_x.append(np.asarray(tf.reduce_mean(maps_batch, axis=[1, 2])))
        pooled_y.append(labels.numpy())
    pooled_x, pooled_y = np.concatenate(pooled_x), np.concatenate(pooled_y)
    pooled = (tf.data.Dataset.from_tensor_slices((pooled_x, pooled_y)).cache()
              .shuffle(len(pooled_y), seed=0, reshuffle_each_iteration=True).batch(batch_size).prefetch(2))
    inputs = keras.Input(pooled_x.shape[1:])
    dense = keras.Model(inputs, keras.layers.Dense(info.num_classes, activation="softmax")(
        keras.layers.Dropout(0.2)(inputs)))
    dense.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy", metrics=["accuracy"])
    in_memory = _head_epochs(dense, pooled, epochs)
    log(f"head epochs on pooled {pooled_x.shape[1:]} features in memory: {[round(s, 3) for s in in_memory]}s")
    result = {"cache_build_s": built.get("train"), "cache_mib": disk / 2**20, "feature_shape": list(feature_shape),
              "unpooled_disk_epoch_s": unpooled, "pooled_memory_epoch_s": in_memory,
              "pooled_bytes": int(pooled_x.nbytes)}
    if "pooling" in inspect.signature(FeatureCache.dataset).parameters:  # the cache also keeps pooled vectors
        cached_pooled = cache.dataset("train", batch_size, shuffle=True, seed=0, pooling="avg")
        dense = keras.Model(inputs, keras.layers.Dense(info.num_classes, activation="softmax")(
            keras.layers.Dropout(0.2)(inputs)))
        dense.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy", metrics=["accuracy"])
        result["featurecache_pooled_epoch_s"] = _head_epochs(dense, cached_pooled, epochs)
        log(f"head epochs on the FeatureCache's pooled (avg) vectors: "
            f"{[round(s, 3) for s in result['featurecache_pooled_epoch_s']]}s")
        lean = FeatureCache(os.path.join(cache_root, "pooled-only"), backbone, weights, SIZE, info, batch_size=64,
                            keep_maps=False)
        result["cache_build_pooled_only_s"] = lean.ensure(("train",)).get("train")
        log(f"feature cache without maps built in {result['cache_build_pooled_only_s']:.1f}s")
    return result


def bench_augment_layers(batch_size: int, rounds: int = 7) -> dict:
    """Seconds per batch of two resamplings (RandomRotation then RandomZoom) against one (RandomRotationZoom).

    Both run as graph functions on the same batch of 224x224 float images,
    interleaved round by round; the median of ``rounds`` counts.
    """
    import keras
    import numpy as np
    import tensorflow as tf

    from trainer.model.augment import RandomRotationZoom

    images = tf.constant(np.random.default_rng(0).uniform(0, 255, (batch_size, *SIZE, 3)).astype("float32"))
    two = keras.Sequential([keras.layers.RandomRotation(0.05, fill_mode="reflect", seed=1),
                            keras.layers.RandomZoom(0.1, fill_mode="reflect", seed=2)])
    one = RandomRotationZoom(0.05, zoom=0.1, fill_mode="reflect", seed=1)
    fns = {"rotation_then_zoom": tf.function(lambda x: two(x, training=True)),
           "rotation_zoom_one_pass": tf.function(lambda x: one(x, training=True))}
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn(images).numpy()  # trace
    for _ in range(rounds):
        for name, fn in fns.items():
            started = time.perf_counter()
            fn(images).numpy()
            times[name].append(time.perf_counter() - started)
    result = {name: statistics.median(values) for name, values in times.items()}
    result["speedup"] = result["rotation_then_zoom"] / result["rotation_zoom_one_pass"]
    log(f"augmentation per batch of {batch_size}: rotation then zoom {result['rotation_then_zoom'] * 1e3:.0f} ms, "
        f"one pass {result['rotation_zoom_one_pass'] * 1e3:.0f} ms ({result['speedup']:.2f}x)")
    return result


def bench_finetune_cache(info, backbone, weights: str, batch_size: int, depth: int, steps: int, augmenter,
                         cache_root: str) -> dict:
    """A fine-tune step on augmented images against one on cached activations (``--finetune-cache``).

    The same classifier (top ``depth`` blocks unfrozen) trains ``steps`` steps
    fed by the trainer's augmented image pipeline, then ``steps`` steps of its
    ``boundary -> upper backbone -> head`` part fed by the activation cache,
    interleaved twice; medians count. The cache's one-off cost is timed too
    (one view of every training image), which gives the break-even point.
    """
    import keras

    from trainer.config import AugmentConfig
    from trainer.data.records import image_dataset
    from trainer.data.activations import ActivationCache
    from trainer.model.classifier import boundary_layer, upper_backbone
    from trainer.model.classifier import find_backbone

    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    model, trainable = classifier(backbone, weights, info.num_classes, depth)
    backbone_model = find_backbone(model)
    boundary = boundary_layer(backbone, backbone_model, depth)
    cache = ActivationCache(cache_root, backbone, weights, SIZE, info, boundary=boundary, views=1,
                            augment=AugmentConfig(), seed=0)
    build_s = cache.ensure(("train",))["train"]
    upper = upper_backbone(backbone_model, boundary)
    activations = keras.Input(tuple(upper.input.shape[1:]))
    head = keras.Sequential(model.layers[3:])
    trainee = keras.Model(activations, head(upper(activations, training=False)))
    trainee.compile(keras.optimizers.Adam(1e-4), "sparse_categorical_crossentropy", metrics=["accuracy"])
    images_steps, cached_steps = [], []
    for round_ in range(2):
        clock = BatchClock()
        fed = image_dataset(info, "train", SIZE, batch_size, shuffle=True, seed=round_, augmenter=augmenter)
        model.fit(fed.take(steps), epochs=1, verbose=0, callbacks=[clock])
        images_steps += clock.step_seconds()
        clock = BatchClock()
        trainee.fit(cache.dataset("train", batch_size, shuffle=True, seed=round_).take(steps), epochs=1, verbose=0,
                    callbacks=[clock])
        cached_steps += clock.step_seconds()
    images_s, cached_s = statistics.median(images_steps), statistics.median(cached_steps)
    steps_per_epoch = -(-info.size("train") // batch_size)
    saved_per_epoch = (images_s - cached_s) * steps_per_epoch
    result = {"depth": depth, "trainable_layers": trainable, "boundary": boundary, "steps_timed": len(images_steps),
              "step_s_images": images_s, "step_s_cached": cached_s, "speedup": images_s / cached_s,
              "view_build_s": build_s, "views_per_s": info.size("train") / build_s,
              "epoch_s_images": images_s * steps_per_epoch, "epoch_s_cached": cached_s * steps_per_epoch,
              "break_even_epochs_per_view": build_s / saved_per_epoch if saved_per_epoch > 0 else None}
    log(f"fine-tune step, top {depth} blocks, batch {batch_size}: {images_s:.3f}s on augmented images, "
        f"{cached_s:.3f}s on cached activations at {boundary} ({result['speedup']:.1f}x); one view of "
        f"{info.size('train')} images cached in {build_s:.0f}s, repaid after "
        f"{result['break_even_epochs_per_view'] or float('nan'):.2f} epochs")
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="224x224 TFRecords (default: build them from clothing-small)")
    parser.add_argument("--weights", default=WEIGHTS)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=15, help="fine-tune steps timed per setting")
    parser.add_argument("--json", help="write the figures here as JSON")
    parser.add_argument("--only-augment", action="store_true",
                        help="only time the augmentation layers (no data or weights needed)")
    parser.add_argument("--only-finetune-cache", action="store_true",
                        help="only time fine-tune steps on images against steps on cached activations")
    parser.add_argument("--depth", type=int, default=5, help="blocks unfrozen for --only-finetune-cache")
    parser.add_argument("--only-cached", action="store_true",
                        help="only question 2's head epochs: the frozen backbone against the feature cache")
    args = parser.parse_args(argv)
    if args.only_augment:
        result = bench_augment_layers(args.batch_size)
        if args.json:
            with open(args.json, "w") as handle:
                json.dump(result, handle, indent=2)
        return 0

    workdir = tempfile.mkdtemp(prefix="bench-trainer-")
    try:
        info_machine = machine()
        log(f"machine: {info_machine['nproc']} CPUs, {info_machine['cpu_model']}, load {info_machine['loadavg_start']}")
        for line in info_machine["busy_processes_start"]:
            log(f"  busy at start: {line}")
        data_dir = args.data or build_data(workdir)

        from trainer.model.augment import build_augmenter
        from trainer.model.backbones import get_backbone
        from trainer.config import AugmentConfig
        from trainer.data.info import inspect_data

        info = inspect_data(data_dir)
        backbone = get_backbone("mobilenet_v2")
        augmenter = build_augmenter(AugmentConfig(), seed=0)
        log(f"data: {data_dir}, train {info.size('train')} images, {info.num_classes} classes")

        results = {"machine": info_machine, "batch_size": args.batch_size, "data_dir": data_dir}
        if args.only_finetune_cache:
            results["finetune_cache"] = bench_finetune_cache(info, backbone, args.weights, args.batch_size,
                                                             args.depth, args.steps, augmenter,
                                                             os.path.join(workdir, "cache"))
            results["machine"]["loadavg_end"] = os.getloadavg()
            if args.json:
                with open(args.json, "w") as handle:
                    json.dump(results, handle, indent=2, default=float)
            return 0
        if not args.only_cached:
            results["augment_layers"] = bench_augment_layers(args.batch_size)
            results["input"] = bench_input(info, args.batch_size, augmenter)
            num_blocks = len(backbone.blocks(backbone.build(SIZE, None)))
            results["finetune"] = [bench_finetune(info, backbone, args.weights, args.batch_size, depth, args.steps,
                                                  augmenter) for depth in (2, num_blocks)]
        results["frozen_epoch"] = bench_frozen_epoch(info, backbone, args.weights, args.batch_size)
        results["cached"] = bench_cached_epochs(info, backbone, args.weights, args.batch_size,
                                                os.path.join(workdir, "cache"))
        results["machine"]["loadavg_end"] = os.getloadavg()

        frozen = results["frozen_epoch"]["seconds"]
        unpooled = min(results["cached"]["unpooled_disk_epoch_s"][1:])
        pooled = min(results["cached"]["pooled_memory_epoch_s"][1:])
        results["summary"] = {
            "frozen_over_unpooled_cache_epoch": frozen / unpooled,
            "frozen_over_pooled_cache_epoch": frozen / pooled,
        }
        if "input" in results:
            input_rate = results["input"]["augmented"]["batches_per_s"]
            results["summary"]["input_vs_finetune"] = {f"top_{r['depth']}_blocks": input_rate * r["step_s_in_memory"]
                                                       for r in results["finetune"]}
        if "featurecache_pooled_epoch_s" in results["cached"]:
            results["summary"]["frozen_over_featurecache_pooled_epoch"] = (
                frozen / min(results["cached"]["featurecache_pooled_epoch_s"][1:]))
        log("summary: " + json.dumps(results["summary"], indent=None))
        if args.json:
            with open(args.json, "w") as handle:
                json.dump(results, handle, indent=2, default=float)
        return 0
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
