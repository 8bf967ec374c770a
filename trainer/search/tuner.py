"""Creating, resuming and running the Keras Tuner search.

The tuner project lives in ``JOB/tuner/``. Keras Tuner reloads it when it
exists, which is how an interrupted search resumes; but it would also silently
keep an old search space or tuner when the command changed. So the settings
that define a search are written to ``JOB/tuner/search.json`` and compared on
every start: a different search is refused (``--overwrite`` starts afresh),
the same one resumes. ``--max-trials`` may change between runs (to extend a
finished search).

Failed trials (NaN loss, out of memory) are Keras Tuner's ``FAILED`` trials:
recorded, and the search goes on (it stops after 3 failures in a row). Memory
is released between trials by Keras Tuner (``clear_session`` + ``gc``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time

import keras_tuner as kt

from trainer import distribute
from trainer.compat import keras_tuner as compat
from trainer.config import TrainConfig, UserError

log = logging.getLogger("trainer.search.tuner")

SEARCH_FILE = "search.json"
OBJECTIVE = kt.Objective("val_accuracy", direction="max")
MAX_CONSECUTIVE_FAILURES = 3


def _tuner_classes() -> dict:
    return {"hyperband": kt.Hyperband, "bayesian": kt.BayesianOptimization, "random": kt.RandomSearch,
            "grid": kt.GridSearch}


class _ProgressMixin:
    """Logs trial n of N, its hyperparameters, its score and the time left.

    Works on a distributed-tuning worker too, whose oracle is a gRPC client
    that knows only ``max_trials`` and single trials.
    """

    _trial_started = 0.0

    def on_trial_begin(self, trial):
        super().on_trial_begin(trial)
        self._trial_started = time.perf_counter()
        values = ", ".join(f"{k}={_short(v)}" for k, v in trial.hyperparameters.values.items()
                           if not k.startswith("tuner/"))
        number, total = _number(trial), scheduled_trials(self.oracle)
        if isinstance(number, int) and total and number > total:
            log.info("trial %s starting again (it was interrupted; Keras Tuner finishes it even past the %d "
                     "trials asked for): %s", trial.trial_id, total, values)
        else:
            log.info("trial %s (%s of %s) starting: %s", trial.trial_id, number, total or "?", values)

    def on_trial_end(self, trial):
        super().on_trial_end(trial)
        took = time.perf_counter() - self._trial_started
        self.__dict__.setdefault("trial_seconds", {})[trial.trial_id] = took
        self.__dict__.setdefault("statuses", {})
        number, total = _number(trial), scheduled_trials(self.oracle)
        left = ""
        if total and isinstance(number, int):
            durations = list(self.__dict__["trial_seconds"].values())
            remaining = max(0, total - number)
            left = f"; about {_duration(remaining * sum(durations) / len(durations))} left for {remaining} more"
        status = str(getattr(trial.status, "value", trial.status))
        self.__dict__["statuses"][status] = self.__dict__["statuses"].get(status, 0) + 1
        score = self.oracle.get_trial(trial.trial_id).score if status == "COMPLETED" else None
        if score is None:
            message = (getattr(trial, "message", None) or "").strip().splitlines()
            log.warning("trial %s (%s of %s) %s after %s%s%s", trial.trial_id, number, total or "?", status.lower(),
                        _duration(took),
                        f" ({message[-1][:200]})" if message else "", left)
        else:
            log.info("trial %s (%s of %s) done in %s: val_accuracy %.4f%s", trial.trial_id, number, total or "?",
                     _duration(took), score, left)
        if _is_local_oracle(self.oracle):
            # Rewritten after every trial, so a long or interrupted search keeps its table and times.
            from trainer.search.tables import write_trials_table

            try:
                write_trials_table(self.oracle, self.project_dir, elapsed_s=self.__dict__["trial_seconds"],
                                   announce=False)
            except Exception as error:  # noqa: BLE001 - a report must not stop the search
                log.warning("could not update the trials table in %s: %s", self.project_dir, error)


def _is_local_oracle(oracle) -> bool:
    """Whether this process holds the search's trials (not a distributed-tuning worker's gRPC client).

    Keras Tuner gives a worker (``KERASTUNER_TUNER_ID`` not a chief) an oracle
    client in place of the oracle; the role is read from those variables.
    """
    return distribute.tuning_role() != "worker" and hasattr(oracle, "trials")


def scheduled_trials(oracle) -> int | None:
    """How many trials the search will run: ``max_trials``, or Hyperband's schedule (None when unknown)."""
    if getattr(oracle, "max_trials", None):
        return oracle.max_trials
    return compat.hyperband_trials(oracle)


