"""The serving graph's decode (preprocessing/graph_decode.py) against what the preprocessing job records.

Every file is built here with Pillow/numpy: a smooth, asymmetric picture (a
gradient, a dark bar top-left and a bright disk bottom-right) so resampling
differences stay small and a wrong orientation or a lost alpha shows. For each
file the in-graph ``decode_and_resize_upload`` is compared with
``images.convert(..., image_format="png")`` read back by
``tfrecords.decode_and_resize``: exactly the pixels training sees.
"""

from __future__ import annotations

import functools
import io
import os
import struct
import subprocess
import sys
import textwrap
import time
import zlib

import numpy as np
import pytest
from PIL import Image

SIZE = (24, 32)  # (height, width) of the model input
TOLERANCE = 3.0  # mean absolute difference per value, in levels of 0..255


def picture(height: int = 48, width: int = 64) -> np.ndarray:
    """uint8 RGB: gradients, a dark bar top-left, a bright disk bottom-right (no symmetry)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    rgb = np.stack([255 * x / (width - 1), 255 * y / (height - 1), 128 + 80 * np.sin(x / 9 + y / 13)], -1)
    rgb[height // 8:height // 3, width // 10:width // 2] = (20, 30, 40)
    disk = (x - 0.75 * width) ** 2 + (y - 0.7 * height) ** 2 < (height / 6) ** 2
    rgb[disk] = (250, 240, 60)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def alpha_mask(height: int = 48, width: int = 64) -> np.ndarray:
    """uint8 alpha: a ramp left to right, a fully transparent block, a fully opaque stripe."""
    alpha = np.tile(np.linspace(0, 255, width), (height, 1))
    alpha[height // 2:, : width // 4] = 0
    alpha[: height // 6] = 255
    return np.rint(alpha).astype(np.uint8)


def save(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def png_bytes(width: int, height: int, depth: int, colour: int, rows) -> bytes:
    """A PNG from raw filtered rows (an iterable of bytes, each starting with filter byte 0)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for row in rows) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def jpeg_with_orientation(orientation: int) -> bytes:
    return save(Image.fromarray(picture()), "JPEG", quality=95, exif=_exif(orientation))


def rgba_png() -> bytes:
    return save(Image.fromarray(np.dstack([picture(), alpha_mask()]), "RGBA"), "PNG")


def palette_transparent_png() -> bytes:
    image = Image.fromarray(picture()).quantize(63)
    indices = np.asarray(image).copy()
    indices[30:44, 4:20] = 63  # the transparent index; its colour (black) is hidden
    palette = image.getpalette()[: 63 * 3] + [0, 0, 0]
    out = Image.fromarray(indices, "P")
    out.putpalette(palette)
    return save(out, "PNG", transparency=63)


def la_png() -> bytes:
    gray = np.asarray(Image.fromarray(picture()).convert("L"))
    return save(Image.fromarray(np.dstack([gray, alpha_mask()]), "LA"), "PNG")


def gray16_png() -> bytes:
    gray = picture()[..., 0].astype(np.uint16) * 250 + picture()[..., 1].astype(np.uint16) * 7
    return save(Image.fromarray(gray), "PNG")


def rgb16_png() -> bytes:
    pixels = picture().astype(np.uint16) * 257 + np.uint16(91)
    rows = (b"\x00" + row.astype(">u2").tobytes() for row in pixels)
    return png_bytes(pixels.shape[1], pixels.shape[0], 16, 2, rows)


def cmyk_jpeg() -> bytes:
    return save(Image.fromarray(picture()).convert("CMYK"), "JPEG", quality=95)


def transparent_gif() -> bytes:
    image = Image.fromarray(picture()).quantize(63)
    indices = np.asarray(image).copy()
    indices[30:44, 4:20] = 63
    out = Image.fromarray(indices, "P")
    out.putpalette(image.getpalette()[: 63 * 3] + [0, 0, 0])
    return save(out, "GIF", transparency=63)


