"""Bottleneck features: computed once per backbone configuration, equal to the backbone's output, reused."""

from __future__ import annotations

import json

import keras
import numpy as np

from trainer.data import info as data_info

from trainer.data import features, records

from trainer.model import backbones, classifier, random_weights
from trainer.cli import main


def test_cached_features_are_the_frozen_backbones_output(tfrecord_data, tmp_path):
    info = data_info.inspect_data(str(tfrecord_data))
    backbone = backbones.get_backbone("mobilenet_v2")
    weights = random_weights.materialize_random_weights(backbone, (32, 32), str(tmp_path), seed=0)
    cache = features.FeatureCache(str(tmp_path), backbone, weights, (32, 32), info)
    assert set(cache.ensure()) == {"train", "validation"}
    cached = np.concatenate([f.numpy() for f, _ in cache.dataset("validation", 4)])
    extractor = classifier.build_feature_extractor(backbone, weights, (32, 32))
    direct = np.concatenate([keras.ops.convert_to_numpy(extractor(x, training=False))
                             for x, _ in records.image_dataset(info, "validation", (32, 32), 4)])
    np.testing.assert_allclose(cached, direct, rtol=1e-4, atol=1e-5)


def test_a_second_request_reuses_the_cache_without_recomputing(tfrecord_data, tmp_path):
    info = data_info.inspect_data(str(tfrecord_data))
    backbone = backbones.get_backbone("mobilenet_v2")
    weights = random_weights.materialize_random_weights(backbone, (32, 32), str(tmp_path), seed=0)
    first = features.FeatureCache(str(tmp_path), backbone, weights, (32, 32), info)
    first.ensure()
    again = features.FeatureCache(str(tmp_path), backbone, weights, (32, 32), info)
    assert again.path == first.path
    assert again.ensure() == {}
    other_size = features.FeatureCache(str(tmp_path), backbone, weights, (48, 48), info)
    assert other_size.path != first.path


def test_a_search_computes_features_once_for_all_its_trials(tfrecord_data, tmp_path, caplog):
    caplog.set_level("INFO", logger="trainer")
    rc = main(["--data", str(tfrecord_data), "--job-dir", str(tmp_path), "--weights", "none", "--image-size", "32",
               "--epochs", "1", "--tuner", "random", "--max-trials", "2", "--no-export",
               "--search-space", json.dumps({"finetune_depth": 0})])
    assert rc == 0
    computed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("bottleneck features: train")]
    assert len(computed) == 1
    assert sum("trial" in r.getMessage() and "done" in r.getMessage() for r in caplog.records) == 2
    assert len(list((tmp_path / "cache").glob("mobilenet_v2-32x32-*/train-pooled/DONE"))) == 1


def test_pooled_features_are_the_pooled_maps_and_need_no_maps_on_disk(tfrecord_data, tmp_path):
    info = data_info.inspect_data(str(tfrecord_data))
    backbone = backbones.get_backbone("mobilenet_v2")
    weights = random_weights.materialize_random_weights(backbone, (64, 64), str(tmp_path), seed=0)
    with_maps = features.FeatureCache(str(tmp_path / "a"), backbone, weights, (64, 64), info)
    with_maps.ensure()
    maps = np.concatenate([f.numpy() for f, _ in with_maps.dataset("validation", 4)])
    vectors_only = features.FeatureCache(str(tmp_path / "b"), backbone, weights, (64, 64), info, keep_maps=False)
    vectors_only.ensure()
    assert not (tmp_path / "b" / vectors_only.path.rsplit("/", 1)[-1] / "validation").exists()
    for pooling, reduce in (("avg", np.mean), ("max", np.max)):
        pooled = np.concatenate([f.numpy() for f, _ in vectors_only.dataset("validation", 4, pooling=pooling)])
        assert pooled.shape == (info.size("validation"), maps.shape[-1])
        np.testing.assert_allclose(pooled, reduce(maps, axis=(1, 2)), rtol=1e-5, atol=1e-6)


def test_a_random_initialisation_takes_its_batchnorm_statistics_from_training_images(tfrecord_data, tmp_path):
    info = data_info.inspect_data(str(tfrecord_data))
    backbone = backbones.get_backbone("mobilenet_v2")

    def feature_spread(weights):
        extractor = classifier.build_feature_extractor(backbone, weights, (64, 64))
        pooled = np.concatenate([keras.ops.convert_to_numpy(extractor(x, training=False)).mean(axis=(1, 2))
                                 for x, _ in records.image_dataset(info, "validation", (64, 64), 8)])
        return float(pooled.std(axis=0).mean())

    plain = random_weights.materialize_random_weights(backbone, (64, 64), str(tmp_path), seed=0)
    calibrated = random_weights.materialize_random_weights(
        backbone, (64, 64), str(tmp_path), seed=0,
        calibration_images=lambda: next(iter(records.image_dataset(info, "train", (64, 64), 64)))[0])
    assert calibrated != plain
    assert feature_spread(plain) < 1e-6
    assert feature_spread(calibrated) > 0.05
