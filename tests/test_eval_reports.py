"""Search reports from a real Keras Tuner RandomSearch on the sample TFRecords: trials table and hparams table."""

import csv
import json
import os

import keras
import keras_tuner as kt
import numpy as np
import pytest
import tensorflow as tf
from tensorboard.plugins.hparams import api_pb2
from tensorboard.plugins.hparams import metadata as hp_metadata

from preprocessing import tfrecords
from trainer.search.hparams import hparams_callback, write_hparams_config
from trainer.search.tables import write_trials_table

SIZE = (32, 32)
MAX_TRIALS = 4
FAILING_TRIAL = 2  # this trial raises: Keras Tuner records it as FAILED and goes on


def _dataset(data_dir, split):
    def to_pair(serialized):
        parsed = tfrecords.parse_example(serialized)
        return tfrecords.decode_and_resize(parsed[tfrecords.ENCODED], SIZE), parsed[tfrecords.LABEL]

    return tf.data.TFRecordDataset(tfrecords.list_shards(str(data_dir), split)).map(to_pair).batch(16).cache()


class TinyHyperModel(kt.HyperModel):
    def build(self, hp):
        units = hp.Choice("units", [4, 8, 16])
        learning_rate = hp.Float("learning_rate", 1e-3, 1e-1, sampling="log")
        model = keras.Sequential([keras.Input((*SIZE, 3)), keras.layers.Rescaling(1 / 255),
                                  keras.layers.AveragePooling2D(8), keras.layers.Flatten(),
                                  keras.layers.Dense(units, activation="relu"),
                                  keras.layers.Dense(3, activation="softmax")])
        model.compile(keras.optimizers.Adam(learning_rate), "sparse_categorical_crossentropy", metrics=["accuracy"])
        return model


class LoggedSearch(kt.RandomSearch):
    """Gives each trial an hparams callback in its own run under ``logdir``; one trial fails."""

    logdir = ""

    def run_trial(self, trial, *args, **kwargs):
        if len(self.oracle.trials) == FAILING_TRIAL:
            raise ValueError("out of memory (simulated)\nthe last line explains it")
        run = os.path.join(self.logdir, f"trial_{trial.trial_id}")
        kwargs["callbacks"] = [hparams_callback(run, trial.hyperparameters.values, trial_id=trial.trial_id)]
        return super().run_trial(trial, *args, **kwargs)


@pytest.fixture(scope="module")
def search(tfrecord_data, tmp_path_factory):
    keras.utils.set_random_seed(1)
    job = tmp_path_factory.mktemp("job")
    tuner = LoggedSearch(TinyHyperModel(), objective="val_accuracy", max_trials=MAX_TRIALS, seed=3,
                         directory=str(job), project_name="tuner", max_consecutive_failed_trials=2)
    tuner.logdir = str(job / "tensorboard")
    write_hparams_config(tuner.logdir, tuner.oracle.hyperparameters)
    tuner.search(_dataset(tfrecord_data, "train"), validation_data=_dataset(tfrecord_data, "validation"),
                 epochs=1, verbose=1)
    csv_path, json_path = write_trials_table(tuner.oracle, str(job / "tuner"))
    return tuner, job, csv_path, json_path


def _events(run_dir):
    for name in sorted(os.listdir(run_dir)):
        if name.startswith("events.out.tfevents"):
            yield from tf.compat.v1.train.summary_iterator(os.path.join(run_dir, name))


def _hparams_plugin_data(run_dir):
    return [value.metadata.plugin_data.content for event in _events(run_dir) for value in event.summary.value
            if value.metadata.plugin_data.plugin_name == hp_metadata.PLUGIN_NAME]


def _scalars(run_dir, tag):
    return {event.step: float(tf.make_ndarray(value.tensor)) for event in _events(run_dir)
            for value in event.summary.value if value.tag == tag}


def test_trials_table_lists_every_trial_best_first_and_failed_last(search):
    tuner, _, _, json_path = search
    table = json.loads(open(json_path).read())
    assert table["objective"] == "val_accuracy" and table["direction"] == "max"
    assert table["num_trials"] == len(tuner.oracle.trials) == MAX_TRIALS
    scores = [row["score"] for row in table["trials"] if row["status"] == "COMPLETED"]
    assert scores == sorted(scores, reverse=True) and len(scores) == MAX_TRIALS - 1
    failed = table["trials"][-1]
    assert (failed["status"], failed["score"], failed["number"]) == ("FAILED", None, FAILING_TRIAL)
    assert "the last line explains it" in failed["message"]
    assert [row["rank"] for row in table["trials"]] == list(range(1, MAX_TRIALS + 1))
    assert table["trials"][0]["trial_id"] == tuner.oracle.get_best_trials(1)[0].trial_id


