"""The preprocessing job's options: one typed dataclass, the single source of defaults.

The CLI (:mod:`preprocessing.cli`) mirrors every field as a flag and the job
(:mod:`preprocessing.pipeline`) reads nothing else. ``to_json`` is what lands
in ``stats.json["options"]``; the trainer reads ``image_size`` (as
``[height, width]``), ``resize_mode`` and ``image_format`` from there.

``num_shards`` 0 (the default) means the job's own rule, per split, from the
split's record count ``R`` (:func:`preprocessing.shards.num_shards`):
``min(R, max(64, ceil(R * estimated record size / 128 MiB)))``, and one empty
shard for an empty split. A split of at least 64 records thus has at least
64 shards, enough for file-based sharding over 16 trainer workers with 4 or
more each, and shards stay near or under 128 MiB as the data grows (224x224
JPEG: 64 shards up to ~230,000 records). A positive value is the exact count.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from preprocessing import tfrecords
from preprocessing.errors import PreprocessingError

DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own decompression-bomb limit (~ 0.25 GiB of RGBA)


@dataclass(frozen=True)
class PreprocessConfig:
    """Everything the job needs besides Beam's own pipeline options."""

    input: str
    output: str
    image_size: tuple[int, int] = (224, 224)  # (height, width)
    resize_mode: str = "stretch"
    image_format: str = "jpeg"
    jpeg_quality: int = 95
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)
    max_pixels: int = DEFAULT_MAX_PIXELS
    num_shards: int = 0  # per split; 0 = the rule above (preprocessing.shards)
    overwrite: bool = False
    progress_seconds: float = 10.0

    def __post_init__(self) -> None:
        height, width = self.image_size
        if height < 1 or width < 1:
            raise PreprocessingError(f"--image-size must be positive, got {width}x{height}")
        if self.resize_mode not in tfrecords.RESIZE_MODES:
            raise PreprocessingError(f"--resize-mode must be one of {', '.join(tfrecords.RESIZE_MODES)}, got {self.resize_mode!r}")
        if self.image_format not in tfrecords.IMAGE_FORMATS:
            raise PreprocessingError(f"--image-format must be one of {', '.join(tfrecords.IMAGE_FORMATS)}, got {self.image_format!r}")
        if not 1 <= self.jpeg_quality <= 100:
            raise PreprocessingError(f"--jpeg-quality must be between 1 and 100, got {self.jpeg_quality}")
        if self.max_pixels < 1:
            raise PreprocessingError(f"--max-pixels must be positive, got {self.max_pixels}")
        if self.num_shards < 0:
            raise PreprocessingError(f"--num-shards must be 0 (the default rule) or more, got {self.num_shards}")

    def to_json(self) -> dict:
        """The options as written to ``stats.json`` (sizes as ``[height, width]``)."""
        data = dataclasses.asdict(self)
        data["image_size"] = list(self.image_size)
        data["split"] = list(self.split)
        return data


def parse_image_size(text: str) -> tuple[int, int]:
    """``--image-size`` as (height, width): :func:`preprocessing.tfrecords.parse_image_size`, the one parser."""
    from preprocessing.tfrecords import parse_image_size as parse

    try:
        return parse(text)
    except ValueError as error:
        raise PreprocessingError(str(error)) from None


def parse_split(text: str) -> tuple[float, float, float]:
    """``"80,10,10"`` -> fractions of train, validation and test that sum to 1."""
    try:
        parts = [float(part) for part in text.split(",")]
    except ValueError:
        raise PreprocessingError(f"--split must be three numbers TRAIN,VALIDATION,TEST, got {text!r}") from None
    if len(parts) != 3 or min(parts) < 0 or sum(parts) <= 0:
        raise PreprocessingError(f"--split must be three non-negative numbers TRAIN,VALIDATION,TEST, got {text!r}")
    total = sum(parts)
    return tuple(part / total for part in parts)  # type: ignore[return-value]
