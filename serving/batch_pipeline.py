"""The batch job's Beam graph: list the inputs, read them, RunInference, write predictions and dead letters.

::

    MatchFiles(ROOT/**) | ReadFromText(manifest)     one element per file / row, in the listing worker
      -> ListInputs      inputs in chunks of CHUNK_FILES           (or, for TFRecords: the record files)
      -> Reshuffle       spread the chunks (files) over all workers
      -> ReadImages      each file's bytes; unreadable or empty -> errors  (ReadRecords: each record's image)
      -> RunInference    BatchElements + serving_default on the bytes, one model per worker (batch_handler)
      -> WritePredictions  top-k per image as JSON lines, one file per bundle; refused files -> errors
    every step's bundle report -> MergeReports -> Finish   predictions-*.jsonl, predictions.csv, errors.jsonl,
                                                            _counts.json (serving.batch_outputs)

Only paths cross the shuffle; image bytes are read by the worker that scores
them and flow through one fused stage. As in the preprocessing job
(:mod:`preprocessing.pipeline`), each step counts what it decided per bundle
and hands on one report; files are written per bundle into a temporary
folder and only those named in a report are published by ``Finish`` (a
retried bundle's leftovers never are). ``found == predicted + errors`` is
checked against those counts and the lines written, not runner metrics.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections import defaultdict
from typing import Iterable

import apache_beam as beam
import numpy as np
from apache_beam.io import fileio
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import KeyedModelHandler, RunInference
from apache_beam.transforms.window import GlobalWindows

from preprocessing import images
from preprocessing.pipeline import read_bytes
from serving import batch_inputs
from serving.batch_config import BatchConfig, ModelInfo
from serving.batch_handler import SavedModelBytesHandler
from serving.batch_inputs import BatchInput, Item, Rejected
from serving.batch_outputs import TEMP_FOLDER, Finish, MergeReports, create

NAMESPACE = "batch_predict"
CHUNK_FILES = 100
REPORT = "report"
_log = logging.getLogger("preprocessing.serving_batch")  # shown by the local runner's workers (preprocessing.worker)


def _windowed(value, tag: str | None = None):
    value = GlobalWindows.windowed_value(value)
    return value if tag is None else beam.pvalue.TaggedOutput(tag, value)


class _Step(beam.DoFn):
    """Counts per bundle, rejected inputs into a per-bundle file, one report per bundle (as preprocessing does)."""

    def __init__(self, temp_dir: str, progress_seconds: float = 0.0) -> None:
        self.temp_dir = temp_dir
        self.progress_seconds = progress_seconds

    def setup(self) -> None:
        self.done = 0
        self.started = self.last = 0.0

    def start_bundle(self) -> None:
        self.counts: dict[str, int] = defaultdict(int)
        self.files: list[tuple[str, int]] = []
        self._errors = None
        self._errors_path = ""

    def reject(self, name: str, reason: str, stage: str) -> None:
        self.counts["errors"] += 1
        self.counts[f"stage:{stage}"] += 1
        if self._errors is None:
            self._errors_path = FileSystems.join(self.temp_dir, f"errors-{uuid.uuid4().hex}.jsonl")
            self._errors = create(self._errors_path)
        line = json.dumps({"path": name, "reason": reason, "stage": stage}, ensure_ascii=False) + "\n"
        self._errors.write(line.encode("utf-8"))

    def progress(self, what: str) -> None:
        now = time.monotonic()
        if not self.done:
            self.started = self.last = now
        self.done += 1
        if self.progress_seconds > 0 and now - self.last >= self.progress_seconds:
            self.last = now
            _log.info("progress: %s %s in this worker, %.1f/s", f"{self.done:,}", what,
                      self.done / max(now - self.started, 1e-9))

    def report(self):
        errors = []
        if self._errors is not None:
            self._errors.close()
            errors = [self._errors_path]
        for name, value in self.counts.items():
            Metrics.counter(NAMESPACE, name).inc(value)
        return _windowed({"counts": dict(self.counts), "errors": errors, "files": self.files}, REPORT)


class ListInputs(_Step):
    """Matched files or manifest lines -> chunks of :class:`Item` s (a manifest row without a path is an error)."""

    def __init__(self, source: BatchInput, temp_dir: str) -> None:
        super().__init__(temp_dir)
        self.source = source

    def start_bundle(self) -> None:
        super().start_bundle()
        self.chunk: list[Item] = []

    def process(self, element) -> Iterable:
        try:
            if self.source.layout == batch_inputs.sources.MANIFEST:
                item = batch_inputs.item_from_row(element, self.source)
            else:
                item = batch_inputs.item_from_path(element.path, self.source)
        except Rejected as error:
            self.counts["found"] += 1
            self.reject(element.strip()[:200], str(error), "list")
            return
        if item is None:
            self.counts["ignored"] += 1
            return
        self.counts["found"] += 1
        self.chunk.append(item)
        if len(self.chunk) >= CHUNK_FILES:
            yield self.chunk
            self.chunk = []

    def finish_bundle(self) -> Iterable:
        if self.chunk:
            yield _windowed(self.chunk)
        yield self.report()


class ReadImages(_Step):
    """A chunk of inputs -> ``(item, file bytes)``; unreadable and empty files are errors (stage ``read``)."""

    def process(self, chunk: list) -> Iterable:
        for item in chunk:
            item = Item(*item)
            try:
                data = read_bytes(item.path)
                if not data:
                    raise images.Rejected("empty file (0 bytes)")
            except images.Rejected as error:
                self.reject(item.name, str(error), "read")
                continue
            yield item, data

    def finish_bundle(self) -> Iterable:
        yield self.report()


class ListRecordFiles(beam.DoFn):
    """Matched files -> the paths of TFRecord files (``.tfrecord``/``.tfrecords``, also compressed ``.gz``)."""

    def process(self, metadata) -> Iterable:
        name = metadata.path.lower().removesuffix(".gz")
        if name.endswith(batch_inputs.TFRECORD_SUFFIXES):
            yield metadata.path


class ReadRecords(_Step):
    """A TFRecord file -> ``(item, encoded image)`` per record; each record is an input (counted ``found``).

    A file that cannot be read or is damaged is one error (stage ``tfrecord``),
    after the records before the damage; a record without an image is one too.
    """

    def process(self, path: str) -> Iterable:
        index = 0
        try:
            with FileSystems.open(path, compression_type=CompressionTypes.AUTO) as handle:
                for index, serialized in enumerate(batch_inputs.read_records(handle)):
                    self.counts["found"] += 1
                    try:
                        yield batch_inputs.record_item(serialized, path, index)
                    except Rejected as error:
                        self.reject(f"{path}#{index}", str(error), "tfrecord")
        except Rejected as error:
            self.counts["found"] += 1
            self.reject(path, str(error), "tfrecord")
        except Exception as error:  # noqa: BLE001 - any filesystem's or decompressor's error: this file only
            message = str(error).strip().splitlines()
            self.counts["found"] += 1
            self.reject(path, f"cannot read the TFRecord file ({message[0] if message else type(error).__name__})",
                        "tfrecord")

    def finish_bundle(self) -> Iterable:
        yield self.report()


class WritePredictions(_Step):
    """``(item, PredictionResult)`` -> one JSON line per scored image into the bundle's file; refusals -> errors."""

    def __init__(self, labels: tuple[str, ...], top_k: int, version: int | None, temp_dir: str,
                 progress_seconds: float) -> None:
        super().__init__(temp_dir, progress_seconds)
        self.labels = labels
        self.top_k = top_k
        self.version = version

    def start_bundle(self) -> None:
        super().start_bundle()
        self._out = None
        self._out_path = ""
        self._lines = 0

    def process(self, element) -> None:
        item, result = element
        item = Item(*item)
        self.progress("images scored")
        if isinstance(result.inference, str):
            self.reject(item.name, result.inference, "decode")
            return
        probabilities = np.asarray(result.inference, dtype=np.float64)
        order = np.argsort(-probabilities, kind="stable")[: self.top_k]
        top = [{"label": self._label(i), "score": float(probabilities[i])} for i in order]
        line = {"path": item.name, "label": top[0]["label"], "score": top[0]["score"], "class_id": int(order[0]),
                "top": top, "model_version": self.version}
        if item.given:
            line["given_label"] = item.given
            if item.given in self.labels:  # agreement only where the given label is one of the model's classes
                self.counts["given"] += 1
                self.counts["agree"] += int(item.given == line["label"])
        self.counts["predicted"] += 1
        self.counts[f"label:{line['label']}"] += 1
        if self._out is None:
            self._out_path = FileSystems.join(self.temp_dir, f"predictions-{uuid.uuid4().hex}.jsonl")
            self._out = create(self._out_path)
        self._out.write((json.dumps(line, ensure_ascii=False) + "\n").encode("utf-8"))
        self._lines += 1

    def _label(self, index: int) -> str:
        return self.labels[index] if index < len(self.labels) else f"class_{index}"

    def finish_bundle(self) -> Iterable:
        if self._out is not None:
            self._out.close()
            self.files.append((self._out_path, self._lines))
        yield self.report()


