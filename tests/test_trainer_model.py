"""Backbones, the model a trial builds, fine-tune depth in blocks, frozen batch normalization, the search space."""

from __future__ import annotations

import keras
import keras_tuner as kt
import numpy as np
import pytest

from trainer.model import backbones, classifier

from trainer.data.inputs import TrialInputs
from trainer.search import hypermodel
from trainer.search import space as search_space
from trainer.config import UserError

SIX = {"mobilenet_v2", "efficientnet_b0", "resnet50", "vgg16", "densenet121", "xception"}


CURRENT = ("efficientnet_v2_b0", "efficientnet_v2_s", "convnext_tiny", "mobilenet_v3_large")


def test_the_registry_offers_the_six_backbones_by_lower_case_name():
    assert SIX <= set(backbones.REGISTRY)
    with pytest.raises(UserError, match="alexnet"):
        backbones.get_backbone("alexnet")


def test_the_cli_choices_are_the_registry():
    from trainer.config import BACKBONES

    assert list(BACKBONES) == list(backbones.REGISTRY)


@pytest.mark.parametrize("name", CURRENT)
def test_a_current_backbone_groups_its_layers_into_blocks_above_its_stem(name):
    """The newer keras.applications families: blocks for the fine-tune depth, preprocessing inside the network."""
    backbone = backbones.get_backbone(name)
    model = backbone.build((32, 32), None)
    blocks = backbone.blocks(model)
    assert len(blocks) >= 15
    in_blocks = {layer.name for block in blocks for layer in block}
    stem = [layer.name for layer in model.layers[1:] if layer.name not in in_blocks]
    assert stem and all("stem" in n or n.startswith(("conv", "activation", "rescaling", "normalization"))
                        for n in stem), stem
    assert backbone.preprocess == "none"  # include_preprocessing: the network takes 0-255 pixels itself
    classifier.set_finetune_depth(model, backbone, 1)
    assert {layer.name for layer in model.layers if layer.trainable and layer.weights} <= {l.name for l in blocks[-1]}


@pytest.mark.parametrize("name", CURRENT)
def test_a_current_backbone_builds_a_classifier_that_trains_a_step(name):
    backbone = backbones.get_backbone(name)
    space = search_space.resolve_space({"finetune_depth": 1, "dense_layers": 0}, num_blocks=16, num_train=30)
    model = hypermodel.TransferHyperModel(backbone, None, (32, 32), 3, space, epochs=1).build(kt.HyperParameters())
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    loss = model.train_on_batch(np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32"),
                                np.array([0, 1, 2, 0]))
    assert np.isfinite(float(np.asarray(loss).reshape(-1)[0]))


@pytest.mark.parametrize("name, module", [("mobilenet_v2", keras.applications.mobilenet_v2),
                                          ("xception", keras.applications.xception),
                                          ("resnet50", keras.applications.resnet50),
                                          ("vgg16", keras.applications.vgg16),
                                          ("densenet121", keras.applications.densenet)])
def test_built_in_preprocessing_matches_keras_applications(name, module):
    images = np.random.default_rng(0).uniform(0, 255, size=(2, 8, 8, 3)).astype("float32")
    layer = classifier.BackbonePreprocess(backbones.get_backbone(name).preprocess)
    expected = module.preprocess_input(images.copy())
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer(images)), expected, rtol=1e-5, atol=1e-4)


def test_mobilenet_v2_blocks_run_from_the_first_bottleneck_to_the_top_conv():
    backbone = backbones.get_backbone("mobilenet_v2")
    blocks = backbone.blocks(backbone.build((32, 32), None))
    assert len(blocks) == 18
    assert blocks[0][0].name.startswith("expanded_conv")
    assert [layer.name for layer in blocks[-1]] == ["Conv_1", "Conv_1_bn", "out_relu"]
    assert {layer.name.split("_")[1] for layer in blocks[-2]} == {"16"}


def test_finetune_depth_unfreezes_only_the_top_blocks_and_never_batch_norm():
    backbone = backbones.get_backbone("mobilenet_v2")
    model = backbone.build((32, 32), None)
    classifier.set_finetune_depth(model, backbone, 2)
    trainable = [layer for layer in model.layers if layer.trainable and layer.weights]
    assert trainable
    assert {layer.name.split("_")[0] + "_" + layer.name.split("_")[1] for layer in trainable} <= {"block_16", "Conv_1"}
    assert not any(isinstance(layer, keras.layers.BatchNormalization) and layer.trainable for layer in model.layers)
    classifier.set_finetune_depth(model, backbone, 0)
    assert not model.trainable_weights


def test_default_depth_follows_the_size_of_the_data():
    assert search_space.default_max_depth(300, 18) == 2
    assert search_space.default_max_depth(5000, 18) == 5
    assert search_space.default_max_depth(50000, 18) == 9
    assert search_space.default_max_depth(500000, 18) == 18


