"""The trainer's input: checked counts, the carved validation split, image batches, class weights, augmentation."""

from __future__ import annotations

import logging
import pathlib

import numpy as np
import pytest

from conftest import write_tfrecord_data
from trainer.data import info as data_info
from trainer.data import records
from trainer.model.augment import build_augmenter
from trainer.config import AugmentConfig, UserError


@pytest.fixture(scope="module")
def no_validation(tmp_path_factory):
    import json

    root = write_tfrecord_data(tmp_path_factory.mktemp("noval"), per_class=20)
    (root / "validation-00000-of-00001.tfrecord").unlink()
    stats = json.loads((root / "stats.json").read_text())  # as preprocessing writes it for two splits
    stats["by_split_and_class"].pop("validation")
    (root / "stats.json").write_text(json.dumps(stats))
    return root


def test_counts_per_split_and_class_come_from_the_records(tfrecord_data):
    info = data_info.inspect_data(str(tfrecord_data))
    assert info.labels == ["circle", "square", "triangle"]
    assert info.counts == {"train": [10, 10, 10], "validation": [3, 3, 3], "test": [3, 3, 3]}
    assert not info.carved_validation
    assert info.record_size == (32, 32) and info.resize_mode == "stretch"


def test_without_a_validation_split_one_is_carved_from_train(no_validation):
    info = data_info.inspect_data(str(no_validation), validation_fraction=0.25)
    assert info.carved_validation
    train, _ = records.encoded_examples(info, "train")
    validation, _ = records.encoded_examples(info, "validation")
    assert len(train) == info.size("train") and len(validation) == info.size("validation")
    assert 0 < len(validation) < len(train)
    assert not set(train) & set(validation)
    assert len(train) + len(validation) == 3 * 12  # the first 60% of 20 per class were written to train


def test_the_carved_counts_come_from_stats_json_without_reading_a_record(no_validation, caplog):
    with caplog.at_level(logging.INFO, logger="trainer.data"):
        info = data_info.inspect_data(str(no_validation), validation_fraction=0.25)
    assert not [r for r in caplog.records if "counting" in r.getMessage()]
    counted = data_info._count_split(str(no_validation), "train", info.shards["train"], info.labels, True, 0.25)
    assert counted == {"train": info.counts["train"], "validation": info.counts["validation"]}


@pytest.mark.parametrize("change, reason", [
    (lambda stats: stats.pop("carve_histogram"), "no carve histogram"),
    (lambda stats: stats["carve_histogram"]["train"]["circle"].__setitem__(0, 99), "does not add up"),
])
def test_a_folder_without_a_usable_carve_histogram_is_counted_and_says_why(no_validation, tmp_path, caplog, change,
                                                                          reason):
    import json
    import shutil

    folder = tmp_path / "data"
    shutil.copytree(no_validation, folder)
    stats = json.loads((folder / "stats.json").read_text())
    change(stats)
    (folder / "stats.json").write_text(json.dumps(stats))
    with caplog.at_level(logging.INFO, logger="trainer.data"):
        info = data_info.inspect_data(str(folder), validation_fraction=0.25)
    assert any("counting the train records" in r.getMessage() and reason in r.getMessage() for r in caplog.records)
    assert info.counts == data_info.inspect_data(str(no_validation), validation_fraction=0.25).counts


def test_a_fraction_finer_than_the_histogram_is_counted(no_validation, caplog):
    with caplog.at_level(logging.INFO, logger="trainer.data"):
        info = data_info.inspect_data(str(no_validation), validation_fraction=0.255)
    assert any("not a multiple of 1/100" in r.getMessage() for r in caplog.records)
    assert len(records.encoded_examples(info, "validation")[0]) == info.size("validation")


def test_the_carved_split_is_the_same_on_every_run(no_validation):
    first = records.encoded_examples(data_info.inspect_data(str(no_validation)), "validation")[0]
    second = records.encoded_examples(data_info.inspect_data(str(no_validation)), "validation")[0]
    assert first == second


def test_image_batches_are_float_pixels_in_0_255_with_int_labels(tfrecord_data):
    info = data_info.inspect_data(str(tfrecord_data))
    batches = list(records.image_dataset(info, "test", (40, 48), 4))
    images, labels = batches[0]
    assert images.shape == (4, 40, 48, 3) and images.dtype.name == "float32"
    assert labels.dtype.name == "int32"
    assert 0.0 <= float(np.min(images)) and float(np.max(images)) <= 255.0
    assert sum(int(b[1].shape[0]) for b in batches) == info.size("test")


def test_class_weights_balance_an_imbalanced_train_split():
    info = data_info.DataInfo("d", ["a", "b"], None, "stretch", {}, counts={"train": [30, 10]})
    weights = data_info.class_weights(info)
    assert weights[0] == pytest.approx(40 / 60) and weights[1] == pytest.approx(2.0)
    assert weights[0] * 30 == pytest.approx(weights[1] * 10)