def build(pipeline: beam.Pipeline, config: BatchConfig, source: BatchInput, model: ModelInfo, top_k: int,
          out_dir: str, threads: int | None = None) -> None:
    """Add the whole job to ``pipeline``, writing into ``out_dir`` (the staging folder)."""
    temp_dir = FileSystems.join(out_dir, TEMP_FOLDER)
    allow_empty = fileio.EmptyMatchTreatment.ALLOW
    if source.layout == batch_inputs.TFRECORDS:
        listed = (pipeline
                  | "MatchRecordFiles" >> fileio.MatchFiles(source.glob, empty_match_treatment=allow_empty)
                  | "ListRecordFiles" >> beam.ParDo(ListRecordFiles()))
        reports = []
        read = (listed
                | "SpreadOverWorkers" >> beam.Reshuffle()
                | "ReadRecords" >> beam.ParDo(ReadRecords(temp_dir)).with_outputs(REPORT, main="images"))
    else:
        if source.layout == batch_inputs.sources.MANIFEST:
            lines = pipeline | "ReadManifest" >> beam.io.ReadFromText(source.path, skip_header_lines=1)
        else:
            lines = pipeline | "MatchFiles" >> fileio.MatchFiles(source.glob, empty_match_treatment=allow_empty)
        listed = lines | "ListInputs" >> beam.ParDo(ListInputs(source, temp_dir)).with_outputs(REPORT, main="chunks")
        reports = [listed[REPORT]]
        read = (listed.chunks
                | "SpreadOverWorkers" >> beam.Reshuffle()
                | "ReadImages" >> beam.ParDo(ReadImages(temp_dir)).with_outputs(REPORT, main="images"))
    quiet = not logging.getLogger("apache_beam").isEnabledFor(logging.INFO)  # the driver's --verbose
    handler = SavedModelBytesHandler(model.path, model.version, min_batch_size=config.min_batch_size,
                                     max_batch_size=config.max_batch_size, threads=threads, quiet=quiet)
    written = (read.images
               | "RunInference" >> RunInference(KeyedModelHandler(handler))
               | "WritePredictions" >> beam.ParDo(WritePredictions(
                   model.labels, top_k, model.version, temp_dir, config.progress_seconds)).with_outputs(REPORT))
    _ = (
        (*reports, read[REPORT], written[REPORT])
        | "AllReports" >> beam.Flatten()
        | "MergeReports" >> beam.CombineGlobally(MergeReports()).without_defaults()
        | "Finish" >> beam.ParDo(Finish(out_dir, temp_dir, top_k, config.csv_max_rows))
    )
