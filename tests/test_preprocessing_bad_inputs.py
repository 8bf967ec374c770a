"""One real Beam run over a class-folder tree full of awkward files: each is converted or explained once.

The run uses the in-process FnApiRunner (one worker) so the many assertions
below share one quick pipeline; the multi-process runner is exercised by the
CLI and real-data tests.
"""

from __future__ import annotations

import io
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from preprocessing import readback, splits
from preprocessing.config import PreprocessConfig
from preprocessing.job import run

IN_PROCESS = ["--direct_num_workers=1", "--direct_running_mode=in_memory"]
SIZE = 24


def _save(path, image: Image.Image, fmt: str, **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=fmt, **kwargs)


def _photo(seed: int, size=(40, 30)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


# Odd images that must be converted (name -> writer).
CONVERTED = {
    "cat/cmyk.jpg": lambda p: _save(p, Image.new("CMYK", (30, 20), (0, 255, 255, 0)), "JPEG"),
    "cat/sixteen bit.png": lambda p: _save(p, Image.fromarray(np.full((20, 20), 40000, np.uint16)), "PNG"),
    "cat/gray.png": lambda p: _save(p, Image.new("L", (20, 30), 90), "PNG"),
    "cat/rgba.png": lambda p: _save(p, Image.new("RGBA", (20, 20), (255, 0, 0, 128)), "PNG"),
    "cat/palette-transparent.png": lambda p: _save(p, Image.new("P", (20, 20), 0), "PNG", transparency=0),
    "cat/exif-rotated.jpg": lambda p: _save(p, _photo(5, (40, 20)), "JPEG", exif=_orientation(6)),
    "cat/one pixel.png": lambda p: _save(p, Image.new("RGB", (1, 1), (1, 2, 3)), "PNG"),
    "dog/naïve café ø.jpg": lambda p: _save(p, _photo(6), "JPEG"),
    "dog/animated.gif": lambda p: _save(p, Image.new("P", (20, 20), 3), "GIF"),
    "dog/bitmap.bmp": lambda p: _save(p, _photo(7), "BMP"),
    "dog/webp.webp": lambda p: _save(p, _photo(8), "WEBP"),
    "dog/tiff.tif": lambda p: _save(p, _photo(9), "TIFF"),
}

# Inputs that must be rejected, each with a reason fragment and stage.
REJECTED = {
    "cat/zero bytes.jpg": (lambda p: p.write_bytes(b""), "empty file", "read"),
    "cat/truncated.jpg": (lambda p: p.write_bytes(_jpeg(_photo(10, (64, 64)))[:300]), "truncated", "decode"),
    "dog/text.jpg": (lambda p: p.write_text("not a picture\n"), "not an image", "decode"),
    "dog/image.ppm": (lambda p: _save(p, _photo(11), "PPM"), "unsupported image format PPM", "decode"),
    "dog/bomb.png": (lambda p: _save(p, Image.new("L", (2000, 1500)), "PNG"), "too large", "decode"),
    # listed, then reported (Beam's own listing would have dropped it without a word)
    "cat/broken link.jpg": (lambda p: p.symlink_to(p.parent / "nowhere.jpg"), "file not found", "read"),
}


# Exact copies of rejected inputs: rejected as well, with the same reason, not counted as duplicates.
BROKEN_COPIES = {"dog/copy of text.jpg": "dog/text.jpg", "cat/copy of truncated.jpg": "cat/truncated.jpg"}


def _orientation(value: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif.tobytes()


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def awkward(tmp_path_factory):
    """(input root, output data folder) after one run over the awkward tree."""
    root = tmp_path_factory.mktemp("awkward") / "images"
    for index in range(6):
        _save(root / "cat" / f"plain_{index}.jpg", _photo(100 + index), "JPEG")
        _save(root / "dog" / f"plain_{index}.png", _photo(200 + index), "PNG")
    for name, write in CONVERTED.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        write(root / name)
    for name, (write, _, _) in REJECTED.items():
        write(root / name)
    shutil.copy(root / "cat" / "plain_0.jpg", root / "dog" / "copy of cat plain_0.jpg")  # exact duplicate
    for copy, original in BROKEN_COPIES.items():
        shutil.copy(root / original, root / copy)
    (root / "empty_class").mkdir()
    (root / "cat" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")  # hidden: not an input
    (root / "NOTES.txt").write_text("top-level files are not inputs")
    out = root.parent / "data"
    run(
        PreprocessConfig(input=str(root), output=str(out), image_size=(SIZE, SIZE), max_pixels=1_000_000,
                         progress_seconds=0),
        IN_PROCESS,
    )
    return root, out


def _inputs(root) -> int:
    return sum(1 for dirpath, _, names in os.walk(root) for name in names
               if not name.startswith(".") and dirpath != str(root))


def _records(out) -> list[dict]:
    return [record for split in ("train", "validation", "test") for record in readback.read_records(str(out), split)]


def test_every_input_is_accounted_for(awkward):
    root, out = awkward
    totals = readback.read_stats(str(out))["totals"]
    assert totals["found"] == _inputs(root) == len(CONVERTED) + len(REJECTED) + len(BROKEN_COPIES) + 12 + 1
    assert totals["written"] + totals["rejected"] + totals["duplicates"] == totals["found"]
    assert totals == {"found": totals["found"], "written": len(CONVERTED) + 12,
                      "rejected": len(REJECTED) + len(BROKEN_COPIES), "duplicates": 1}


@pytest.mark.parametrize("name", sorted(REJECTED))
def test_broken_input_appears_once_in_errors_with_reason_and_stage(awkward, name):
    root, out = awkward
    _, reason, stage = REJECTED[name]
    matches = [error for error in readback.read_errors(str(out)) if error["path"] == str(root / name)]
    assert len(matches) == 1
    assert reason in matches[0]["reason"] and matches[0]["stage"] == stage


@pytest.mark.parametrize("copy", sorted(BROKEN_COPIES))
def test_an_exact_copy_of_a_broken_input_is_rejected_too_not_counted_as_a_duplicate(awkward, copy):
    root, out = awkward
    errors = {error["path"]: error for error in readback.read_errors(str(out))}
    original = errors[str(root / BROKEN_COPIES[copy])]
    assert errors[str(root / copy)]["reason"] == original["reason"]
    assert errors[str(root / copy)]["stage"] == original["stage"] == "decode"


@pytest.mark.parametrize("name", sorted(CONVERTED))
def test_odd_image_is_converted_to_rgb_of_the_requested_size(awkward, name):
    root, out = awkward
    record = next(r for r in _records(out) if r["image/source_id"] == str(root / name))
    image = Image.open(io.BytesIO(record["image/encoded"]))
    assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (SIZE, SIZE))
    assert (record["image/height"], record["image/width"], record["image/format"]) == (SIZE, SIZE, "jpeg")


def test_exact_duplicates_are_written_once(awkward):
    root, out = awkward
    records = _records(out)
    shas = [record["image/key/sha256"] for record in records]
    assert len(shas) == len(set(shas))
    ids = {record["image/source_id"] for record in records}
    assert str(root / "cat" / "plain_0.jpg") in ids and str(root / "dog" / "copy of cat plain_0.jpg") not in ids
    stats = readback.read_stats(str(out))
    assert stats["by_class"]["dog"]["duplicates"] == 1
    assert stats["duplicate_label_conflicts"] == 1  # the copy sits in dog/, the kept original in cat/


def test_labels_are_the_non_empty_class_folders_sorted_and_ids_match(awkward):
    _, out = awkward
    labels = (out / "labels.txt").read_text().splitlines()
    assert labels == ["cat", "dog"]
    assert all(labels[r["image/class/label"]] == r["image/class/text"] for r in _records(out))


def test_empty_class_folder_is_reported_not_trained_on(awkward):
    root, out = awkward
    assert readback.read_stats(str(out))["empty_class_folders"] == [str(root / "empty_class")]


def test_splits_come_from_the_sha256_of_each_file(awkward):
    _, out = awkward
    fractions = tuple(readback.read_stats(str(out))["options"]["split"])
    for split in ("train", "validation", "test"):
        for record in readback.read_records(str(out), split):
            assert splits.split_for(record["image/key/sha256"], fractions) == split


def test_stats_name_the_options_the_trainer_needs(awkward):
    _, out = awkward
    stats = readback.read_stats(str(out))
    assert stats["options"]["image_size"] == [SIZE, SIZE]
    assert stats["options"]["resize_mode"] == "stretch" and stats["options"]["image_format"] == "jpeg"
    assert sum(stats["image_sizes"]["long_side_histogram"].values()) == stats["totals"]["written"]
    assert stats["run"]["seconds"] > 0 and stats["run"]["images_per_second"] > 0


def test_per_split_and_per_class_counts_add_up(awkward):
    _, out = awkward
    stats = readback.read_stats(str(out))
    for outcome in ("found", "written", "rejected", "duplicates"):
        assert sum(stats[outcome].values()) == stats["totals"][outcome]
        assert sum(row[outcome] for row in stats["by_class"].values()) == stats["totals"][outcome]
    for split in ("train", "validation", "test"):
        assert stats["written"][split] == len(readback.read_records(str(out), split))


def test_unreadable_file_is_rejected_with_a_reason(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("running as root: chmod 000 does not stop root from reading (the manifest tests cover "
                    "unreadable paths with a folder named like an image)")
    root = tmp_path / "images"
    for label in ("a", "b"):
        for index in range(2):
            _save(root / label / f"{index}.png", _photo(index + ord(label)), "PNG")
    locked = root / "a" / "locked.png"
    _save(locked, _photo(1), "PNG")
    locked.chmod(0)
    run(PreprocessConfig(input=str(root), output=str(tmp_path / "data"), image_size=(8, 8), progress_seconds=0), IN_PROCESS)
    errors = readback.read_errors(str(tmp_path / "data"))
    assert [(e["path"], e["stage"]) for e in errors] == [(str(locked), "read")]
    assert "permission denied" in errors[0]["reason"]
