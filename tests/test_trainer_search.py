"""The search end to end through ``trainer.cli.main``: real Keras Tuner searches over real TFRecords.

Plumbing runs use ``--weights none`` and 32x32 inputs so they are quick; the
real-weights run is in test_trainer_real.py.
"""

from __future__ import annotations

import json

import pytest

from trainer.cli import main

QUICK = ["--weights", "none", "--image-size", "32", "--epochs", "1", "--batch-size", "16", "--seed", "3"]
SPACE = json.dumps({"finetune_depth": [0, 1], "dense_layers": [0, 1], "pooling": ["avg", "max"]})


def _statuses(job) -> list[str]:
    return sorted(json.loads(p.read_text())["status"] for p in (job / "tuner").glob("trial_*/trial.json"))


@pytest.fixture(scope="module")
def searched_job(tfrecord_data, tmp_path_factory):
    job = tmp_path_factory.mktemp("job")
    rc = main(["--data", str(tfrecord_data), "--job-dir", str(job), "--tuner", "random", "--max-trials", "2",
               "--search-space", SPACE, "--find-label-issues", *QUICK])  # asked for: random weights skip it otherwise
    assert rc == 0
    return job


def test_a_search_writes_the_job_folder_of_the_contract(searched_job):
    for path in ("tuner/search.json", "tuner/trials.csv", "tuner/trials.json", "eval/metrics.json",
                 "eval/confusion_matrix.png", "best_hyperparameters.json", "gate.json", "export/1/saved_model.pb"):
        assert (searched_job / path).exists(), path
    assert _statuses(searched_job) == ["COMPLETED", "COMPLETED"]


