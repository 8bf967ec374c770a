"""Fixtures shared by every stage's tests: the sample images, a small TFRecord
data folder written straight through the contract module, and ``../shared``."""

from __future__ import annotations

import json
import os
import pathlib

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_ROOT = REPO_ROOT.parent / "shared"
CLOTHING = SHARED_ROOT / "datasets" / "clothing-small"
MOBILENET_V2_NOTOP = SHARED_ROOT / "weights" / "mobilenet_v2_1.0_224_imagenet_notop.weights.h5"


@pytest.fixture(scope="session")
def repo_root() -> pathlib.Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def clothing_dir() -> pathlib.Path:
    """The real clothing-small photos (../shared, present on dev machines and in CI)."""
    if not CLOTHING.is_dir():
        pytest.skip(f"real data not found at {CLOTHING} (../shared is missing)")
    return CLOTHING


@pytest.fixture(scope="session")
def mobilenet_weights() -> pathlib.Path:
    """Real ImageNet MobileNetV2 weights without the top (../shared/weights)."""
    if not MOBILENET_V2_NOTOP.is_file():
        pytest.skip(f"weights not found at {MOBILENET_V2_NOTOP} (../shared is missing)")
    return MOBILENET_V2_NOTOP


@pytest.fixture(scope="session")
def sample_images(tmp_path_factory) -> pathlib.Path:
    """Generated split folders ``{train,validation,test}/<class>/`` with 3 broken files in train."""
    from preprocessing.sample_data import SampleSpec, generate

    root = tmp_path_factory.mktemp("sample_images")
    generate(str(root), SampleSpec(per_class=20, seed=1))
    return root


def write_tfrecord_data(root: pathlib.Path, *, per_class: int = 16, size: int = 32, seed: int = 0,
                        classes=("circle", "square", "triangle"), shards: int = 1) -> pathlib.Path:
    """A data folder as the preprocessing job writes it, made without Beam (fast, for trainer/serving tests).

    Images are drawn by ``preprocessing.sample_data`` at ``size``x``size``,
    split 60/20/20 per class, ``shards`` shards per split (records dealt round-robin).
    """
    import hashlib
    import io
    import random

    import tensorflow as tf

    from preprocessing import tfrecords
    from preprocessing.sample_data import draw_image

    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    labels = sorted(classes)
    names = {split: [f"{split}-{i:05d}-of-{shards:05d}.tfrecord" for i in range(shards)] for split in tfrecords.SPLITS}
    writers = {split: [tf.io.TFRecordWriter(str(root / name)) for name in names[split]] for split in tfrecords.SPLITS}
    counts = {split: 0 for split in tfrecords.SPLITS}
    by_split = {split: {name: {"written": 0} for name in sorted(classes)} for split in tfrecords.SPLITS}
    carve = {name: [0] * tfrecords.CARVE_BINS for name in labels}
    for label_id, name in enumerate(labels):
        for i in range(per_class):
            split = "train" if i < per_class * 0.6 else ("validation" if i < per_class * 0.8 else "test")
            buf = io.BytesIO()
            draw_image(name, rng, size, size).save(buf, format="JPEG", quality=95)
            data = buf.getvalue()
            writers[split][counts[split] % shards].write(tfrecords.serialize_example(
                encoded=data, image_format="jpeg", height=size, width=size, label=label_id, text=name,
                source_id=f"{split}/{name}/{i}.jpg", sha256=hashlib.sha256(data).hexdigest()))
            counts[split] += 1
            by_split[split][name]["written"] += 1
            if split == "train":
                bucket = tfrecords.carve_bucket(hashlib.sha256(data).hexdigest())
                carve[name][bucket * tfrecords.CARVE_BINS // tfrecords.CARVE_BUCKETS] += 1
    for split_writers in writers.values():
        for writer in split_writers:
            writer.close()
    (root / tfrecords.LABELS_FILE).write_text("\n".join(labels) + "\n")
    (root / tfrecords.STATS_FILE).write_text(json.dumps({
        "options": {"image_size": [size, size], "resize_mode": "stretch", "image_format": "jpeg"},
        "written": counts, "by_split_and_class": by_split, "labels": labels,
        "shards": {split: {name: (root / name).stat().st_size for name in names[split]} for split in tfrecords.SPLITS},
        "carve_histogram": {"method": tfrecords.CARVE_METHOD, "buckets": tfrecords.CARVE_BUCKETS,
                            "bins": tfrecords.CARVE_BINS, "train": carve},
    }))
    (root / tfrecords.ERRORS_FILE).write_text("")
    return root


@pytest.fixture(scope="session")
def tfrecord_data(tmp_path_factory) -> pathlib.Path:
    """A small 3-class data folder (32x32 JPEGs) in the contract's layout."""
    return write_tfrecord_data(tmp_path_factory.mktemp("data"))
