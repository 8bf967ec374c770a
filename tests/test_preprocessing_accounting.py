"""The job's accounting comes from what the pipeline writes, not from the runner's metrics.

A runner may report no metrics, report them late, or report only attempted
values. Before, the job read its counts from Beam metrics, so on such a runner
``written`` read 0 and the "no usable images" refusal deleted a good output.
These tests run the real pipeline (in-process runner) with the metrics query
made to answer as such runners do.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from preprocessing import stats
from preprocessing.config import PreprocessConfig
from preprocessing.job import run

IN_PROCESS = ["--direct_num_workers=1", "--direct_running_mode=in_memory"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for label in ("cat", "dog"):
        (root / label).mkdir()
        for i in range(6):
            pixels = rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / label / f"{i}.png")
    (root / "dog" / "copy.png").write_bytes((root / "dog" / "0.png").read_bytes())
    (root / "cat" / "broken.jpg").write_bytes(b"not a picture")
    return root


def _run(photos, out, monkeypatch, metrics) -> dict:
    monkeypatch.setattr(stats, "query_counts", lambda result: metrics)
    config = PreprocessConfig(input=str(photos), output=str(out), image_size=(16, 16), progress_seconds=0)
    return run(config, IN_PROCESS)


def test_a_runner_reporting_no_metrics_keeps_the_output_and_the_counts(photos, tmp_path, monkeypatch, caplog):
    caplog.set_level("INFO", logger="preprocessing")
    result = _run(photos, tmp_path / "data", monkeypatch, ({}, {}, "beam metrics"))
    assert result["totals"] == {"found": 14, "written": 12, "rejected": 1, "duplicates": 1}
    assert result["accounted"] and result["cross_check"]["beam_metrics"] == "unavailable"
    on_disk = json.loads((tmp_path / "data" / "stats.json").read_text())
    assert on_disk["totals"]["written"] == 12 and on_disk["image_sizes"]["width"]["count"] == 12
    assert sorted(p.name for p in (tmp_path / "data").iterdir() if p.suffix == ".tfrecord")
    assert not (tmp_path / "data" / stats.COUNTS_FILE).exists()
    assert "reported no metrics" in caplog.text


def test_metrics_that_disagree_are_reported_and_the_output_is_kept(photos, tmp_path, monkeypatch, caplog):
    attempted_twice = {"found:train:cat": 20, "written:train:cat": 18}  # e.g. retried bundles counted twice
    result = _run(photos, tmp_path / "data", monkeypatch, (attempted_twice, {}, "beam metrics"))
    assert result["totals"]["written"] == 12
    assert result["cross_check"]["beam_metrics"] == "disagree"
    assert result["cross_check"]["beam_metrics_totals"]["written"] == 18
    assert (tmp_path / "data" / "stats.json").exists()
    assert "disagree with the pipeline's own counts" in caplog.text
