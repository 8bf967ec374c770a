"""Creating, resuming and running the Keras Tuner search.

The tuner project lives in ``JOB/tuner/``. Keras Tuner reloads it when it
exists, which is how an interrupted search resumes (:mod:`trainer.search.identity`
refuses a resume whose settings changed). ``--max-trials`` may change between
runs (to extend a finished search); ``--max-search-time`` stops new trials
past a time budget.

Failed trials (NaN loss, out of memory) are Keras Tuner's ``FAILED`` trials:
recorded, and the search goes on (it stops after 3 failures in a row). Memory
is released between trials by Keras Tuner (``clear_session`` + ``gc``).
"""

from __future__ import annotations

import json
import logging
import os
import time

import keras_tuner as kt

from trainer import distribute
from trainer.compat import keras_tuner as compat
from trainer.config import TrainConfig, UserError

log = logging.getLogger("trainer.search.tuner")

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
    deadline: float | None = None  # time.monotonic() past which no new trial starts (--max-search-time)

    def pre_create_trial(self):
        super().pre_create_trial()
        if self.deadline is not None and time.monotonic() >= self.deadline:
            stop_new_trials(self.oracle)

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


# Keras Tuner's Oracle takes ``seed or random.randint(1, 10000)``: a seed of 0 would mean "unseeded".
_ZERO_SEED = 2**31 - 1


def oracle_seed(seed: int) -> int:
    """The oracle seed for ``--seed``: the same number, except 0, which Keras Tuner would replace at random."""
    return seed if seed != 0 else _ZERO_SEED


def create_tuner(hypermodel, config: TrainConfig, strategy=None):
    """The configured Keras Tuner (reloading ``JOB/tuner`` when it exists)."""
    base = _tuner_classes()[config.tuner]
    compat.write_state_atomically()
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


def stop_new_trials(oracle) -> None:
    """No trial starts after this (the ones running finish): the oracle's public ``max_trials`` becomes the
    number of trials it has (at least one, so there is a best trial to retrain)."""
    if _is_local_oracle(oracle):
        have = len(oracle.trials)
        if not oracle.max_trials or oracle.max_trials > max(1, have):
            log.info("--max-search-time reached: no new trial starts (%d so far); the best is retrained next", have)
            oracle.max_trials = max(1, have)


def run_search(tuner, config: TrainConfig, callbacks: list) -> None:
    """Run (or resume) the search; a search that cannot go on is a one-line :class:`UserError`.

    With ``--max-search-time`` the budget counts from now: the tuner checks it
    before asking for each trial; the chief of a distributed search checks it
    on a timer, and its workers then get no new trial from it.
    """
    timer = None
    if config.max_search_time_s:
        tuner.deadline = time.monotonic() + config.max_search_time_s
        if distribute.tuning_role() == "chief":
            import threading

            timer = threading.Timer(config.max_search_time_s, stop_new_trials, args=(tuner.oracle,))
            timer.daemon = True
            timer.start()
    try:
        tuner.search(epochs=config.epochs, callbacks=callbacks, verbose=0)
    except RuntimeError as error:
        if "consecutive failures" in str(error) or "failed" in str(error).lower():
            raise UserError(f"the search stopped: {MAX_CONSECUTIVE_FAILURES} trials in a row failed "
                            f"(see {config.tuner_dir}/trials.json)") from None
        raise
    finally:
        if timer is not None:
            timer.cancel()


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
