"""What the batch job's input is, and turning each listed file, manifest row or TFRecord into one input.

The input forms are the preprocessing job's (:mod:`preprocessing.sources`,
docs/contracts.md section 1) plus two that only make sense for scoring:

* **class folders** ``ROOT/<class>/<image>`` or **split folders**
  ``ROOT/{train,validation,test}/<class>/<image>``: every file; the folder
  names the given label (:func:`preprocessing.sources.item_from_path`);
* **a plain folder**: files directly in ``ROOT`` (and below): every file, no
  given label;
* **a CSV manifest** with a ``path`` column (``label`` and ``split`` are
  optional here, since nothing is trained); relative paths start from the
  CSV's folder, as in preprocessing;
* **TFRecords**: a data folder written by the preprocessing job (its
  ``*.tfrecord`` files), one ``.tfrecord`` file, or a pattern such as
  ``data/test-*.tfrecord``. Each record is one input: its ``image/encoded``
  bytes, named by ``image/source_id`` and labelled by ``image/class/text``.

Hidden files and folders are left out, as in preprocessing. Records are read
here (:func:`read_records`), not by Beam's ``ReadFromTFRecord``: a corrupt
file then becomes one line in ``errors.jsonl`` (after the records before the
damage were scored) instead of failing the whole job.
"""

from __future__ import annotations

import csv
import io
import os
import struct
from dataclasses import dataclass
from typing import Iterator, NamedTuple

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from preprocessing import sources, tfrecords
from serving.batch_config import BatchError

PLAIN_FOLDER = "plain folder"
TFRECORDS = "tfrecords"
TFRECORD_SUFFIXES = (".tfrecord", ".tfrecords")
_GLOB = set("*?[")


class Rejected(Exception):
    """One input that cannot be scored; the message is the reason written to ``errors.jsonl``."""


class Item(NamedTuple):
    """One input to score: where it is, what it is called in the output, and its given label ("" if none)."""

    path: str
    name: str
    given: str


@dataclass(frozen=True)
class BatchInput:
    """The input as inspected: its layout and what the job lists."""

    path: str
    layout: str
    spec: sources.InputSpec | None = None  # folders and manifests
    pattern: str = ""  # TFRecords: the Beam file pattern of the record files

    @property
    def glob(self) -> str:
        return self.pattern if self.layout == TFRECORDS else FileSystems.join(self.path, "**")


def _is_local(path: str) -> bool:
    return "://" not in path


def _matches(pattern: str, limit: int | None = None) -> list[str]:
    try:
        found = FileSystems.match([pattern], limits=[limit] if limit else None)[0].metadata_list
    except Exception:  # noqa: BLE001 - a filesystem that cannot list means "nothing here"
        return []
    return [entry.path for entry in found]


def inspect_input(path: str) -> BatchInput:
    """Decide what ``path`` is and refuse an unusable one with a one-line reason."""
    given = path
    path = path.rstrip("/") if len(path) > 1 else path
    if _is_local(path):
        path = os.path.abspath(path)
    if _GLOB & set(path):
        return _inspect_pattern(given, path)
    if _is_local(path) and not os.path.exists(path):
        raise BatchError(f"{given}: input not found")
    if path.lower().endswith(TFRECORD_SUFFIXES):
        if not FileSystems.exists(path):
            raise BatchError(f"{given}: input not found")
        return BatchInput(path=path, layout=TFRECORDS, pattern=path)
    if (os.path.isfile(path) if _is_local(path) else path.lower().endswith(".csv") and FileSystems.exists(path)):
        return _inspect_manifest(given, path)
    records = [p for p in _matches(FileSystems.join(path, "*.tfrecord*")) if p.lower().endswith(TFRECORD_SUFFIXES)]
    if records:
        return BatchInput(path=path, layout=TFRECORDS, pattern=FileSystems.join(path, "*.tfrecord*"))
    if not _matches(FileSystems.join(path, "**"), limit=1):
        raise BatchError(f"{given}: no files found (expected image files, class folders, a CSV manifest or "
                         "TFRecords)")
    if _has_top_level_files(path):
        return BatchInput(path=path, layout=PLAIN_FOLDER, spec=sources.InputSpec(path, PLAIN_FOLDER))
    splits = any(_matches(FileSystems.join(path, split, "**"), limit=1) for split in tfrecords.SPLITS)
    layout = sources.SPLIT_FOLDERS if splits else sources.CLASS_FOLDERS
    return BatchInput(path=path, layout=layout, spec=sources.InputSpec(path, layout))


def _has_top_level_files(path: str) -> bool:
    """Whether ``path`` holds (non-hidden) files directly: a plain folder rather than class folders."""
    if _is_local(path):
        return any(entry.is_file() and not entry.name.startswith(".") for entry in os.scandir(path))
    root = path.rstrip("/") + "/"
    return any("/" not in p[len(root):] and not p[len(root):].startswith(".")
               for p in _matches(FileSystems.join(path, "*")))