def is_complete(tuner) -> bool:
    """Whether a reloaded search has nothing left to run: every scheduled trial exists and has ended.

    False when it cannot tell (a distributed-tuning worker, a schedule it cannot
    compute), so callers that prepare for trials err on the side of preparing.
    """
    oracle = tuner.oracle
    if not _is_local_oracle(oracle):
        return False
    planned, counts = scheduled_trials(oracle), trial_counts(tuner)
    return bool(planned) and sum(counts.values()) >= planned and set(counts) <= {"COMPLETED", "FAILED", "INVALID"}


def _number(trial):
    try:
        return int(trial.trial_id) + 1
    except (TypeError, ValueError):
        return trial.trial_id


def _short(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"


# Settings that change what a trial measures; every other flag may change on resume (docs/trainer.md).
def search_identity(config: TrainConfig, space: dict, image_size, weights_id: str, *,
                    mixed_precision: bool = False) -> dict:
    """The settings that define a search: a resume must match all of them.

    Everything that changes a trial's score is here, the data folder's digest
    included, so a resumed search never ranks trials trained differently.
    ``--max-trials``, the final fit (``--final-epochs``, ``--finetune-cache-final``),
    caching locations, verbosity and the export gate are not: they change no
    trial already run.
    """
    identity = {
        "tuner": config.tuner,
        "backbone": config.backbone,
        "weights": weights_id,
        "image_size": list(image_size),
        "search_space": space,
        "epochs": config.epochs,
        "seed": config.seed,
        "objective": OBJECTIVE.name,
        "data_dir": config.data_dir if "://" in config.data_dir else os.path.abspath(config.data_dir),
        "data_digest": data_digest(config.data_dir),
        "batch_size": config.batch_size,
        "strategy": config.strategy,
        "mixed_precision": bool(mixed_precision),
        "augment": dataclasses.asdict(config.augment),
        "class_weights": config.class_weights,
        "validation_fraction": config.validation_fraction,
        "early_stopping_patience": config.early_stopping_patience,
    }
    if config.finetune_cache:
        identity["finetune_cache"] = config.finetune_cache  # absent when off, so older searches still resume
    return identity


def data_digest(data_dir: str) -> str:
    """sha256 of ``labels.txt`` and ``stats.json``'s content (or, without it, of the shard names and sizes).

    ``stats.json``'s counts per split and class, source sizes and options
    change when the folder is rewritten from other photos or options; its
    run times (``run``) and metrics check (``cross_check``) are left out, so
    re-running the same preprocessing command keeps the same digest.
    """
    import hashlib

    import tensorflow as tf

    from preprocessing import tfrecords

    digest = hashlib.sha256()
    labels = os.path.join(data_dir, tfrecords.LABELS_FILE)
    if tf.io.gfile.exists(labels):
        with tf.io.gfile.GFile(labels, "rb") as handle:
            digest.update(handle.read())
    stats = os.path.join(data_dir, tfrecords.STATS_FILE)
    if tf.io.gfile.exists(stats):
        with tf.io.gfile.GFile(stats, "rb") as handle:
            try:
                content = json.loads(handle.read())
            except ValueError:
                content = {}
        content = {k: v for k, v in content.items() if k not in ("run", "cross_check")}
        digest.update(json.dumps(content, sort_keys=True).encode())
    else:
        for shard in sorted(tf.io.gfile.glob(os.path.join(data_dir, "*.tfrecord*"))):
            digest.update(f"{os.path.basename(shard)}:{tf.io.gfile.stat(shard).length}".encode())
    return digest.hexdigest()[:16]


def _shown(value) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":")) if value is not None else "(unset)"
    return text if len(text) <= 60 else text[:57] + "..."