def test_trials_csv_has_a_column_per_hyperparameter_with_the_trial_values(search):
    tuner, _, csv_path, _ = search
    with open(csv_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0])[:8] == ["rank", "trial_id", "number", "status", "score", "best_step", "elapsed_s", "message"]
    assert {"units", "learning_rate"} <= set(rows[0])
    for row in rows:
        values = tuner.oracle.trials[row["trial_id"]].hyperparameters.values
        assert int(row["units"]) == values["units"]
        assert float(row["learning_rate"]) == pytest.approx(values["learning_rate"])


def test_elapsed_seconds_come_from_the_tuner_records_or_the_caller(search):
    tuner, job, _, json_path = search
    rows = json.loads(open(json_path).read())["trials"]
    assert all(row["elapsed_s"] is not None and row["elapsed_s"] >= 0 for row in rows)
    trial_id = rows[0]["trial_id"]
    _, json_path = write_trials_table(tuner.oracle, str(job / "again"), elapsed_s={trial_id: 12.5})
    again = json.loads(open(json_path).read())["trials"]
    assert next(row for row in again if row["trial_id"] == trial_id)["elapsed_s"] == 12.5


def test_a_resumed_search_keeps_the_trial_seconds_of_the_earlier_table(search):
    tuner, job, _, _ = search
    trial_id = next(iter(tuner.oracle.trials))
    write_trials_table(tuner.oracle, str(job / "resumed"), elapsed_s={trial_id: 42.0})
    _, json_path = write_trials_table(tuner.oracle, str(job / "resumed"))
    rows = json.loads(open(json_path).read())["trials"]
    assert next(row for row in rows if row["trial_id"] == trial_id)["elapsed_s"] == 42.0


def test_hparams_experiment_declares_each_hyperparameter_with_its_domain_and_the_metrics(search):
    _, job, _, _ = search
    [content] = [c for c in _hparams_plugin_data(job / "tensorboard")]
    experiment = hp_metadata.parse_experiment_plugin_data(content)
    hparams = {info.name: info for info in experiment.hparam_infos}
    assert [v.number_value for v in hparams["units"].domain_discrete.values] == [4, 8, 16]
    assert (hparams["learning_rate"].domain_interval.min_value,
            hparams["learning_rate"].domain_interval.max_value) == pytest.approx((1e-3, 1e-1))
    assert [info.name.tag for info in experiment.metric_infos] == ["score/val_accuracy", "score/val_loss"]


def test_each_trial_run_holds_its_hparams_session_and_metric_scalars(search):
    tuner, job, _, _ = search
    completed = [t for t in tuner.oracle.trials.values() if t.status == "COMPLETED"]
    for trial in completed:
        run = job / "tensorboard" / f"trial_{trial.trial_id}"
        start = hp_metadata.parse_session_start_info_plugin_data(_hparams_plugin_data(run)[0])
        assert start.hparams["units"].number_value == trial.hyperparameters.values["units"]
        assert start.group_name == trial.trial_id
        assert _scalars(run, "val_accuracy") == {1: pytest.approx(trial.score)}


def test_one_hparams_callback_spans_both_fit_phases_of_a_trial(tmp_path):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, activation="softmax")])
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    x, y = np.random.default_rng(0).normal(size=(16, 4)), np.arange(16) % 2
    callback = hparams_callback(str(tmp_path), {"units": 8, "tuner/epochs": 2})
    model.fit(x, y, validation_split=0.25, epochs=2, callbacks=[callback], verbose=0)
    model.fit(x, y, validation_split=0.25, epochs=1, callbacks=[callback], verbose=0)
    kinds = [hp_metadata.parse_session_start_info_plugin_data(c) if i == 0
             else hp_metadata.parse_session_end_info_plugin_data(c)
             for i, c in enumerate(_hparams_plugin_data(tmp_path))]
    assert set(kinds[0].hparams) == {"units"}
    assert [end.status for end in kinds[1:]] == [api_pb2.STATUS_SUCCESS] * 2  # one start, an end per fit
    assert sorted(_scalars(tmp_path, "val_accuracy")) == [1, 2, 3]
    callback.record_score({"val_accuracy": 0.5, "val_loss": 1.25})  # the epoch early stopping kept, say
    assert _scalars(tmp_path, "score/val_accuracy") == {3: pytest.approx(0.5)}