CASES = {
    **{f"jpeg-orientation-{n}": (lambda n=n: jpeg_with_orientation(n)) for n in range(1, 9)},
    "png-rgba": rgba_png,
    "png-palette-trns": palette_transparent_png,
    "png-gray": lambda: save(Image.fromarray(picture()).convert("L"), "PNG"),
    "png-gray-trns": lambda: save(Image.fromarray(picture()).convert("L"), "PNG", transparency=20),
    "png-rgb-trns": lambda: save(Image.fromarray(picture()), "PNG", transparency=(20, 30, 40)),
    "png-la": la_png,
    "png-gray16": gray16_png,
    "png-rgb16": rgb16_png,
    "jpeg-gray": lambda: save(Image.fromarray(picture()).convert("L"), "JPEG", quality=95),
    "jpeg-cmyk": cmyk_jpeg,
    "webp-lossy": lambda: save(Image.fromarray(picture()), "WEBP", quality=90),
    "webp-lossless-alpha": lambda: save(Image.fromarray(np.dstack([picture(), alpha_mask()]), "RGBA"), "WEBP",
                                        lossless=True),
    "webp-lossy-alpha": lambda: save(Image.fromarray(np.dstack([picture(), alpha_mask()]), "RGBA"), "WEBP",
                                     quality=90),
    "gif": lambda: save(Image.fromarray(picture()).quantize(64), "GIF"),
    "gif-transparent": transparent_gif,
    "bmp": lambda: save(Image.fromarray(picture()), "BMP"),
    "bmp-palette": lambda: save(Image.fromarray(picture()).quantize(64), "BMP"),
    "bmp-rgba": lambda: save(Image.fromarray(np.dstack([picture(), alpha_mask()]), "RGBA"), "BMP"),
    "png-exif-orientation-6": lambda: save(Image.fromarray(picture()), "PNG", exif=_exif(6)),
    "webp-exif-orientation-3": lambda: save(Image.fromarray(picture()), "WEBP", quality=90, exif=_exif(3)),
}

# Measured on TF 2.21 / Pillow 12.0 (graph vs record MAD; the old decode_image(channels=3) vs record):
#   jpeg-orientation-1..4 1.17 (old: 1.2, 68.2, 114.6, 72.2), 5..8 1.11 (old, sideways: 75-85),
#   jpeg-gray 0.78, jpeg-cmyk 0.95, png-rgba 0.26 (old 62.5), png-palette-trns 0.20 (old 18.8),
#   png-la 0.31 (old 57.2), png-gray 0.30, png-gray-trns 0.30 and png-rgb-trns 0.20 (tRNS colour key ignored, as
#   the job ignores it), png-gray16 0.18, png-rgb16 0.21, webp-lossy 0.28,
#   webp-lossless-alpha 0.26 and webp-lossy-alpha 0.26 (old: refused), gif 0.20,
#   gif-transparent 0.20 (old 18.8), bmp 0.20, bmp-palette 0.20 (old 101.1), bmp-rgba 0.20,
#   png-exif-orientation-6 0.25 (old 81.8),
#   webp-exif-orientation-3 0.28 (old 114.9). JPEG cases differ most: Pillow's and TF's libjpeg builds.


def record_pixels(raw: bytes) -> np.ndarray:
    """What training sees for ``raw``: the job's PNG record read back by the trainer's decode."""
    import tensorflow as tf

    from preprocessing import images, tfrecords

    record = images.convert(raw, SIZE, "stretch", image_format="png").encoded
    return tfrecords.decode_and_resize(tf.constant(record), SIZE).numpy()


@functools.cache
def _upload_graph():
    """``decode_and_resize_upload`` traced once as a graph, as the exported signature runs it."""
    import tensorflow as tf

    from preprocessing.graph_decode import decode_and_resize_upload

    return tf.function(lambda data: decode_and_resize_upload(data, SIZE, "stretch"),
                       input_signature=[tf.TensorSpec([], tf.string)])


def upload_pixels(raw: bytes) -> np.ndarray:
    import tensorflow as tf

    return _upload_graph()(tf.constant(raw)).numpy()


def naive_pixels(raw: bytes) -> np.ndarray:
    """The old serving decode (``tf.io.decode_image(channels=3)``): no orientation, no alpha handling."""
    import tensorflow as tf

    from preprocessing import tfrecords

    return tfrecords.decode_and_resize(tf.constant(raw), SIZE).numpy()


def mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(np.abs(a.astype(np.float64) - b.astype(np.float64))))


@pytest.mark.parametrize("name", sorted(CASES))
def test_upload_matches_record(name):
    raw = CASES[name]()
    want = record_pixels(raw)
    got = upload_pixels(raw)
    assert got.shape == want.shape == (*SIZE, 3)
    difference = mad(got, want)
    assert difference <= TOLERANCE, f"{name}: graph vs record MAD {difference:.2f} > {TOLERANCE}"


@pytest.mark.parametrize("name", [f"jpeg-orientation-{n}" for n in range(2, 9)] + [
    "png-rgba", "png-palette-trns", "png-la", "webp-lossless-alpha", "gif-transparent", "bmp-palette",
    "png-exif-orientation-6", "webp-exif-orientation-3"])
def test_the_old_decode_would_fail(name):
    """The comparison is sensitive: ignoring orientation or alpha is far outside the tolerance."""
    import tensorflow as tf

    raw = CASES[name]()
    want = record_pixels(raw)
    try:
        naive = naive_pixels(raw)  # for orientations 5-8: the sideways pixels stretched to the upright shape
    except tf.errors.InvalidArgumentError:
        return  # the old decode (channels=3) cannot even read an RGBA WebP
    assert mad(naive, want) > 6 * TOLERANCE


