"""What the client sends: the caller's bytes untouched where the serving graph decodes them itself.

Exports made since the serving graph normalises uploads (EXIF orientation,
alpha on white, colour modes: docs/contracts.md) get every client's bytes as
they are, so this client answers what curl or a stub-built client answers.
``--normalize-on-client`` keeps the old fix for exports made before that.
"""

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


def _webp() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 10)).save(out, format="WEBP", lossless=True)
    return out.getvalue()


def test_a_plain_jpeg_is_sent_byte_for_byte():
    data = _jpeg()
    assert to_decodable(data) is data


def test_a_jpeg_with_an_exif_rotation_is_sent_untouched_for_the_graph_to_turn():
    data = _jpeg(orientation=6)
    assert to_decodable(data) is data


def test_webp_is_sent_untouched():
    data = _webp()
    assert to_decodable(data) is data


def test_with_normalize_on_client_an_exif_rotation_is_sent_upright_as_png():
    sent = to_decodable(_jpeg(orientation=6), normalize=True)  # 6: display rotated 90 degrees clockwise
    with Image.open(io.BytesIO(sent)) as image:
        assert image.format == "PNG"
        assert image.size == (20, 40)
        top, bottom = image.convert("RGB").getpixel((10, 2)), image.convert("RGB").getpixel((10, 37))
    assert top[2] > 150 and bottom[0] > 150  # the blue left half is now on top


def test_with_normalize_on_client_webp_is_re_encoded_as_png():
    with Image.open(io.BytesIO(to_decodable(_webp(), normalize=True))) as image:
        assert image.format == "PNG" and image.getpixel((4, 4)) == (10, 200, 10)


def test_formats_no_serving_graph_decodes_are_sent_upright_as_png():
    out = io.BytesIO()
    Image.new("RGB", (8, 6), (10, 200, 10)).save(out, format="TIFF")
    with Image.open(io.BytesIO(to_decodable(out.getvalue()))) as image:
        assert image.format == "PNG" and image.size == (8, 6) and image.getpixel((4, 4)) == (10, 200, 10)


def test_bytes_that_are_no_image_are_left_for_the_server_to_refuse():
    assert to_decodable(b"not an image") == b"not an image"
