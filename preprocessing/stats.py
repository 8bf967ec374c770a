"""Counting every outcome, and turning the counts into ``stats.json`` and a summary.

The accounting is what the pipeline itself writes: every step that decides an
input's outcome (found, written, rejected, duplicates, per split and class;
rejections by stage; source sizes) counts it in a :class:`Tally` and hands
its bundle's counts on in one report element (:func:`report`). The pipeline
merges the reports (:class:`MergeReports`) and writes the sums beside the
records (``COUNTS_FILE`` in the staging folder), so the numbers do not depend
on whether, when or how a runner reports metrics. Beam counters of
the same names are kept for progress while the job runs, and compared with the
pipeline's counts at the end (:func:`cross_check`): a disagreement is reported,
never a reason to drop a good output.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter

from preprocessing.splits import UNASSIGNED
from preprocessing.tfrecords import CARVE_BINS, CARVE_BUCKETS, CARVE_METHOD, SPLITS, carve_bucket

NAMESPACE = "preprocessing"
NO_CLASS = "(none)"  # an input rejected before its class was known (e.g. a manifest row with a blank label)
OUTCOMES = ("found", "written", "rejected", "duplicates")
CARVE = "carve"
LONG_SIDE_BUCKETS = (32, 64, 128, 256, 512, 1024, 2048, 4096)
COUNTS_FILE = "_counts.json"  # written by the pipeline into the staging folder, folded into stats.json

_log = logging.getLogger("preprocessing")


class Tally:
    """One bundle's counts, also added to the Beam counters of the same names (progress, cross-check).

    The step that owns it hands :meth:`counts` on once per bundle, in its
    report (:class:`MergeReports`), instead of one element per count; the
    counters are incremented then too, once per name and bundle.
    """

    def __init__(self) -> None:
        self.values: dict[str, int] = defaultdict(int)

    def add(self, name: str, value: int = 1) -> None:
        self.values[name] += value

    def count(self, outcome: str, split: str, label: str, value: int = 1) -> None:
        """One outcome for one (split, class)."""
        self.add(f"{outcome}:{split}:{label}", value)

    def carve(self, label: str, sha256_hex: str) -> None:
        """A written train record's carve bin (stats.json ``carve_histogram``; not a Beam counter)."""
        self.values[f"{CARVE}:{label}:{carve_bucket(sha256_hex) * CARVE_BINS // CARVE_BUCKETS}"] += 1

    def stage(self, stage: str) -> None:
        """One more input rejected at ``stage``."""
        self.add(f"stage:{stage}")

    def size(self, width: int, height: int) -> None:
        """A decoded source image's size (the histogram; the caller keeps the min/max/mean)."""
        Metrics.distribution(NAMESPACE, "source_width").update(width)
        Metrics.distribution(NAMESPACE, "source_height").update(height)
        self.add(f"long_side:{size_bucket(width, height)}")

    def counts(self) -> dict[str, int]:
        """The bundle's counts (call once, as the bundle ends: it also increments the Beam counters)."""
        for name, value in self.values.items():
            if not name.startswith(CARVE):  # up to 100 per class: too many for a runner's metrics
                Metrics.counter(NAMESPACE, name).inc(value)
        return dict(self.values)


def size_bucket(width: int, height: int) -> str:
    """Histogram bucket of a source image by its longer side."""
    side = max(width, height)
    for edge in LONG_SIDE_BUCKETS:
        if side <= edge:
            return f"<={edge}"
    return f">{LONG_SIDE_BUCKETS[-1]}"


class SizeSummary(beam.CombineFn):
    """(width, height) pairs -> ``{"width": {count, min, max, sum}, "height": {...}}``."""

    def create_accumulator(self):
        return {"width": [0, None, None, 0], "height": [0, None, None, 0]}

    def add_input(self, accumulator, size):
        for key, value in zip(("width", "height"), size):
            count_, low, high, total = accumulator[key]
            accumulator[key] = [count_ + 1, value if low is None else min(low, value),
                                value if high is None else max(high, value), total + value]
        return accumulator

    def merge_accumulators(self, accumulators):
        merged = self.create_accumulator()
        for accumulator in accumulators:
            for key, (count_, low, high, total) in accumulator.items():
                if not count_:
                    continue
                m = merged[key]
                merged[key] = [m[0] + count_, low if m[1] is None else min(m[1], low),
                               high if m[2] is None else max(m[2], high), m[3] + total]
        return merged

    def extract_output(self, accumulator):
        return {key: dict(zip(("count", "min", "max", "sum"), values)) for key, values in accumulator.items()}