def test_header_sizes():
    import tensorflow as tf

    from preprocessing.graph_decode import image_header_size

    cases = {name: CASES[name]() for name in ("jpeg-orientation-6", "png-rgba", "png-rgb16", "gif", "bmp",
                                               "webp-lossy", "webp-lossless-alpha", "webp-lossy-alpha")}
    top_down = Image.fromarray(picture())
    cases["bmp-32"] = save(top_down.convert("RGBA"), "BMP")
    frames = [Image.fromarray(picture()).quantize(16), Image.fromarray(255 - picture()).quantize(16)]
    cases["gif-animated"] = save(frames[0], "GIF", save_all=True, append_images=frames[1:], comment=b"x" * 600)
    for name, raw in cases.items():
        height, width = (int(v) for v in image_header_size(tf.constant(raw)))
        assert (height, width) == (48, 64), name
    assert [int(v) for v in image_header_size(tf.constant(b"not an image"))] == [0, 0]


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_read(orientation):
    import tensorflow as tf

    from preprocessing.graph_decode import exif_orientation

    assert int(exif_orientation(tf.constant(jpeg_with_orientation(orientation)))) == orientation


def test_big_endian_exif_and_garbage_are_safe():
    import tensorflow as tf

    from preprocessing.graph_decode import exif_orientation

    base = save(Image.fromarray(picture()), "JPEG", quality=90)
    # An APP1 segment by hand: Motorola byte order, one IFD0 entry (0x0112, SHORT, 1, value 6).
    entry = struct.pack(">HHIHH", 0x0112, 3, 1, 6, 0)
    tiff = b"MM\x00*" + struct.pack(">I", 8) + struct.pack(">H", 1) + entry + b"\0\0\0\0"
    segment = b"Exif\x00\x00" + tiff
    big_endian = base[:2] + b"\xff\xe1" + struct.pack(">H", len(segment) + 2) + segment + base[2:]
    assert int(exif_orientation(tf.constant(big_endian))) == 6
    garbled = base[:2] + b"\xff\xe1\x00\x10Exif\x00\x00XX\xff\xff\xff\xff" + base[2:]
    assert int(exif_orientation(tf.constant(garbled))) == 1
    truncated = base[:2] + b"\xff\xe1\xff\xf0Exif\x00\x00II*\x00"
    assert int(exif_orientation(tf.constant(truncated))) == 1
    assert int(exif_orientation(tf.constant(b""))) == 1


def test_composite_is_bit_exact_with_pillow():
    import tensorflow as tf

    from preprocessing.graph_decode import composite_on_white

    value, alpha = np.meshgrid(np.arange(256), np.arange(256))
    rgba = np.stack([value, 255 - value, value // 2, alpha], -1).astype(np.uint8)
    background = Image.new("RGBA", (256, 256), (255, 255, 255, 255))
    want = np.asarray(Image.alpha_composite(background, Image.fromarray(rgba, "RGBA")).convert("RGB"))
    assert np.array_equal(composite_on_white(tf.constant(rgba)).numpy(), want)


def test_unknown_format_is_refused():
    import tensorflow as tf

    from preprocessing.graph_decode import decode_upright_rgb

    with pytest.raises(tf.errors.InvalidArgumentError, match="Unknown image file format"):
        decode_upright_rgb(tf.constant(b"hello, not an image"))


def _patched(raw: bytes, offset: int, packed: bytes) -> bytes:
    return raw[:offset] + packed + raw[offset + len(packed):]


def bomb_headers() -> dict[str, tuple[bytes, str]]:
    """Small files whose headers claim a huge image, and the size the refusal must name."""
    jpeg = save(Image.fromarray(picture()), "JPEG")
    sof = jpeg.index(b"\xff\xc0")
    gif = save(Image.fromarray(picture()).quantize(16), "GIF")
    bmp = save(Image.fromarray(picture()), "BMP")
    webp = save(Image.fromarray(picture()), "WEBP", lossless=True)
    bits = (16384 - 1) | ((16384 - 1) << 14) | (struct.unpack("<I", webp[21:25])[0] & ~((1 << 28) - 1))
    noise = np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8)
    big_first = save(Image.fromarray(noise).quantize(256), "GIF")  # ~100 KB of full 255-byte sub-blocks
    later_frame = big_first[:-1] + b"\x2c" + struct.pack("<HHHHB", 0, 0, 30000, 30000, 0) + b"\x02\x00\x3b"
    return {
        "jpeg": (_patched(jpeg, sof + 5, struct.pack(">HH", 40000, 30000)), "30000x40000"),
        "gif-later-frame": (later_frame, "30000x30000"),
        "gif": (_patched(gif, 6, struct.pack("<HH", 60000, 50000)), "60000x50000"),
        "bmp": (_patched(bmp, 18, struct.pack("<ii", 30000, -30000)), "30000x30000"),
        "webp": (_patched(webp, 21, struct.pack("<I", bits)), "16384x16384"),
    }


@pytest.mark.parametrize("name", ["jpeg", "gif", "gif-later-frame", "bmp", "webp"])
def test_bomb_headers_are_refused(name):
    import tensorflow as tf

    from preprocessing.graph_decode import decode_upright_rgb

    raw, size = bomb_headers()[name]
    with pytest.raises(tf.errors.InvalidArgumentError, match=f"image too large .*{size} = "):
        decode_upright_rgb(tf.constant(raw))


def test_limit_is_the_jobs_default_and_adjustable():
    import inspect

    import tensorflow as tf

    from preprocessing.config import DEFAULT_MAX_PIXELS, PreprocessConfig
    from preprocessing.graph_decode import decode_upright_rgb

    assert inspect.signature(decode_upright_rgb).parameters["max_pixels"].default == DEFAULT_MAX_PIXELS
    assert PreprocessConfig(input="i", output="o").max_pixels == DEFAULT_MAX_PIXELS
    raw = CASES["png-rgba"]()
    assert decode_upright_rgb(tf.constant(raw), 48 * 64).shape == (48, 64, 3)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"64x48 = 3,072 pixels, over the limit of 3,071"):
        decode_upright_rgb(tf.constant(raw), 48 * 64 - 1)


