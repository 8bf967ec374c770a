"""A full disk while the trainer writes (simulated by a file size limit, RLIMIT_FSIZE): one line, nothing half-written.

A write past ``RLIMIT_FSIZE`` fails with EFBIG as a write to a full disk
fails with ENOSPC (the process ignores SIGXFSZ, as
``tests/test_preprocessing_full_disk.py`` does for the Beam job). The small
state files are checked in this process, the limit lowered around one write;
the feature cache through the real CLI in a subprocess whose limit is set
before it starts. docs/operations.md names these tests.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import signal
import subprocess
import sys

import pytest
from conftest import write_tfrecord_data

pytest_plugins = ["serving_fixtures"]

from trainer import staging
from trainer.compat import keras_tuner as kt_compat

LIMIT = 64 * 1024


@contextlib.contextmanager
def file_size_limit(limit: int):
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def _limited(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_state_file_write_past_the_limit_leaves_the_old_file_whole_and_no_temporary(tmp_path):
    path = tmp_path / "summary.json"
    staging.write_text(str(path), json.dumps({"version": 1}))
    with file_size_limit(LIMIT), pytest.raises(OSError) as raised:
        staging.write_text(str(path), json.dumps({"rows": "x" * (2 * LIMIT)}))
    assert staging.disk_full(raised.value) is not None
    assert json.loads(path.read_text()) == {"version": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_keras_tuners_oracle_state_is_written_by_write_then_rename(tmp_path):
    """Keras Tuner writes ``oracle.json`` in place; with the hook a failed write keeps the last good one."""
    import keras
    import keras_tuner

    def build(hp):
        model = keras.Sequential([keras.layers.Dense(hp.Int("units", 1, 4))])
        model.compile("sgd", "mse")
        return model

    assert kt_compat.write_state_atomically()
    tuner = keras_tuner.RandomSearch(build, objective="val_loss", max_trials=2, directory=str(tmp_path),
                                     project_name="tuner")
    tuner.oracle.save()
    state = tmp_path / "tuner" / "oracle.json"
    saved = state.read_text()
    for i in range(2 * LIMIT // 1000):  # a state too big for the limit
        tuner.oracle.hyperparameters.Fixed(f"padding_{i}", "x" * 1000)
    with file_size_limit(LIMIT), pytest.raises(OSError):
        tuner.oracle.save()
    assert state.read_text() == saved
    assert not [p.name for p in state.parent.iterdir() if ".tmp-" in p.name]


def test_on_another_keras_tuner_the_state_hook_falls_back_to_its_own_writes(monkeypatch):
    monkeypatch.setattr(kt_compat, "installed_version", lambda: "9.9.9")
    assert kt_compat.write_state_atomically() is False


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_full_disk_while_the_feature_cache_is_written_fails_in_one_line_and_a_rerun_works(tmp_path, repo_root):
    import keras

    data = write_tfrecord_data(tmp_path / "data", per_class=20)
    weights = tmp_path / "mobilenet_v2.weights.h5"  # a local file, so the first big write is the cache's
    keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(32, 32, 3)).save_weights(weights)
    job = tmp_path / "job"
    command = [sys.executable, "-m", "trainer", "--data", str(data), "--job-dir", str(job), "--weights", str(weights),
               "--image-size", "32", "--epochs", "1", "--max-trials", "1", "--tuner", "random", "--no-export",
               "--search-space", '{"finetune_depth": 0}']
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    failed = subprocess.run(command, cwd=repo_root, env=env, capture_output=True, text=True, timeout=600,
                            preexec_fn=_limited(LIMIT))
    assert failed.returncode == 2, failed.stderr[-3000:]
    assert "Traceback" not in failed.stderr, failed.stderr[-3000:]
    errors = [line for line in failed.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1 and "File too large" in errors[0] and str(job / "cache") in errors[0], errors
    cache_entries = [name for _, dirs, files in os.walk(job / "cache") for name in dirs + files]
    assert not [name for name in cache_entries if ".tmp-" in name or name.endswith("-pooled")], cache_entries

    again = subprocess.run(command, cwd=repo_root, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert re.search(r"bottleneck features: train, \d+ images in", again.stderr)
    assert (job / "summary.json").is_file()


def test_a_full_disk_while_exporting_publishes_nothing_and_names_the_path(tiny_model, split_images, tmp_path):
    from serving_fixtures import export_tiny

    from trainer.publish.export import ExportError

    model, labels = tiny_model
    base = tmp_path / "export"
    with file_size_limit(LIMIT), pytest.raises(ExportError) as raised:
        export_tiny(model, labels, base, split_images["test"])
    message = str(raised.value)
    assert "\n" not in message and "File too large" in message and str(base) in message, message
    assert sorted(os.listdir(base)) == [], "no version and no temporary may be left"
    assert export_tiny(model, labels, base, split_images["test"]).version == 1
