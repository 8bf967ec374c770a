"""What a search leaves to read: the trials table, the TensorBoard hparams table, progress lines.

* :func:`write_trials_table` turns a Keras Tuner oracle into ``trials.csv`` and
  ``trials.json`` in the tuner project (every trial, best first).
* :func:`write_hparams_config` and :func:`hparams_callback` feed TensorBoard's
  hparams plugin: the experiment's columns once at the top of the log dir, then
  one session per trial with its values and its per-epoch metrics.
* :func:`format_trial_line` and :func:`estimate_remaining_s` make the one-line
  progress report of a trial.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import time
from typing import Any, Iterable, Mapping, Sequence

import keras

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

    started = getattr(getattr(oracle, "_display", None), "trial_start", {}).get(trial.trial_id)
    project = getattr(oracle, "_project_dir", None)
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
    with tf.io.gfile.GFile(csv_path, "w") as handle:
        handle.write(buf.getvalue())
    document = {
        "objective": getattr(oracle.objective, "name", str(oracle.objective)),
        "direction": getattr(oracle.objective, "direction", None),
        "num_trials": len(rows),
        "statuses": {status: sum(r["status"] == status for r in rows) for status in sorted({r["status"] for r in rows})},
        "trials": rows,
    }
    with tf.io.gfile.GFile(json_path, "w") as handle:
        handle.write(json.dumps(document, indent=2, default=str) + "\n")
    best = rows[0] if rows and rows[0]["score"] is not None else None
    log.log(logging.INFO if announce else logging.DEBUG, "trials table: %d trials (%s), best %s -> %s", len(rows),
             ", ".join(f"{n} {s.lower()}" for s, n in document["statuses"].items()),
             f"trial {best['trial_id']} {document['objective']}={best['score']:.4f}" if best else "none scored",
             csv_path)
    return csv_path, json_path


# -- TensorBoard hparams ------------------------------------------------------------------------

def _plain(value):
    """A value the hparams plugin accepts (bool, int, float, str)."""
    if isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def _hparam(hp_or_name, value=None):
    """An ``api.HParam`` with a domain from a Keras Tuner hyperparameter, or a bare name."""
    from tensorboard.plugins.hparams import api as hp_api

    kind = type(hp_or_name).__name__
    if kind == "Choice":
        return hp_api.HParam(hp_or_name.name, hp_api.Discrete([_plain(v) for v in hp_or_name.values]))
    if kind == "Boolean":
        return hp_api.HParam(hp_or_name.name, hp_api.Discrete([False, True]))
    if kind == "Fixed":
        return hp_api.HParam(hp_or_name.name, hp_api.Discrete([_plain(hp_or_name.value)]))
    if kind == "Int":
        return hp_api.HParam(hp_or_name.name, hp_api.IntInterval(int(hp_or_name.min_value), int(hp_or_name.max_value)))
    if kind == "Float":
        return hp_api.HParam(hp_or_name.name,
                             hp_api.RealInterval(float(hp_or_name.min_value), float(hp_or_name.max_value)))
    name = getattr(hp_or_name, "name", hp_or_name)
    if isinstance(value, (list, tuple)) and value:
        return hp_api.HParam(str(name), hp_api.Discrete([_plain(v) for v in value]))
    return hp_api.HParam(str(name))


SCORE_PREFIX = "score/"
SCORE_METRICS = (f"{SCORE_PREFIX}val_accuracy", f"{SCORE_PREFIX}val_loss")


def write_hparams_config(logdir: str, hyperparameters, metrics: Iterable[str] = SCORE_METRICS) -> None:
    """Write the hparams experiment (its columns) at the top of ``logdir``, once per search.

    ``hyperparameters`` is the search space: a ``keras_tuner.HyperParameters``
    (``oracle.hyperparameters`` or ``hypermodel``'s), whose Choice/Int/Float/
    Boolean/Fixed entries become columns with their domains, or a dict
    ``{name: [possible values]}`` or ``{name: value}``. ``tuner/*`` entries are
    left out. ``metrics`` are the scalar tags :func:`hparams_callback` writes
    per epoch into each trial's run (``JOB/tensorboard/<trial>/``).
    """
    import tensorflow as tf
    from tensorboard.plugins.hparams import api as hp_api

    if hasattr(hyperparameters, "space"):
        columns = [_hparam(hp) for hp in hyperparameters.space if not hp.name.startswith(TUNER_KEY_PREFIX)]
    else:
        columns = [_hparam(name, value) for name, value in dict(hyperparameters).items()
                   if not str(name).startswith(TUNER_KEY_PREFIX)]
    writer = tf.summary.create_file_writer(logdir)
    with writer.as_default():
        hp_api.hparams_config(hparams=columns, metrics=[
            hp_api.Metric(name, display_name=name.removeprefix(SCORE_PREFIX) + (" (score)" if name != name.removeprefix(
                SCORE_PREFIX) else "")) for name in metrics])
    writer.close()
    log.info("hparams experiment: %d hyperparameters, metrics %s -> %s", len(columns), ", ".join(metrics), logdir)


class HParamsLogger(keras.callbacks.Callback):
    """One trial's row in TensorBoard's hparams table, and the per-epoch metrics that fill it.

    Unlike ``hparams.api.KerasCallback`` this one may be given to several
    ``fit`` calls of the same trial (the head phase, then the fine-tune
    phase): the session starts at the first fit, epochs are numbered across
    fits, every numeric log value (``loss``, ``val_accuracy``, ...) is written
    as a scalar of that name in ``logdir``, and each fit's end marks the
    session done (the plugin shows the latest values).
    """

    def __init__(self, logdir: str, hyperparameters: Mapping[str, Any], trial_id: str | None = None):
        super().__init__()
        from tensorboard.plugins.hparams import summary_v2

        self.logdir = logdir
        self.hyperparameters = {str(k): _plain(v) for k, v in dict(hyperparameters).items()
                                if not str(k).startswith(TUNER_KEY_PREFIX)}
        self.trial_id = trial_id
        summary_v2.hparams_pb(self.hyperparameters, trial_id=trial_id)  # fail now on values the plugin refuses
        self.epochs_seen = 0
        self._writer = None
        self._started = False

    def _get_writer(self):
        import tensorflow as tf

        if self._writer is None:
            self._writer = tf.summary.create_file_writer(self.logdir)
        return self._writer

    def on_train_begin(self, logs=None):
        from tensorboard.plugins.hparams import summary_v2

        if self._started:
            return
        self._started = True
        with self._get_writer().as_default():
            summary_v2.hparams(self.hyperparameters, trial_id=self.trial_id, start_time_secs=int(time.time()))

    def on_epoch_end(self, epoch, logs=None):
        import tensorflow as tf

        self.epochs_seen += 1
        with self._get_writer().as_default():
            for name, value in (logs or {}).items():
                if isinstance(value, (int, float)) or getattr(value, "shape", None) == ():
                    tf.summary.scalar(name, float(value), step=self.epochs_seen)

    def on_train_end(self, logs=None):
        import tensorflow as tf
        from tensorboard.plugins.hparams import api_pb2, summary

        with self._get_writer().as_default():
            end = summary.session_end_pb(api_pb2.STATUS_SUCCESS, end_time_secs=int(time.time()))
            tf.summary.experimental.write_raw_pb(end.SerializeToString(), step=self.epochs_seen)
        self._writer.close()
        self._writer = None


    def record_score(self, metrics: Mapping[str, float]) -> None:
        """The tuner's own score of the trial (the metrics ``fit`` returned), as ``score/<name>`` scalars.

        The hparams table shows each metric's latest value; the per-epoch
        ``val_accuracy`` ends at the last epoch, while the tuner scores the
        epoch early stopping restored. The table's columns are these tags
        (:data:`SCORE_METRICS`), so it shows the numbers of the log and trials.csv.
        """
        import tensorflow as tf

        with self._get_writer().as_default():
            for name, value in metrics.items():
                tf.summary.scalar(f"{SCORE_PREFIX}{name}", float(value), step=self.epochs_seen)
        self._writer.close()
        self._writer = None


def hparams_callback(logdir: str, hyperparameters: Mapping[str, Any], *, trial_id: str | None = None) -> HParamsLogger:
    """The callback recording one trial for the hparams table (see :class:`HParamsLogger`).

    ``logdir`` is the trial's own run, below the folder given to
    :func:`write_hparams_config` (e.g. ``JOB/tensorboard/trial_03``);
    ``hyperparameters`` its values (``trial.hyperparameters.values``; ``tuner/*``
    keys are dropped). Pass the same instance to every ``fit`` of the trial.
    """
    return HParamsLogger(logdir, hyperparameters, trial_id=trial_id)


# -- progress lines -----------------------------------------------------------------------------

def format_duration(seconds: float) -> str:
    """``7s``, ``1m30s``, ``2h05m``."""
    seconds = int(round(max(0.0, seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"


def estimate_remaining_s(durations_s: Sequence[float], trials_left: int | None) -> float | None:
    """Mean duration of the trials so far times the trials left; None when either is unknown."""
    if trials_left is None or not durations_s:
        return None
    return max(0, trials_left) * sum(durations_s) / len(durations_s)


def _format_value(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def format_trial_line(number: int, total: int | None, hyperparameters: Mapping[str, Any], *,
                      score: float | None = None, objective: str = "val_accuracy", status: str = "COMPLETED",
                      elapsed_s: float | None = None, remaining_s: float | None = None,
                      best_score: float | None = None, message: str | None = None) -> str:
    """One readable line for a finished (or failed) trial.

    ``number`` of ``total`` (None: unknown) trials; ``hyperparameters`` the
    trial's values (``tuner/*`` keys left out); ``score`` its objective value
    (None for a trial without one); ``status`` the Keras Tuner status, shown
    when it is not COMPLETED, with ``message``'s last line; ``elapsed_s`` the
    trial's seconds; ``remaining_s`` the estimate for the rest
    (:func:`estimate_remaining_s`); ``best_score`` the best so far. Example::

        trial 3/10 [learning_rate=0.001 dropout=0.2] val_accuracy=0.9100 (best 0.9300) (12s, ~1m30s left)
    """
    values = " ".join(f"{k}={_format_value(v)}" for k, v in hyperparameters.items()
                      if not str(k).startswith(TUNER_KEY_PREFIX))
    parts = [f"trial {number}/{total if total else '?'}", f"[{values}]" if values else "[defaults]"]
    status = str(getattr(status, "value", status))
    if status != "COMPLETED" or score is None:
        parts.append(status if status != "COMPLETED" else "no score")
        reason = _last_line(message)
        if reason:
            parts.append(f"({reason[:120]})")
    else:
        parts.append(f"{objective}={score:.4f}")
    if best_score is not None:
        parts.append(f"(best {best_score:.4f})")
    timing = [format_duration(elapsed_s)] if elapsed_s is not None else []
    if remaining_s is not None:
        timing.append(f"~{format_duration(remaining_s)} left")
    if timing:
        parts.append(f"({', '.join(timing)})")
    return " ".join(parts)
