"""Run the batch job end to end: inspect, stage, run Beam, check the accounting, write ``summary.json``, publish.

:func:`run` is what the CLI (:mod:`serving.batch`) calls and what other code
(the benchmark, tests) may call; it returns the ``summary.json`` content and
raises :class:`~serving.batch_config.BatchError` for anything the user can
fix. The output is written to a staging folder beside ``--output`` and moved
into place only when the job succeeded (:class:`preprocessing.staging.Staging`).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from preprocessing import runners, worker
from preprocessing.staging import Staging
from serving import batch_inputs, batch_pipeline
from serving.batch_config import BatchConfig, BatchError, ModelInfo, resolve_model
from serving.batch_outputs import COUNTS_FILE, CSV_FILE, ERRORS_FILE, SUMMARY_FILE
from serving.batch_pipeline import NAMESPACE

_log = logging.getLogger("serving.batch")


def _read_text(path: str) -> str:
    with FileSystems.open(path) as handle:
        return handle.read().decode("utf-8")


def run(config: BatchConfig, beam_args: list[str] | None = None, fork: bool = False) -> dict:
    """Run the whole job; returns what it wrote to ``OUTPUT/summary.json``.

    ``fork``: this process runs only this job (the CLI as the program), so the
    local runner's workers may be forks of it (:mod:`preprocessing.worker`).
    """
    try:
        return _run(config, list(beam_args or []), fork)
    finally:
        worker.stop_standby()


def _start_workers(beam_args: list[str], fork: bool) -> None:
    """Start the local runner's workers now, while this process builds the pipeline (no-op for other runners).

    Forked, they get TensorFlow already imported: one import instead of one
    per worker. Only the import: nothing of TensorFlow's runtime (threads, a
    device context) exists before the fork; each worker starts its own when it
    loads the model. Otherwise they are new processes importing Beam meanwhile.
    """
    workers = worker.local_workers(beam_args)
    if fork and workers:
        from preprocessing.console import import_tensorflow_quietly

        import_tensorflow_quietly(logging.getLogger("apache_beam").isEnabledFor(logging.INFO))  # quiet unless -v
    worker.start_standby(workers, fork=fork)


def _run(config: BatchConfig, beam_args: list[str], fork: bool) -> dict:
    model = resolve_model(config.model)
    source = batch_inputs.inspect_input(config.input)
    staging = Staging(config.output, config.overwrite)
    staging.check()
    _start_workers(beam_args, fork)
    folders = (batch_inputs.PLAIN_FOLDER, batch_inputs.sources.CLASS_FOLDERS, batch_inputs.sources.SPLIT_FOLDERS)
    if source.layout in folders and (staging.output + "/").startswith(source.path.rstrip("/") + "/"):
        raise BatchError(f"{staging.output}: the output must not be inside the input folder {source.path}")
    top_k = min(config.top_k, len(model.labels))
    if top_k < config.top_k:
        _log.info("--top-k %d is more than the model's %d classes: writing all %d", config.top_k,
                  len(model.labels), top_k)
    choice = runners.choose_runner(beam_args)
    threads = None
    if choice.local:
        workers = worker.local_workers(beam_args) or 1
        threads = max(1, worker.available_cores() // workers)
    if not model.normalises_uploads:
        _log.warning("model %s predates the in-graph normalisation of uploads (no export.decode %r in its "
                     "metadata): it decodes with tf.io.decode_image only, so EXIF orientation, alpha and colour "
                     "modes are not handled as in training", model.path, "upright-rgb-v1")
    _log.info("model  %s (version %s, %d classes)", model.path, model.version, len(model.labels))
    _log.info("input  %s (%s)", source.path, source.layout)
    _log.info("output %s (staged in %s until the job succeeds)", staging.output, staging.path)
    _log.info("top %d, batches of %d-%d images; runner %s", top_k, config.min_batch_size, config.max_batch_size,
              choice.description)

    out_dir = staging.create()
    started_at = dt.datetime.now(dt.timezone.utc)
    started = time.monotonic()
    try:
        pipeline = beam.Pipeline(runner=choice.runner, options=choice.options)
        batch_pipeline.build(pipeline, config, source, model, top_k, out_dir, threads)
        result = pipeline.run()
        result.wait_until_finish()
        seconds = time.monotonic() - started
        summary = _summarise(staging, result, model)
        _refuse_unusable(config, summary, staging.join(ERRORS_FILE))
    except BaseException:  # a failed, refused or interrupted run leaves nothing behind
        staging.discard()
        raise
    counts = summary["counts"]
    summary.update({
        "model": {"path": model.path, "version": model.version, "labels": list(model.labels)},
        "input": {"path": source.path, "layout": source.layout},
        "output": staging.output,
        "options": {**config.to_json(), "top_k": top_k},
        "run": {
            "runner": choice.description,
            "started_at": started_at.isoformat(timespec="seconds"),
            "seconds": round(seconds, 3),
            "images_per_second": round(counts["found"] / seconds, 2) if seconds > 0 else 0.0,
            "predicted_per_second": round(counts["predicted"] / seconds, 2) if seconds > 0 else 0.0,
        },
    })
    summary["files"] = {
        "predictions": [FileSystems.join(staging.output, name) for name in summary.pop("shards")],
        "predictions_csv": FileSystems.join(staging.output, CSV_FILE) if summary.pop("csv") else None,
        "errors": FileSystems.join(staging.output, ERRORS_FILE),
    }
    with FileSystems.create(staging.join(SUMMARY_FILE)) as handle:
        handle.write((json.dumps(summary, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
    staging.commit()
    for line in summary_lines(summary, config.csv_max_rows):
        _log.info("%s", line)
    return summary


def _summarise(staging: Staging, result, model: ModelInfo) -> dict:
    """The counts the pipeline wrote (``_counts.json``), checked against the lines of the files it wrote."""
    try:
        written = json.loads(_read_text(staging.join(COUNTS_FILE)))
    except Exception as error:  # noqa: BLE001
        raise RuntimeError(f"the pipeline finished without writing its counts ({COUNTS_FILE}: {error})") from None
    FileSystems.delete([staging.join(COUNTS_FILE)])
    raw = written["counts"]
    counts = {name: int(raw.get(name, 0)) for name in ("found", "predicted", "errors")}
    error_lines = sum(1 for line in _read_text(staging.join(ERRORS_FILE)).splitlines() if line.strip())
    prediction_lines = sum(written["shards"].values())
    distribution = {label: int(raw.get(f"label:{label}", 0)) for label in model.labels}
    given, agree = int(raw.get("given", 0)), int(raw.get("agree", 0))
    summary = {
        "counts": counts,
        "accounted": counts["predicted"] + counts["errors"] == counts["found"]
        and prediction_lines == counts["predicted"] and error_lines == counts["errors"],
        "ignored_files": int(raw.get("ignored", 0)),
        "errors_by_stage": {name.split(":", 1)[1]: int(v) for name, v in sorted(raw.items())
                            if name.startswith("stage:")},
        "label_distribution": distribution,
        "given_labels": {"images": given, "agree": agree, "agreement": round(agree / given, 4) if given else None},
        "cross_check": {"prediction_lines": prediction_lines, "errors_file_lines": error_lines,
                        "beam_metrics": _metrics_check(result, counts)},
        "shards": sorted(written["shards"]),
        "csv": written.get("csv"),
    }
    if not summary["accounted"]:
        _log.warning("accounting mismatch: found %d, predicted %d (%d lines written), errors %d (%d lines in %s)",
                     counts["found"], counts["predicted"], prediction_lines, counts["errors"], error_lines, ERRORS_FILE)
    return summary


def _metrics_check(result, counts: dict) -> str:
    """The runner's counters against the pipeline's own counts: ``agree``, ``disagree`` or ``unavailable``."""
    from apache_beam.metrics.metric import MetricsFilter

    try:
        entries = result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))["counters"]
    except Exception:  # noqa: BLE001 - a runner without a metrics API
        return "unavailable"
    metrics: dict[str, int] = {}
    for entry in entries:
        value = entry.committed if entry.committed is not None else entry.attempted
        metrics[entry.key.metric.name] = metrics.get(entry.key.metric.name, 0) + int(value or 0)
    if not metrics:
        return "unavailable"
    if all(metrics.get(name, 0) == value for name, value in counts.items()):
        return "agree"
    _log.warning("the runner's metrics (%s) disagree with the pipeline's own counts (%s); the output is kept",
                 metrics, counts)
    return "disagree"


def _refuse_unusable(config: BatchConfig, summary: dict, errors_path: str) -> None:
    counts = summary["counts"]
    if counts["found"] == 0:
        raise BatchError(f"{config.input}: no inputs found")
    if counts["predicted"] == 0:
        examples = []
        for line in _read_text(errors_path).splitlines()[:3]:
            entry = json.loads(line)
            examples.append(f"{entry['path']}: {entry['reason']}")
        detail = f" (e.g. {'; '.join(examples)})" if examples else ""
        raise BatchError(f"{config.input}: no image could be scored: {counts['found']} input(s), all refused{detail}")


def summary_lines(summary: dict, csv_max_rows: int) -> list[str]:
    """The end-of-run summary a person reads."""
    counts, run, files = summary["counts"], summary["run"], summary["files"]
    lines = [f"found {counts['found']:,} inputs: {counts['predicted']:,} scored, {counts['errors']:,} errors, "
             f"in {run['seconds']:.1f}s ({run['images_per_second']:.1f} images/s)"]
    top = sorted(summary["label_distribution"].items(), key=lambda kv: -kv[1])
    lines.append("  predicted labels: " + ", ".join(f"{label} {count:,}" for label, count in top[:10])
                 + (f" (+{len(top) - 10} more)" if len(top) > 10 else ""))
    given = summary["given_labels"]
    if given["images"]:
        lines.append(f"  agreement with the given labels: {given['agreement']:.1%} of {given['images']:,}")
    lines.append(f"  predictions: {len(files['predictions'])} JSON-lines file(s) in {summary['output']}"
                 + (f", and {files['predictions_csv']}" if files["predictions_csv"]
                    else f" (no predictions.csv: over {csv_max_rows:,} rows)"))
    if counts["errors"]:
        lines.append(f"  {counts['errors']:,} inputs could not be scored; their reasons are in {files['errors']}")
    lines.append(f"  summary: {FileSystems.join(summary['output'], SUMMARY_FILE)}")
    if not summary["accounted"]:
        lines.append("  WARNING: predicted + errors != found; inputs were lost between the job's steps")
    return lines
