"""Pillow conversion: every kind of odd image becomes upright 8-bit RGB of the requested size, or a reason."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from preprocessing import images


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _decoded(converted: images.Converted) -> np.ndarray:
    image = Image.open(io.BytesIO(converted.encoded))
    assert image.mode == "RGB"
    return np.asarray(image).astype(int)


def test_output_has_requested_height_and_width_in_every_mode():
    data = _encode(Image.new("RGB", (90, 40), (10, 200, 30)), "PNG")
    for mode in ("stretch", "pad", "crop"):
        converted = images.convert(data, (24, 32), mode, "png")
        assert Image.open(io.BytesIO(converted.encoded)).size == (32, 24)
        assert (converted.height, converted.width) == (24, 32)
        assert (converted.source_width, converted.source_height) == (90, 40)


def test_png_output_is_lossless_and_jpeg_output_respects_quality():
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    data = _encode(photo, "PNG")
    png = images.convert(data, (64, 64), "stretch", "png")
    assert np.array_equal(_decoded(png), np.asarray(photo).astype(int))
    low = images.convert(data, (64, 64), "stretch", "jpeg", jpeg_quality=30)
    high = images.convert(data, (64, 64), "stretch", "jpeg", jpeg_quality=95)
    assert Image.open(io.BytesIO(high.encoded)).format == "JPEG"
    assert len(low.encoded) < len(high.encoded)


def test_rgba_is_composited_on_white():
    rgba = Image.new("RGBA", (20, 20), (255, 0, 0, 0))  # fully transparent red
    rgba.paste((0, 0, 255, 255), (0, 0, 10, 20))  # opaque blue left half
    pixels = _decoded(images.convert(_encode(rgba, "PNG"), (20, 20), "stretch", "png"))
    assert pixels[10, 2].tolist() == [0, 0, 255]
    assert pixels[10, 17].tolist() == [255, 255, 255]


def test_palette_png_with_transparency_becomes_rgb_on_white():
    palette = Image.new("P", (16, 16), 1)
    palette.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    palette.paste(0, (0, 0, 8, 16))
    data = _encode(palette, "PNG", transparency=0)
    pixels = _decoded(images.convert(data, (16, 16), "stretch", "png"))
    assert pixels[8, 2].tolist() == [255, 255, 255]  # transparent index -> white
    assert pixels[8, 13].tolist() == [0, 255, 0]


def test_grayscale_becomes_three_equal_channels():
    pixels = _decoded(images.convert(_encode(Image.new("L", (12, 12), 77), "PNG"), (12, 12), "stretch", "png"))
    assert pixels.shape == (12, 12, 3) and (pixels == 77).all()


def test_sixteen_bit_png_is_scaled_not_clipped():
    array = np.full((10, 10), 32896, dtype=np.uint16)  # half of 65535
    data = _encode(Image.fromarray(array), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    pixels = _decoded(images.convert(data, (10, 10), "stretch", "png"))
    assert (abs(pixels - 128) <= 1).all()


def test_cmyk_jpeg_becomes_rgb():
    data = _encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95)  # red in CMYK
    pixels = _decoded(images.convert(data, (16, 16), "stretch", "png"))
    red, green, blue = pixels[8, 8]
    assert red > 200 and green < 60 and blue < 60


def test_exif_orientation_is_applied():
    wide = Image.new("RGB", (40, 20), (0, 0, 0))
    wide.paste((255, 255, 255), (0, 0, 20, 20))  # white left half
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    data = _encode(wide, "JPEG", quality=95, exif=exif.tobytes())
    converted = images.convert(data, (40, 20), "stretch", "png")
    pixels = _decoded(converted)
    assert pixels.shape[:2] == (40, 20)  # stored 40 wide, shown upright 20 wide and 40 high
    assert pixels[5, 10].mean() > 200 and pixels[35, 10].mean() < 50  # white on top after rotating


def test_one_pixel_image_is_upscaled():
    pixels = _decoded(images.convert(_encode(Image.new("RGB", (1, 1), (9, 99, 199)), "PNG"), (8, 8), "pad", "png"))
    assert pixels.shape == (8, 8, 3)
    assert (abs(pixels - [9, 99, 199]) <= 1).all()


def test_pad_mode_centres_the_image_between_black_bars():
    pixels = _decoded(images.convert(_encode(Image.new("RGB", (80, 20), (255, 255, 255)), "PNG"), (32, 32), "pad", "png"))
    assert pixels[:10].max() == 0 and pixels[-10:].max() == 0
    assert pixels[16].min() == 255


def test_crop_mode_keeps_the_centre():
    image = Image.new("RGB", (90, 30), (255, 0, 0))
    image.paste((0, 0, 255), (30, 0, 60, 30))  # blue centre square
    pixels = _decoded(images.convert(_encode(image, "PNG"), (16, 16), "crop", "png"))
    assert (pixels[:, :, 2] > 240).all() and (pixels[:, :, 0] < 15).all()


@pytest.mark.parametrize("mode", ["stretch", "pad", "crop"])
def test_resize_matches_the_tensorflow_contract(mode):
    """Pillow (writing) and preprocessing.tfrecords.resize_image (serving) agree on the geometry."""
    import tensorflow as tf

    from preprocessing import tfrecords

    rng = np.random.default_rng(3)
    source = np.kron(rng.integers(0, 255, (12, 20, 3)), np.ones((10, 10, 1))).astype(np.uint8)  # smooth blocks
    data = _encode(Image.fromarray(source), "PNG")
    ours = _decoded(images.convert(data, (48, 64), mode, "png")).astype(float)
    theirs = tfrecords.decode_and_resize(tf.constant(data), (48, 64), mode).numpy()
    assert np.abs(ours - theirs).mean() < 6.0


def test_animated_gif_gives_its_first_frame():
    frames = [Image.new("P", (8, 8), index) for index in (1, 2)]
    for frame in frames:
        frame.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    pixels = _decoded(images.convert(buffer.getvalue(), (8, 8), "stretch", "png"))
    assert pixels[4, 4].tolist() == [255, 0, 0]


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty file"),
        (b"this is a text file with an image's name\n", "not an image"),
        (_encode(Image.new("RGB", (64, 64)), "JPEG")[:200], "truncated"),
        (_encode(Image.new("RGB", (8, 8)), "PPM"), "unsupported image format PPM"),
    ],
    ids=["zero-bytes", "text", "truncated-jpeg", "unsupported-format"],
)
def test_unusable_bytes_are_rejected_with_a_reason(data, reason):
    with pytest.raises(images.Rejected, match=reason):
        images.convert(data, (16, 16))


def test_decompression_bomb_is_rejected_from_its_header_before_decoding():
    data = _encode(Image.new("L", (3000, 3000)), "PNG")  # tiny file, 9 megapixels
    with pytest.raises(images.Rejected, match="too large"):
        images.probe(data, max_pixels=1_000_000)
    with pytest.raises(images.Rejected, match="over --max-pixels 1,000,000"):
        images.convert(data, (16, 16), max_pixels=1_000_000)
