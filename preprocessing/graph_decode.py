"""Decode uploaded image bytes inside the serving graph as the preprocessing job does.

The job (:mod:`preprocessing.images`, Pillow) applies EXIF orientation,
composites alpha on white and turns every colour mode into 8-bit RGB before
it writes a record; the records the trainer reads are therefore already
normalised. A client of the exported model sends the original file, so the
serving graph must do the same normalisation itself, with TensorFlow ops only
(no ``tf.py_function``, no numpy): the real ``tensorflow_model_server`` runs it.

Contract of :func:`decode_upright_rgb` (what ``image_bytes`` accepts):

* EXIF orientation 1..8 is applied as ``ImageOps.exif_transpose`` applies
  it, read where Pillow reads it: a JPEG's first APP1 ``Exif`` segment, a
  PNG's ``eXIf`` chunk, a WebP's ``EXIF`` chunk. A missing or garbled EXIF
  block means orientation 1, never an error.
* JPEG: also grayscale, CMYK (Adobe, as Pillow writes it) and MPO (its first image).
* PNG: palette (with ``tRNS``), gray+alpha and RGBA are composited on white
  with Pillow's ``alpha_composite`` integer arithmetic; 16-bit grayscale is
  scaled by 1/257 with rounding, other 16-bit PNGs keep the high byte (what
  Pillow's decoder does). A ``tRNS`` colour key on grayscale or RGB PNGs is
  ignored, as the job ignores it.
* GIF: the first frame; a transparent colour index becomes white.
* BMP: 24/32-bit as TensorFlow's ``DecodeBmp`` reads them; 8-bit palette
  BMPs through their palette (``DecodeBmp`` alone returns the indices).
* WebP: lossy, lossless and extended; alpha is composited on white; an
  animated WebP gives its first frame when it carries an alpha flag and is
  refused otherwise (TensorFlow's ``DecodeWebP`` cannot decode it).
* Anything else (TIFF, JPEG XL, text) is refused with "Unknown image file
  format...".

Before any pixel is decoded, the width and height are read from the header
(:func:`image_header_size`) and an image over ``max_pixels`` (default: the
job's ``--max-pixels``) is refused with ``InvalidArgumentError`` naming its
size, so a decompression bomb never allocates its pixels.

Every GIF frame is size-checked (giflib reads all of them before TensorFlow
keeps the first), each against the limit as Pillow checks one image.

Known gaps against Pillow: a GIF whose first frame is smaller than its
logical screen may fill the rest differently; BMPs ``DecodeBmp`` cannot read (1/4-bit,
RLE) fail with its message although Pillow reads them.
"""

from __future__ import annotations

from typing import Sequence

import tensorflow as tf

from preprocessing import tfrecords
from preprocessing.config import DEFAULT_MAX_PIXELS

UNKNOWN, JPEG, PNG, GIF, BMP, WEBP = range(6)
UNKNOWN_FORMAT_MESSAGE = "Unknown image file format. One of JPEG, PNG, GIF, BMP, WebP required."
_MAX_JPEG_SEGMENTS = 64  # markers walked before giving up on finding EXIF
_MAX_IFD_ENTRIES = 256  # IFD0 entries looked at for the orientation tag
_MAX_GIF_BLOCKS = 1 << 20  # GIF walk steps (each at least one sub-block: files up to ~256 MB)
_GIF_RUN = 64  # full 255-byte sub-blocks skipped in one step
_MAX_CHUNKS = 4096  # PNG/WebP chunks walked looking for EXIF
_BYTE_VALUES = [bytes([value]) for value in range(256)]


def _bytes(data: tf.Tensor, pos, n: int) -> tf.Tensor:
    """``n`` bytes of ``data`` from ``pos`` as int64 ``[n]``, zeros past the end (never an error)."""
    size = tf.cast(tf.strings.length(data), tf.int64)
    pos = tf.clip_by_value(tf.cast(pos, tf.int64), 0, size)
    raw = tf.cast(tf.io.decode_raw(tf.strings.substr(data, pos, tf.constant(n, tf.int64)), tf.uint8), tf.int64)
    return tf.reshape(tf.pad(raw, [[0, n - tf.size(raw, out_type=tf.int64)]]), [n])


