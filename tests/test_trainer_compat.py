"""The private hooks into Keras and Keras Tuner (trainer/compat/) stay tied to the versions they were written for.

An upgrade of either library past its pin fails here first, so someone reviews
the hooks (each says why no public API serves) before moving the constant.
"""

from __future__ import annotations

import pathlib
import re

import keras
import keras_tuner
import pytest

from trainer.compat import keras as compat_keras
from trainer.compat import keras_tuner as compat_kt
from trainer.config import UserError

ROOT = pathlib.Path(__file__).resolve().parents[1]


def pinned(name: str) -> str:
    match = re.search(rf"^{re.escape(name)}==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M)
    assert match, f"{name} is not pinned in constraints.txt"
    return match.group(1)


def test_the_hooks_were_written_for_the_pinned_and_installed_keras():
    assert compat_keras.KERAS_VERSION == pinned("keras") == keras.__version__


def test_the_hooks_were_written_for_the_pinned_and_installed_keras_tuner():
    assert compat_kt.KERAS_TUNER_VERSION == pinned("keras-tuner") == keras_tuner.__version__


def test_a_keras_hook_refuses_another_keras_with_one_line_naming_both_versions(monkeypatch):
    monkeypatch.setattr(compat_keras, "installed_version", lambda: "3.99.0")
    with pytest.raises(UserError) as error:
        compat_keras.require("RandomRotationZoom")
    assert "keras==3.15.1" in str(error.value) and "keras==3.99.0" in str(error.value)
    assert "\n" not in str(error.value)


def test_the_augmentation_refuses_another_keras_instead_of_augmenting_differently(monkeypatch):
    import numpy as np

    from trainer.model.augment import RandomRotationZoom

    layer = RandomRotationZoom(0.1, zoom=0.2, seed=1)
    monkeypatch.setattr(compat_keras, "installed_version", lambda: "3.99.0")
    with pytest.raises(UserError, match="keras==3.99.0"):
        layer(np.zeros((2, 8, 8, 3), "float32"), training=True)


def test_keras_tuners_checkpoint_hook_refuses_another_keras_tuner(monkeypatch):
    monkeypatch.setattr(compat_kt, "installed_version", lambda: "1.5.0")
    with pytest.raises(UserError, match="keras-tuner==1.4.8.*keras-tuner==1.5.0"):
        compat_kt.is_save_best_epoch(object())


def test_report_only_hooks_fall_back_to_unknown_on_another_keras_tuner(monkeypatch):
    oracle = keras_tuner.oracles.HyperbandOracle(objective="val_accuracy", max_epochs=9, hyperband_iterations=1)
    assert compat_kt.hyperband_trials(oracle) > 0
    monkeypatch.setattr(compat_kt, "installed_version", lambda: "1.5.0")
    assert compat_kt.hyperband_trials(oracle) is None
    assert compat_kt.trial_start(oracle, "0") is None
    assert compat_kt.project_dir(oracle) is None


def test_keras_tuners_checkpoint_is_recognised_on_the_pinned_version(tmp_path):
    from keras_tuner.src.engine.tuner_utils import SaveBestEpoch

    assert compat_kt.is_save_best_epoch(SaveBestEpoch(objective=keras_tuner.Objective("val_loss", "min"),
                                                      filepath=str(tmp_path / "w.weights.h5")))
    assert not compat_kt.is_save_best_epoch(keras.callbacks.TerminateOnNaN())


def test_no_private_keras_or_keras_tuner_name_is_used_outside_compat():
    """``obj._name`` reads of library objects live in trainer/compat/ only (our own objects' are fine)."""
    offenders = []
    pattern = re.compile(r"\b(keras\.src|keras_tuner\.src|oracle\._\w+|_get_num_brackets|_compute_affine_matrix|"
                         r"_get_seed_generator|_maybe_symbolic_build|\._actions\b)")
    for path in (ROOT / "trainer").rglob("*.py"):
        if "compat" in path.parts:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == []
