"""What the batch job publishes: the reports merged, the files renamed into place, ``predictions.csv``, the counts.

The steps of :mod:`serving.batch_pipeline` write their predictions and
rejected inputs per bundle into ``OUTPUT/_tmp/`` and name those files in their
reports; :class:`Finish` publishes exactly the files the merged report names
(a retried bundle's leftovers never are): the prediction files as
``predictions-NNNNN-of-NNNNN.jsonl``, the rejections joined into
``errors.jsonl``, ``predictions.csv`` when at most ``--csv-max-rows`` images
were scored, and ``_counts.json``, which :mod:`serving.batch_job` folds into
``summary.json``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections import defaultdict

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from preprocessing.staging import remove_tree

TEMP_FOLDER = "_tmp"
COUNTS_FILE = "_counts.json"
ERRORS_FILE = "errors.jsonl"
CSV_FILE = "predictions.csv"
SUMMARY_FILE = "summary.json"
_log = logging.getLogger("preprocessing.serving_batch")  # shown by the local runner's workers (preprocessing.worker)


def shard_name(index: int, count: int) -> str:
    return f"predictions-{index:05d}-of-{count:05d}.jsonl"


def create(path: str):
    """A new file at ``path``, written as given (no compression chosen from the name)."""
    return FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED)


class MergeReports(beam.CombineFn):
    """Every bundle's report -> one: counts summed, error files and prediction files joined."""

    def create_accumulator(self):
        return {"counts": {}, "errors": [], "files": []}

    def add_input(self, accumulator, one):
        return self.merge_accumulators([accumulator, one])

    def merge_accumulators(self, accumulators):
        counts: dict[str, int] = defaultdict(int)
        merged = self.create_accumulator()
        for accumulator in accumulators:
            for name, value in accumulator["counts"].items():
                counts[name] += value
            merged["errors"].extend(accumulator["errors"])
            merged["files"].extend(accumulator["files"])
        merged["counts"] = dict(counts)
        return merged

    def extract_output(self, accumulator):
        return accumulator


class Finish(beam.DoFn):
    """Publish the reported files under their final names, ``predictions.csv`` when small, and the counts."""

    def __init__(self, out_dir: str, temp_dir: str, top_k: int, csv_max_rows: int) -> None:
        self.out_dir = out_dir
        self.temp_dir = temp_dir
        self.top_k = top_k
        self.csv_max_rows = csv_max_rows

    def process(self, report: dict) -> None:
        files = sorted(report["files"])
        names = [shard_name(index, len(files)) for index in range(len(files))]
        if files:
            FileSystems.rename([path for path, _ in files], [FileSystems.join(self.out_dir, n) for n in names])
        with create(FileSystems.join(self.out_dir, ERRORS_FILE)) as errors:
            for path in sorted(report["errors"]):
                with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as part:
                    while block := part.read(1 << 20):
                        errors.write(block)
        predicted = report["counts"].get("predicted", 0)
        csv_written = 0 < predicted <= self.csv_max_rows
        if csv_written:
            self._write_csv(names)
        counts = {"counts": report["counts"], "shards": {n: lines for n, (_, lines) in zip(names, files)},
                  "csv": CSV_FILE if csv_written else None}
        with create(FileSystems.join(self.out_dir, COUNTS_FILE)) as handle:
            handle.write(json.dumps(counts, sort_keys=True).encode("utf-8"))
        remove_tree(self.temp_dir)

    def _write_csv(self, names: list[str]) -> None:
        header = ["path", "given_label", "label", "score"]
        for rank in range(2, self.top_k + 1):
            header += [f"label_{rank}", f"score_{rank}"]
        with create(FileSystems.join(self.out_dir, CSV_FILE)) as handle:
            text = io.TextIOWrapper(handle, encoding="utf-8", newline="")
            writer = csv.writer(text)
            writer.writerow(header)
            for name in names:
                with FileSystems.open(FileSystems.join(self.out_dir, name),
                                      compression_type=CompressionTypes.UNCOMPRESSED) as shard:
                    for raw in io.TextIOWrapper(shard, encoding="utf-8"):
                        line = json.loads(raw)
                        row = [line["path"], line.get("given_label", ""), line["label"], line["score"]]
                        for entry in line["top"][1:]:
                            row += [entry["label"], entry["score"]]
                        writer.writerow(row)
            text.flush()
            text.detach()