def prepare_project(config: TrainConfig, identity: dict) -> str:
    """Refuse a changed search, or clear the project with ``--overwrite``; return "resume" or "fresh".

    A refusal lists every setting that differs, old and new. Settings that a
    record from an older trainer does not hold yet are taken as they are now
    (logged), so such searches still resume.
    """
    import tensorflow as tf

    project = config.tuner_dir
    record = os.path.join(project, SEARCH_FILE)
    if config.overwrite and tf.io.gfile.exists(project):
        tf.io.gfile.rmtree(project)
        log.info("--overwrite: removed the previous search in %s; starting afresh", project)
        return "fresh"
    if not tf.io.gfile.exists(project) or not tf.io.gfile.listdir(project):
        return "fresh"
    if not tf.io.gfile.exists(record):
        raise UserError(f"--job-dir {config.job_dir}: {project} holds a search this trainer did not record; "
                        "pass --overwrite to start afresh")
    with tf.io.gfile.GFile(record) as handle:
        previous = json.load(handle)
    unrecorded = sorted(k for k in identity if k not in previous and k != "finetune_cache")
    if unrecorded:
        log.info("%s predates the check of %s: taking the current values", record, ", ".join(unrecorded))
        previous = {**previous, **{k: identity[k] for k in unrecorded}}
    changed = sorted(k for k in set(previous) | set(identity) if previous.get(k) != identity.get(k))
    if changed:
        differences = "; ".join(f"{k} {_shown(previous.get(k))} -> {_shown(identity.get(k))}" for k in changed)
        raise UserError(f"--job-dir {config.job_dir}: holds a search with different settings ({differences}); "
                        "re-run with the same settings to resume, or pass --overwrite to start afresh")
    return "resume"


def record_identity(config: TrainConfig, identity: dict) -> None:
    import tensorflow as tf

    tf.io.gfile.makedirs(config.tuner_dir)
    with tf.io.gfile.GFile(os.path.join(config.tuner_dir, SEARCH_FILE), "w") as handle:
        json.dump(identity, handle, indent=2, sort_keys=True)


# Keras Tuner's Oracle takes ``seed or random.randint(1, 10000)``: a seed of 0 would mean "unseeded".
_ZERO_SEED = 2**31 - 1


def oracle_seed(seed: int) -> int:
    """The oracle seed for ``--seed``: the same number, except 0, which Keras Tuner would replace at random."""
    return seed if seed != 0 else _ZERO_SEED


def create_tuner(hypermodel, config: TrainConfig, strategy=None):
    """The configured Keras Tuner (reloading ``JOB/tuner`` when it exists)."""
    base = _tuner_classes()[config.tuner]
    cls = type(f"{base.__name__}WithProgress", (_ProgressMixin, base), {})
    common = dict(objective=OBJECTIVE, seed=oracle_seed(config.seed), directory=config.job_dir, project_name="tuner",
                  overwrite=False, distribution_strategy=strategy,
                  max_consecutive_failed_trials=MAX_CONSECUTIVE_FAILURES)
    try:
        with hypermodel.declaring_only():  # the constructor's builds only discover the space
            if config.tuner == "hyperband":
                tuner = cls(hypermodel, max_epochs=max(2, config.epochs), factor=3, **common)
            else:
                tuner = cls(hypermodel, max_trials=config.trial_budget, **common)
    except ImportError as error:
        raise UserError(f"--tuner {config.tuner}: {str(error).splitlines()[0][:200]}") from None
    except (ValueError, TypeError) as error:
        raise UserError(f"--search-space: {str(error).splitlines()[0][:200]}") from None
    tuner.oracle.max_trials = config.trial_budget
    return tuner


def run_search(tuner, config: TrainConfig, callbacks: list) -> None:
    """Run (or resume) the search; a search that cannot go on is a one-line :class:`UserError`."""
    try:
        tuner.search(epochs=config.epochs, callbacks=callbacks, verbose=0)
    except RuntimeError as error:
        if "consecutive failures" in str(error) or "failed" in str(error).lower():
            raise UserError(f"the search stopped: {MAX_CONSECUTIVE_FAILURES} trials in a row failed "
                            f"(see {config.tuner_dir}/trials.json)") from None
        raise


def trial_counts(tuner) -> dict[str, int]:
    """Trials per status: all of the search's, or, on a distributed-tuning worker, the ones it ran."""
    if not _is_local_oracle(tuner.oracle):
        return dict(tuner.__dict__.get("statuses", {}))
    counts: dict[str, int] = {}
    for trial in tuner.oracle.trials.values():
        status = str(getattr(trial.status, "value", trial.status))
        counts[status] = counts.get(status, 0) + 1
    return counts


def best_trial(oracle):
    trials = oracle.get_best_trials(1)
    if not trials or trials[0].score is None:
        raise UserError("the search finished without a successful trial (every trial failed); "
                        "see the trials table in JOB/tuner")
    return trials[0]