def test_the_trials_table_records_each_trials_wall_time(searched_job):
    import csv

    with open(searched_job / "tuner" / "trials.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2
    assert all(float(row["elapsed_s"]) > 0 for row in rows)


def test_tensorboard_has_scalars_per_trial_and_for_the_final_fit(searched_job):
    trial_logs = [p for p in (searched_job / "tensorboard" / "search").iterdir() if p.is_dir()]
    assert len(trial_logs) == 2
    for trial in trial_logs:
        assert list(trial.rglob("events.out.tfevents.*")), trial
    assert list((searched_job / "tensorboard" / "final").rglob("events.out.tfevents.*"))


def _hparams_tags(accumulator) -> dict:
    try:
        return accumulator.PluginTagToContent("hparams")
    except KeyError:
        return {}


def test_tensorboard_has_the_hparams_table_of_every_trial(searched_job):
    from tensorboard.backend.event_processing import event_accumulator

    root = searched_job / "tensorboard" / "search"
    sessions = 0
    for run in [root, *[p for p in root.rglob("*") if p.is_dir()]]:
        if not list(run.glob("events.out.tfevents.*")):
            continue
        accumulator = event_accumulator.EventAccumulator(str(run))
        accumulator.Reload()
        tags = _hparams_tags(accumulator)
        sessions += "_hparams_/session_start_info" in tags
        if run == root:
            assert "_hparams_/experiment" in tags
    assert sessions == 2


def test_tensorboard_shows_each_trials_own_score_as_trials_csv_does(searched_job):
    """Issue: TensorBoard's table read the last epoch's val_accuracy, the log and trials.csv the tuner's score."""
    import csv

    import tensorflow as tf
    from tensorboard.backend.event_processing import event_accumulator

    with open(searched_job / "tuner" / "trials.csv") as handle:
        scores = {row["trial_id"]: float(row["score"]) for row in csv.DictReader(handle)}
    assert len(scores) == 2
    for trial_id, score in scores.items():
        run = searched_job / "tensorboard" / "search" / trial_id / "execution0"
        accumulator = event_accumulator.EventAccumulator(str(run), size_guidance={"tensors": 0})
        accumulator.Reload()
        [event] = accumulator.Tensors("score/val_accuracy")
        assert float(tf.make_ndarray(event.tensor_proto)) == pytest.approx(score, abs=1e-6)


def test_best_hyperparameters_are_the_winning_trials_values_and_score(searched_job):
    best = json.loads((searched_job / "best_hyperparameters.json").read_text())
    trial = json.loads((searched_job / "tuner" / f"trial_{best['trial_id']}" / "trial.json").read_text())
    assert best["score"] == pytest.approx(trial["score"])
    assert best["values"]["finetune_depth"] in (0, 1)
    assert best["values"] == {k: v for k, v in trial["hyperparameters"]["values"].items()
                              if not k.startswith("tuner/")}


def test_the_evaluation_writes_its_mistakes_and_the_suspect_labels(searched_job):
    """eval/mistakes.* (exactly metrics.json's errors) and eval/label_issues.* from the run's cached features."""
    import csv

    import numpy as np
    from PIL import Image

    metrics = json.loads((searched_job / "eval" / "metrics.json").read_text())
    matrix = np.array(metrics["confusion_matrix"]["matrix"])
    with open(searched_job / "eval" / "mistakes.csv", newline="") as handle:
        mistakes = list(csv.DictReader(handle))
    assert len(mistakes) == matrix.sum() - np.trace(matrix)
    assert all(row["true_label"] != row["predicted_label"] for row in mistakes)
    assert (searched_job / "eval" / "label_issues.csv").read_text().startswith("path,split,given_label,")
    summary = json.loads((searched_job / "summary.json").read_text())
    assert summary["mistakes"] == len(mistakes) and summary["label_issues"] >= 0
    for name in ("mistakes.png", "label_issues.png"):
        with Image.open(searched_job / "eval" / name) as image:
            assert image.format == "PNG" and image.width > 100, name


def test_the_exported_model_answers_for_encoded_test_images(searched_job, tfrecord_data):
    from trainer.data import info as data_info
    from trainer.data import records
    from trainer.publish.export import load_predict_fn

    info = data_info.inspect_data(str(tfrecord_data))
    images, _ = records.encoded_examples(info, "test")
    out = load_predict_fn(str(searched_job / "export" / "1"))(images)
    assert out["probabilities"].shape == (len(images), 3)
    assert out["probabilities"].sum(axis=1) == pytest.approx([1.0] * len(images), abs=1e-4)
    assert {label.decode() if isinstance(label, bytes) else label for label in out["labels"]} <= set(info.labels)


def test_the_export_records_its_upload_decode_and_the_datas_pixel_limit(searched_job, tfrecord_data):
    from preprocessing.config import DEFAULT_MAX_PIXELS
    from trainer.data import info as data_info
    from trainer.data import records

    export = json.loads((searched_job / "export" / "1" / "assets.extra" / "metadata.json").read_text())["export"]
    assert export["decode"] == "upright-rgb-v1"
    assert export["max_pixels"] == data_info.read_options(str(tfrecord_data)).get("max_pixels", DEFAULT_MAX_PIXELS)


def test_rerunning_the_same_command_resumes_without_new_trials(searched_job, tfrecord_data, caplog):
    caplog.set_level("INFO", logger="trainer")
    rc = main(["--data", str(tfrecord_data), "--job-dir", str(searched_job), "--tuner", "random", "--max-trials", "2",
               "--search-space", SPACE, "--no-export", *QUICK])
    assert rc == 0
    assert "resuming the previous search" in caplog.text
    assert "has run all its trials" in caplog.text
    assert len(_statuses(searched_job)) == 2


def test_a_changed_search_space_is_refused_in_one_line(searched_job, tfrecord_data, capsys):
    rc = main(["--data", str(tfrecord_data), "--job-dir", str(searched_job), "--tuner", "random", "--max-trials", "2",
               "--search-space", '{"finetune_depth": 0}', *QUICK])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and "search_space" in err and "--overwrite" in err


def test_a_changed_tuner_is_refused(searched_job, tfrecord_data, capsys):
    rc = main(["--data", str(tfrecord_data), "--job-dir", str(searched_job), "--tuner", "bayesian",
               "--max-trials", "2", "--search-space", SPACE, *QUICK])
    assert rc == 2
    assert "tuner" in capsys.readouterr().err


@pytest.mark.parametrize("flags, differences", [
    (["--batch-size", "8"], ["batch_size 16 -> 8"]),
    (["--no-augment", "--patience", "5"], ["augment {", "early_stopping_patience 3 -> 5"]),
    (["--validation-fraction", "0.3", "--no-class-weights"], ["class_weights true -> false",
                                                              "validation_fraction 0.2 -> 0.3"]),
])
def test_a_change_of_any_setting_that_alters_trials_is_refused_naming_old_and_new(
        searched_job, tfrecord_data, capsys, flags, differences):
    """Issue: re-running a finished search with --batch-size 16 or --no-augment resumed silently."""
    args = ["--data", str(tfrecord_data), "--job-dir", str(searched_job), "--tuner", "random", "--max-trials", "2",
            "--search-space", SPACE, *QUICK]
    rc = main([*args, *flags])  # the last --batch-size wins
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "--overwrite" in err
    for difference in differences:
        assert difference in err


def test_the_data_digest_follows_the_datas_content_not_the_run_that_wrote_it(tfrecord_data, tmp_path):
    import shutil

    from trainer.search.identity import data_digest

    copy = tmp_path / "data"
    shutil.copytree(tfrecord_data, copy)
    before = data_digest(str(copy))
    assert before == data_digest(str(tfrecord_data))
    stats = json.loads((copy / "stats.json").read_text())
    stats["run"] = {"started_at": "later", "seconds": 12.5}  # the same command run again
    stats.pop("carve_histogram")  # as a preprocessing from before December 2026 wrote it
    (copy / "stats.json").write_text(json.dumps(stats))
    assert data_digest(str(copy)) == before
    stats["written"] = {"train": 1}  # other photos
    (copy / "stats.json").write_text(json.dumps(stats))
    assert data_digest(str(copy)) != before


def test_overwrite_starts_the_search_afresh(tfrecord_data, tmp_path, caplog):
    caplog.set_level("INFO", logger="trainer")
    args = ["--data", str(tfrecord_data), "--job-dir", str(tmp_path), "--tuner", "random", "--no-export", *QUICK]
    assert main([*args, "--max-trials", "1", "--search-space", '{"finetune_depth": 0, "dense_layers": 0}']) == 0
    assert main([*args, "--max-trials", "1", "--search-space", '{"finetune_depth": 0, "dense_layers": 1}',
                 "--overwrite"]) == 0
    assert "starting afresh" in caplog.text.split("--overwrite")[-1]
    search = json.loads((tmp_path / "tuner" / "search.json").read_text())
    assert search["search_space"]["dense_layers"] == {"value": 1}
    assert len(_statuses(tmp_path)) == 1


def test_a_failing_trial_is_recorded_and_the_search_goes_on(tfrecord_data, tmp_path):
    # An L2 factor of 1e38 overflows the loss to infinity: that trial fails, the next one completes.
    space = {"finetune_depth": 0, "dense_layers": 0, "pooling": "avg", "head_batchnorm": False, "dropout": 0,
             "optimizer": "adam", "head_learning_rate": 1e-3, "l2": [1e38, 0.0]}
    rc = main(["--data", str(tfrecord_data), "--job-dir", str(tmp_path), "--tuner", "grid", "--max-trials", "2",
               "--search-space", json.dumps(space), "--no-export", *QUICK])
    assert rc == 0
    assert _statuses(tmp_path) == ["COMPLETED", "FAILED"]
    best = json.loads((tmp_path / "best_hyperparameters.json").read_text())
    assert best["values"]["l2"] == 0.0


@pytest.mark.parametrize("tuner", ["hyperband", "bayesian"])
def test_the_other_tuners_complete_a_search(tuner, tfrecord_data, tmp_path):
    # Conditional hyperparameters (the dense units, SGD's momentum) but no fine-tune: the random search covers that.
    space = json.dumps({"finetune_depth": 0, "dense_layers": [0, 1], "pooling": ["avg", "max"]})
    rc = main(["--data", str(tfrecord_data), "--job-dir", str(tmp_path), "--tuner", tuner, "--max-trials", "2",
               "--search-space", space, "--no-export", *QUICK])
    assert rc == 0
    assert "COMPLETED" in _statuses(tmp_path)
    assert json.loads((tmp_path / "best_hyperparameters.json").read_text())["score"] is not None


def test_an_interrupted_search_resumes_where_it_stopped(tfrecord_data, tmp_path, repo_root):
    import os
    import signal
    import subprocess
    import sys

    args = [sys.executable, "-m", "trainer", "--data", str(tfrecord_data), "--job-dir", str(tmp_path),
            "--tuner", "random", "--max-trials", "3", "--search-space", json.dumps({"finetune_depth": 0}),
            "--no-export", *QUICK]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    first = subprocess.Popen(args, cwd=repo_root, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        for line in first.stderr:
            if "(1 of 3) done" in line:
                first.send_signal(signal.SIGKILL)
                break
    finally:
        first.kill()
        first.wait(timeout=60)
    assert _statuses(tmp_path).count("COMPLETED") == 1
    second = subprocess.run(args, cwd=repo_root, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resuming the previous search" in second.stderr
    assert "(1 of 3) starting" not in second.stderr
    assert _statuses(tmp_path) == ["COMPLETED"] * 3


def test_a_current_backbone_runs_end_to_end_with_random_weights(tfrecord_data, tmp_path):
    """mobilenet_v3_large, the cheapest of the newer families, from records to an export that answers."""
    from trainer.data import info as data_info
    from trainer.data import records
    from trainer.publish.export import load_predict_fn

    rc = main(["--data", str(tfrecord_data), "--job-dir", str(tmp_path), "--backbone", "mobilenet_v3_large",
               "--tuner", "random", "--max-trials", "1",
               "--search-space", json.dumps({"finetune_depth": [1], "dense_layers": 0}), *QUICK])
    assert rc == 0
    best = json.loads((tmp_path / "best_hyperparameters.json").read_text())
    assert best["values"]["finetune_depth"] == 1
    images, _ = records.encoded_examples(data_info.inspect_data(str(tfrecord_data)), "test")
    probabilities = load_predict_fn(str(tmp_path / "export" / "1"))(images)["probabilities"]
    assert probabilities.shape == (len(images), 3)


def test_past_the_time_budget_no_new_trial_starts_and_the_best_so_far_is_published(tfrecord_data, tmp_path, caplog):
    job = tmp_path / "job"
    with caplog.at_level("INFO", logger="trainer"):
        rc = main(["--data", str(tfrecord_data), "--job-dir", str(job), "--tuner", "random", "--max-trials", "5",
                   "--max-search-time", "1s", "--search-space", SPACE, *QUICK])
    assert rc == 0
    assert _statuses(job) == ["COMPLETED"]  # the trial in flight at the deadline finished; no other started
    assert (job / "export" / "1" / "saved_model.pb").exists()
    assert any("--max-search-time reached" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("text", ["soon", "0", "5 minutes", "1x"])
def test_a_time_budget_that_is_not_a_duration_is_one_line(text, tfrecord_data, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--data", str(tfrecord_data), "--job-dir", str(tmp_path), "--max-search-time", text])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--max-search-time" in err[0] and repr(text) in err[0]
