"""Splits chosen from each file's sha256: the requested shares, and stable when files are added."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from PIL import Image

from preprocessing import readback, splits
from preprocessing.config import PreprocessConfig, parse_image_size, parse_split
from preprocessing.errors import PreprocessingError
from preprocessing.job import run

IN_PROCESS = ["--direct_num_workers=1", "--direct_running_mode=in_memory"]


def test_split_shares_follow_the_fractions():
    digests = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(20000)]
    chosen = [splits.split_for(d, (0.8, 0.1, 0.1)) for d in digests]
    assert abs(chosen.count("train") / len(chosen) - 0.8) < 0.02
    assert abs(chosen.count("test") / len(chosen) - 0.1) < 0.02


def test_zero_share_split_gets_nothing():
    digests = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(2000)]
    assert {splits.split_for(d, (0.9, 0.0, 0.1)) for d in digests} == {"train", "test"}


@pytest.mark.parametrize("text, expected", [("96", (96, 96)), ("128x96", (96, 128)), ("64X32", (32, 64))])
def test_image_size_is_one_number_or_width_x_height(text, expected):
    assert parse_image_size(text) == expected


@pytest.mark.parametrize("text", ["", "0", "12x", "axb", "1x2x3"])
def test_bad_image_size_is_refused(text):
    with pytest.raises(PreprocessingError, match="--image-size"):
        parse_image_size(text)


def test_split_option_is_normalised_to_fractions():
    assert parse_split("80,10,10") == pytest.approx((0.8, 0.1, 0.1))
    with pytest.raises(PreprocessingError, match="--split"):
        parse_split("80,20")


def _images(root, start, stop):
    for index in range(start, stop):
        label = "even" if index % 2 == 0 else "odd"
        (root / label).mkdir(parents=True, exist_ok=True)
        pixels = np.random.default_rng(index).integers(0, 255, (12, 12, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / label / f"{index}.png")


def _split_of_each(out) -> dict:
    return {r["image/source_id"]: split for split in ("train", "validation", "test")
            for r in readback.read_records(str(out), split)}


def test_adding_files_and_rerunning_never_moves_an_image_between_splits(tmp_path):
    root = tmp_path / "images"
    _images(root, 0, 30)
    config = dict(input=str(root), image_size=(8, 8), split=(0.6, 0.2, 0.2), progress_seconds=0)
    run(PreprocessConfig(output=str(tmp_path / "first"), **config), IN_PROCESS)
    _images(root, 30, 60)
    run(PreprocessConfig(output=str(tmp_path / "second"), **config), IN_PROCESS)
    first, second = _split_of_each(tmp_path / "first"), _split_of_each(tmp_path / "second")
    assert len(first) == 30 and len(second) == 60
    assert {path: second[path] for path in first} == first
    assert set(second.values()) == {"train", "validation", "test"}


def test_the_job_records_the_carve_histogram_the_trainer_carves_by(tmp_path, caplog):
    """No validation split written: the trainer's carved counts come from stats.json and match the records."""
    from trainer.data import info as data_info
    from trainer.data import records

    _images(tmp_path / "images", 0, 80)
    out = tmp_path / "data"
    run(PreprocessConfig(input=str(tmp_path / "images"), output=str(out), image_size=(8, 8), split=(0.8, 0.0, 0.2),
                         progress_seconds=0), IN_PROCESS)
    with caplog.at_level("INFO", logger="trainer.data"):
        info = data_info.inspect_data(str(out), validation_fraction=0.3)
    assert info.carved_validation
    assert not [r for r in caplog.records if "counting" in r.getMessage()]
    for split in ("train", "validation"):
        labels = records.encoded_examples(info, split)[1]
        assert [list(labels).count(i) for i in range(2)] == info.counts[split]
    assert info.size("train") + info.size("validation") == len(readback.read_records(str(out), "train"))
