"""The Beam graph: list inputs, hash and deduplicate, shard, convert and write, then the job's small files.

::

    input folder | ReadFromText(manifest)
      -> ListInputs       the folder's files (streamed, in one worker) or the manifest's rows as InputItems,
                          in chunks of CHUNK_FILES; wrongly placed inputs rejected
      -> Reshuffle        spread the chunks over all workers
      -> ReadAndHash      read bytes, sha256 (empty files rejected), split from sha256 when not given;
                          entries handed on per sha256 bucket (BUCKETS), a few lists per bundle
      -> GroupByKey(bucket) -> KeepFirst     exact duplicates written once; kept entries per split
      -> AssignShards     shard of each record: contiguous runs in sha256 order (preprocessing.shards)
      -> GroupByKey(shard) -> ConvertShard   Pillow decode/convert/resize/encode, serialize_example,
                          one TFRecord file per shard: {split}-NNNNN-of-NNNNN.tfrecord
                          (the local multi-process runner: GroupByKey(lane), one lane per worker)
    every step's bundle report -> MergeReports -> Finish   _counts.json, labels.txt, errors.jsonl
    listed labels + kept records per bucket -> plan         side input (its parts, as a list): label ids, shards

Only small tuples (path, source id, label, split, sha256) cross a shuffle,
and they cross it packed in lists (a chunk of the listing, one sha256 bucket
of a bundle, one shard's run; ~40 bytes an entry), not one element per file:
the local runner keeps what crosses a shuffle in its driver process, as
decoded Python values. Each stage's input reaches a worker as one bundle,
and the buffers that carry it (driver and workers) used to stay resident in
glibc's per-thread heaps once freed: the local processes now run with fixed
malloc thresholds (:func:`preprocessing.worker.tune_memory`). From 10,000
to 100,000 images the driver's peak RSS grows by ~0.35 KB per image and the
whole process tree's by ~0.9 KB (it was ~3 KB for the driver with one element
per file, then 0.75 and 1.8-1.9 KB), bounded by a test. Image bytes are
read inside the steps that need them (twice: once to hash, once to convert)
and never held, so memory does not grow with the images.

**Lanes.** The local multi-process runner hands each worker every n-th key
of a grouped stage, by count (``GroupingBuffer.partition`` in
``apache_beam/runners/portability/fn_api_runner/execution.py``, 2.77.0):
with 64 train shards of ~60 records and 128 validation and test shards of
~8, one of two workers converted 34 train shards and the other 30 (9% more
images, and the job waits for the slower). So on that runner the shards are
grouped into one *lane* per worker, contiguous ranges of equal record counts
(:func:`lane_of`), and each worker converts its lane's shards one after the
other. Other runners balance work themselves and get one key per shard.

The job has few steps on purpose: each of the local runner's stages costs
tens of milliseconds (Beam's ``WriteToText``/``WriteToTFRecord`` take four
each), so the shards are written by the step that converts (temporary name,
renamed when complete) and the three small files by one last step. Every
step counts into a per-bundle :class:`~preprocessing.stats.Tally` and hands on
one report per bundle; rejected inputs go to a per-bundle file that the last
step joins into ``errors.jsonl``. The accounting needs no runner metrics
(:mod:`preprocessing.stats`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import pickle
import time
import uuid
import zlib
from collections import defaultdict
from operator import itemgetter
from typing import Iterable

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms.window import GlobalWindows

from preprocessing import images, shards, sources, splits, stats
from preprocessing.staging import remove_tree
from preprocessing.config import PreprocessConfig
from preprocessing.sources import InputSpec
from preprocessing.tfrecords import ERRORS_FILE, LABELS_FILE, SPLITS

CHUNK_FILES = 100  # listed inputs per element handed to the hashing workers
FLUSH_ENTRIES = 20_000  # hashed entries a worker holds before handing them on (also at the end of a bundle)
BUCKETS = 256  # sha256 buckets (first byte) that deduplication groups by
REPORT = "report"
PLAN = "plan"  # tag of the elements the plan is combined from
_SPLIT_ORDER = {split: index for index, split in enumerate(SPLITS)}
_log = logging.getLogger("preprocessing")

# Entries are plain tuples:
#   listed: (path, source_id or None when it is the path, label, split or "")
#   hashed: (sha256 digest bytes, path, source_id or None, label, split)
#   kept:   hashed + (its exact duplicates as ((path, label, split), ...), usually empty,)
# and cross a shuffle packed, a list of them as one compressed bytes value (_pack): the local runner holds
# what a shuffle buffers as decoded Python values, and one bytes object of ~40 bytes per entry is far less
# than a tuple of strings (~400 bytes).
_DIGEST, _PATH, _SOURCE_ID, _LABEL, _SPLIT = range(5)


def _pack(entries: list) -> bytes:
    return zlib.compress(pickle.dumps(entries, protocol=4), 1)


def _unpack(packed: bytes) -> list:
    return pickle.loads(zlib.decompress(packed))


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


def _windowed(value, tag: str | None = None):
    """An element yielded from ``finish_bundle`` (which must say its window)."""
    value = GlobalWindows.windowed_value(value)
    return value if tag is None else beam.pvalue.TaggedOutput(tag, value)


class _Step(beam.DoFn):
    """A step that counts into a per-bundle tally, writes its rejections to a per-bundle file and reports both."""

    def __init__(self, temp_dir: str) -> None:
        self.temp_dir = temp_dir

    def start_bundle(self) -> None:
        self.tally = stats.Tally()
        self._errors = None
        self._errors_path = ""

    def reject(self, path: str, reason: str, stage: str, split: str, label: str) -> None:
        self.tally.count("rejected", split, label)
        self.tally.stage(stage)
        if self._errors is None:
            self._errors_path = FileSystems.join(self.temp_dir, f"errors-{uuid.uuid4().hex}.jsonl")
            self._errors = FileSystems.create(self._errors_path, compression_type=CompressionTypes.UNCOMPRESSED)
        self._errors.write((json.dumps(rejection(path, reason, stage), ensure_ascii=False) + "\n").encode("utf-8"))

    def report(self, **extra):
        errors = []
        if self._errors is not None:
            self._errors.close()
            errors = [self._errors_path]
        return _windowed(stats.report(self.tally.counts(), errors=errors, **extra), REPORT)


class ListInputs(_Step):
    """The root folder (or each manifest line) -> chunks of listed entries; wrongly placed inputs are rejected.

    A folder is listed here, streamed (:func:`preprocessing.sources.list_files`),
    rather than by Beam's ``MatchFiles``: that holds the whole listing as
    ``FileMetadata`` objects (~0.3 KB a file in the listing worker, 3 GB at ten
    million files) and passes each file through two more steps.
    """

    def __init__(self, spec: InputSpec, temp_dir: str) -> None:
        super().__init__(temp_dir)
        self.spec = spec

    def start_bundle(self) -> None:
        super().start_bundle()
        self.listed = 0
        self.chunk: list[tuple] = []
        self.labels: set[str] = set()

    def process(self, element) -> Iterable:
        for one in [element] if self.spec.layout == sources.MANIFEST else sources.list_files(element):
            yield from self._one(one)

    def _one(self, element: str) -> Iterable:
        """One listed file's path, or one manifest line."""
        self.listed += 1
        try:
            if self.spec.layout == sources.MANIFEST:
                item = sources.item_from_row(element, self.spec)
            else:
                item = sources.item_from_path(element, self.spec)
        except sources.RowRejected as error:
            self._reject(error.path, str(error))
            return
        except images.Rejected as error:
            self._reject(element, str(error))
            return
        if item is None:
            self.tally.add("ignored")
            return
        if item.split:
            self.tally.count("found", item.split, item.label)
        self.labels.add(item.label)
        self.chunk.append((item.path, None if item.source_id == item.path else item.source_id, item.label, item.split))
        if len(self.chunk) >= CHUNK_FILES:
            yield _pack(self.chunk)
            self.chunk = []

    def _reject(self, path: str, reason: str) -> None:
        self.tally.count("found", splits.UNASSIGNED, stats.NO_CLASS)
        self.reject(path, reason, "list", splits.UNASSIGNED, stats.NO_CLASS)

    def finish_bundle(self) -> Iterable:
        if self.listed:
            _log.info("listed %s input files", f"{self.listed:,}")
        if self.chunk:
            yield _windowed(_pack(self.chunk))
        yield _windowed(("labels", sorted(self.labels)), PLAN)
        yield self.report()