def report(counts: dict | None = None, sizes: dict | None = None, errors: list | None = None,
           shards: list | None = None) -> dict:
    """What one bundle of a step hands on: its counts, source sizes, rejected-input files and written shards."""
    return {"counts": counts or {}, "sizes": sizes, "errors": errors or [], "shards": shards or []}


class MergeReports(beam.CombineFn):
    """All the steps' bundle reports -> one (counts summed, sizes merged, file lists joined)."""

    def create_accumulator(self):
        return report(sizes=SizeSummary().create_accumulator())

    def add_input(self, accumulator, one):
        return self.merge_accumulators([accumulator, one])

    def merge_accumulators(self, accumulators):
        merged = self.create_accumulator()
        counts = defaultdict(int)
        sizes = [merged["sizes"]]
        for accumulator in accumulators:
            for name, value in accumulator["counts"].items():
                counts[name] += value
            if accumulator["sizes"]:
                sizes.append(accumulator["sizes"])
            merged["errors"].extend(accumulator["errors"])
            merged["shards"].extend(accumulator["shards"])
        merged["counts"] = dict(counts)
        merged["sizes"] = SizeSummary().merge_accumulators(sizes)
        return merged

    def extract_output(self, accumulator):
        return accumulator


def counts_json(counters: dict, sizes: dict) -> str:
    """The content of ``COUNTS_FILE``."""
    return json.dumps({"counters": counters, "sizes": sizes}, sort_keys=True)


def read_counts(text: str) -> tuple[dict, dict]:
    """(counters, distributions) from ``COUNTS_FILE``'s content, as :func:`build_stats` takes them."""
    content = json.loads(text)
    return ({name: int(value) for name, value in content["counters"].items()},
            {f"source_{key}": value for key, value in content["sizes"].items()})


class WorkerProgress:
    """Per-process progress lines ("1,200 done, 85 img/s"), at most one every ``interval`` seconds.

    Each worker process logs its own share: with the local multi-process
    runner the lines appear in the console, on Dataflow in the worker logs.
    """

    def __init__(self, what: str, interval: float) -> None:
        self.what = what
        self.interval = interval
        self.done = 0
        self.rejected = 0
        self.started = self.last = 0.0

    def add(self, rejected: bool = False) -> None:
        if not self.done:
            self.started = self.last = time.monotonic()
        self.done += 1
        self.rejected += int(rejected)
        now = time.monotonic()
        if self.interval > 0 and now - self.last >= self.interval:
            self.last = now
            self.log()

    def log(self) -> None:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        _log.info(
            "progress: %s %s in this worker (%s rejected), %.1f/s",
            f"{self.done:,}", self.what, f"{self.rejected:,}", self.done / elapsed,
        )


def query_counts(result) -> tuple[dict, dict, str]:
    """(counters, distributions, source) from a runner's metrics: committed where it has them. Progress only."""
    metrics = result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))

    def pick(entries):
        out = {}
        for entry in entries:
            value = entry.committed if entry.committed is not None else entry.attempted
            name = entry.key.metric.name
            out[name] = _merge(out.get(name), value)
        return out

    return pick(metrics["counters"]), pick(metrics["distributions"]), "beam metrics"


def _merge(old, new):
    if old is None:
        return new
    if isinstance(new, int):
        return old + new
    return new


def cross_check(result, totals: dict, errors_lines: int) -> dict:
    """Compare the pipeline's own totals with the runner's metrics and the dead-letter file; log any difference.

    Returns what ``stats.json`` records under ``"cross_check"``. The pipeline's
    counts stand either way: a runner may report metrics late, only as
    attempted values (retries counted twice), or not at all.
    """
    check: dict = {"errors_file_lines": errors_lines}
    if errors_lines != totals["rejected"]:
        _log.warning("errors.jsonl holds %d lines but %d inputs were rejected", errors_lines, totals["rejected"])
    try:
        counters, _, _ = query_counts(result)
    except Exception as error:  # noqa: BLE001 - a runner without a metrics API
        counters = {}
        _log.debug("no metrics from the runner: %s", error)
    metric_totals = build_stats(counters, {})["totals"]
    if not counters:
        check["beam_metrics"] = "unavailable"
        _log.info("the runner reported no metrics; the counts are the pipeline's own (%s)", COUNTS_FILE)
    elif metric_totals == totals:
        check["beam_metrics"] = "agree"
    else:
        check["beam_metrics"] = "disagree"
        check["beam_metrics_totals"] = metric_totals
        _log.warning("the runner's metrics (%s) disagree with the pipeline's own counts (%s); the output is kept "
                     "and stats.json holds the pipeline's counts",
                     ", ".join(f"{k} {v:,}" for k, v in metric_totals.items()),
                     ", ".join(f"{k} {v:,}" for k, v in totals.items()))
    return check


