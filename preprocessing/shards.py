"""How many TFRecord shards a split gets, what they are called, and writing one.

**The default rule** (``--num-shards 0``), per split, from the number of
inputs ``R`` the split keeps after deduplication (its records, plus any kept
file that proves not to be an image when converted: that one is rejected
then, and its shard is a record short):

* ``R == 0``: one empty shard, so every split has a file;
* otherwise ``min(R, max(MIN_SHARDS, ceil(R * estimated record size / TARGET_SHARD_BYTES)))``.

So a split of at least ``MIN_SHARDS`` (64) records always has at least 64
shards: file-based sharding over 16 trainer workers gives each of them at
least 4 (and any smaller split has one record per shard); large splits get
more shards so that none is much over ``TARGET_SHARD_BYTES`` (128 MiB), a
size that object stores and ``tf.data`` read efficiently. The record size is
estimated from the output size and format (:func:`estimated_record_bytes`:
224x224 JPEG: about 38 KB, so 64 shards up to about 230,000 records). Records go
to shards in sha256 order, in contiguous runs: shard sizes differ by at most
one record (less the inputs rejected when converted), and the same input gives
the same shards, byte for byte, on every runner and every run. ``--num-shards N`` writes exactly N shards per split
(some empty when the split has fewer than N records).

Shard files are ``{split}-NNNNN-of-NNNNN.tfrecord``
(:func:`preprocessing.tfrecords.shard_pattern`). A shard is written under a
temporary name and renamed when complete, so a retried bundle rewrites it
whole rather than appending.
"""

from __future__ import annotations

import math
import struct
import uuid

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from preprocessing.tfrecords import SHARD_SUFFIX

MIN_SHARDS = 64  # 16 trainer workers x 4 shards each
TARGET_SHARD_BYTES = 128 * 2**20
# Encoded bytes per output pixel (all 3 channels), roughly, for photos: JPEG q95 ~ 0.75, PNG ~ 3.
_BYTES_PER_PIXEL = {"jpeg": 0.75, "png": 3.0}
TEMP_FOLDER = "_tmp"  # under the staging folder; removed when the job's last step is done


def estimated_record_bytes(image_size: tuple[int, int], image_format: str) -> int:
    """A rough size of one record: the encoded image (and ~200 bytes of keys and metadata)."""
    height, width = image_size
    return int(height * width * _BYTES_PER_PIXEL.get(image_format, 3.0)) + 200


def num_shards(records: int, record_bytes: int, requested: int = 0) -> int:
    """Shards for a split of ``records`` records: ``requested`` when > 0, else the default rule above."""
    if requested > 0:
        return requested
    if records <= 0:
        return 1
    by_size = math.ceil(records * record_bytes / TARGET_SHARD_BYTES)
    return min(records, max(MIN_SHARDS, by_size))


def shard_of(rank: int, records: int, shards: int) -> int:
    """The shard of the record at ``rank`` (0-based, in sha256 order) among ``records``: contiguous, balanced runs."""
    return rank * shards // records


def first_rank(shard: int, records: int, shards: int) -> int:
    """The rank of the first record of ``shard`` (the inverse of :func:`shard_of`)."""
    return -(-shard * records // shards)


def shard_name(split: str, index: int, shards: int) -> str:
    return f"{split}-{index:05d}-of-{shards:05d}{SHARD_SUFFIX}"


def _masked_crc32c(data: bytes) -> int:
    import google_crc32c  # a dependency of this package (and what Beam's own TFRecord sink uses)

    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


class ShardWriter:
    """One TFRecord file: written under a temporary name, renamed to ``path`` by :meth:`commit`.

    TFRecord framing: length (uint64 LE), masked CRC-32C of the length,
    the record, masked CRC-32C of the record.
    """

    def __init__(self, path: str, temp_dir: str) -> None:
        self.path = path
        self.temp = FileSystems.join(temp_dir, f"{uuid.uuid4().hex}{SHARD_SUFFIX}")
        self.handle = FileSystems.create(self.temp, compression_type=CompressionTypes.UNCOMPRESSED)
        self.records = 0

    def write(self, record: bytes) -> None:
        length = struct.pack("<Q", len(record))
        self.handle.write(b"".join((length, struct.pack("<I", _masked_crc32c(length)), record,
                                    struct.pack("<I", _masked_crc32c(record)))))
        self.records += 1

    def commit(self) -> None:
        self.handle.close()
        FileSystems.rename([self.temp], [self.path])  # replaces the file of an earlier, retried attempt

    def discard(self) -> None:
        try:
            self.handle.close()
            FileSystems.delete([self.temp])
        except Exception:  # noqa: BLE001 - best effort; the staging folder goes on failure anyway
            pass


def write_empty(path: str) -> None:
    """An empty shard (a valid TFRecord file with no records)."""
    FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED).close()
