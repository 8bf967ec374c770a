"""How many shards a split gets (the default rule, documented in --help), which records go where, and the files."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from preprocessing import readback, shards
from preprocessing.cli import build_parser
from preprocessing.config import PreprocessConfig
from preprocessing.job import run
from preprocessing.tfrecords import SPLITS

IN_PROCESS = ["--direct_num_workers=1", "--direct_running_mode=in_memory"]
JPEG_224 = shards.estimated_record_bytes((224, 224), "jpeg")


@pytest.mark.parametrize("records, expected", [
    (0, 1),  # an empty split still gets one (empty) shard
    (1, 1), (10, 10), (63, 63),  # fewer records than MIN_SHARDS: one record per shard
    (64, 64), (1000, 64), (200_000, 64),  # 64 shards, 16 trainer workers x 4 each
    (1_000_000, math.ceil(1_000_000 * JPEG_224 / shards.TARGET_SHARD_BYTES)),  # then by size: <= ~128 MiB each
])
def test_default_shard_count_rule(records, expected):
    assert shards.num_shards(records, JPEG_224) == expected


def test_large_splits_get_shards_of_at_most_about_the_target_size():
    records = 5_000_000
    count = shards.num_shards(records, JPEG_224)
    assert count > shards.MIN_SHARDS
    assert records * JPEG_224 / count <= shards.TARGET_SHARD_BYTES
    assert records * JPEG_224 / (count - 1) > shards.TARGET_SHARD_BYTES


def test_a_requested_count_is_used_as_is():
    assert shards.num_shards(0, JPEG_224, requested=3) == 3
    assert shards.num_shards(10_000, JPEG_224, requested=2) == 2


@pytest.mark.parametrize("records, count", [(64, 64), (100, 64), (1000, 64), (7, 3), (5, 5)])
def test_records_go_to_shards_in_contiguous_runs_of_equal_size(records, count):
    assigned = [shards.shard_of(rank, records, count) for rank in range(records)]
    assert assigned == sorted(assigned) and set(assigned) == set(range(count))
    sizes = [assigned.count(index) for index in range(count)]
    assert max(sizes) - min(sizes) <= 1


def test_help_says_how_the_shard_count_is_chosen():
    text = " ".join(build_parser().format_help().split())
    for fragment in ("0 (default) chooses per split", "max(64,", "128 MiB", "16 trainer workers", "exactly N"):
        assert fragment in text


def test_shard_files_are_the_tfrecords_tensorflow_writes(tmp_path):
    import tensorflow as tf

    records = [b"", b"one", bytes(range(256)) * 40]
    writer = shards.ShardWriter(str(tmp_path / "ours.tfrecord"), str(tmp_path / "tmp"))
    for record in records:
        writer.write(record)
    writer.commit()
    with tf.io.TFRecordWriter(str(tmp_path / "tf.tfrecord")) as theirs:
        for record in records:
            theirs.write(record)
    assert (tmp_path / "ours.tfrecord").read_bytes() == (tmp_path / "tf.tfrecord").read_bytes()
    assert list((tmp_path / "tmp").iterdir()) == []  # written under a temporary name, then renamed


def _images(root, count):
    for index in range(count):
        label = ("red", "green", "blue")[index % 3]
        (root / label).mkdir(parents=True, exist_ok=True)
        pixels = np.random.default_rng(index).integers(0, 255, (6, 6, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / label / f"{index}.png")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards") / "photos"
    _images(root, 180)
    return root


def test_each_split_gets_the_default_number_of_balanced_shards_in_sha256_order(photos, tmp_path):
    import tensorflow as tf

    from preprocessing.tfrecords import SHA256, parse_example

    out = tmp_path / "data"
    stats = run(PreprocessConfig(input=str(photos), output=str(out), image_size=(8, 8), split=(0.6, 0.2, 0.2),
                                 progress_seconds=0), IN_PROCESS)
    assert stats["totals"]["written"] == 180
    for split in SPLITS:
        written = stats["written"][split]
        count = shards.num_shards(written, 0)
        assert written > 20 and count == min(written, 64)
        names = sorted(p.name for p in out.glob(f"{split}-*"))
        assert names == [shards.shard_name(split, index, count) for index in range(count)]
        sizes, digests = [], []
        for name in names:
            parsed = [parse_example(record) for record in tf.data.TFRecordDataset(str(out / name))]
            sizes.append(len(parsed))
            digests += [example[SHA256].numpy().decode() for example in parsed]
        assert sum(sizes) == written and max(sizes) - min(sizes) <= 1
        assert digests == sorted(digests)


def test_more_shards_than_records_gives_empty_shards(photos, tmp_path):
    out = tmp_path / "data"
    stats = run(PreprocessConfig(input=str(photos), output=str(out), image_size=(8, 8), split=(1.0, 0.0, 0.0),
                                 num_shards=200, progress_seconds=0), IN_PROCESS)
    for split in SPLITS:
        assert len(list(out.glob(f"{split}-*-of-00200.tfrecord"))) == 200
    assert len(readback.read_records(str(out), "train")) == stats["written"]["train"] == 180
    assert readback.read_records(str(out), "test") == []
    assert not (out / shards.TEMP_FOLDER).exists()
