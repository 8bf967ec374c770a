"""The command line: a real multi-process run with no network, one-line errors, staging and --overwrite."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from preprocessing import readback
from preprocessing.cli import main
from preprocessing.sample_data import SampleSpec, generate

IN_PROCESS = ["--direct_num_workers=1", "--direct_running_mode=in_memory"]


def _two_classes(root, per_class=3):
    for label in ("hat", "shoe"):
        for index in range(per_class):
            folder = root / label
            folder.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (20 + index, 20), (index * 40, 0 if label == "hat" else 200, 50)).save(folder / f"{index}.png")
    return root


def _one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if line.startswith("tlp-preprocess: error:")]
    assert len(lines) == 1 and "Traceback" not in err
    return lines[0]


def test_help_documents_the_options_and_beam_passthrough(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--input", "--output", "--image-size", "--resize-mode", "--image-format", "--jpeg-quality",
                 "--split", "--max-pixels", "--num-shards", "--overwrite", "--runner DataflowRunner"):
        assert flag in text


def test_missing_input_is_a_one_line_error(tmp_path, capsys):
    line = _one_line_error(capsys, ["--input", str(tmp_path / "nope"), "--output", str(tmp_path / "d")])
    assert "input not found" in line and str(tmp_path / "nope") in line


def test_folder_without_images_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "in" / "hat").mkdir(parents=True)
    (tmp_path / "in" / "README.md").write_text("no images here")
    line = _one_line_error(capsys, ["--input", str(tmp_path / "in"), "--output", str(tmp_path / "d")])
    assert "no images found" in line


def test_single_class_is_a_one_line_error(tmp_path, capsys):
    root = _two_classes(tmp_path / "in")
    shutil.rmtree(root / "shoe")
    line = _one_line_error(capsys, ["--input", str(root), "--output", str(tmp_path / "d")])
    assert "at least two class" in line and "'hat'" in line


def test_bad_option_value_is_a_one_line_error(tmp_path, capsys):
    root = _two_classes(tmp_path / "in")
    line = _one_line_error(capsys, ["--input", str(root), "--output", str(tmp_path / "d"), "--image-size", "big"])
    assert "--image-size" in line


def test_input_with_only_broken_files_fails_and_leaves_no_output(tmp_path, capsys):
    for label in ("hat", "shoe"):
        (tmp_path / "in" / label).mkdir(parents=True)
        (tmp_path / "in" / label / "x.jpg").write_text("text")
    line = _one_line_error(capsys, ["--input", str(tmp_path / "in"), "--output", str(tmp_path / "d"), *IN_PROCESS])
    assert "no usable images" in line and "not an image" in line
    assert sorted(os.listdir(tmp_path)) == ["in"]  # no output, no staging folder left behind


def test_the_summary_rows_add_up_to_the_totals_with_inputs_rejected_before_a_split(tmp_path, caplog):
    """An empty file in a class folder is rejected before its sha256 (and so its split) is known."""
    root = _two_classes(tmp_path / "in")
    (root / "hat" / "empty.jpg").write_bytes(b"")
    with caplog.at_level("INFO", logger="preprocessing"):
        assert main(["--input", str(root), "--output", str(tmp_path / "d"), "--image-size", "8", *IN_PROCESS]) == 0
    rows = [re.match(r"\s+(\w[\w ]*?)\s+(\d+) written\s+(\d+) rejected\s+(\d+) duplicates", r.getMessage())
            for r in caplog.records]
    rows = {row[1]: [int(n) for n in row.groups()[1:]] for row in rows if row}
    assert rows["no split"] == [0, 1, 0]
    assert [sum(column) for column in zip(*rows.values())] == [6, 1, 0]


def test_existing_output_is_refused_and_replaced_with_overwrite(tmp_path, capsys):
    root = _two_classes(tmp_path / "in")
    out = tmp_path / "d"
    out.mkdir()
    (out / "old.txt").write_text("from an earlier run")
    line = _one_line_error(capsys, ["--input", str(root), "--output", str(out), *IN_PROCESS])
    assert "already exists" in line and "--overwrite" in line
    assert main(["--input", str(root), "--output", str(out), "--overwrite", "--image-size", "8", *IN_PROCESS]) == 0
    assert not (out / "old.txt").exists()
    assert readback.read_stats(str(out))["totals"]["written"] == 6
    assert [p for p in os.listdir(tmp_path) if ".staging-" in p or ".old-" in p] == []


def test_local_runner_uses_worker_processes_and_needs_no_network(tmp_path):
    """The demo's command, in a network namespace with only loopback: no runner download, no hang.

    (Loopback stays: the local runner talks to its worker processes over gRPC on localhost.)
    """
    offline = ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$0" "$@"']
    if shutil.which("unshare") is None or subprocess.run([*offline, "true"]).returncode != 0:
        pytest.skip("cannot create a network namespace here (needs unshare, ip and privileges)")
    generate(str(tmp_path / "in"), SampleSpec(per_class=6, seed=3))
    out = tmp_path / "data"
    command = [*offline, sys.executable, "-m", "preprocessing", "--input", str(tmp_path / "in"),
               "--output", str(out), "--image-size", "32", "--runner", "DirectRunner", "--direct_num_workers=2"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = json.loads((out / "stats.json").read_text())
    assert "multi_processing" in stats["run"]["runner"]
    assert stats["totals"] == {"found": 27, "written": 24, "rejected": 3, "duplicates": 0}
    assert "3 rejected inputs are listed with their reasons in" in proc.stderr
    # the workers (preprocessing.worker) print their own lines in the driver's format, and none of Beam's start-up noise
    assert re.search(r"^\d\d:\d\d:\d\d INFO listed \d+ input files$", proc.stderr, re.MULTILINE), proc.stderr[-3000:]
    for noise in ("apitools not found", "Logging handler created", "INFO:"):
        assert noise not in proc.stderr, proc.stderr[-3000:]
    # the default shard count (preprocessing.shards): a split of fewer than 64 kept inputs gets one shard per input
    # (a kept file that is not an image is rejected when converted, and its shard stays empty)
    written, shards = stats["written"]["train"], len(list(out.glob("train-*")))
    assert written <= shards <= written + stats["rejected"].get("train", 0)
    assert sorted(p.name for p in out.glob("train-*")) == [f"train-{i:05d}-of-{shards:05d}.tfrecord" for i in range(shards)]
    assert [len(readback.read_records(str(out), "train"))] == [written]
    assert {e["path"].rsplit("/", 1)[-1] for e in readback.read_errors(str(out))} == {
        "broken_empty.jpg", "broken_truncated.jpg", "broken_not_an_image.jpg"}


def test_the_job_does_not_import_tensorflow(tmp_path, repo_root):
    """Listing, hashing, converting and writing records need no TensorFlow (in-process runner: the
    workers' DoFns run in this same interpreter, so whatever they import shows in sys.modules)."""
    root = _two_classes(tmp_path / "in")
    code = ("import sys\n"
            "from preprocessing.cli import main\n"
            f"assert main(['--input', {str(root)!r}, '--output', {str(tmp_path / 'd')!r}, '--image-size', '8', "
            f"*{IN_PROCESS!r}]) == 0\n"
            "assert not [m for m in sys.modules if m.split('.')[0] == 'tensorflow'], 'tensorflow imported'\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert readback.read_stats(str(tmp_path / "d"))["totals"]["written"] == 6


def test_size_mode_and_format_flags_reach_the_records_and_stats(tmp_path):
    root = _two_classes(tmp_path / "in")
    out = tmp_path / "d"
    assert main(["--input", str(root), "--output", str(out), "--image-size", "48x32", "--resize-mode", "pad",
                 "--image-format", "png", "--num-shards", "1", *IN_PROCESS]) == 0
    options = readback.read_stats(str(out))["options"]
    assert (options["image_size"], options["resize_mode"], options["image_format"]) == ([32, 48], "pad", "png")
    records = [r for split in ("train", "validation", "test") for r in readback.read_records(str(out), split)]
    assert len(records) == 6
    for record in records:
        image = Image.open(io.BytesIO(record["image/encoded"]))
        assert (image.format, image.size, record["image/format"]) == ("PNG", (48, 32), "png")
        assert (record["image/height"], record["image/width"]) == (32, 48)
    assert sorted(p.name for p in out.glob("train-*")) == ["train-00000-of-00001.tfrecord"]


def test_output_inside_the_input_folder_is_refused(tmp_path, capsys):
    root = _two_classes(tmp_path / "in")
    line = _one_line_error(capsys, ["--input", str(root), "--output", str(root / "data"), *IN_PROCESS])
    assert "must not be inside the input folder" in line
    assert sorted(p.name for p in root.iterdir()) == ["hat", "shoe"]


def test_a_mistyped_flag_is_an_error_not_a_beam_option(tmp_path, capsys):
    """Before, --image-szie went to Beam, which only logged 'Discarding unparseable args', and the job ran at 224."""
    root = _two_classes(tmp_path / "in")
    with pytest.raises(SystemExit) as exit_:
        main(["--input", str(root), "--output", str(tmp_path / "out"), "--image-szie", "32"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: --image-szie" in err and "did you mean --image-size?" in err
    assert not (tmp_path / "out").exists()


def test_beam_options_and_anything_after_a_double_dash_reach_beam(tmp_path):
    root = _two_classes(tmp_path / "in")
    out = tmp_path / "out"
    assert main(["--input", str(root), "--output", str(out), "--image-size", "8", "--direct_num_workers=1",
                 "--direct_running_mode", "in_memory", "--", "--a_runners_own_flag=1"]) == 0
    assert json.loads((out / "stats.json").read_text())["totals"]["written"] == 6


def test_stats_json_records_every_shards_size(tmp_path):
    generate(str(tmp_path / "in"), SampleSpec(per_class=4, seed=5))
    out = tmp_path / "data"
    assert main(["--input", str(tmp_path / "in"), "--output", str(out), "--image-size", "32"]) == 0
    shards = json.loads((out / "stats.json").read_text())["shards"]
    on_disk = {split: {p.name: p.stat().st_size for p in sorted(out.glob(f"{split}-*.tfrecord"))}
               for split in ("train", "validation", "test")}
    assert shards == on_disk and sum(len(files) for files in shards.values()) > 3
