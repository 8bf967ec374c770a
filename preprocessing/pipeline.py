"""The Beam graph: list inputs, hash and deduplicate, convert, write TFRecords.

::

    MatchFiles(ROOT/**) | ReadFromText(manifest)      one element per input file
      -> Reshuffle                                     spread the files over all workers
      -> ReadAndHash    read bytes, sha256, header check, split from sha256 when not given
      -> GroupByKey(sha256) -> KeepFirst               exact duplicates written once
      -> Convert        Pillow decode/convert/resize/encode, serialize_example
      -> Partition(split) -> WriteToTFRecord           {split}-NNNNN-of-NNNNN.tfrecord
    rejected inputs from every step -> WriteToText     errors.jsonl
    distinct labels -> sorted list (side input)        label ids, labels.txt

Only small tuples (path, label, split, sha256) cross a shuffle: image bytes
are read inside the steps that need them (twice: once to hash, once to
convert) and never held, so memory does not grow with the images. (The
local runner keeps those small tuples in memory between steps, a few KB per
file; distributed runners shuffle them to disk.) Every counting step also
emits its counts on a side output, summed and written with the data
(:mod:`preprocessing.stats`), so the accounting needs no runner metrics.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Iterable

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from preprocessing import images, sources, splits, stats
from preprocessing.config import PreprocessConfig
from preprocessing.sources import InputItem, InputSpec
from preprocessing.tfrecords import ERRORS_FILE, LABELS_FILE, SHARD_SUFFIX, SPLITS

REJECTED = "rejected"
_log = logging.getLogger("preprocessing")


def rejection(path: str, reason: str, stage: str) -> dict:
    """One line of ``errors.jsonl``."""
    return {"path": path, "reason": reason, "stage": stage}


def read_bytes(path: str) -> bytes:
    """The file's bytes, exactly (no decompression by extension); :class:`images.Rejected` if unreadable."""
    try:
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            return handle.read()
    except FileNotFoundError:
        raise images.Rejected("file not found") from None
    except IsADirectoryError:
        raise images.Rejected("is a folder, not a file") from None
    except PermissionError:
        raise images.Rejected("permission denied: cannot read the file") from None
    except Exception as error:  # noqa: BLE001 - any filesystem's error means "cannot read"
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        if "No such file" in message or "not found" in message.lower():
            raise images.Rejected("file not found") from None
        raise images.Rejected(f"cannot read the file ({message})") from None


class LogListed(beam.DoFn):
    """Pass-through that tells the person watching how many inputs were listed (per bundle)."""

    def start_bundle(self) -> None:
        self.listed = 0

    def process(self, element) -> Iterable:
        self.listed += 1
        yield element

    def finish_bundle(self) -> None:
        if self.listed:
            _log.info("listed %s input files", f"{self.listed:,}")


class ListedFile(beam.DoFn):
    """A matched file (or manifest line) -> :class:`InputItem`; wrongly placed inputs are rejected."""

    def __init__(self, spec: InputSpec) -> None:
        self.spec = spec

    @staticmethod
    def _reject(path: str, reason: str) -> list:
        return [stats.count("found", splits.UNASSIGNED, stats.NO_CLASS),
                stats.count("rejected", splits.UNASSIGNED, stats.NO_CLASS),
                stats.count_stage("list"),
                beam.pvalue.TaggedOutput(REJECTED, rejection(path, reason, "list"))]

    def process(self, element) -> Iterable:
        try:
            if self.spec.layout == sources.MANIFEST:
                item = sources.item_from_row(element, self.spec)
            else:
                item = sources.item_from_path(element.path, self.spec)
        except sources.RowRejected as error:
            yield from self._reject(error.path, str(error))
            return
        except images.Rejected as error:
            yield from self._reject(element.path, str(error))
            return
        if item is None:
            yield stats.tally("ignored")
            return
        if item.split:
            yield stats.count("found", item.split, item.label)
        yield item


