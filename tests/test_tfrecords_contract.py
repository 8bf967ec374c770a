"""The shared TFRecord contract: records round-trip and decode the same way everywhere."""

import io
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from preprocessing import tfrecords


def _jpeg(width=40, height=30, colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


# serialize_example's keyword arguments -> the values tf.io.parse_single_example must give back
RECORDS = {
    "plain": dict(encoded=_jpeg(), image_format="jpeg", height=30, width=40, label=2, text="hat",
                  source_id="a dir/ça.jpg", sha256="ab" * 32),
    "non-ascii": dict(encoded=b"\x89PNG\r\n\x1a\n\x00\xff" * 50, image_format="png", height=1, width=1, label=0,
                      text="Mütze 帽子 🧢", source_id="gs://bücket/日本/ß ü.png", sha256="0" * 64),
    "empty-strings": dict(encoded=b"", image_format="jpeg", height=0, width=0, label=0, text="", source_id="",
                          sha256=""),
    "large-ints": dict(encoded=bytes(range(256)) * 1000, image_format="jpeg", height=2**31, width=2**62,
                       label=2**63 - 1, text="x" * 300, source_id="p" * 200, sha256="f" * 64),
    "negative-int": dict(encoded=b"\x00", image_format="png", height=-1, width=-(2**63), label=-5, text="t",
                         source_id="s", sha256="e3"),
}


def _expected(args: dict) -> dict:
    return {
        tfrecords.ENCODED: args["encoded"], tfrecords.FORMAT: args["image_format"].encode(),
        tfrecords.HEIGHT: args["height"], tfrecords.WIDTH: args["width"], tfrecords.LABEL: args["label"],
        tfrecords.TEXT: args["text"].encode("utf-8"), tfrecords.SOURCE_ID: args["source_id"].encode("utf-8"),
        tfrecords.SHA256: args["sha256"].encode("ascii"),
    }


def _tf_example(args: dict) -> tf.train.Example:
    """The same record built with TensorFlow's own ``tf.train.Example`` classes."""
    def feature(value):
        if isinstance(value, int):
            return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))

    return tf.train.Example(features=tf.train.Features(feature={k: feature(v) for k, v in _expected(args).items()}))


@pytest.mark.parametrize("name", RECORDS)
def test_tensorflow_parses_every_contract_key_back_exactly(name):
    args = RECORDS[name]
    record = tfrecords.serialize_example(**args)
    parsed = tfrecords.parse_example(tf.constant(record))
    assert sorted(parsed) == sorted(_expected(args))
    for key, value in _expected(args).items():
        assert parsed[key].numpy() == value, key
        assert parsed[key].dtype == (tf.int64 if isinstance(value, int) else tf.string), key
    # every key is really in the record (not filled in from the spec's default_value)
    assert set(tf.train.Example.FromString(record).features.feature) == set(_expected(args))


@pytest.mark.parametrize("name", RECORDS)
def test_records_are_the_bytes_tensorflow_writes(name):
    """Built without TensorFlow, yet the same message as tf.train.Example and, keys sorted, the same bytes."""
    args = RECORDS[name]
    record = tfrecords.serialize_example(**args)
    reference = _tf_example(args)
    assert tf.train.Example.FromString(record) == reference
    assert record == reference.SerializeToString(deterministic=True)
    assert record == tfrecords.serialize_example(**args)  # deterministic


def test_ints_outside_int64_and_unknown_formats_are_refused():
    args = dict(RECORDS["plain"])
    with pytest.raises(ValueError):
        tfrecords.serialize_example(**{**args, "label": 2**63})
    with pytest.raises(ValueError, match="image_format"):
        tfrecords.serialize_example(**{**args, "image_format": "gif"})


def test_serializing_does_not_import_tensorflow(repo_root):
    code = ("import sys\n"
            "from preprocessing import tfrecords\n"
            "tfrecords.serialize_example(encoded=b'x', image_format='jpeg', height=1, width=1, label=0, text='t',"
            " source_id='s', sha256='ab')\n"
            "assert not [m for m in sys.modules if m.split('.')[0] == 'tensorflow'], 'tensorflow imported'\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize("mode", tfrecords.RESIZE_MODES)
def test_decode_and_resize_gives_target_shape_in_pixel_range(mode):
    image = tfrecords.decode_and_resize(tf.constant(_jpeg(80, 20)), (24, 32), mode)
    assert image.shape == (24, 32, 3) and image.dtype == tf.float32
    assert 0.0 <= float(tf.reduce_min(image)) and float(tf.reduce_max(image)) <= 255.0


def test_pad_mode_keeps_aspect_ratio_with_black_bars():
    image = tfrecords.decode_and_resize(tf.constant(_jpeg(80, 20, (255, 255, 255))), (32, 32), "pad").numpy()
    assert image[0].max() < 5 and image[-1].max() < 5  # bars above and below
    assert image[16].min() > 240  # the picture in the middle


def test_grayscale_png_decodes_to_three_channels():
    buf = io.BytesIO()
    Image.new("L", (10, 10), 128).save(buf, format="PNG")
    image = tfrecords.decode_image(tf.constant(buf.getvalue())).numpy()
    assert image.shape == (10, 10, 3)
    assert np.all(image == 128)


def test_unknown_resize_mode_is_refused():
    with pytest.raises(ValueError, match="resize mode"):
        tfrecords.resize_image(tf.zeros([4, 4, 3], tf.uint8), (2, 2), "squash")


def test_the_carve_bucket_is_the_same_in_python_and_in_the_graph():
    """The job's carve histogram (Python, no TensorFlow) and the trainer's per-record carve (graph) agree."""
    import hashlib

    import tensorflow as tf

    shas = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(500)]
    graph = tfrecords.carve_bucket_tensor(tf.constant(shas), tf.constant(["x"] * len(shas))).numpy()
    assert list(graph) == [tfrecords.carve_bucket(sha) for sha in shas]
    assert 0.15 < sum(b < tfrecords.carve_threshold(0.2) for b in graph) / len(shas) < 0.25
    no_sha = tfrecords.carve_bucket_tensor(tf.constant(["", ""]), tf.constant(["a.jpg", "b.jpg"])).numpy()
    assert all(0 <= b < tfrecords.CARVE_BUCKETS for b in no_sha)
