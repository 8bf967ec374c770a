"""``python -m serving.batch``: the Beam RunInference job scores files as the development server does.

One real run on the default local runner (two worker processes, as a user's
run) over the test split's photos in class folders, original-file variants
(EXIF-rotated JPEGs, RGBA and 16-bit PNGs, WebP) and broken files; smaller
runs on Beam's in-memory runner for TFRecords and a manifest; and the
command's refusals (one line, exit status 2).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_serving_raw_clients import raw_files

from serving.batch import main

pytest_plugins = ["serving_fixtures"]  # one registration: session fixtures built once per run

IN_MEMORY = ["--direct_running_mode", "in_memory"]


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _predictions(out: Path) -> dict[str, dict]:
    lines = [line for shard in sorted(out.glob("predictions-*.jsonl")) for line in _lines(shard)]
    by_path = {line["path"]: line for line in lines}
    assert len(by_path) == len(lines), "an input was scored twice"
    return by_path


@pytest.fixture(scope="module")
def photos(tmp_path_factory, split_images, tiny_model) -> Path:
    """Class folders of the test split's JPEGs, a plain folder of original-file variants, and broken files."""
    _, labels = tiny_model
    root = tmp_path_factory.mktemp("batch-photos")
    for index, data in enumerate(split_images["test"]):
        folder = root / labels[index % len(labels)]
        folder.mkdir(exist_ok=True)
        (folder / f"test-{index:02d}.jpg").write_bytes(data)
    (root / "variants").mkdir()
    for name, data in raw_files(split_images["test"]).items():
        (root / "variants" / f"{name}.{name.split('-')[0]}").write_bytes(data)
    broken = root / labels[0]
    (broken / "text.jpg").write_text("this is not an image\n")
    (broken / "truncated.jpg").write_bytes(split_images["test"][0][:200])
    (broken / "empty.png").write_bytes(b"")
    (broken / ".hidden.jpg").write_bytes(split_images["test"][0])  # left out, as preprocessing does
    return root


@pytest.fixture(scope="module")
def folder_run(photos, exported_base, tmp_path_factory):
    """The job on the default runner: 2 local worker processes, batches of 4-8 (several batches per worker)."""
    out = tmp_path_factory.mktemp("batch-out") / "predictions"
    code = main(["--model", str(exported_base), "--input", str(photos), "--output", str(out), "--top-k", "2",
                 "--min-batch-size", "4", "--max-batch-size", "8", "--direct_num_workers", "2"])
    assert code == 0
    return out


def test_every_input_is_accounted_for_and_broken_files_are_errors(folder_run, photos):
    inputs = [p for p in photos.rglob("*") if p.is_file() and not p.name.startswith(".")]
    summary = json.loads((folder_run / "summary.json").read_text())
    errors = {Path(e["path"]).name: e for e in _lines(folder_run / "errors.jsonl")}
    predictions = _predictions(folder_run)

    assert summary["counts"] == {"found": len(inputs), "predicted": len(inputs) - 3, "errors": 3}
    assert summary["accounted"] is True and summary["cross_check"]["beam_metrics"] in ("agree", "unavailable")
    assert set(errors) == {"text.jpg", "truncated.jpg", "empty.png"}
    assert errors["empty.png"]["stage"] == "read" and "empty file" in errors["empty.png"]["reason"]
    assert errors["text.jpg"]["stage"] == "decode" and "Unknown image file format" in errors["text.jpg"]["reason"]
    assert errors["truncated.jpg"]["stage"] == "decode" and errors["truncated.jpg"]["reason"]
    assert set(predictions) == {str(p) for p in inputs if p.name not in errors}
    assert sum(summary["label_distribution"].values()) == summary["counts"]["predicted"]
    assert summary["files"]["predictions_csv"] and (folder_run / "predictions.csv").read_text().count("\n") == \
        len(predictions) + 1
    assert not list(folder_run.parent.glob("*.staging-*")), "the staging folder was left behind"


def test_predictions_equal_the_development_servers(folder_run, grpc_target):
    from serving.client import PredictionClient

    predictions = _predictions(folder_run)
    paths = sorted(predictions)
    with PredictionClient(grpc_target) as client:
        served = client.predict(paths)
    for path, answer in zip(paths, served):
        line = predictions[path]
        top = answer.top(2)
        assert line["label"] == answer.label and [t["label"] for t in line["top"]] == [name for name, _ in top], path
        np.testing.assert_allclose([t["score"] for t in line["top"]], [score for _, score in top], atol=1e-5,
                                   err_msg=path)
        assert line["model_version"] == 1


def test_class_folders_give_the_given_label(folder_run, split_images):
    predictions = _predictions(folder_run)
    assert all(line["given_label"] == Path(path).parent.name for path, line in predictions.items())
    summary = json.loads((folder_run / "summary.json").read_text())
    # agreement is counted where the given label is one of the model's classes (not for variants/)
    assert summary["given_labels"]["images"] == len(split_images["test"])