def _le(b: tf.Tensor) -> tf.Tensor:
    """Unsigned little-endian integer from the bytes ``b`` (last axis)."""
    weights = tf.constant([1 << (8 * i) for i in range(b.shape[-1])], tf.int64)
    return tf.reduce_sum(b * weights, axis=-1)


def _be(b: tf.Tensor) -> tf.Tensor:
    """Unsigned big-endian integer from the bytes ``b`` (last axis)."""
    return _le(tf.reverse(b, [-1]))


def _shr(x: tf.Tensor, bits: int) -> tf.Tensor:
    return tf.bitwise.right_shift(x, tf.constant(bits, x.dtype))


def _table_entries(flags: tf.Tensor) -> tf.Tensor:
    """Entries of a GIF colour table from its packed flags byte (2 ** (1 + low 3 bits))."""
    return tf.bitwise.left_shift(tf.constant(2, tf.int64), flags & 7)


def _matches(b: tf.Tensor, pattern: bytes) -> tf.Tensor:
    return tf.reduce_all(tf.equal(b, tf.constant(list(pattern), tf.int64)))


def _format_of(head: tf.Tensor) -> tf.Tensor:
    """Format code (int32) from the first 32 bytes, by the signatures ``DecodeImage`` checks."""
    checks = [
        (JPEG, _matches(head[:3], b"\xff\xd8\xff")),
        (PNG, _matches(head[:8], b"\x89PNG\r\n\x1a\n")),
        (GIF, _matches(head[:4], b"GIF8")),
        (BMP, _matches(head[:2], b"BM")),
        (WEBP, _matches(head[:4], b"RIFF") & _matches(head[8:12], b"WEBP")),
    ]
    code = tf.constant(UNKNOWN, tf.int32)
    for value, hit in reversed(checks):
        code = tf.where(hit, tf.constant(value, tf.int32), code)
    return code