class ReadAndHash(beam.DoFn):
    """Read a file, hash it and check its header: ``(sha256, item with its split)`` or a rejection.

    Empty and non-image files are rejected here, before deduplication, so two
    broken files with the same bytes are both reported rather than one
    counted as a duplicate of the other.
    """

    def __init__(self, config: PreprocessConfig) -> None:
        self.fractions = config.split
        self.max_pixels = config.max_pixels
        self.progress_seconds = config.progress_seconds

    def setup(self) -> None:
        self.progress = stats.WorkerProgress("files read and hashed", self.progress_seconds)

    def process(self, item: InputItem) -> Iterable:
        try:
            data = read_bytes(item.path)
            if not data:
                raise images.Rejected("empty file (0 bytes)")
        except images.Rejected as error:
            if not item.split:
                yield stats.count("found", splits.UNASSIGNED, item.label)
            yield stats.count("rejected", item.split or splits.UNASSIGNED, item.label)
            yield stats.count_stage("read")
            self.progress.add(rejected=True)
            yield beam.pvalue.TaggedOutput(REJECTED, rejection(item.path, str(error), "read"))
            return
        digest = hashlib.sha256(data).hexdigest()
        if not item.split:
            item = item._replace(split=splits.split_for(digest, self.fractions))
            yield stats.count("found", item.split, item.label)
        try:
            images.probe(data, self.max_pixels)
        except images.Rejected as error:
            yield stats.count("rejected", item.split, item.label)
            yield stats.count_stage("decode")
            self.progress.add(rejected=True)
            yield beam.pvalue.TaggedOutput(REJECTED, rejection(item.path, str(error), "decode"))
            return
        self.progress.add()
        yield digest, item


def keep_first(element) -> Iterable:
    """Of the files sharing one sha256, keep one (earliest split, then path) and count the rest."""
    digest, items = element
    ordered = sorted(items, key=lambda item: (SPLITS.index(item.split), item.path))
    kept = ordered[0]
    for duplicate in ordered[1:]:
        yield stats.count("duplicates", duplicate.split, duplicate.label)
        if duplicate.label != kept.label:
            yield stats.tally("duplicate_label_conflicts")
            _log.warning("same image, different labels: kept %s (%s), dropped %s (%s)",
                         kept.path, kept.label, duplicate.path, duplicate.label)
    yield digest, kept


class Convert(beam.DoFn):
    """Decode, normalise, resize and re-encode one image into a serialized ``tf.train.Example``."""

    def __init__(self, config: PreprocessConfig) -> None:
        self.config = config

    def setup(self) -> None:
        from preprocessing.tfrecords import serialize_example  # protobuf only: workers never import TensorFlow

        self.serialize = serialize_example
        self.progress = stats.WorkerProgress("images converted", self.config.progress_seconds)
        self._labels: list[str] | None = None
        self._ids: dict[str, int] = {}

    def _label_id(self, labels: list[str], label: str) -> int:
        if labels is not self._labels:
            self._labels = labels
            self._ids = {name: index for index, name in enumerate(labels)}
        return self._ids[label]

    def _reject(self, item: InputItem, reason: str, stage: str) -> list:
        self.progress.add(rejected=True)
        return [stats.count("rejected", item.split, item.label), stats.count_stage(stage),
                beam.pvalue.TaggedOutput(REJECTED, rejection(item.path, reason, stage))]

    def process(self, element, labels: list[str]) -> Iterable:
        digest, item = element
        config = self.config
        try:
            data = read_bytes(item.path)
        except images.Rejected as error:
            yield from self._reject(item, str(error), "read")
            return
        if hashlib.sha256(data).hexdigest() != digest:
            yield from self._reject(item, "file changed while the job ran (sha256 differs from the first read)", "read")
            return
        try:
            converted = images.convert(
                data, config.image_size, config.resize_mode, config.image_format, config.jpeg_quality, config.max_pixels
            )
        except images.Rejected as error:
            yield from self._reject(item, str(error), "decode")
            return
        record = self.serialize(
            encoded=converted.encoded,
            image_format=config.image_format,
            height=converted.height,
            width=converted.width,
            label=self._label_id(labels, item.label),
            text=item.label,
            source_id=item.source_id,
            sha256=digest,
        )
        yield stats.count("written", item.split, item.label)
        yield from stats.count_size(converted.source_width, converted.source_height)
        self.progress.add()
        yield item.split, record


class SortedList(beam.CombineFn):
    """Distinct values -> one sorted list (the class names, in ``labels.txt`` order)."""

    def create_accumulator(self):
        return set()

    def add_input(self, accumulator, value):
        accumulator.add(value)
        return accumulator

    def merge_accumulators(self, accumulators):
        return set().union(*accumulators)

    def extract_output(self, accumulator):
        return sorted(accumulator)


