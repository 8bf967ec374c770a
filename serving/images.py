"""The images a client sends: which files are images, and the bytes that go on the wire.

The serving graph of an export made by this project decodes and normalises
uploads itself (``decode: upright-rgb-v1`` in its metadata, docs/contracts.md),
so the client sends the caller's bytes untouched wherever it can: every client
(this one, curl, a stub-built one) then gets the same answer for the same
bytes. The only clean-up left here is for what no serving graph decodes
(TIFF...) and, with ``--normalize-on-client``, for exports made before the
graph applied EXIF orientation itself. Pillow is imported only when an image
needs it.
"""

from __future__ import annotations

import os
from typing import Sequence, Union

ImageInput = Union[str, os.PathLike, bytes]
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff")

_JPEG = b"\xff\xd8\xff"
_GRAPH_DECODES = (_JPEG, b"\x89PNG", b"GIF87a", b"GIF89a", b"BM")  # and WebP (RIFF....WEBP)
_EXIF_ORIENTATION = 0x0112


def _graph_decodes(data: bytes) -> bool:
    return data.startswith(_GRAPH_DECODES) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def to_decodable(data: bytes, normalize: bool = False) -> bytes:
    """``data`` as it should travel to the serving graph.

    JPEG, PNG, GIF, BMP and WebP go untouched: the serving graph of an export
    made by this project (``decode: upright-rgb-v1`` in its metadata) applies
    EXIF orientation, composites alpha on white and converts colour modes
    itself, as preprocessing did for the training images, so every client
    gets the same answer for the same bytes. Other formats Pillow reads
    (TIFF...) are sent upright as lossless PNG, since no serving graph decodes
    them. ``normalize`` (``--normalize-on-client``) is for exports made before
    that: it also sends EXIF-rotated JPEGs and WebP upright as PNG, as those
    graphs ignore EXIF. Bytes Pillow cannot read either are sent as they are,
    and the server answers INVALID_ARGUMENT with the decoder's reason.
    """
    graph_decodes = _graph_decodes(data)
    if graph_decodes and not normalize:
        return data
    jpeg = data.startswith(_JPEG)
    if graph_decodes and not jpeg and not data.startswith(b"RIFF"):
        return data  # PNG, GIF, BMP: no EXIF orientation to apply
    try:
        import io

        from PIL import Image, ImageOps
    except ImportError:  # pragma: no cover - Pillow is a project dependency
        return data
    try:
        with Image.open(io.BytesIO(data)) as image:
            if jpeg and image.getexif().get(_EXIF_ORIENTATION, 1) in (0, 1):
                return data
            upright = ImageOps.exif_transpose(image)
            upright = upright.convert("RGBA" if "A" in upright.getbands() else "RGB")
            out = io.BytesIO()
            upright.save(out, format="PNG")
            return out.getvalue()
    except Exception:  # noqa: BLE001 - not an image Pillow knows either: let the server say so
        return data


def read_image(item: ImageInput, normalize: bool = False) -> tuple[str, bytes]:
    """``(source, bytes)`` of a path or of raw bytes, as :func:`to_decodable` sends them."""
    if isinstance(item, (bytes, bytearray, memoryview)):
        source, data = f"<{len(item)} bytes>", bytes(item)
    else:
        source = os.fspath(item)
        with open(source, "rb") as handle:
            data = handle.read()
    return source, to_decodable(data, normalize)


def expand_images(paths: Sequence[str]) -> list[str]:
    """Files as given, folders walked (sorted) for image files; a missing path raises FileNotFoundError."""
    found = []
    for path in paths:
        if os.path.isdir(path):
            for root, dirs, files in os.walk(path):
                dirs.sort()
                found.extend(os.path.join(root, f) for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS))
        elif os.path.isfile(path):
            found.append(path)
        else:
            raise FileNotFoundError(f"no such file or folder: {path}")
    return found