def test_the_search_space_file_fixes_chooses_and_widens():
    space = search_space.resolve_space({"pooling": "flatten", "dense_layers": [0, 2],
                                      "finetune_depth": {"min": 0, "max": 6}}, num_blocks=18, num_train=100)
    assert space["pooling"] == {"value": "flatten"}
    assert space["dense_layers"] == {"values": [0, 2]}
    assert space["finetune_depth"] == {"min": 0, "max": 6}
    with pytest.raises(UserError, match="finetune_depth"):
        search_space.resolve_space({"finetune_depth": 40}, num_blocks=18, num_train=100)
    with pytest.raises(UserError, match="pooling"):
        search_space.resolve_space({"pooling": "median"}, num_blocks=18, num_train=100)


def _hypermodel(classes=3, space=None, inputs=None):
    backbone = backbones.get_backbone("mobilenet_v2")
    space = space or search_space.resolve_space({}, num_blocks=18, num_train=30)
    return hypermodel.TransferHyperModel(backbone, None, (32, 32), classes, space, inputs, epochs=1)


def test_the_built_model_takes_0_255_pixels_and_returns_a_float32_softmax_even_in_mixed_precision():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = _hypermodel().build(kt.HyperParameters())
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert tuple(model.input.shape) == (None, 32, 32, 3)
    assert model.output.dtype == "float32"
    out = keras.ops.convert_to_numpy(model(np.full((2, 32, 32, 3), 128.0, "float32")))
    assert out.shape == (2, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-3)


def test_creating_a_tuner_declares_every_conditional_hyperparameter_without_building_a_backbone(tmp_path, monkeypatch):
    from trainer.search import tuner as search
    from trainer.config import TrainConfig

    space = search_space.resolve_space({"dense_layers": [0, 1, 2], "optimizer": ["adam", "sgd"],
                                      "finetune_depth": [0, 1]}, num_blocks=18, num_train=30)
    model_builder = _hypermodel(space=space)
    builds = []
    monkeypatch.setattr(classifier, "build_classifier", lambda *args: builds.append(1))
    tuner = search.create_tuner(model_builder, TrainConfig(data_dir=str(tmp_path), job_dir=str(tmp_path),
                                                           tuner="random", max_trials=1))
    declared = {hp.name for hp in tuner.oracle.get_space().space}
    assert {"dense_units_1", "dense_units_2", "momentum", "finetune_learning_rate"} <= declared
    assert builds == []


def test_seed_0_samples_the_same_trials_every_time(tmp_path):
    """Keras Tuner reads seed 0 as 'no seed' (``seed or random.randint``): the demo's --seed 0 sampled anew each run."""
    from trainer.search import tuner as search
    from trainer.config import TrainConfig

    samples = []
    for run in range(2):
        config = TrainConfig(data_dir=str(tmp_path), job_dir=str(tmp_path / str(run)), tuner="random", max_trials=3,
                             seed=0)
        oracle = search.create_tuner(_hypermodel(), config).oracle
        samples.append([oracle.populate_space(str(i))["values"] for i in range(3)])
    assert samples[0] == samples[1]


def test_the_model_has_no_augmentation_layers():
    model = _hypermodel().build(kt.HyperParameters())
    names = [type(layer).__name__ for layer in model._flatten_layers()]
    assert not [n for n in names if n.startswith("Random")]


def test_fine_tuning_moves_the_unfrozen_weights_but_not_batch_norm_statistics(tfrecord_data):
    from trainer.data import info as data_info
    from trainer.data import records

    info = data_info.inspect_data(str(tfrecord_data))
    images = lambda split, augment=False: records.image_dataset(info, split, (32, 32), 8, shuffle=split == "train")  # noqa: E731
    features = lambda split, pooling=None: pytest.fail("a warm-started fine-tune must not train the head on features")  # noqa: E731,E501
    space = search_space.resolve_space({"finetune_depth": 2, "optimizer": "adam", "finetune_learning_rate": 1e-2},
                                     num_blocks=18, num_train=30)
    model_builder = _hypermodel(space=space, inputs=TrialInputs(features, images))
    hp = kt.HyperParameters()
    model = model_builder.build(hp)
    hp.values["tuner/trial_id"] = "warm"  # a Hyperband continuation: the fine-tune phase only
    backbone_model = classifier.find_backbone(model)
    norms = [layer for layer in backbone_model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    stats_before = [keras.ops.convert_to_numpy(v).copy() for layer in norms
                    for v in (layer.moving_mean, layer.moving_variance)]
    kernel_before = keras.ops.convert_to_numpy(backbone_model.get_layer("Conv_1").kernel).copy()
    stem_before = keras.ops.convert_to_numpy(backbone_model.get_layer("Conv1").kernel).copy()
    model_builder.fit(hp, model, epochs=1)
    stats_after = [keras.ops.convert_to_numpy(v) for layer in norms for v in (layer.moving_mean, layer.moving_variance)]
    for before, after in zip(stats_before, stats_after):
        np.testing.assert_array_equal(before, after)
    assert not np.array_equal(kernel_before, keras.ops.convert_to_numpy(backbone_model.get_layer("Conv_1").kernel))
    np.testing.assert_array_equal(stem_before, keras.ops.convert_to_numpy(backbone_model.get_layer("Conv1").kernel))
    assert "phase2" in model_builder.last_history and "phase1" not in model_builder.last_history
