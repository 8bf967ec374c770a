"""The shared TFRecord contract: records round-trip and decode the same way everywhere."""

import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from preprocessing import tfrecords


def _jpeg(width=40, height=30, colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def test_example_round_trips_every_contract_key():
    data = _jpeg()
    record = tfrecords.serialize_example(encoded=data, image_format="jpeg", height=30, width=40, label=2,
                                         text="hat", source_id="a dir/ça.jpg", sha256="ab" * 32)
    parsed = tfrecords.parse_example(tf.constant(record))
    assert parsed[tfrecords.ENCODED].numpy() == data
    assert parsed[tfrecords.FORMAT].numpy() == b"jpeg"
    assert (parsed[tfrecords.HEIGHT].numpy(), parsed[tfrecords.WIDTH].numpy()) == (30, 40)
    assert parsed[tfrecords.LABEL].numpy() == 2
    assert parsed[tfrecords.TEXT].numpy().decode() == "hat"
    assert parsed[tfrecords.SOURCE_ID].numpy().decode("utf-8") == "a dir/ça.jpg"
    assert parsed[tfrecords.SHA256].numpy().decode() == "ab" * 32


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