def _inspect_pattern(given: str, pattern: str) -> BatchInput:
    found = _matches(pattern)
    if not found:
        raise BatchError(f"{given}: no file matches the pattern")
    others = [p for p in found if not p.lower().endswith(TFRECORD_SUFFIXES)]
    if others:
        raise BatchError(f"{given}: a pattern may only name TFRecord files ({', '.join(TFRECORD_SUFFIXES)}), "
                         f"it also matches {others[0]}")
    return BatchInput(path=pattern, layout=TFRECORDS, pattern=pattern)


def _inspect_manifest(given: str, path: str) -> BatchInput:
    try:
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            head = handle.read(1 << 16)
    except Exception as error:  # noqa: BLE001
        raise BatchError(f"{given}: cannot read the manifest ({error})") from None
    text = head.decode("utf-8-sig", errors="replace")
    if "\x00" in text or "\ufffd" in text[:200]:
        raise BatchError(f"{given}: not a CSV manifest, image folder or TFRecord file (binary content)")
    lines = text.splitlines()
    columns = tuple(column.strip().lower() for column in next(csv.reader(lines[:1]), []))
    if "path" not in columns:
        raise BatchError(f"{given}: manifest header lacks a path column (expected a CSV with path[,label,split])")
    if not any(line.strip() for line in lines[1:]):
        raise BatchError(f"{given}: manifest has a header but no rows")
    return BatchInput(path=path, layout=sources.MANIFEST, spec=sources.InputSpec(path, sources.MANIFEST, columns))


def item_from_path(path: str, source: BatchInput) -> Item | None:
    """A listed file as an input; ``None`` for hidden files and folders (left out, as preprocessing does)."""
    root = source.path.rstrip("/") + "/"
    relative = path[len(root):] if path.startswith(root) else path
    if any(part.startswith(".") for part in relative.replace("\\", "/").split("/")):
        return None
    given = ""
    if source.layout != PLAIN_FOLDER:
        try:
            listed = sources.item_from_path(path, source.spec)
            given = listed.label if listed is not None else ""
        except Exception:  # noqa: BLE001 - sources.Rejected: a file out of place still gets scored, unlabelled
            given = ""
    return Item(path=path, name=path, given=given)


def item_from_row(line: str, source: BatchInput) -> Item | None:
    """One manifest line as an input; ``None`` for blank lines; :class:`Rejected` for a row without a path."""
    if not line.strip():
        return None
    values = next(csv.reader(io.StringIO(line)), [])
    row = {column: (values[index].strip() if index < len(values) else "") for index, column in
           enumerate(source.spec.columns)}
    given = row.get("path", "")
    if not given:
        raise Rejected("manifest row has no path")
    path = given if "://" in given or os.path.isabs(given) else FileSystems.join(source.spec.base_dir, given)
    return Item(path=path, name=given, given=row.get("label", ""))


# ---------------------------------------------------------------- TFRecords

def _masked_crc(data: bytes) -> int:
    import google_crc32c

    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_records(handle) -> Iterator[bytes]:
    """The records of an open TFRecord file (TensorFlow's framing, both checksums verified).

    Raises :class:`Rejected` at the first damage (short read, bad checksum).
    """
    index = 0
    while True:
        header = handle.read(12)
        if not header:
            return
        if len(header) < 12:
            raise Rejected(f"truncated TFRecord file: record {index} has an incomplete header")
        length, length_crc = struct.unpack("<QI", header)
        if _masked_crc(header[:8]) != length_crc:
            raise Rejected(f"corrupt TFRecord file: record {index}'s length fails its checksum")
        data = handle.read(length)
        footer = handle.read(4)
        if len(data) < length or len(footer) < 4:
            raise Rejected(f"truncated TFRecord file: record {index} is incomplete")
        if _masked_crc(data) != struct.unpack("<I", footer)[0]:
            raise Rejected(f"corrupt TFRecord file: record {index}'s data fails its checksum")
        yield data
        index += 1


def record_item(serialized: bytes, file_path: str, index: int) -> tuple[Item, bytes]:
    """One record as ``(item, encoded image)``; :class:`Rejected` for a record without an image."""
    from tensorflow.core.example import example_pb2  # the worker has TensorFlow loaded for the model anyway

    example = example_pb2.Example()
    where = f"{file_path}#{index}"
    try:
        example.ParseFromString(serialized)
    except Exception:  # noqa: BLE001 - protobuf's DecodeError
        raise Rejected(f"record {index} is not a tf.train.Example") from None
    feature = example.features.feature

    def text(key: str) -> str:
        values = feature[key].bytes_list.value if key in feature else []
        return values[0].decode("utf-8", errors="replace") if values else ""

    encoded = feature[tfrecords.ENCODED].bytes_list.value if tfrecords.ENCODED in feature else []
    if not encoded:
        raise Rejected(f"record {index} has no {tfrecords.ENCODED}")
    name = text(tfrecords.SOURCE_ID) or where
    return Item(path=where, name=name, given=text(tfrecords.TEXT)), bytes(encoded[0])
