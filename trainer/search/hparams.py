"""TensorBoard's hparams table for a search: the experiment's columns once, then one session per trial.

* :func:`write_hparams_config` writes the columns (every hyperparameter with
  its domain, and the score metrics) at the top of the search's log dir.
* :func:`hparams_callback` records one trial: its values, its per-epoch
  metrics across both phases, and the score the tuner gave it.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Iterable, Mapping

import keras

from trainer.search.tables import TUNER_KEY_PREFIX

log = logging.getLogger(__name__)


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
