"""A CSV manifest (path,label[,split]) as input: given splits are kept, bad rows are explained."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from preprocessing import readback
from preprocessing.config import PreprocessConfig
from preprocessing.errors import PreprocessingError
from preprocessing.job import run

IN_PROCESS = ["--direct_num_workers=1", "--direct_running_mode=in_memory"]


def _image(path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(path)


@pytest.fixture(scope="module")
def manifest_run(tmp_path_factory):
    """(folder, output, manifest rows) after one run over a manifest with good and bad rows."""
    base = tmp_path_factory.mktemp("manifest")
    for index in range(8):
        _image(base / "pics" / f"hat_{index}.png", index)
        _image(base / "pics" / f"shoe {index}.jpg", 100 + index)
    _image(base / "elsewhere" / "absolute hat.png", 999)
    (base / "pics" / "a folder.jpg").mkdir()
    (base / "pics" / "dangling.jpg").symlink_to(base / "pics" / "nowhere.jpg")
    rows = ["path,label,split,notes"]
    rows += [f"pics/hat_{index}.png,hat,{'test' if index < 2 else 'train'},ok" for index in range(8)]
    rows += [f'"pics/shoe {index}.jpg",shoe,,from ""catalogue""' for index in range(8)]
    rows += [
        f"{base / 'elsewhere' / 'absolute hat.png'},hat,validation,absolute path",
        "pics/missing.jpg,shoe,,file does not exist",
        "pics/hat_0.png,,,blank label",
        "pics/a folder.jpg,shoe,,a directory",
        "pics/dangling.jpg,shoe,,a broken symlink",
        "pics/hat_1.png,hat,holdout,bad split",
        "",
    ]
    (base / "manifest.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    out = base / "data"
    run(PreprocessConfig(input=str(base / "manifest.csv"), output=str(out), image_size=(16, 16), progress_seconds=0),
        IN_PROCESS)
    return base, out


def _errors_by_path(out) -> dict:
    return {error["path"]: error for error in readback.read_errors(str(out))}


def test_manifest_rows_are_accounted_for(manifest_run):
    _, out = manifest_run
    totals = readback.read_stats(str(out))["totals"]
    assert totals == {"found": 22, "written": 17, "rejected": 5, "duplicates": 0}


def test_given_splits_are_kept(manifest_run):
    base, out = manifest_run
    test_ids = {record["image/source_id"] for record in readback.read_records(str(out), "test")}
    assert {"pics/hat_0.png", "pics/hat_1.png"} <= test_ids
    validation = readback.read_records(str(out), "validation")
    assert str(base / "elsewhere" / "absolute hat.png") in {r["image/source_id"] for r in validation}


def test_relative_paths_resolve_from_the_manifest_folder_and_keep_their_given_name(manifest_run):
    _, out = manifest_run
    ids = {r["image/source_id"] for split in ("train", "validation", "test") for r in readback.read_records(str(out), split)}
    assert {f"shoe {index}.jpg" for index in range(8)} <= {i.rsplit("/", 1)[-1] for i in ids}
    assert "pics/shoe 3.jpg" in ids


@pytest.mark.parametrize(
    "row_path, reason, stage",
    [
        ("pics/missing.jpg", "file not found", "read"),
        ("pics/hat_0.png", "blank label", "list"),
        ("pics/a folder.jpg", "is a folder", "read"),
        ("pics/dangling.jpg", "file not found", "read"),
        ("pics/hat_1.png", "unknown split 'holdout'", "list"),
    ],
    ids=["missing-file", "blank-label", "unreadable-folder", "broken-symlink", "bad-split"],
)
def test_bad_row_is_rejected_with_its_path_and_reason(manifest_run, row_path, reason, stage):
    base, out = manifest_run
    error = _errors_by_path(out)[str(base / row_path)]
    assert reason in error["reason"] and error["stage"] == stage


def test_unknown_columns_are_ignored_and_reported(manifest_run):
    _, out = manifest_run
    assert readback.read_stats(str(out))["input"]["manifest_unknown_columns"] == ["notes"]


def test_manifest_without_a_label_column_is_refused_in_one_line(tmp_path):
    (tmp_path / "m.csv").write_text("file,class\na.jpg,hat\n")
    with pytest.raises(PreprocessingError, match=r"lacks column\(s\) path, label"):
        run(PreprocessConfig(input=str(tmp_path / "m.csv"), output=str(tmp_path / "data")), IN_PROCESS)
    assert not (tmp_path / "data").exists()


def test_a_single_file_that_is_not_a_csv_is_refused_in_one_line(tmp_path):
    _image(tmp_path / "photo.png", 1)
    with pytest.raises(PreprocessingError, match="not a CSV manifest"):
        run(PreprocessConfig(input=str(tmp_path / "photo.png"), output=str(tmp_path / "data")), IN_PROCESS)
