"""Pillow side of the job: bytes in, a resized 8-bit RGB image re-encoded out.

The contract (docs/contracts.md, section 1): orientation from EXIF is applied;
palette, grayscale, CMYK, 16-bit and alpha images become 8-bit RGB, alpha
composited on white; the resize matches :func:`preprocessing.tfrecords.resize_image`
(``stretch``, ``pad`` = ``tf.image.resize_with_pad``'s black centred bars,
``crop`` = the largest central crop of the target aspect ratio) so training
and serving see the same geometry. Anything that cannot be turned into such
an image raises :class:`Rejected` with a reason a person understands.

No TensorFlow here: the plain-loop benchmark and the Beam workers call the
same :func:`convert`.
"""

from __future__ import annotations

import io
import math
import warnings
from contextlib import contextmanager
from struct import error as struct_error
from dataclasses import dataclass
from typing import Iterator

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# The job enforces its own limit (--max-pixels) before decoding; Pillow's
# global one would otherwise fire first with a different message.
Image.MAX_IMAGE_PIXELS = None
ImageFile.LOAD_TRUNCATED_IMAGES = False

SUPPORTED_FORMATS = ("JPEG", "MPO", "PNG", "GIF", "BMP", "WEBP", "TIFF")
_PIL_SAVE_FORMAT = {"jpeg": "JPEG", "png": "PNG"}


class Rejected(Exception):
    """This input cannot become a training image; ``str()`` is the reason."""


@dataclass(frozen=True)
class Converted:
    """One re-encoded image and the size it came in at."""

    encoded: bytes
    width: int
    height: int
    source_width: int
    source_height: int
    source_format: str
    source_mode: str


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB; alpha is composited on white, 16-bit is scaled (not clipped)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    elif mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        array = np.asarray(image)
        if mode == "F" or array.dtype.kind == "f":
            scaled = np.clip(array, 0, 255)
        elif mode.startswith("I;16") or array.max(initial=0) > 255:
            scaled = array.astype(np.float64) / 257.0
        else:
            scaled = array
        image = Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), "L")
        mode = "L"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def resize(image: Image.Image, size: tuple[int, int], mode: str) -> Image.Image:
    """Resize an RGB image to ``size = (height, width)`` as ``tfrecords.resize_image`` does."""
    height, width = size
    in_w, in_h = image.size
    if mode == "stretch":
        return image.resize((width, height), Image.Resampling.BILINEAR)
    if mode == "pad":
        ratio = max(in_w / width, in_h / height)
        new_w = max(1, math.floor(in_w / ratio))
        new_h = max(1, math.floor(in_h / ratio))
        offset_x = max(0, math.floor((width - in_w / ratio) / 2))
        offset_y = max(0, math.floor((height - in_h / ratio) / 2))
        canvas = Image.new("RGB", (width, height), (0, 0, 0))
        canvas.paste(image.resize((new_w, new_h), Image.Resampling.BILINEAR), (offset_x, offset_y))
        return canvas
    if mode == "crop":
        aspect = width / height
        crop_w = max(1, round(min(in_w, in_h * aspect)))
        crop_h = max(1, round(min(in_h, in_w / aspect)))
        left = (in_w - crop_w) // 2
        top = (in_h - crop_h) // 2
        cropped = image.crop((left, top, left + crop_w, top + crop_h))  # crop first: no bleed from outside, as in TF
        return cropped.resize((width, height), Image.Resampling.BILINEAR)
    raise ValueError(f"unknown resize mode {mode!r}")


def encode(image: Image.Image, image_format: str, jpeg_quality: int) -> bytes:
    """RGB image to JPEG (at ``jpeg_quality``) or PNG bytes."""
    buffer = io.BytesIO()
    if image_format == "jpeg":
        image.save(buffer, format="JPEG", quality=jpeg_quality)
    else:
        image.save(buffer, format=_PIL_SAVE_FORMAT[image_format])
    return buffer.getvalue()


def _open_checked(data: bytes, max_pixels: int | None) -> Image.Image:
    """Open (header only) and refuse empty, unsupported and too-large inputs."""
    if not data:
        raise Rejected("empty file (0 bytes)")
    image = Image.open(io.BytesIO(data))
    source_format = image.format or "unknown"
    if source_format not in SUPPORTED_FORMATS:
        raise Rejected(f"unsupported image format {source_format} (supported: {', '.join(SUPPORTED_FORMATS)})")
    width, height = image.size
    if max_pixels is not None and width * height > max_pixels:
        raise Rejected(
            f"image too large (possible decompression bomb): {width}x{height} = "
            f"{width * height:,} pixels, over --max-pixels {max_pixels:,}"
        )
    return image


def probe(data: bytes, max_pixels: int | None = None) -> tuple[int, int, str]:
    """Cheap check from the header alone: ``(width, height, format)`` or :class:`Rejected`."""
    with _reasons():
        image = _open_checked(data, max_pixels)
        return image.size[0], image.size[1], image.format


@contextmanager
def _reasons() -> Iterator[None]:
    """Turn Pillow's exceptions into :class:`Rejected` with a reason a person understands."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except Rejected:
        raise
    except UnidentifiedImageError:
        raise Rejected("not an image Pillow can identify (wrong extension, text or unknown format?)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise Rejected(f"image too large (possible decompression bomb): {error}") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, MemoryError, struct_error) as error:
        raise Rejected(f"corrupt or truncated image data ({type(error).__name__}: {error})") from None


def convert(
    data: bytes,
    size: tuple[int, int],
    mode: str = "stretch",
    image_format: str = "jpeg",
    jpeg_quality: int = 95,
    max_pixels: int | None = None,
) -> Converted:
    """Decode ``data``, normalise it to upright 8-bit RGB, resize and re-encode it.

    Raises :class:`Rejected` for empty, truncated, unidentifiable, unsupported
    or too-large (``max_pixels``) inputs, before decoding the pixels where it can.
    """
    with _reasons():
        image = _open_checked(data, max_pixels)
        source_format = image.format
        source_w, source_h = image.size
        source_mode = image.mode
        image.load()
        image = ImageOps.exif_transpose(image)
        encoded = encode(resize(to_rgb(image), size, mode), image_format, jpeg_quality)
    return Converted(
        encoded=encoded,
        width=size[1],
        height=size[0],
        source_width=source_w,
        source_height=source_h,
        source_format=source_format,
        source_mode=source_mode,
    )
