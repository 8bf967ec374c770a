"""What the client sends: images upright and in a format the serving graph decodes, as preprocessing saw them."""

from __future__ import annotations

import io

from PIL import Image

from serving.client import to_decodable


def _jpeg(size=(40, 20), orientation: int | None = None) -> bytes:
    image = Image.new("RGB", size, (200, 30, 30))
    image.paste((30, 30, 200), (0, 0, size[0] // 2, size[1]))  # left half blue
    out = io.BytesIO()
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    image.save(out, format="JPEG", quality=95, exif=exif.tobytes())
    return out.getvalue()


def test_a_plain_jpeg_is_sent_byte_for_byte():
    data = _jpeg()
    assert to_decodable(data) is data


def test_a_jpeg_with_an_exif_rotation_is_sent_upright_as_png():
    sent = to_decodable(_jpeg(orientation=6))  # 6: the camera was turned; display rotated 90 degrees clockwise
    with Image.open(io.BytesIO(sent)) as image:
        assert image.format == "PNG"
        assert image.size == (20, 40)
        top, bottom = image.convert("RGB").getpixel((10, 2)), image.convert("RGB").getpixel((10, 37))
    assert top[2] > 150 and bottom[0] > 150  # the blue left half is now on top


def test_formats_the_graph_cannot_decode_are_re_encoded_as_png():
    out = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 10)).save(out, format="WEBP", lossless=True)
    with Image.open(io.BytesIO(to_decodable(out.getvalue()))) as image:
        assert image.format == "PNG" and image.getpixel((4, 4)) == (10, 200, 10)


def test_bytes_that_are_no_image_are_left_for_the_server_to_refuse():
    assert to_decodable(b"not an image") == b"not an image"