def test_tfrecords_are_scored_and_a_damaged_file_is_one_error(tfrecord_data, exported_base, expected_outputs,
                                                               tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(tfrecord_data / "test-00000-of-00001.tfrecord", data)
    whole = (tfrecord_data / "validation-00000-of-00001.tfrecord").read_bytes()
    (data / "validation-00000-of-00001.tfrecord").write_bytes(whole[: len(whole) * 2 // 3])
    out = tmp_path / "out"
    assert main(["--model", str(exported_base / "1"), "--input", str(data), "--output", str(out), *IN_MEMORY]) == 0

    summary = json.loads((out / "summary.json").read_text())
    errors = _lines(out / "errors.jsonl")
    predictions = _predictions(out)
    assert len(errors) == 1 and errors[0]["stage"] == "tfrecord" and "truncated" in errors[0]["reason"]
    assert errors[0]["path"].endswith("validation-00000-of-00001.tfrecord")
    assert summary["counts"]["found"] == summary["counts"]["predicted"] + 1 and summary["accounted"]
    test_lines = {path: line for path, line in predictions.items() if path.startswith("test/")}
    assert len(test_lines) == len(expected_outputs["labels"])  # every test record, named by its source id
    assert len(predictions) > len(test_lines)  # and the validation records before the damage
    # the fixture wrote the test records class by class (sorted), image by image: expected_outputs' order
    ordered = sorted(test_lines, key=lambda p: (p.split("/")[1], int(p.split("/")[2].split(".")[0])))
    for index, path in enumerate(ordered):
        line = test_lines[path]
        assert line["given_label"] == path.split("/")[1]
        assert line["label"] == expected_outputs["labels"][index], path
        assert line["score"] == pytest.approx(float(expected_outputs["scores"][index]), abs=1e-5)
    assert summary["given_labels"]["images"] == len(predictions)


def test_a_manifest_names_its_files_relative_to_itself(photos, exported_base, tmp_path):
    manifest = photos.parent / "manifest.csv"
    rows = ["path", *sorted(str(p.relative_to(photos.parent)) for p in (photos / "variants").iterdir()), ""]
    manifest.write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    assert main(["--model", str(exported_base), "--input", str(manifest), "--output", str(out), "--top-k", "1",
                 *IN_MEMORY]) == 0
    predictions = _predictions(out)
    assert set(predictions) == set(rows[1:-1]) and all(len(line["top"]) == 1 for line in predictions.values())


@pytest.mark.parametrize("argv, message", [
    (["--model", "{tmp}/no-model"], "no-model: model not found"),
    (["--input", "{tmp}/no-photos"], "no-photos: input not found"),
    (["--top-k", "0"], "--top-k must be 1 or more, got 0"),
    (["--top-k", "three"], "argument --top-k: invalid int value: 'three'"),
    (["--max-batch-size", "2", "--min-batch-size", "8"], "--max-batch-size (2) must not be below"),
    (["--top-kk", "3"], "unrecognized arguments: --top-kk"),
    (["--model", "{tmp}"], "no model version in it"),
])
def test_bad_input_is_one_line_and_exit_status_2(argv, message, photos, exported_base, tmp_path, capsys):
    given = {"--model": str(exported_base), "--input": str(photos), "--output": str(tmp_path / "out")}
    extra = []
    for flag, value in zip(argv[::2], argv[1::2]):
        value = value.format(tmp=tmp_path)
        if flag in given:
            given[flag] = value
        else:
            extra += [flag, value]
    try:
        code = main([item for pair in given.items() for item in pair] + extra)
    except SystemExit as leaving:  # argparse's own checks leave through parser.error
        code = leaving.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("tlp-predict: error: ") and message in err[0], err
    assert not (tmp_path / "out").exists()


def test_an_existing_output_is_refused_without_overwrite(folder_run, photos, exported_base, capsys):
    code = main(["--model", str(exported_base), "--input", str(photos), "--output", str(folder_run)])
    assert code == 2
    assert "output already exists (use --overwrite" in capsys.readouterr().err


def test_version_and_the_console_script(repo_root, capsys):
    from preprocessing import package_version

    with pytest.raises(SystemExit) as leaving:
        main(["--version"])
    assert leaving.value.code == 0
    assert capsys.readouterr().out.strip() == f"tlp-predict {package_version()}"
    assert 'tlp-predict = "serving.batch:main"' in (repo_root / "pyproject.toml").read_text()


@pytest.mark.parametrize("overlay", ["dev", "gpu"])
def test_the_kubernetes_job_parses_with_its_own_cli_and_beam(overlay):
    """k8s/base/predict: tlp-predict takes the Job's flags, and it runs one Beam worker per CPU of its limit."""
    from k8s_support import all_containers, pod_templates, render
    from preprocessing.runners import unknown_flags
    from serving.batch import build_parser, config_from_args

    containers = [c for _, t in pod_templates(render(overlay)) for _, c in all_containers(t["spec"])
                  if c.get("command") == ["tlp-predict"]]
    assert len(containers) == 1
    args, beam_args = build_parser().parse_known_args(containers[0]["args"])
    config = config_from_args(args)
    assert (config.model, config.input) == ("/workspace/job/export", "/workspace/images")
    assert unknown_flags(beam_args) == []
    workers = next(int(a.split("=", 1)[1]) for a in beam_args if a.startswith("--direct_num_workers="))
    assert workers == max(1, int(float(str(containers[0]["resources"]["limits"]["cpu"]).rstrip("m"))))
