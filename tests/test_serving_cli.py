"""The serving CLIs: client (predict/metadata/status), loadtest and server, as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from serving import client as client_cli
from serving import loadtest as loadtest_cli
from serving import server as server_cli

pytest_plugins = ["serving_fixtures"]  # one registration: session fixtures built once per run


@pytest.fixture(scope="module")
def image_dir(split_images, tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    (root / "nested").mkdir()
    for i, image in enumerate(split_images["test"][:4]):
        (root / ("nested" if i % 2 else ".") / f"img{i}.jpg").write_bytes(image)
    (root / "notes.txt").write_text("not an image")
    return root


def test_predict_prints_a_table_with_one_row_per_image(grpc_target, image_dir, capsys):
    assert client_cli.main(["--server", grpc_target, "--model", "classifier", "--top-k", "2", str(image_dir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["image", "label", "score", "top-2"]
    assert len(lines) == 5 and all("img" in line for line in lines[1:])


def test_predict_json_lines_carry_label_score_and_probabilities(grpc_target, image_dir, capsys, expected_outputs):
    assert client_cli.main(["predict", "--server", grpc_target, "--json", "--label", "stable",
                            str(image_dir / "img0.jpg")]) == 0
    [row] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert row["label"] == expected_outputs["labels"][0] and row["model_version"] == 1
    assert set(row["probabilities"]) == {"circle", "square", "triangle"} or len(row["probabilities"]) == 3
    assert len(row["top"]) == 3


def test_metadata_and_status_subcommands(grpc_target, capsys):
    assert client_cli.main(["metadata", "--server", grpc_target]) == 0
    out = capsys.readouterr().out
    assert "signature serving_default" in out and "input  image_bytes: string [-1]" in out
    assert client_cli.main(["--server", grpc_target, "status", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == [
        {"version": 1, "state": "AVAILABLE", "error_code": "OK", "error_message": ""}]


def test_user_mistakes_give_one_line_errors_and_nonzero_exits(grpc_target, tmp_path, capsys):
    assert client_cli.main(["--server", grpc_target, str(tmp_path / "missing.jpg")]) == 2
    assert client_cli.main(["status", "--server", grpc_target, "--model", "nope"]) == 1
    assert client_cli.main(["status", "--server", "127.0.0.1:1", "--retries", "0", "--timeout", "2"]) == 1
    errors = capsys.readouterr().err.splitlines()
    assert errors[0].startswith("tlp-client: error: no such file or folder")
    assert errors[1] == f"tlp-client: error: {grpc_target}: NOT_FOUND: Could not find any versions of model nope"
    assert errors[2].startswith("tlp-client: error: 127.0.0.1:1: UNAVAILABLE")
    assert len(errors) == 3


def test_loadtest_prints_throughput_percentiles_and_errors(grpc_target, image_dir, capsys):
    code = loadtest_cli.main(["--server", grpc_target, "--concurrency", "2", "--requests", "20", "--batch", "2",
                              str(image_dir)])
    out = capsys.readouterr().out
    assert code == 0
    assert "requests 20 (20 ok, 0 failed)" in out and "p50" in out and "p99" in out and "errors none" in out


def test_loadtest_counts_failures_by_status_code(grpc_target, image_dir, tmp_path, capsys):
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    code = loadtest_cli.main(["--server", grpc_target, "--requests", "4", "--concurrency", "1", "--json",
                              str(image_dir / "img0.jpg"), str(tmp_path / "broken.jpg")])
    result = json.loads(capsys.readouterr().out)
    assert code == 1
    assert (result["requests"], result["ok"], result["errors"]) == (4, 2, {"INVALID_ARGUMENT": 2})


def test_loadtest_reports_a_model_it_cannot_reach_in_one_line(grpc_target, image_dir, capsys):
    assert loadtest_cli.main(["--server", grpc_target, "--model-version", "9", "--requests", "3", str(image_dir)]) == 1
    assert capsys.readouterr().err.strip() == (
        f"tlp-loadtest: error: {grpc_target}: NOT_FOUND: Servable not found for request: Specific(classifier, 9)")


def test_server_refuses_a_missing_base_path_in_one_line(tmp_path, capsys):
    assert server_cli.main(["--model-base-path", str(tmp_path / "nope"), "--port", "0"]) == 2
    assert capsys.readouterr().err.strip() == f"tlp-serve: error: model base path {tmp_path / 'nope'} is not a folder"


def test_help_is_fast_because_it_does_not_import_tensorflow(repo_root):
    code = ("import sys\nfrom serving import client, loadtest, server\n"
            "for m in (client, loadtest, server): m.build_parser().format_help()\n"
            "assert 'tensorflow' not in sys.modules, 'tensorflow imported'\n")
    subprocess.run([sys.executable, "-c", code], cwd=repo_root, check=True, timeout=60)
    listing = subprocess.run([sys.executable, "-m", "serving"], cwd=repo_root, capture_output=True, text=True,
                             timeout=60, check=True).stdout
    assert "python -m serving.server" in listing and "python -m serving.loadtest" in listing