def build_stats(counters: dict, distributions: dict) -> dict:
    """The counts part of ``stats.json`` from the counter values."""
    table: dict = defaultdict(lambda: defaultdict(lambda: dict.fromkeys(OUTCOMES, 0)))
    by_stage: dict[str, int] = {}
    long_side: dict[str, int] = {}
    carve: dict[str, list[int]] = {}
    for name, value in counters.items():
        kind, _, rest = name.partition(":")
        if kind in OUTCOMES:
            split, _, label = rest.partition(":")
            table[split][label][kind] += int(value)
        elif kind == "stage":
            by_stage[rest] = int(value)
        elif kind == "long_side":
            long_side[rest] = int(value)
        elif kind == CARVE:
            label, _, carve_bin = rest.rpartition(":")
            carve.setdefault(label, [0] * CARVE_BINS)[int(carve_bin)] += int(value)
    splits = [split for split in SPLITS] + sorted(set(table) - set(SPLITS))
    per_split = {split: dict.fromkeys(OUTCOMES, 0) for split in splits}
    per_class: dict = defaultdict(lambda: dict.fromkeys(OUTCOMES, 0))
    for split, labels in table.items():
        for label, outcome in labels.items():
            for kind in OUTCOMES:
                per_split[split][kind] += outcome[kind]
                per_class[label][kind] += outcome[kind]
    totals = {kind: sum(per_split[split][kind] for split in per_split) for kind in OUTCOMES}
    order = [f"<={edge}" for edge in LONG_SIDE_BUCKETS] + [f">{LONG_SIDE_BUCKETS[-1]}"]
    stats = {kind: {split: per_split[split][kind] for split in per_split} for kind in OUTCOMES}
    stats.update({
        "totals": totals,
        "accounted": totals["written"] + totals["rejected"] + totals["duplicates"] == totals["found"],
        "by_class": {label: per_class[label] for label in sorted(per_class)},
        "by_split_and_class": {
            split: {label: dict(table[split][label]) for label in sorted(table[split])} for split in splits if split in table
        },
        "rejected_by_stage": dict(sorted(by_stage.items())),
        "image_sizes": {
            "long_side_histogram": {bucket: long_side[bucket] for bucket in order if bucket in long_side},
            **{name.replace("source_", ""): _distribution(value) for name, value in sorted(distributions.items())},
        },
    })
    if carve:
        stats["carve_histogram"] = {"method": CARVE_METHOD, "buckets": CARVE_BUCKETS, "bins": CARVE_BINS,
                                    "train": {label: carve[label] for label in sorted(carve)}}
    return stats


def _distribution(value) -> dict:
    if isinstance(value, dict):
        count_, low, high, total = (value.get(k) for k in ("count", "min", "max", "sum"))
    else:  # a Beam DistributionResult
        count_, low, high, total = (getattr(value, k, None) for k in ("count", "min", "max", "sum"))
    if not count_:
        return {"count": 0}
    return {"count": count_, "min": low, "max": high, "mean": round(total / count_, 1)}


def summary_lines(stats: dict) -> list[str]:
    """The end-of-run summary a person reads."""
    totals = stats["totals"]
    run = stats["run"]
    lines = [
        f"found {totals['found']:,} inputs: {totals['written']:,} written, {totals['rejected']:,} rejected, "
        f"{totals['duplicates']:,} duplicates, in {run['seconds']:.1f}s ({run['images_per_second']:.1f} images/s)",
    ]
    for split in SPLITS:
        lines.append(
            f"  {split:<10} {stats['written'].get(split, 0):>8,} written  {stats['rejected'].get(split, 0):>6,} rejected"
            f"  {stats['duplicates'].get(split, 0):>6,} duplicates"
        )
    unplaced = stats["rejected"].get(UNASSIGNED, 0)
    if unplaced:  # so that the rows add up to the totals
        lines.append(f"  {'no split':<10} {0:>8,} written  {unplaced:>6,} rejected  {0:>6,} duplicates"
                     "  (unreadable or empty before a split was chosen)")
    lines.append(f"  classes ({len(stats['labels'])}): {', '.join(stats['labels'])}")
    if totals["rejected"]:
        lines.append(f"  {totals['rejected']:,} rejected inputs are listed with their reasons in {stats['errors_file']}")
    if stats.get("empty_class_folders"):
        lines.append(f"  empty class folders left out: {', '.join(stats['empty_class_folders'])}")
    if not stats["accounted"]:
        lines.append("  WARNING: written + rejected + duplicates != found; inputs were lost between the job's steps")
    return lines