def test_augmentation_changes_shuffled_training_batches_only(tfrecord_data):
    info = data_info.inspect_data(str(tfrecord_data))
    augmenter = build_augmenter(AugmentConfig(flip=False, rotation=0.2, zoom=0.2, contrast=0.3), seed=1)
    plain = next(iter(records.image_dataset(info, "train", (32, 32), 30, shuffle=True, seed=5)))[0].numpy()
    augmented = next(iter(records.image_dataset(info, "train", (32, 32), 30, shuffle=True, seed=5,
                                             augmenter=augmenter)))[0].numpy()
    assert not np.allclose(plain, augmented)
    assert augmented.min() >= 0.0 and augmented.max() <= 255.0
    evaluation = next(iter(records.image_dataset(info, "test", (32, 32), 9, augmenter=augmenter)))[0].numpy()
    reference = next(iter(records.image_dataset(info, "test", (32, 32), 9)))[0].numpy()
    np.testing.assert_array_equal(evaluation, reference)


def test_switching_every_augmentation_off_means_no_augmenter():
    assert build_augmenter(AugmentConfig(enabled=False), seed=0) is None
    assert build_augmenter(AugmentConfig(flip=False, rotation=0, zoom=0, contrast=0), seed=0) is None


def test_counts_come_from_stats_json_without_reading_a_record(tfrecord_data, monkeypatch):
    def no_reading(*args, **kwargs):
        raise AssertionError("a record was read to count")

    monkeypatch.setattr(data_info, "_count_split", no_reading)
    info = data_info.inspect_data(str(tfrecord_data))
    assert info.counts == {"train": [10, 10, 10], "validation": [3, 3, 3], "test": [3, 3, 3]}


def test_a_folder_without_stats_json_is_counted_and_says_so(tfrecord_data, tmp_path, caplog):
    import shutil

    copy = pathlib.Path(shutil.copytree(tfrecord_data, tmp_path / "data"))
    (copy / "stats.json").unlink()
    with caplog.at_level(logging.INFO, logger="trainer.data"):
        info = data_info.inspect_data(str(copy))
    assert info.counts == data_info.inspect_data(str(tfrecord_data)).counts
    assert any("counting the train records" in r.getMessage() for r in caplog.records)


def test_a_missing_shard_is_named_before_training(tfrecord_data, tmp_path):
    import shutil

    copy = pathlib.Path(shutil.copytree(tfrecord_data, tmp_path / "data"))
    (copy / "train-00000-of-00001.tfrecord").rename(copy / "train-00001-of-00002.tfrecord")
    with pytest.raises(UserError, match="train shards are not a complete set"):
        data_info.inspect_data(str(copy))


def test_a_shard_left_empty_by_an_input_rejected_when_converted_is_accepted(tmp_path):
    """Preprocessing picks shard counts from the kept inputs; one that proves not to be an image leaves its shard empty."""
    from preprocessing.config import PreprocessConfig
    from preprocessing.job import run
    from preprocessing.sample_data import SampleSpec, generate

    generate(str(tmp_path / "images"), SampleSpec(per_class=4, seed=1))  # with a truncated and a non-image file
    stats = run(PreprocessConfig(input=str(tmp_path / "images"), output=str(tmp_path / "data"), image_size=(16, 16),
                                 progress_seconds=0), ["--direct_num_workers=1", "--direct_running_mode=in_memory"])
    empty = [name for split in stats["shards"].values() for name, size in split.items() if size == 0]
    assert empty and stats["totals"]["rejected"] == 3
    info = data_info.inspect_data(str(tmp_path / "data"))
    assert {split: sum(per_class) for split, per_class in info.counts.items()} == stats["written"]


def test_workers_read_disjoint_shards_that_cover_the_split(tmp_path):
    data = write_tfrecord_data(tmp_path / "data", shards=3)
    info = data_info.inspect_data(str(data))
    own = [records.worker_shards(info, "train", (index, 2)) for index in range(2)]
    assert sorted(f for files in own for f in files) == info.shards["train"]
    assert not set(own[0]) & set(own[1])
    assert records.worker_shards(info, "train", (0, 4)) is None  # fewer shards than workers: all read everything


def test_a_worker_decodes_only_the_images_of_its_own_shards(tmp_path):
    data = write_tfrecord_data(tmp_path / "data", shards=2)
    info = data_info.inspect_data(str(data))
    labels = []
    for index in range(2):
        files = records.worker_shards(info, "test", (index, 2))
        mine = records._records(info, "test", shuffle=False, seed=0, files=files)
        labels.append(sum(1 for _ in mine))
    assert labels == [len(list(records._records(info, "test", shuffle=False, seed=0, files=[f])))
                      for f in info.shards["test"]]
    assert sum(labels) == info.size("test")
