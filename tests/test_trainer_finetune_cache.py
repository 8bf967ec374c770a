"""Fine-tuning on cached activations: the lower backbone's output, per augmented view, feeding the classifier's own upper layers."""

from __future__ import annotations

import json
import shutil

import keras
import numpy as np
import pytest

from trainer.data import info as data_info

from trainer.data import activations, features, records

from trainer.model import backbones, classifier
from trainer.cli import main
from trainer.config import AugmentConfig

SIZE = (32, 32)


@pytest.fixture()
def mobilenet(mobilenet_weights):
    """The shared ImageNet weights (at 32 px): random ones give vanishing activations and gradients up there."""
    return backbones.get_backbone("mobilenet_v2"), str(mobilenet_weights)


def _cache(tmp_path, mobilenet, info, views=3, augment=AugmentConfig()):
    backbone, weights = mobilenet
    model = backbone.build(SIZE, weights)
    boundary = classifier.boundary_layer(backbone, model, 2)
    return activations.ActivationCache(str(tmp_path), backbone, weights, SIZE, info, boundary=boundary,
                                          views=views, augment=augment, seed=0), model


def test_the_boundary_is_the_input_of_the_lowest_block_the_search_may_unfreeze(mobilenet):
    backbone, weights = mobilenet
    model = backbone.build(SIZE, weights)
    blocks = backbone.blocks(model)
    assert classifier.boundary_layer(backbone, model, 2) == blocks[-2][0].name == "block_16_expand"
    assert classifier.boundary_layer(backbone, model, 5) == "block_13_expand"
    assert classifier.boundary_layer(backbone, model, 0) is None
    assert classifier.boundary_layer(backbone, model, len(blocks)) is None


def test_lower_then_upper_part_is_the_whole_backbone(mobilenet):
    backbone, weights = mobilenet
    model = backbone.build(SIZE, weights)
    boundary = classifier.boundary_layer(backbone, model, 3)
    images = np.random.default_rng(0).uniform(0, 255, size=(4, *SIZE, 3)).astype("float32")
    lower = classifier.build_feature_extractor(backbone, weights, SIZE, up_to=boundary)
    upper = classifier.upper_backbone(model, boundary)
    whole = classifier.build_feature_extractor(backbone, weights, SIZE)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(upper(lower(images))),
                               keras.ops.convert_to_numpy(whole(images)), rtol=1e-4, atol=1e-5)


def test_validation_activations_are_the_clean_lower_output(tfrecord_data, tmp_path, mobilenet):
    info = data_info.inspect_data(str(tfrecord_data))
    cache, _ = _cache(tmp_path, mobilenet, info)
    assert set(cache.ensure()) == {"train", "validation"}
    cached = np.concatenate([x.numpy() for x, _ in cache.dataset("validation", 4)])
    lower = classifier.build_feature_extractor(*mobilenet, SIZE, up_to=cache.boundary)
    direct = np.concatenate([keras.ops.convert_to_numpy(lower(x)) for x, _ in
                             records.image_dataset(info, "validation", SIZE, 4)])
    assert cached.dtype == np.float32 and cached.shape == direct.shape
    np.testing.assert_allclose(cached, direct, rtol=1e-3, atol=1e-4)


def test_each_training_image_has_distinct_augmented_views_and_epochs_draw_among_them(tfrecord_data, tmp_path,
                                                                                       mobilenet):
    import tensorflow as tf

    info = data_info.inspect_data(str(tfrecord_data))
    cache, _ = _cache(tmp_path, mobilenet, info, views=3)
    cache.ensure(["train"])
    stored = list(tf.data.Dataset.load(cache.split_path("train")).as_numpy_iterator())
    assert len(stored) == info.size("train")
    views, _ = stored[0]
    assert views.shape[0] == 3 and views.dtype == tf.bfloat16.as_numpy_dtype
    views = views.astype(np.float32)
    scale = np.abs(views).max()
    assert scale > 0
    assert np.abs(views[0] - views[1]).max() > 0.01 * scale and np.abs(views[1] - views[2]).max() > 0.01 * scale

    def epoch():
        x, y = zip(*[(a.numpy(), b.numpy()) for a, b in cache.dataset("train", 64, shuffle=True, seed=1)])
        return np.concatenate(x), np.concatenate(y)

    def view_of(x):
        for label_views in stored:
            for v, view in enumerate(label_views[0]):
                if np.array_equal(view.astype(np.float32), x):
                    return v
        raise AssertionError("an epoch returned activations that are not a stored view")

    first, labels = epoch()
    second, _ = epoch()
    assert len(first) == info.size("train")
    assert sorted(labels.tolist()) == sorted(int(y) for _, y in stored)
    drawn = [view_of(x) for x in np.concatenate([first, second])]
    assert len(set(drawn)) == 3


