"""The trials table: a Keras Tuner oracle as ``trials.csv`` and ``trials.json`` in the tuner project.

Every trial, best first, with its status, score, time and hyperparameters
(docs/contracts.md section 3). Rewritten after every trial, so an interrupted
search keeps its table.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from typing import Any, Mapping, Sequence

from trainer import staging
from trainer.compat import keras_tuner as compat

log = logging.getLogger(__name__)

TRIALS_CSV = "trials.csv"
TRIALS_JSON = "trials.json"
TRIAL_FIELDS = ("rank", "trial_id", "number", "status", "score", "best_step", "elapsed_s", "message")
TUNER_KEY_PREFIX = "tuner/"  # bookkeeping values Hyperband adds (tuner/epochs, tuner/trial_id, ...)


# -- the trials table ---------------------------------------------------------------------------

def _status(trial) -> str:
    status = getattr(trial.status, "value", trial.status)
    return str(status) if status is not None else "UNKNOWN"


def _last_line(message: str | None) -> str:
    lines = [line.strip() for line in (message or "").strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def _metadata_elapsed(oracle, trial) -> float | None:
    """Seconds from the oracle's recorded trial start to the last write of ``trial.json`` (best effort).

    Keras Tuner records when each trial began (its display state, saved with
    the oracle) and rewrites ``trial_<id>/trial.json`` when the trial ends, so
    the difference is the trial's wall time. Unknown (None) while a trial
    runs, or when the search ran with ``verbose=0`` (no start recorded).
    """
    import tensorflow as tf

    started = compat.trial_start(oracle, trial.trial_id)
    project = compat.project_dir(oracle)
    if started is None or not project or _status(trial) in ("RUNNING", "IDLE"):
        return None
    path = os.path.join(project, f"trial_{trial.trial_id}", "trial.json")
    try:
        if "://" in path:
            ended = tf.io.gfile.stat(path).mtime_nsec / 1e9
        else:  # tf.io.gfile.stat rounds local times down to the second
            ended = os.stat(path).st_mtime
    except Exception:  # noqa: BLE001 - no file, no figure
        return None
    seconds = ended - started.timestamp()
    if not -1.0 < seconds < 365 * 86400:  # clocks disagree (a remote filesystem): no figure
        return None
    return round(max(0.0, seconds), 3)  # a trial that fails at once can end before a coarse mtime ticks


def trial_rows(oracle, elapsed_s: Mapping[str, float] | None = None) -> list[dict[str, Any]]:
    """One dict per trial, best first: the fields of :data:`TRIAL_FIELDS` plus ``hyperparameters``.

    Scored trials come first, ordered by the oracle's objective direction; the
    rest (running, failed, invalid) follow in the order they started. ``number``
    is the trial's place in the start order (1-based). ``elapsed_s`` wins over
    the figure derived from the tuner's own records.
    """
    elapsed_s = dict(elapsed_s or {})
    order = {trial_id: index + 1 for index, trial_id in enumerate(getattr(oracle, "start_order", []))}
    maximise = getattr(oracle.objective, "direction", "max") == "max"
    rows = []
    for trial in oracle.trials.values():
        score = trial.score
        scored = _status(trial) == "COMPLETED" and score is not None and not math.isnan(score)
        seconds = elapsed_s.get(trial.trial_id)
        rows.append({
            "trial_id": trial.trial_id,
            "number": order.get(trial.trial_id),
            "status": _status(trial),
            "score": float(score) if scored else None,
            "best_step": int(trial.best_step) if scored and trial.best_step is not None else None,
            "elapsed_s": round(float(seconds), 3) if seconds is not None else _metadata_elapsed(oracle, trial),
            "message": _last_line(trial.message),
            "hyperparameters": dict(trial.hyperparameters.values),
        })

    def sort_key(row):
        number = row["number"] if row["number"] is not None else math.inf
        if row["score"] is None:
            return (1, 0.0, number)
        return (0, -row["score"] if maximise else row["score"], number)

    rows.sort(key=sort_key)
    for rank, row in enumerate(rows, start=1):
        row["rank"] = rank
    return [{key: row[key] for key in (*TRIAL_FIELDS, "hyperparameters")} for row in rows]


def _hp_columns(oracle, rows: Sequence[Mapping[str, Any]]) -> list[str]:
    names = [hp.name for hp in getattr(oracle.hyperparameters, "space", [])]
    for row in rows:
        names.extend(name for name in row["hyperparameters"] if name not in names)
    return names


def _previous_elapsed(tuner_dir: str) -> dict[str, float]:
    """Trial seconds from an earlier ``trials.json`` here, so a resumed search keeps the times it measured."""
    import tensorflow as tf

    path = os.path.join(tuner_dir, TRIALS_JSON)
    try:
        with tf.io.gfile.GFile(path) as handle:
            rows = json.load(handle).get("trials", [])
        return {str(r["trial_id"]): float(r["elapsed_s"]) for r in rows if r.get("elapsed_s") is not None}
    except (tf.errors.NotFoundError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def write_trials_table(oracle, tuner_dir: str, *, elapsed_s: Mapping[str, float] | None = None,
                       announce: bool = True) -> tuple[str, str]:
    """Write ``tuner_dir/trials.csv`` and ``tuner_dir/trials.json``; return their paths.

    Every trial the oracle knows (a resumed search included), best first (see
    :func:`trial_rows`). The CSV has the fixed columns of
    :data:`TRIAL_FIELDS` then one column per hyperparameter (empty where a
    trial has no value, e.g. a conditional one); a hyperparameter whose name
    clashes with a fixed column gets an ``hp_`` prefix. The JSON holds the
    objective, its direction and the same rows with a ``hyperparameters``
    dict. ``elapsed_s`` maps trial ids to measured seconds (pass what the
    tuner measured: Keras Tuner keeps no trial times when it runs with
    ``verbose=0``); trials missing from it keep the seconds of an earlier
    ``trials.json`` in ``tuner_dir`` (a resumed search), else come from the
    tuner's own records where it kept them. ``announce``: log the table's
    summary at INFO (the end of a search) or DEBUG (after each trial).
    """
    import tensorflow as tf

    rows = trial_rows(oracle, {**_previous_elapsed(tuner_dir), **dict(elapsed_s or {})})
    hp_names = _hp_columns(oracle, rows)
    hp_headers = [f"hp_{name}" if name in TRIAL_FIELDS else name for name in hp_names]

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([*TRIAL_FIELDS, *hp_headers])
    for row in rows:
        fixed = ["" if row[key] is None else row[key] for key in TRIAL_FIELDS]
        writer.writerow([*fixed, *(row["hyperparameters"].get(name, "") for name in hp_names)])

    tf.io.gfile.makedirs(tuner_dir)
    csv_path = os.path.join(tuner_dir, TRIALS_CSV)
    json_path = os.path.join(tuner_dir, TRIALS_JSON)
    staging.write_text(csv_path, buf.getvalue())
    document = {
        "objective": getattr(oracle.objective, "name", str(oracle.objective)),
        "direction": getattr(oracle.objective, "direction", None),
        "num_trials": len(rows),
        "statuses": {status: sum(r["status"] == status for r in rows) for status in sorted({r["status"] for r in rows})},
        "trials": rows,
    }
    staging.write_text(json_path, json.dumps(document, indent=2, default=str) + "\n")
    best = rows[0] if rows and rows[0]["score"] is not None else None
    log.log(logging.INFO if announce else logging.DEBUG, "trials table: %d trials (%s), best %s -> %s", len(rows),
             ", ".join(f"{n} {s.lower()}" for s, n in document["statuses"].items()),
             f"trial {best['trial_id']} {document['objective']}={best['score']:.4f}" if best else "none scored",
             csv_path)
    return csv_path, json_path


# -- TensorBoard hparams ------------------------------------------------------------------------


# -- progress lines -----------------------------------------------------------------------------