def build(pipeline: beam.Pipeline, config: PreprocessConfig, spec: InputSpec, out_dir: str) -> None:
    """Add the whole job to ``pipeline``, writing into ``out_dir`` (the staging folder)."""
    if spec.layout == sources.MANIFEST:
        lines = pipeline | "ReadManifest" >> beam.io.ReadFromText(spec.path, skip_header_lines=1)
    else:
        lines = pipeline | "MatchFiles" >> fileio.MatchFiles(spec.glob, empty_match_treatment=fileio.EmptyMatchTreatment.ALLOW)
    listed = (
        lines
        | "LogListed" >> beam.ParDo(LogListed())
        | "SpreadOverWorkers" >> beam.Reshuffle()
        | "ToInputItems" >> beam.ParDo(ListedFile(spec)).with_outputs(REJECTED, stats.COUNTS, main="items")
    )
    items = listed.items

    labels = (
        items
        | "Labels" >> beam.Map(lambda item: item.label)
        | "SortedLabels" >> beam.CombineGlobally(SortedList())
    )
    _ = (
        labels
        | "LabelsText" >> beam.Map(lambda names: "\n".join(names))
        | "WriteLabels" >> beam.io.WriteToText(
            FileSystems.join(out_dir, LABELS_FILE), num_shards=1, shard_name_template=""
        )
    )

    hashed = items | "ReadAndHash" >> beam.ParDo(ReadAndHash(config)).with_outputs(
        REJECTED, stats.COUNTS, main="hashed")
    unique = (
        hashed.hashed
        | "GroupBySha256" >> beam.GroupByKey()
        | "KeepFirstOfDuplicates" >> beam.FlatMap(keep_first).with_outputs(stats.COUNTS, main="kept")
    )
    converted = unique.kept | "Convert" >> beam.ParDo(
        Convert(config), labels=beam.pvalue.AsSingleton(labels)
    ).with_outputs(REJECTED, stats.COUNTS, stats.SIZES, main="records")

    by_split = converted.records | "BySplit" >> beam.Partition(lambda kv, _: SPLITS.index(kv[0]), len(SPLITS))
    for split, records in zip(SPLITS, by_split):
        _ = (
            records
            | f"{split}Records" >> beam.Values()
            | f"Write{split.capitalize()}" >> beam.io.WriteToTFRecord(
                FileSystems.join(out_dir, split),
                file_name_suffix=SHARD_SUFFIX,
                num_shards=config.num_shards,
                shard_name_template="-SSSSS-of-NNNNN",
            )
        )

    sizes = converted[stats.SIZES] | "SizeSummary" >> beam.CombineGlobally(stats.SizeSummary())
    _ = (
        (listed[stats.COUNTS], hashed[stats.COUNTS], unique[stats.COUNTS], converted[stats.COUNTS])
        | "AllCounts" >> beam.Flatten()
        | "SumCounts" >> beam.CombinePerKey(sum)
        | "CountsDict" >> beam.combiners.ToDict()
        | "CountsJson" >> beam.Map(stats.counts_json, beam.pvalue.AsSingleton(sizes))
        | "WriteCounts" >> beam.io.WriteToText(
            FileSystems.join(out_dir, stats.COUNTS_FILE), num_shards=1, shard_name_template="")
    )

    errors_stem, errors_ext = ERRORS_FILE.rsplit(".", 1)
    _ = (
        (listed[REJECTED], hashed[REJECTED], converted[REJECTED])
        | "AllRejected" >> beam.Flatten()
        | "ErrorLines" >> beam.Map(lambda record: json.dumps(record, ensure_ascii=False))
        | "WriteErrors" >> beam.io.WriteToText(
            FileSystems.join(out_dir, errors_stem), file_name_suffix="." + errors_ext, num_shards=1, shard_name_template=""
        )
    )


def wait_with_progress(result, local: bool, interval: float) -> None:
    """Block until the job ends, logging the runner's counts while it runs (for runners that return early)."""
    from apache_beam.runners.runner import PipelineState

    if local or interval <= 0:
        result.wait_until_finish()
        return
    while not PipelineState.is_terminal(result.state):
        time.sleep(interval)
        try:
            counters, _, _ = stats.query_counts(result)
        except Exception:  # noqa: BLE001 - not every runner reports metrics while running
            continue
        totals = stats.build_stats(counters, {})["totals"]
        _log.info(
            "progress: found %s, written %s, rejected %s, duplicates %s",
            f"{totals['found']:,}", f"{totals['written']:,}", f"{totals['rejected']:,}", f"{totals['duplicates']:,}",
        )
    result.wait_until_finish()
