"""The whole clothing-small photo set through the default (multi-process) runner: counts match SOURCE.md."""

from __future__ import annotations

import re

import pytest
import tensorflow as tf

from preprocessing import readback, tfrecords
from preprocessing.config import PreprocessConfig
from preprocessing.job import run

pytestmark = pytest.mark.slow


def _source_counts(clothing_dir) -> dict:
    """{(split, class): count} from the table in SOURCE.md."""
    counts = {}
    for line in (clothing_dir / "SOURCE.md").read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 5 and re.fullmatch(r"\d+", cells[1]) and not cells[0].startswith("**"):
            for split, value in zip(("train", "validation", "test"), cells[1:4]):
                counts[(split, cells[0])] = int(value)
    return counts


def test_clothing_small_is_written_completely_per_split_and_class(clothing_dir, tmp_path):
    expected = _source_counts(clothing_dir)
    assert sum(expected.values()) == 3781
    out = tmp_path / "data"
    stats = run(PreprocessConfig(input=str(clothing_dir), output=str(out), image_size=(64, 64), progress_seconds=0))
    assert stats["totals"] == {"found": 3781, "written": 3781, "rejected": 0, "duplicates": 0}
    assert readback.read_errors(str(out)) == []
    written = {(split, label): row["written"]
               for split, labels in stats["by_split_and_class"].items() for label, row in labels.items()}
    assert written == expected
    for split in ("train", "validation", "test"):
        shards = tfrecords.list_shards(str(out), split)
        assert sum(1 for _ in tf.data.TFRecordDataset(shards)) == stats["written"][split]
    assert (out / "labels.txt").read_text().splitlines() == sorted({label for _, label in expected})
    assert stats["ignored_files"] == 3  # LICENSE, README.md, SOURCE.md at the top of the folder