def test_the_cache_is_reused_and_changes_with_views_and_augmentation(tfrecord_data, tmp_path, mobilenet):
    info = data_info.inspect_data(str(tfrecord_data))
    first, _ = _cache(tmp_path, mobilenet, info, views=2)
    first.ensure()
    again, _ = _cache(tmp_path, mobilenet, info, views=2)
    assert again.path == first.path and again.ensure() == {}
    assert _cache(tmp_path, mobilenet, info, views=3)[0].path != first.path
    assert _cache(tmp_path, mobilenet, info, views=2, augment=AugmentConfig(zoom=0.2))[0].path != first.path


def test_a_search_fine_tunes_on_the_cache_the_final_model_on_images_and_a_rerun_builds_no_cache(tfrecord_data, tmp_path, caplog):
    caplog.set_level("INFO", logger="trainer")
    job = tmp_path / "job"
    args = ["--data", str(tfrecord_data), "--job-dir", str(job), "--weights", "none", "--image-size", "32",
            "--epochs", "2", "--tuner", "random", "--max-trials", "2", "--finetune-cache", "2",
            "--search-space", json.dumps({"finetune_depth": [1, 2], "dense_layers": 0})]
    assert main(args) == 0
    messages = [r.getMessage() for r in caplog.records]
    assert sum(m.startswith("fine-tune cache: train, ") for m in messages) == 1
    assert any("fine-tuning on freshly augmented images" in m for m in messages)
    assert len(list((job / "cache").glob("*-finetune-block_16_expand-2v-*/train/DONE"))) == 1
    summary = json.loads((job / "summary.json").read_text())
    assert summary["best_hyperparameters"]["finetune_depth"] in (1, 2)
    assert (job / "export" / str(summary["export_version"]) / "saved_model.pb").exists()

    shutil.rmtree(next((job / "cache").glob("*-finetune-*")))
    assert main([*args, "--no-export"]) == 0
    assert not list((job / "cache").glob("*-finetune-*")), "a finished search must not rebuild the activation cache"


def test_a_fine_tune_on_the_cache_trains_the_classifier_s_own_backbone_layers(tfrecord_data, tmp_path, mobilenet):
    import keras_tuner as kt

    from trainer.data.inputs import TrialInputs
    from trainer.search import hypermodel
    from trainer.search import space as search_space

    info = data_info.inspect_data(str(tfrecord_data))
    cache, _ = _cache(tmp_path, mobilenet, info, views=2)
    cache.ensure()
    backbone, weights = mobilenet
    space = search_space.resolve_space({"finetune_depth": 2, "dense_layers": 0}, num_blocks=18, num_train=30)
    pooled = features.FeatureCache(str(tmp_path), backbone, weights, SIZE, info, keep_maps=False)
    pooled.ensure()
    inputs = TrialInputs(
        lambda split, pooling=None: pooled.dataset(split, 8, shuffle=split == "train", pooling=pooling),
        lambda split, augment=False: pytest.fail("a cached fine-tune must not read images"),
        activations=lambda split: cache.dataset(split, 8, shuffle=split == "train"),
        boundary=cache.boundary, max_cached_depth=2)
    builder = hypermodel.TransferHyperModel(backbone, weights, SIZE, info.num_classes, space, inputs, epochs=1)
    hp = kt.HyperParameters()
    model = builder.build(hp)
    top = model.get_layer("mobilenetv2_1.00_32").get_layer("Conv_1").get_weights()[0].copy()
    stem = model.get_layer("mobilenetv2_1.00_32").get_layer("Conv1").get_weights()[0].copy()
    result = builder.fit(hp, model)
    assert set(result) == {"val_loss", "val_accuracy", "accuracy", "loss"}
    backbone_model = model.get_layer("mobilenetv2_1.00_32")
    assert np.abs(backbone_model.get_layer("Conv_1").get_weights()[0] - top).max() > 1e-6
    np.testing.assert_array_equal(backbone_model.get_layer("Conv1").get_weights()[0], stem)


def test_a_search_that_never_fine_tunes_caches_nothing_and_says_so(tfrecord_data, tmp_path, caplog):
    caplog.set_level("INFO", logger="trainer")
    job = tmp_path / "job"
    rc = main(["--data", str(tfrecord_data), "--job-dir", str(job), "--weights", "none", "--image-size", "32",
               "--epochs", "1", "--tuner", "random", "--max-trials", "1", "--finetune-cache", "2", "--no-export",
               "--search-space", json.dumps({"finetune_depth": 0})])
    assert rc == 0
    assert any("no trial fine-tunes" in r.getMessage() for r in caplog.records)
    assert not list((job / "cache").glob("*-finetune-*"))