class ReadAndHash(_Step):
    """Read each listed file and hash it: entries by sha256 bucket, or a rejection (unreadable, empty).

    Images are not opened here (Pillow's header parse was ~5% of a job's
    CPU, and converting opens them anyway); a file that turns out not to be
    an image is rejected when converted, and so are its exact duplicates
    (:class:`KeepFirst` hands them on with it), so two broken files with the
    same bytes are both reported rather than one counted as a duplicate.
    """

    def __init__(self, config: PreprocessConfig, temp_dir: str) -> None:
        super().__init__(temp_dir)
        self.fractions = config.split
        self.progress_seconds = config.progress_seconds

    def setup(self) -> None:
        self.progress = stats.WorkerProgress("files read and hashed", self.progress_seconds)

    def start_bundle(self) -> None:
        super().start_bundle()
        self.buckets: dict[int, list] = defaultdict(list)
        self.held = 0

    def process(self, chunk: bytes) -> Iterable:
        for path, source_id, label, split in _unpack(chunk):
            self._one(path, source_id, label, split)
        if self.held >= FLUSH_ENTRIES:
            yield from self._hand_on()

    def _one(self, path: str, source_id, label: str, split: str) -> None:
        try:
            data = read_bytes(path)
            if not data:
                raise images.Rejected("empty file (0 bytes)")
        except images.Rejected as error:
            if not split:
                self.tally.count("found", splits.UNASSIGNED, label)
            self.reject(path, str(error), "read", split or splits.UNASSIGNED, label)
            self.progress.add(rejected=True)
            return
        digest = hashlib.sha256(data).digest()
        if not split:
            split = splits.split_for(digest.hex(), self.fractions)
            self.tally.count("found", split, label)
        self.progress.add()
        self.buckets[digest[0] * BUCKETS // 256].append((digest, path, source_id, label, split))
        self.held += 1

    def _hand_on(self, windowed: bool = False) -> Iterable:
        for bucket, entries in self.buckets.items():
            yield _windowed((bucket, _pack(entries))) if windowed else (bucket, _pack(entries))
        self.buckets = defaultdict(list)
        self.held = 0

    def finish_bundle(self) -> Iterable:
        yield from self._hand_on(windowed=True)
        yield self.report()


class KeepFirst(_Step):
    """Of the files sharing one sha256, keep one (earliest split, then path) and count the rest.

    Per sha256 bucket: the kept entries in sha256 order, each with its
    duplicates (should the kept file prove not to be an image, they are
    rejected with it), and how many each split has (the shard layout is
    computed from those counts).
    """

    def process(self, element) -> Iterable:
        bucket, packed = element
        entries = sorted(itertools.chain.from_iterable(_unpack(one) for one in packed),
                         key=lambda entry: (entry[_DIGEST], _SPLIT_ORDER[entry[_SPLIT]], entry[_PATH]))
        kept = []
        for _, same in itertools.groupby(entries, key=itemgetter(_DIGEST)):
            first = next(same)
            duplicates = []
            for duplicate in same:
                duplicates.append((duplicate[_PATH], duplicate[_LABEL], duplicate[_SPLIT]))
                self.tally.count("duplicates", duplicate[_SPLIT], duplicate[_LABEL])
                if duplicate[_LABEL] != first[_LABEL]:
                    self.tally.add("duplicate_label_conflicts")
                    _log.warning("same image, different labels: kept %s (%s), dropped %s (%s)",
                                 first[_PATH], first[_LABEL], duplicate[_PATH], duplicate[_LABEL])
            kept.append((*first, tuple(duplicates)))
        per_split: dict[str, int] = defaultdict(int)
        for entry in kept:
            per_split[entry[_SPLIT]] += 1
        yield bucket, _pack(kept)
        yield beam.pvalue.TaggedOutput(PLAN, ("kept", (bucket, dict(per_split))))

    def finish_bundle(self) -> Iterable:
        yield self.report()


class Plan(beam.CombineFn):
    """The listed labels and the kept records per (split, bucket) -> the plan the later steps follow.

    Applied by each step that needs it, to the parts as a list side input
    (:class:`PlanOf`), not by ``CombineGlobally``: a few hundred small parts,
    and the two stages a global combine costs the local runner (~45 ms).

    ``{"labels": sorted class names, "splits": {split: {"records", "shards", "offsets"}}}``:
    label ids are positions in ``labels``; ``offsets[bucket]`` is the rank (in
    sha256 order) of the split's first record in that bucket.
    """

    def __init__(self, record_bytes: int, requested: int) -> None:
        self.record_bytes = record_bytes
        self.requested = requested

    def create_accumulator(self):
        return {"labels": set(), "kept": {}}

    def add_input(self, accumulator, element):
        kind, value = element
        if kind == "labels":
            accumulator["labels"].update(value)
        else:
            bucket, per_split = value
            for split, count in per_split.items():
                per_bucket = accumulator["kept"].setdefault(split, {})
                per_bucket[bucket] = per_bucket.get(bucket, 0) + count
        return accumulator

    def merge_accumulators(self, accumulators):
        merged = self.create_accumulator()
        for accumulator in accumulators:
            self.add_input(merged, ("labels", accumulator["labels"]))
            for split, per_bucket in accumulator["kept"].items():
                for bucket, count in per_bucket.items():
                    self.add_input(merged, ("kept", (bucket, {split: count})))
        return merged

    def extract_output(self, accumulator):
        layout = {}
        for split in SPLITS:
            per_bucket = accumulator["kept"].get(split, {})
            offsets, total = {}, 0
            for bucket in sorted(per_bucket):
                offsets[bucket] = total
                total += per_bucket[bucket]
            layout[split] = {"records": total, "shards": shards.num_shards(total, self.record_bytes, self.requested),
                             "offsets": offsets}
        return {"labels": sorted(accumulator["labels"]), "splits": layout}


class PlanOf:
    """The plan from its parts (a list side input), combined once per list a worker is handed."""

    def __init__(self, record_bytes: int, requested: int) -> None:
        self.combine = Plan(record_bytes, requested)
        self._parts: list | None = None
        self._plan: dict = {}

    def __call__(self, parts: list) -> dict:
        if parts is not self._parts:
            accumulator = self.combine.create_accumulator()
            for part in parts:
                accumulator = self.combine.add_input(accumulator, part)
            self._parts, self._plan = parts, self.combine.extract_output(accumulator)
        return self._plan


def assign_shards(element, parts: list, plan_of: PlanOf, lanes: int = 0) -> Iterable:
    """A bucket's kept entries -> ``((split, shard, shards), (bucket, entries))``, one run per shard it touches.

    With ``lanes`` (the local runner's worker count), keyed by lane instead:
    ``(lane, ((split, shard, shards), (bucket, entries)))``.
    """
    bucket, kept = element
    plan = plan_of(parts)
    layout = plan["splits"]
    by_split: dict[str, list] = defaultdict(list)
    for entry in _unpack(kept):
        by_split[entry[_SPLIT]].append(entry)
    for split, entries in by_split.items():
        records, count = layout[split]["records"], layout[split]["shards"]
        ranked = enumerate(entries, layout[split]["offsets"][bucket])
        for shard, run in itertools.groupby(ranked, key=lambda pair: shards.shard_of(pair[0], records, count)):
            key, value = (split, shard, count), (bucket, _pack([entry for _, entry in run]))
            yield (lane_of(plan, split, shard, lanes), (key, value)) if lanes else (key, value)


def lane_of(plan: dict, split: str, shard: int, lanes: int) -> int:
    """The lane of a shard: the shards of all splits, in order, cut into ``lanes`` runs of equal record counts."""
    layout = plan["splits"]
    total = sum(layout[name]["records"] for name in SPLITS)
    before = sum(layout[name]["records"] for name in SPLITS[: SPLITS.index(split)])
    first = shards.first_rank(shard, layout[split]["records"], layout[split]["shards"])
    return min(lanes - 1, (before + first) * lanes // max(1, total))


class ConvertShard(_Step):
    """One shard: decode, normalise, resize and re-encode its images, serialized ``tf.train.Example`` s in one file."""

    def __init__(self, config: PreprocessConfig, out_dir: str, temp_dir: str, plan_of: PlanOf) -> None:
        super().__init__(temp_dir)
        self.config = config
        self.out_dir = out_dir
        self.plan_of = plan_of

    def setup(self) -> None:
        from preprocessing.tfrecords import serialize_example  # protobuf only: workers never import TensorFlow

        self.serialize = serialize_example
        self.progress = stats.WorkerProgress("images converted", self.config.progress_seconds)
        self._labels: list[str] | None = None
        self._ids: dict[str, int] = {}

    def start_bundle(self) -> None:
        super().start_bundle()
        self.sizes = stats.SizeSummary().create_accumulator()
        self.written: list[str] = []

    def _label_id(self, labels: list[str], label: str) -> int:
        if labels is not self._labels:
            self._labels = labels
            self._ids = {name: index for index, name in enumerate(labels)}
        return self._ids[label]

    def process(self, element, parts: list) -> None:
        key, values = element
        plan = self.plan_of(parts)
        if not isinstance(key, int):
            self._shard(key, values, plan)
            return
        runs_by_shard: dict[tuple, list] = defaultdict(list)  # a lane: its shards, one after the other
        for shard_key, run in values:
            runs_by_shard[shard_key].append(run)
        for shard_key in sorted(runs_by_shard):
            self._shard(shard_key, runs_by_shard.pop(shard_key), plan)

    def _shard(self, key: tuple, runs: Iterable, plan: dict) -> None:
        split, shard, count = key
        labels = plan["labels"]
        name = shards.shard_name(split, shard, count)
        writer = shards.ShardWriter(FileSystems.join(self.out_dir, name), self.temp_dir)
        try:
            for _, entries in sorted(runs, key=itemgetter(0)):
                for entry in _unpack(entries):
                    record = self._record(entry, labels)
                    if record is not None:
                        writer.write(record)
            writer.commit()
        except BaseException:
            writer.discard()
            raise
        self.written.append(name)

    def _reject(self, path: str, label: str, split: str, reason: str, stage: str) -> None:
        self.progress.add(rejected=True)
        self.reject(path, reason, stage, split, label)

    def _record(self, entry: tuple, labels: list[str]) -> bytes | None:
        digest, path, source_id, label, split, duplicates = entry
        config = self.config
        try:
            data = read_bytes(path)
        except images.Rejected as error:
            self._reject(path, label, split, str(error), "read")
            return None
        if hashlib.sha256(data).digest() != digest:
            changed = "file changed while the job ran (sha256 differs from the first read)"
            self._reject(path, label, split, changed, "read")
            return None
        try:
            converted = images.convert(
                data, config.image_size, config.resize_mode, config.image_format, config.jpeg_quality, config.max_pixels
            )
        except images.Rejected as error:
            self._reject(path, label, split, str(error), "decode")
            for duplicate_path, duplicate_label, duplicate_split in duplicates:  # the same bytes: not images either
                self.tally.count("duplicates", duplicate_split, duplicate_label, -1)
                if duplicate_label != label:
                    self.tally.add("duplicate_label_conflicts", -1)
                self._reject(duplicate_path, duplicate_label, duplicate_split, str(error), "decode")
            return None
        record = self.serialize(
            encoded=converted.encoded,
            image_format=config.image_format,
            height=converted.height,
            width=converted.width,
            label=self._label_id(labels, label),
            text=label,
            source_id=path if source_id is None else source_id,
            sha256=digest.hex(),
        )
        self.tally.count("written", split, label)
        if split == "train":
            self.tally.carve(label, digest.hex())
        self.tally.size(converted.source_width, converted.source_height)
        self.sizes = stats.SizeSummary().add_input(self.sizes, (converted.source_width, converted.source_height))
        self.progress.add()
        return record

    def finish_bundle(self) -> Iterable:
        yield self.report(sizes=self.sizes, shards=self.written)


class Finish(beam.DoFn):
    """The job's small files from the merged report: ``_counts.json``, ``labels.txt``, ``errors.jsonl``.

    Also writes the empty shards the plan names but no step wrote (a split
    with no records gets one; ``--num-shards`` above a split's record count
    gives some), and removes the temporary folder.
    """

    def __init__(self, out_dir: str, temp_dir: str, plan_of: PlanOf) -> None:
        self.out_dir = out_dir
        self.temp_dir = temp_dir
        self.plan_of = plan_of

    def _write(self, name: str, data: bytes) -> None:
        with FileSystems.create(FileSystems.join(self.out_dir, name),
                                compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            handle.write(data)

    def process(self, report: dict, parts: list) -> None:
        plan = self.plan_of(parts)
        labels, layout = plan["labels"], plan["splits"]
        sizes = stats.SizeSummary().extract_output(report["sizes"])
        self._write(stats.COUNTS_FILE, (stats.counts_json(report["counts"], sizes) + "\n").encode("utf-8"))
        self._write(LABELS_FILE, ("\n".join(labels) + "\n").encode("utf-8"))
        with FileSystems.create(FileSystems.join(self.out_dir, ERRORS_FILE),
                                compression_type=CompressionTypes.UNCOMPRESSED) as errors:
            for path in sorted(report["errors"]):
                with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as part:
                    while block := part.read(1 << 20):
                        errors.write(block)
        written = set(report["shards"])
        for split in SPLITS:
            count = layout[split]["shards"]
            for index in range(count):
                name = shards.shard_name(split, index, count)
                if name not in written:
                    shards.write_empty(FileSystems.join(self.out_dir, name))
        remove_tree(self.temp_dir)



def build(pipeline: beam.Pipeline, config: PreprocessConfig, spec: InputSpec, out_dir: str, lanes: int = 0) -> None:
    """Add the whole job to ``pipeline``, writing into ``out_dir`` (the staging folder).

    ``lanes``: the local multi-process runner's worker count (see Lanes above); 0 for any other runner.
    """
    temp_dir = FileSystems.join(out_dir, shards.TEMP_FOLDER)
    if spec.layout == sources.MANIFEST:
        lines = pipeline | "ReadManifest" >> beam.io.ReadFromText(spec.path, skip_header_lines=1)
    else:
        lines = pipeline | "InputFolder" >> beam.Create([spec.path])
    listed = lines | "ListInputs" >> beam.ParDo(ListInputs(spec, temp_dir)).with_outputs(REPORT, PLAN, main="chunks")
    hashed = (
        listed.chunks
        | "SpreadOverWorkers" >> beam.Reshuffle()
        | "ReadAndHash" >> beam.ParDo(ReadAndHash(config, temp_dir)).with_outputs(REPORT, main="buckets")
    )
    kept = (
        hashed.buckets
        | "GroupBySha256" >> beam.GroupByKey()
        | "KeepFirstOfDuplicates" >> beam.ParDo(KeepFirst(temp_dir)).with_outputs(REPORT, PLAN, main="kept")
    )
    plan_parts = beam.pvalue.AsList((listed[PLAN], kept[PLAN]) | "PlanParts" >> beam.Flatten())
    plan_of = PlanOf(shards.estimated_record_bytes(config.image_size, config.image_format), config.num_shards)
    converted = (
        kept.kept
        | "AssignShards" >> beam.FlatMap(assign_shards, plan_parts, plan_of, lanes)
        | "GroupByShard" >> beam.GroupByKey()
        | "ConvertShard" >> beam.ParDo(ConvertShard(config, out_dir, temp_dir, plan_of), plan_parts)
        .with_outputs(REPORT)
    )
    # Every step's bundle reports: the combine always has input, so it needs no default value (Beam would run
    # two more stages to provide one).
    _ = (
        (listed[REPORT], hashed[REPORT], kept[REPORT], converted[REPORT])
        | "AllReports" >> beam.Flatten()
        | "MergeReports" >> beam.CombineGlobally(stats.MergeReports()).without_defaults()
        | "Finish" >> beam.ParDo(Finish(out_dir, temp_dir, plan_of), plan_parts)
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