def _webp_size(head: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(height, width) of a WebP from its first chunk: VP8 (lossy), VP8L (lossless) or VP8X (extended)."""
    chunk = head[12:16]
    vp8l_bits = _le(head[21:25])
    sizes = [
        (_matches(chunk, b"VP8 "), _le(head[28:30]) & 0x3FFF, _le(head[26:28]) & 0x3FFF),
        (_matches(chunk, b"VP8L"), (_shr(vp8l_bits, 14) & 0x3FFF) + 1, (vp8l_bits & 0x3FFF) + 1),
        (_matches(chunk, b"VP8X"), _le(head[27:30]) + 1, _le(head[24:27]) + 1),
    ]
    height = width = tf.constant(0, tf.int64)
    for hit, h, w in sizes:
        height, width = tf.where(hit, h, height), tf.where(hit, w, width)
    return height, width


def _bmp_size(head: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(height, width) of a BMP: BITMAPCOREHEADER (16-bit) or BITMAPINFOHEADER and later
    (signed 32-bit, a negative height meaning top-down)."""
    core = tf.equal(_le(head[14:18]), 12)

    def signed32(b):
        value = _le(b)
        return tf.abs(tf.where(value >= 1 << 31, value - (1 << 32), value))

    height = tf.where(core, _le(head[20:22]), signed32(head[22:26]))
    width = tf.where(core, _le(head[18:20]), signed32(head[18:22]))
    return height, width


def image_header_size(encoded: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """``(height, width)`` int64 scalars read from the header, without decoding pixels.

    JPEG via ``tf.io.extract_jpeg_shape``; PNG from IHDR; GIF: the logical
    screen or, if larger, the largest frame (giflib reads every frame before
    TensorFlow keeps the first); BMP and WebP from their headers. An unknown
    format gives ``(0, 0)`` (it is refused without decoding).
    """
    encoded = tf.convert_to_tensor(encoded, tf.string)
    head = _bytes(encoded, 0, 32)
    code = _format_of(head)

    def jpeg():
        shape = tf.cast(tf.io.extract_jpeg_shape(encoded), tf.int64)
        return shape[0], shape[1]

    def gif():
        _, _, height, width = _gif_walk(encoded, all_frames=True)
        bigger = height * width > _le(head[8:10]) * _le(head[6:8])
        return tf.where(bigger, height, _le(head[8:10])), tf.where(bigger, width, _le(head[6:8]))

    zero = tf.constant(0, tf.int64)
    branches = [
        lambda: (zero, zero),
        jpeg,
        lambda: (_be(head[20:24]), _be(head[16:20])),
        gif,
        lambda: _bmp_size(head),
        lambda: _webp_size(head),
    ]
    return tf.switch_case(code, branches)


def _thousands(value: tf.Tensor) -> tf.Tensor:
    """An int64 scalar as a string with thousands separators ("400,000,000")."""
    digits = tf.strings.as_string(value)
    pad = (3 - tf.strings.length(digits) % 3) % 3
    padded = tf.strings.join([tf.strings.substr(tf.constant("  "), 0, pad), digits])
    groups = tf.strings.reduce_join(tf.reshape(tf.strings.bytes_split(padded), [-1, 3]), axis=1)
    return tf.strings.strip(tf.strings.reduce_join(groups, separator=","))


def _size_guard(encoded: tf.Tensor, max_pixels: int) -> tf.Tensor:
    """A boolean that is computed only when ``width * height <= max_pixels``: depend on it before decoding.

    The refusal message (size with thousands separators) is built inside the
    failing branch only: ``tf.debugging.Assert`` evaluates string data
    unconditionally, a dozen string ops on every accepted image.
    """
    height, width = image_header_size(encoded)
    pixels = height * width

    def refuse():
        message = tf.strings.join([
            "image too large (possible decompression bomb): ",
            tf.strings.as_string(width), "x", tf.strings.as_string(height), " = ",
            _thousands(pixels), f" pixels, over the limit of {max_pixels:,}",
        ])
        with tf.control_dependencies([tf.debugging.Assert(False, [message])]):
            return tf.constant(False)

    return tf.cond(pixels <= max_pixels, lambda: tf.constant(True), refuse)


def _jpeg_exif_start(data: tf.Tensor) -> tf.Tensor:
    """Offset of the TIFF header in the first APP1 ``Exif`` segment, or -1 (walks markers up to SOS)."""
    size = tf.cast(tf.strings.length(data), tf.int64)

    def body(pos, found, steps):
        b = _bytes(data, pos, 10)
        is_marker = tf.equal(b[0], 0xFF)
        is_exif = is_marker & tf.equal(b[1], 0xE1) & _matches(b[4:10], b"Exif\x00\x00")
        stop = ~is_marker | tf.equal(b[1], 0xDA) | tf.equal(b[1], 0xD9) | (pos + 4 > size)
        found = tf.where(is_exif, pos + 10, tf.where(stop, tf.constant(-2, tf.int64), found))
        return pos + 2 + _be(b[2:4]), found, steps + 1

    def searching(pos, found, steps):
        return tf.equal(found, -1) & (steps < _MAX_JPEG_SEGMENTS)

    start = (tf.constant(2, tf.int64), tf.constant(-1, tf.int64), tf.constant(0))
    _, found, _ = tf.while_loop(searching, body, start)
    return tf.where(found >= 0, found, -1)


def _chunk_exif_start(data: tf.Tensor, first: int, big_endian: bool, kind: bytes, header: int, end: bytes) -> tf.Tensor:
    """Offset of the payload of the first ``kind`` chunk (PNG ``eXIf``, WebP ``EXIF``), or -1.

    PNG chunks are length (big-endian), type, data, CRC; RIFF chunks are
    type, length (little-endian), data padded to even. Stops at ``end``.
    """
    size = tf.cast(tf.strings.length(data), tf.int64)

    def body(pos, found, steps):
        b = _bytes(data, pos, 8)
        name, length = (b[4:8], _be(b[:4])) if big_endian else (b[:4], _le(b[4:8]))
        stop = _matches(name, end) | (pos + 8 > size)
        found = tf.where(_matches(name, kind), pos + 8, tf.where(stop, tf.constant(-2, tf.int64), found))
        return pos + header + length + (0 if big_endian else length & 1), found, steps + 1

    def searching(pos, found, steps):
        return tf.equal(found, -1) & (steps < _MAX_CHUNKS)

    _, found, _ = tf.while_loop(searching, body, (tf.constant(first, tf.int64), tf.constant(-1, tf.int64),
                                                  tf.constant(0)))
    found = tf.where(found >= 0, found, -1)
    return tf.where(_matches(_bytes(data, found, 6), b"Exif\x00\x00"), found + 6, found)


def _exif_start(data: tf.Tensor) -> tf.Tensor:
    """Offset of the EXIF TIFF header where Pillow's ``getexif`` finds it (JPEG APP1, PNG eXIf, WebP EXIF), or -1."""
    none = tf.constant(-1, tf.int64)
    branches = [
        lambda: none,
        lambda: _jpeg_exif_start(data),
        lambda: _chunk_exif_start(data, 8, True, b"eXIf", 12, b"IEND"),
        lambda: none,
        lambda: none,
        lambda: _chunk_exif_start(data, 12, False, b"EXIF", 8, b"\x00\x00\x00\x00"),
    ]
    return tf.switch_case(_format_of(_bytes(data, 0, 32)), branches)


def exif_orientation(encoded: tf.Tensor) -> tf.Tensor:
    """EXIF orientation (int32 1..8) from IFD0's tag 0x0112 (SHORT); 1 when absent or garbled.

    Read from a JPEG's first APP1 ``Exif`` segment, a PNG's ``eXIf`` chunk or
    a WebP's ``EXIF`` chunk, where Pillow's ``exif_transpose`` reads it. A JPEG
    without ``Exif\\0\\0`` in its first bytes (where APP1 sits) skips the
    marker walk: one vectorised search instead of a loop of small ops.
    """
    encoded = tf.convert_to_tensor(encoded, tf.string)
    return tf.cond(_may_have_exif(encoded), lambda: _parsed_orientation(encoded), lambda: tf.constant(1, tf.int32))


_EXIF_SEARCH_BYTES = (1 << 16) + 16  # EXIF's APP1 follows SOI, or an APP0 of at most 64 KB


def _may_have_exif(data: tf.Tensor) -> tf.Tensor:
    """False only for a JPEG whose first ``_EXIF_SEARCH_BYTES`` hold no ``Exif\\0\\0`` (RE2 reads text, not bytes)."""
    head = tf.io.decode_raw(tf.strings.substr(data, 0, _EXIF_SEARCH_BYTES), tf.uint8)
    span = tf.maximum(tf.size(head) - 5, 0)
    hit = tf.ones([span], tf.bool)
    for offset, byte in enumerate(b"Exif\x00\x00"):
        hit &= tf.equal(head[offset:offset + span], byte)
    is_jpeg = tf.equal(_format_of(_bytes(data, 0, 32)), JPEG)
    return tf.reduce_any(hit) | ~is_jpeg


def _parsed_orientation(encoded: tf.Tensor) -> tf.Tensor:
    tiff = _exif_start(encoded)
    header = _bytes(encoded, tiff, 8)
    little = _matches(header[:4], b"II*\x00")
    big = _matches(header[:4], b"MM\x00*")

    def number(b):
        return tf.where(little, _le(b), _be(b))

    ifd = tiff + number(header[4:8])
    count = tf.minimum(number(_bytes(encoded, ifd, 2)), _MAX_IFD_ENTRIES)
    entries = tf.reshape(_bytes(encoded, ifd + 2, 12 * _MAX_IFD_ENTRIES), [_MAX_IFD_ENTRIES, 12])
    in_ifd = tf.range(_MAX_IFD_ENTRIES, dtype=tf.int64) < count
    wanted = in_ifd & tf.equal(number(entries[:, 0:2]), 0x0112) & tf.equal(number(entries[:, 2:4]), 3)  # SHORT
    values = tf.boolean_mask(number(entries[:, 8:10]), wanted)
    value = tf.cond(tf.size(values) > 0, lambda: values[0], lambda: tf.constant(1, tf.int64))
    valid = (tiff >= 0) & (little | big) & (value >= 1) & (value <= 8)
    return tf.cast(tf.where(valid, value, 1), tf.int32)


def apply_orientation(image: tf.Tensor, orientation: tf.Tensor) -> tf.Tensor:
    """Make an ``[h, w, c]`` image upright as Pillow's ``ImageOps.exif_transpose`` does for 1..8."""

    def transpose(x):
        return tf.transpose(x, [1, 0, 2])

    branches = [
        lambda: image,  # 0: not an orientation, left alone
        lambda: image,  # 1: upright
        lambda: tf.reverse(image, [1]),  # 2: FLIP_LEFT_RIGHT
        lambda: tf.reverse(image, [0, 1]),  # 3: ROTATE_180
        lambda: tf.reverse(image, [0]),  # 4: FLIP_TOP_BOTTOM
        lambda: transpose(image),  # 5: TRANSPOSE
        lambda: tf.reverse(transpose(image), [1]),  # 6: ROTATE_270 (90 clockwise)
        lambda: tf.reverse(transpose(image), [0, 1]),  # 7: TRANSVERSE
        lambda: tf.reverse(transpose(image), [0]),  # 8: ROTATE_90 (90 counter-clockwise)
    ]
    return tf.switch_case(tf.clip_by_value(orientation, 0, 8), branches)


def composite_on_white(rgba: tf.Tensor) -> tf.Tensor:
    """uint8 RGBA to RGB on opaque white, bit-exact with Pillow's ``alpha_composite`` (7-bit precision)."""
    pixels = tf.cast(rgba, tf.int32)
    rgb, alpha = pixels[..., :3], pixels[..., 3:]
    blended = 128 * (rgb * alpha + 255 * (255 - alpha)) + (0x80 << 7)
    return tf.cast(_shr(_shr(_shr(blended, 8) + blended, 8), 7), tf.uint8)


def _decode_jpeg(data: tf.Tensor) -> tf.Tensor:
    return tf.io.decode_jpeg(data, channels=3)


def _decode_bmp(data: tf.Tensor) -> tf.Tensor:
    """BMP to RGB; an 8-bit palette BMP is looked up in its palette (``DecodeBmp`` returns the indices)."""
    head = _bytes(data, 0, 32)
    dib = _le(head[14:18])

    def paletted():
        indices = tf.cast(tf.io.decode_bmp(data, channels=3)[..., 0], tf.int32)
        entries = tf.reshape(_bytes(data, 14 + dib, 4 * 256), [256, 4])  # B, G, R, 0
        palette = tf.cast(tf.reverse(entries[:, :3], [1]), tf.uint8)
        return tf.gather(palette, indices)

    return tf.cond(tf.equal(_le(head[28:30]), 8) & (dib >= 40), paletted, lambda: tf.io.decode_bmp(data, channels=3))


def _decode_png(data: tf.Tensor) -> tf.Tensor:
    """PNG to RGB with Pillow's 16-bit reductions; alpha only where Pillow's mode has it (palette, LA, RGBA).

    8-bit files (the usual case) never widen past uint8 unless they have alpha,
    so a large PNG costs what its RGB pixels cost.
    """
    ihdr = _bytes(data, 24, 2)
    depth, colour = ihdr[0], ihdr[1]
    has_alpha = tf.equal(colour, 3) | tf.equal(colour, 4) | tf.equal(colour, 6)

    def sixteen_bit():
        pixels = tf.cast(tf.io.decode_png(data, channels=4, dtype=tf.uint16), tf.int32)
        pixels = tf.where(tf.equal(colour, 0), (2 * pixels + 257) // 514, _shr(pixels, 8))
        pixels = tf.cast(pixels, tf.uint8)
        return tf.cond(has_alpha, lambda: composite_on_white(pixels), lambda: pixels[..., :3])

    def eight_bit():
        return tf.cond(has_alpha, lambda: composite_on_white(tf.io.decode_png(data, channels=4)),
                       lambda: tf.io.decode_png(data, channels=3))

    return tf.cond(tf.equal(depth, 16), sixteen_bit, eight_bit)


def _gif_global_entries(data: tf.Tensor) -> tf.Tensor:
    """Entries of a GIF's global colour table (0 when it has none)."""
    flags = _bytes(data, 10, 1)[0]
    return tf.where(flags >= 0x80, _table_entries(flags), 0)


def _gif_walk(data: tf.Tensor, all_frames: bool) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    """Walk a GIF's blocks: (first image descriptor or -1, its graphic control extension or -1,
    height and width of the largest frame seen).

    Extensions and image data are chains of sub-blocks, skipped by their
    lengths (at most ``_MAX_GIF_BLOCKS`` steps). ``all_frames=False`` stops at
    the first image descriptor.
    """
    size = tf.cast(tf.strings.length(data), tf.int64)
    zero, minus_one = tf.constant(0, tf.int64), tf.constant(-1, tf.int64)
    # The whole file as int32 once, padded, so a step is one gather (this loop runs once per sub-block).
    everything = tf.pad(tf.cast(tf.io.decode_raw(data, tf.uint8), tf.int32), [[0, 16]])
    offsets = tf.range(10, dtype=tf.int64)
    strides = 256 * tf.range(_GIF_RUN, dtype=tf.int64)

    def full_blocks(pos):
        """How many 255-byte sub-blocks follow each other from ``pos`` (up to ``_GIF_RUN``): one step skips them."""
        lengths = tf.gather(everything, tf.minimum(pos + strides, size))
        return tf.reduce_sum(tf.math.cumprod(tf.cast(tf.equal(lengths, 255), tf.int64)))

    def body(pos, in_blocks, first, control, height, width, done, steps):
        b = tf.cast(tf.gather(everything, tf.minimum(pos, size) + offsets), tf.int64)
        run = tf.where(in_blocks, full_blocks(pos), 0)
        extension = ~in_blocks & tf.equal(b[0], 0x21)
        image = ~in_blocks & tf.equal(b[0], 0x2C)
        control = tf.where(extension & tf.equal(b[1], 0xF9) & (first < 0), pos, control)
        bigger = image & (_le(b[7:9]) * _le(b[5:7]) > height * width)
        height, width = tf.where(bigger, _le(b[7:9]), height), tf.where(bigger, _le(b[5:7]), width)
        first = tf.where(image & (first < 0), pos, first)
        local_table = tf.where(b[9] >= 0x80, 3 * _table_entries(b[9]), 0)
        next_pos = tf.where(in_blocks, tf.where(run > 0, pos + 256 * run, pos + 1 + b[0]),
                            tf.where(image, pos + 11 + local_table, pos + 2))
        done = (~in_blocks & ~extension & ~image) | (image & (not all_frames)) | (next_pos >= size)
        in_blocks = tf.where(in_blocks, (run > 0) | tf.not_equal(b[0], 0), extension | image)
        return next_pos, in_blocks, first, control, height, width, done, steps + 1

    def walking(pos, in_blocks, first, control, height, width, done, steps):
        return ~done & (steps < _MAX_GIF_BLOCKS)

    state = (13 + 3 * _gif_global_entries(data), tf.constant(False), minus_one, minus_one, zero, zero,
             tf.constant(False), tf.constant(0))
    _, _, first, control, height, width, _, _ = tf.while_loop(walking, body, state)
    return first, control, height, width


def _replace_bytes(data: tf.Tensor, pos: tf.Tensor, values: tf.Tensor) -> tf.Tensor:
    """``data`` with the bytes at ``pos`` replaced by ``values`` (int64 0..255)."""
    table = tf.constant(_BYTE_VALUES)
    middle = tf.strings.reduce_join(tf.gather(table, values))
    end = pos + tf.size(values, out_type=tf.int64)
    return tf.strings.join([tf.strings.substr(data, tf.constant(0, tf.int64), pos), middle,
                            tf.strings.substr(data, end, tf.cast(tf.strings.length(data), tf.int64) - end)])


def _gif_transparent_to_white(data: tf.Tensor) -> tf.Tensor:
    """A GIF whose first frame's transparent colour is white and opaque (TF decodes it as black).

    Pillow opens such a frame as a palette image with transparency, which the
    job composites on white; patching the colour table gives the same pixels.
    """
    frame, control, _, _ = _gif_walk(data, all_frames=False)
    gce = _bytes(data, control, 8)
    transparent = (control >= 0) & (frame >= 0) & tf.equal(gce[2], 4) & tf.equal(gce[3] & 1, 1)
    index = gce[6]
    descriptor = _bytes(data, frame, 10)
    local = descriptor[9] >= 0x80
    table = tf.where(local, frame + 10, 13)
    entries = tf.where(local, _table_entries(descriptor[9]), _gif_global_entries(data))
    size = tf.cast(tf.strings.length(data), tf.int64)
    patch = transparent & (index < entries) & (table + 3 * entries <= size)

    def patched():
        cleared = _replace_bytes(data, control + 3, tf.reshape(gce[3] - 1, [1]))
        return _replace_bytes(cleared, table + 3 * index, tf.constant([255, 255, 255], tf.int64))

    return tf.cond(patch, patched, lambda: data)


def _decode_gif(data: tf.Tensor) -> tf.Tensor:
    return tf.io.decode_image(_gif_transparent_to_white(data), channels=3, expand_animations=False)


def _decode_webp(data: tf.Tensor) -> tf.Tensor:
    """WebP to RGB; the channel count comes from the header because ``DecodeWebP(channels=0)`` of an
    animation corrupts the heap in TF 2.21, and ``channels`` must match the file."""
    head = _bytes(data, 0, 32)
    extended = _matches(head[12:16], b"VP8X")
    animated = extended & tf.equal(head[20] & 0x02, 0x02)
    alpha = (extended & tf.equal(head[20] & 0x10, 0x10)) | (
        _matches(head[12:16], b"VP8L") & tf.equal(_shr(_le(head[21:25]), 28) & 1, 1))
    refuse = tf.debugging.Assert(~animated | alpha, [
        "animated WebP without an alpha channel is not supported (TensorFlow's DecodeWebP cannot decode it); "
        "send its first frame"])
    with tf.control_dependencies([refuse]):
        data = tf.identity(data)
    return tf.cond(alpha | animated,
                   lambda: composite_on_white(tf.io.decode_webp(data, channels=4)[0]),
                   lambda: tf.io.decode_webp(data, channels=3)[0])


def _unknown(data: tf.Tensor) -> tf.Tensor:
    refuse = tf.debugging.Assert(tf.constant(False), [UNKNOWN_FORMAT_MESSAGE])
    with tf.control_dependencies([refuse]):
        return tf.zeros([0, 0, 3], tf.uint8)


def decode_upright_rgb(encoded: tf.Tensor, max_pixels: int = DEFAULT_MAX_PIXELS) -> tf.Tensor:
    """Encoded image bytes (scalar string) to uint8 ``[h, w, 3]``, normalised as the preprocessing job does.

    Equal within a level or two to ``images.to_rgb(ImageOps.exif_transpose(Image.open(...)))``
    (see the module docstring for the formats). Raises ``InvalidArgumentError``
    for an image over ``max_pixels`` (before decoding), an unknown format or
    a corrupt file.
    """
    encoded = tf.convert_to_tensor(encoded, tf.string)
    with tf.control_dependencies([_size_guard(encoded, int(max_pixels))]):
        data = tf.identity(encoded)
    code = _format_of(_bytes(data, 0, 32))
    branches = [_unknown, _decode_jpeg, _decode_png, _decode_gif, _decode_bmp, _decode_webp]
    image = tf.switch_case(code, [lambda fn=fn: fn(data) for fn in branches])
    image = apply_orientation(image, exif_orientation(data))
    image.set_shape([None, None, 3])
    return image


def decode_and_resize_upload(encoded: tf.Tensor, size: Sequence[int], mode: str = "stretch",
                             max_pixels: int = DEFAULT_MAX_PIXELS) -> tf.Tensor:
    """Uploaded bytes to the float32 ``[height, width, 3]`` image in [0, 255] the model expects.

    :func:`decode_upright_rgb` then :func:`preprocessing.tfrecords.resize_image`,
    the resize the trainer applies to records.
    """
    return tfrecords.resize_image(decode_upright_rgb(encoded, max_pixels), size, mode)
