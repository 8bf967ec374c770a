"""Run the job end to end: inspect the input, stage, run Beam, check, write stats, move into place.

:func:`run` is what the CLI calls and what other code (the demo, the
benchmark) may call: it returns the ``stats.json`` content and raises
:class:`~preprocessing.errors.PreprocessingError` for anything the user can fix.
"""

from __future__ import annotations

import datetime as dt
import errno
import json
import logging
import time

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from preprocessing import pipeline, runners, sources, stats, worker
from preprocessing.config import PreprocessConfig
from preprocessing.errors import PreprocessingError
from preprocessing.staging import Staging
from preprocessing.tfrecords import ERRORS_FILE, LABELS_FILE, STATS_FILE

_log = logging.getLogger("preprocessing")


def _read_text(path: str) -> str:
    with FileSystems.open(path) as handle:
        return handle.read().decode("utf-8")


def _first_errors(path: str, limit: int = 3) -> list[str]:
    try:
        lines = _read_text(path).splitlines()[:limit]
    except Exception:  # noqa: BLE001
        return []
    return [f"{json.loads(line)['path']}: {json.loads(line)['reason']}" for line in lines if line.strip()]


def run(config: PreprocessConfig, beam_args: list[str] | None = None) -> dict:
    """Run the whole job; returns the stats written to ``OUTPUT/stats.json``."""
    # the local runner's worker processes start importing Beam now, while this process inspects and builds
    worker.start_standby(worker.local_workers(list(beam_args or [])))
    try:
        return _run(config, beam_args)
    finally:
        worker.stop_standby()


def _run(config: PreprocessConfig, beam_args: list[str] | None) -> dict:
    spec = sources.inspect_input(config.input)
    staging = Staging(config.output, config.overwrite)
    staging.check()
    if spec.layout != sources.MANIFEST and (staging.output + "/").startswith(spec.path.rstrip("/") + "/"):
        raise PreprocessingError(f"{staging.output}: the output must not be inside the input folder {spec.path}")
    choice = runners.choose_runner(list(beam_args or []))
    if spec.unknown_columns:
        _log.warning("manifest %s: ignoring unknown column(s) %s", spec.path, ", ".join(spec.unknown_columns))
    for folder in spec.empty_class_folders:
        _log.warning("empty class folder left out: %s", folder)
    _log.info("input  %s (%s)", spec.path, spec.layout)
    _log.info("output %s (staged in %s until the job succeeds)", staging.output, staging.path)
    _log.info(
        "images %dx%d %s, %s%s; runner %s",
        config.image_size[1], config.image_size[0], config.resize_mode, config.image_format,
        f" q{config.jpeg_quality}" if config.image_format == "jpeg" else "", choice.description,
    )

    out_dir = staging.create()
    started_at = dt.datetime.now(dt.timezone.utc)
    started = time.monotonic()
    try:
        beam_pipeline = beam.Pipeline(runner=choice.runner, options=choice.options)
        pipeline.build(beam_pipeline, config, spec, out_dir, choice.lanes)
        result = beam_pipeline.run()
        pipeline.wait_with_progress(result, choice.local, config.progress_seconds)
        seconds = time.monotonic() - started
        counters, distributions = stats.read_counts(_read_text(staging.join(stats.COUNTS_FILE)))
        FileSystems.delete([staging.join(stats.COUNTS_FILE)])
        result_stats = stats.build_stats(counters, distributions)
        errors_lines = sum(1 for line in _read_text(staging.join(ERRORS_FILE)).splitlines() if line.strip())
        result_stats["cross_check"] = stats.cross_check(result, result_stats["totals"], errors_lines)
        labels = [line for line in _read_text(staging.join(LABELS_FILE)).splitlines() if line]
        _refuse_unusable(spec, result_stats, labels, staging.join(ERRORS_FILE))
    except BaseException as error:  # a failed, refused or interrupted run leaves nothing behind
        staging.discard()
        full = _disk_full(error)
        if full:
            raise PreprocessingError(
                f"{staging.output}: cannot write the output ({full} while writing {staging.path}); nothing was "
                "published: free some space (or raise the file size limit) and run the same command again") from None
        raise

    totals = result_stats["totals"]
    result_stats.update({
        "options": config.to_json(),
        "input": {"path": spec.path, "layout": spec.layout, "manifest_unknown_columns": list(spec.unknown_columns)},
        "output": staging.output,
        "labels": labels,
        "empty_class_folders": list(spec.empty_class_folders),
        "ignored_files": int(counters.get("ignored", 0)),
        "duplicate_label_conflicts": int(counters.get("duplicate_label_conflicts", 0)),
        "errors_file": FileSystems.join(staging.output, ERRORS_FILE),
        "shards": _shard_sizes(staging),
        "run": {
            "runner": choice.description,
            "started_at": started_at.isoformat(timespec="seconds"),
            "seconds": round(seconds, 3),
            "images_per_second": round(totals["found"] / seconds, 2) if seconds > 0 else 0.0,
            "written_per_second": round(totals["written"] / seconds, 2) if seconds > 0 else 0.0,
        },
    })
    with FileSystems.create(staging.join(STATS_FILE)) as handle:
        handle.write((json.dumps(result_stats, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
    staging.commit()
    for line in stats.summary_lines(result_stats):
        _log.info("%s", line)
    return result_stats


_DISK_FULL = {errno.ENOSPC: "no space left on device", errno.EFBIG: "file size limit reached",
              errno.EDQUOT: "disk quota exceeded"}


def _shard_sizes(staging) -> dict[str, dict[str, int]]:
    """``{split: {shard file name: bytes}}`` of the written shards: the trainer checks them before reading
    (a shard truncated or rewritten after this run is named instead of failing mid-training)."""
    from preprocessing.tfrecords import SPLITS, shard_pattern

    sizes = {}
    for split in SPLITS:
        found = FileSystems.match([staging.join(shard_pattern(split))])[0].metadata_list
        sizes[split] = {FileSystems.split(m.path)[1]: int(m.size_in_bytes) for m in sorted(found, key=lambda m: m.path)}
    return sizes


def _disk_full(error: BaseException) -> str | None:
    """The reason when ``error`` is a full disk, a file size limit or a quota, wherever Beam wrapped it."""
    if isinstance(error, OSError) and error.errno in _DISK_FULL:
        return _DISK_FULL[error.errno]
    text = str(error)
    for number, reason in _DISK_FULL.items():
        if f"[Errno {number}]" in text:
            return reason
    return None


def _refuse_unusable(spec: sources.InputSpec, result_stats: dict, labels: list[str], errors_path: str) -> None:
    """An input with no usable image or a single class cannot train a classifier: say so in one line."""
    totals = result_stats["totals"]
    if totals["written"] == 0:
        examples = "; ".join(_first_errors(errors_path))
        detail = f" (e.g. {examples})" if examples else ""
        raise PreprocessingError(
            f"{spec.path}: no usable images: {totals['found']} input(s) found, all rejected{detail}"
        )
    if len(labels) < 2:
        raise PreprocessingError(f"{spec.path}: need at least two classes, found only {labels[0]!r}")
