"""Counting with Beam metrics, and turning the counts into ``stats.json`` and a summary.

Workers count every outcome with a Beam counter named ``OUTCOME:SPLIT:CLASS``
in the ``preprocessing`` namespace (outcomes: found, written, rejected,
duplicates; the split is ``unassigned`` for an input rejected before its bytes
were read), rejected reasons by stage as ``stage:STAGE``, and source sizes as
``long_side:BUCKET`` plus two distributions. The launching process reads them
back from the runner's result, so the numbers are the runner's committed
metrics, not a second count.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict

from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter

from preprocessing.tfrecords import SPLITS

NAMESPACE = "preprocessing"
NO_CLASS = "(none)"  # an input rejected before its class was known (e.g. a manifest row with a blank label)
OUTCOMES = ("found", "written", "rejected", "duplicates")
LONG_SIDE_BUCKETS = (32, 64, 128, 256, 512, 1024, 2048, 4096)

_log = logging.getLogger("preprocessing")


def count(outcome: str, split: str, label: str, value: int = 1) -> None:
    """Add to the counter of one outcome for one (split, class)."""
    Metrics.counter(NAMESPACE, f"{outcome}:{split}:{label}").inc(value)


def count_stage(stage: str) -> None:
    """One more input rejected at ``stage``."""
    Metrics.counter(NAMESPACE, f"stage:{stage}").inc()


def size_bucket(width: int, height: int) -> str:
    """Histogram bucket of a source image by its longer side."""
    side = max(width, height)
    for edge in LONG_SIDE_BUCKETS:
        if side <= edge:
            return f"<={edge}"
    return f">{LONG_SIDE_BUCKETS[-1]}"


def count_size(width: int, height: int) -> None:
    """Record a decoded source image's size."""
    Metrics.counter(NAMESPACE, f"long_side:{size_bucket(width, height)}").inc()
    Metrics.distribution(NAMESPACE, "source_width").update(width)
    Metrics.distribution(NAMESPACE, "source_height").update(height)


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


def query_counts(result) -> tuple[dict, dict, dict]:
    """(counters, distributions, source) from a pipeline result: committed where the runner has them."""
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


def build_stats(counters: dict, distributions: dict) -> dict:
    """The counts part of ``stats.json`` from the counter values."""
    table: dict = defaultdict(lambda: defaultdict(lambda: dict.fromkeys(OUTCOMES, 0)))
    by_stage: dict[str, int] = {}
    long_side: dict[str, int] = {}
    for name, value in counters.items():
        kind, _, rest = name.partition(":")
        if kind in OUTCOMES:
            split, _, label = rest.partition(":")
            table[split][label][kind] += int(value)
        elif kind == "stage":
            by_stage[rest] = int(value)
        elif kind == "long_side":
            long_side[rest] = int(value)
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
    return stats


def _distribution(value) -> dict:
    if value is None or not getattr(value, "count", 0):
        return {"count": 0}
    return {"count": value.count, "min": value.min, "max": value.max, "mean": round(value.sum / value.count, 1)}


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
    lines.append(f"  classes ({len(stats['labels'])}): {', '.join(stats['labels'])}")
    if totals["rejected"]:
        lines.append(f"  {totals['rejected']:,} rejected inputs are listed with their reasons in {stats['errors_file']}")
    if stats.get("empty_class_folders"):
        lines.append(f"  empty class folders left out: {', '.join(stats['empty_class_folders'])}")
    if not stats["accounted"]:
        lines.append("  WARNING: written + rejected + duplicates != found; the runner may have lost metrics")
    return lines
