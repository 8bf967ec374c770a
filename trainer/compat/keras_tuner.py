"""Every private hook into Keras Tuner, in one place, each checked against the version it was written for.

Each hook says why the public API does not serve. Hooks that only improve a
report (the planned number of Hyperband trials, a trial's start time) take a
documented public fallback on any other version: the report says "unknown".
A hook that changes what gets trained or saved refuses with one line
(:func:`require`). ``tests/test_trainer_compat.py`` fails when the installed
(pinned) Keras Tuner is not :data:`KERAS_TUNER_VERSION`, so an upgrade makes
someone review these hooks and then move the constant.
"""

from __future__ import annotations

from trainer.config import UserError

KERAS_TUNER_VERSION = "1.4.8"


def installed_version() -> str:
    import keras_tuner

    return keras_tuner.__version__


def reviewed() -> bool:
    """Whether the installed Keras Tuner is the one these hooks were written for."""
    return installed_version() == KERAS_TUNER_VERSION


def require(hook: str) -> None:
    """Refuse ``hook`` unless the installed Keras Tuner is the one it was written for."""
    if not reviewed():
        raise UserError(f"{hook} uses Keras Tuner internals written for keras-tuner=={KERAS_TUNER_VERSION}, but "
                        f"keras-tuner=={installed_version()} is installed: install the pinned version "
                        "(constraints.txt) or review trainer/compat/keras_tuner.py")


def hyperband_trials(oracle) -> int | None:
    """How many trials a Hyperband oracle schedules over all its iterations; None when unknown.

    Keras Tuner has no public count; its schedule lives in the private
    ``_get_num_brackets``, ``_get_num_rounds`` and ``_get_size``. Fallback on
    any other version (or another oracle): None, and progress lines say "?".
    """
    if not reviewed():
        return None
    try:
        iterations = int(oracle.hyperband_iterations)
        brackets = oracle._get_num_brackets()
        per_iteration = sum(oracle._get_size(b, r) for b in range(brackets) for r in range(oracle._get_num_rounds(b)))
    except (AttributeError, TypeError, ValueError, OverflowError):
        return None
    return iterations * per_iteration


def trial_start(oracle, trial_id: str):
    """When the oracle recorded ``trial_id``'s start (a ``datetime``), or None.

    Saved with the oracle in its private display state (``_display.trial_start``);
    no public API exposes it, and it is the only start time that survives a
    resumed search. Fallback on any other version: None (the trials table's
    ``elapsed_s`` is then this process's own measurement or empty).
    """
    if not reviewed():
        return None
    return getattr(getattr(oracle, "_display", None), "trial_start", {}).get(trial_id)


def project_dir(oracle) -> str | None:
    """The oracle's project folder (private ``_project_dir``; the public one is the tuner's). Fallback: None."""
    if not reviewed():
        return None
    return getattr(oracle, "_project_dir", None)


def is_save_best_epoch(callback) -> bool:
    """Whether ``callback`` is the checkpoint Keras Tuner adds to every trial's ``fit``.

    The two-phase trial saves the weights itself, once, after both phases
    (a per-epoch checkpoint of one phase would save the wrong model). The
    class lives in the private ``keras_tuner.src.engine.tuner_utils``.
    Refuses on any other version: missing it would silently change what is saved.
    """
    require("finding Keras Tuner's per-trial checkpoint")
    from keras_tuner.src.engine.tuner_utils import SaveBestEpoch

    return isinstance(callback, SaveBestEpoch)


def write_state_atomically() -> bool:
    """Make Keras Tuner write ``oracle.json``, each ``trial.json`` and its own state by write-then-rename.

    Keras Tuner writes them in place (``keras_tuner.src.utils.save_json``
    opens the file for writing and writes), so a search killed mid-write, or a
    full disk, leaves a truncated ``oracle.json`` that the resume cannot parse.
    No public option changes how it writes; every state file goes through that
    one private function, looked up at call time, so it is replaced here by one
    that writes through :func:`trainer.staging.write_text`. Fallback on any
    other version: Keras Tuner's own in-place writes (returns False).
    """
    if not reviewed():
        return False
    import json

    from keras_tuner.src import utils

    from trainer import staging

    if getattr(utils.save_json, "writes_atomically", False):
        return True

    def save_json(path, obj):
        text = json.dumps(obj)
        staging.write_text(path, text)
        return text

    save_json.writes_atomically = True
    utils.save_json = save_json
    return True