BOMB_SCRIPT = textwrap.dedent("""
    import os, struct, sys, time, zlib
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    sys.path.insert(0, sys.argv[1])
    import tensorflow as tf
    from preprocessing.graph_decode import decode_and_resize_upload
    from test_graph_decode import png_bytes

    def hwm_kb():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])

    side = 20000
    row = bytes(1 + side // 8)  # filter byte 0 + 1-bit pixels, all zero
    bomb = png_bytes(side, side, 1, 0, (row for _ in range(side)))
    small = png_bytes(8, 8, 1, 0, (bytes(2) for _ in range(8)))
    decode = tf.function(lambda data: decode_and_resize_upload(data, (24, 32)),
                         input_signature=[tf.TensorSpec([], tf.string)])
    decode(tf.constant(small))  # trace and warm up first: only the bomb's own cost is measured
    before = hwm_kb()
    start = time.perf_counter()
    try:
        decode(tf.constant(bomb))
        print("DECODED")
    except tf.errors.InvalidArgumentError as error:
        print("REFUSED", repr(error.message))
    print("SECONDS", time.perf_counter() - start)
    print("GROWTH_MB", (hwm_kb() - before) / 1024)
    print("BYTES", len(bomb))
""")


def test_png_bomb_is_refused_before_decoding(tmp_path):
    """A 20,000 x 20,000 PNG (tens of KB) is refused in well under a second without allocating its pixels."""
    script = tmp_path / "bomb.py"
    script.write_text(BOMB_SCRIPT)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([repo, os.path.join(repo, "tests")]))
    done = subprocess.run([sys.executable, str(script), repo], capture_output=True, text=True, env=env, timeout=300)
    report = dict(line.split(" ", 1) for line in done.stdout.splitlines() if " " in line)
    assert "REFUSED" in report, done.stdout + done.stderr[-2000:]
    assert "20000x20000 = 400,000,000 pixels, over the limit of 89,478,485" in report["REFUSED"]
    assert int(report["BYTES"]) < 200_000
    assert float(report["SECONDS"]) < 1.0, report
    assert float(report["GROWTH_MB"]) < 100, report


def test_animated_webp_is_refused_or_first_frame():
    """TF 2.21's DecodeWebP corrupts the heap on ``channels=0`` for an animation; the graph never asks for that."""
    import tensorflow as tf

    from preprocessing.graph_decode import decode_upright_rgb

    frames = [Image.fromarray(picture()), Image.fromarray(255 - picture())]
    raw = save(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    with pytest.raises(tf.errors.InvalidArgumentError, match="animated WebP without an alpha channel"):
        decode_upright_rgb(tf.constant(raw))
    rgba = [Image.fromarray(np.dstack([picture(), alpha_mask()]), "RGBA"),
            Image.fromarray(255 - picture()).convert("RGBA")]
    raw = save(rgba[0], "WEBP", save_all=True, append_images=rgba[1:], lossless=True)
    got = decode_upright_rgb(tf.constant(raw)).numpy()
    want = record_pixels(raw)
    assert got.shape == (48, 64, 3)
    assert mad(naive_resize(got), want) <= TOLERANCE


def naive_resize(image: np.ndarray) -> np.ndarray:
    from preprocessing import tfrecords

    return tfrecords.resize_image(image, SIZE).numpy()
