"""Bad input: each mistake is one line on stderr naming the problem, and a non-zero exit (no traceback)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from conftest import write_tfrecord_data
from trainer.cli import main

QUICK = ["--weights", "none", "--image-size", "32", "--epochs", "1", "--max-trials", "1"]


def _fails_in_one_line(capsys, argv, *expected) -> str:
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc != 0
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    for text in expected:
        assert text in err, err
    return err


@pytest.fixture
def data_copy(tfrecord_data, tmp_path):
    target = tmp_path / "data"
    shutil.copytree(tfrecord_data, target)
    return target


def test_a_missing_data_folder(capsys, tmp_path):
    _fails_in_one_line(capsys, ["--data", str(tmp_path / "nope"), "--job-dir", str(tmp_path / "job"), *QUICK],
                       "--data", "no such folder")


def test_an_empty_data_folder(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    _fails_in_one_line(capsys, ["--data", str(tmp_path / "empty"), "--job-dir", str(tmp_path / "job"), *QUICK],
                       "empty")


def test_no_labels_file(capsys, data_copy, tmp_path):
    (data_copy / "labels.txt").unlink()
    _fails_in_one_line(capsys, ["--data", str(data_copy), "--job-dir", str(tmp_path / "job"), *QUICK], "labels.txt")


def test_labels_that_disagree_with_the_records(capsys, data_copy, tmp_path):
    (data_copy / "labels.txt").write_text("cat\ndog\nemu\n")
    _fails_in_one_line(capsys, ["--data", str(data_copy), "--job-dir", str(tmp_path / "job"), *QUICK],
                       "labels.txt", "circle")


def test_labels_with_fewer_classes_than_the_records(capsys, data_copy, tmp_path):
    (data_copy / "labels.txt").write_text("circle\nsquare\n")
    _fails_in_one_line(capsys, ["--data", str(data_copy), "--job-dir", str(tmp_path / "job"), *QUICK],
                       "class id 2")


def test_a_single_class(capsys, tmp_path):
    data = write_tfrecord_data(tmp_path / "one", per_class=5, classes=("circle",))
    _fails_in_one_line(capsys, ["--data", str(data), "--job-dir", str(tmp_path / "job"), *QUICK], "at least 2")


def test_an_unknown_backbone(capsys, tfrecord_data, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["--data", str(tfrecord_data), "--job-dir", str(tmp_path / "job"), "--backbone", "alexnet", *QUICK])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--backbone" in err and "alexnet" in err and "convnext_tiny" in err


def test_a_weights_file_that_does_not_fit_the_backbone(capsys, tfrecord_data, tmp_path):
    import keras

    other = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    path = tmp_path / "other.weights.h5"
    other.save_weights(str(path))
    _fails_in_one_line(capsys, ["--data", str(tfrecord_data), "--job-dir", str(tmp_path / "job"), *QUICK,
                                "--weights", str(path)], str(path), "does not fit", "mobilenet_v2")


def test_a_weights_file_that_does_not_exist(capsys, tfrecord_data, tmp_path):
    _fails_in_one_line(capsys, ["--data", str(tfrecord_data), "--job-dir", str(tmp_path / "job"), *QUICK,
                                "--weights", str(tmp_path / "missing.weights.h5")], "missing.weights.h5", "no such file")


@pytest.mark.parametrize("backbone", ["mobilenet_v2", "convnext_tiny"])
def test_imagenet_weights_offline_name_the_local_alternative(capsys, tfrecord_data, tmp_path, backbone):
    try:
        import urllib.request

        urllib.request.urlopen("https://storage.googleapis.com", timeout=3)
        pytest.skip("this machine is online; the offline message cannot be shown")
    except OSError:
        pass
    _fails_in_one_line(capsys, ["--data", str(tfrecord_data), "--job-dir", str(tmp_path / "job"),
                                "--image-size", "32", "--weights", "imagenet", "--backbone", backbone],
                       "--weights PATH", backbone)
    assert not (tmp_path / "job").exists(), "a failed run left an empty job folder behind"


def test_an_unwritable_job_dir(capsys, tfrecord_data, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    _fails_in_one_line(capsys, ["--data", str(tfrecord_data), "--job-dir", str(blocker / "job"), *QUICK],
                       "--job-dir", "cannot write")


def test_an_image_size_the_backbone_cannot_take(capsys, tfrecord_data, tmp_path):
    _fails_in_one_line(capsys, ["--data", str(tfrecord_data), "--job-dir", str(tmp_path / "job"),
                                "--weights", "none", "--image-size", "16"], "--image-size", "16x16", "at least 32")


def test_a_malformed_flag_is_one_line_too(capsys, tfrecord_data, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["--data", str(tfrecord_data), "--job-dir", str(tmp_path), "--image-size", "big"])
    assert exit_info.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_an_unknown_search_space_name(capsys, tfrecord_data, tmp_path):
    _fails_in_one_line(capsys, ["--data", str(tfrecord_data), "--job-dir", str(tmp_path / "job"), *QUICK,
                                "--search-space", '{"learning_rate": 0.1}'], "learning_rate", "known:")


def test_help_describes_the_flags(repo_root):
    result = subprocess.run([sys.executable, "-m", "trainer", "--help"], cwd=repo_root, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0
    for flag in ("--data", "--job-dir", "--backbone", "--weights", "--tuner", "--search-space", "--min-accuracy",
                 "--mixed-precision", "--no-augment", "--cache-dir"):
        assert flag in result.stdout, flag


def test_from_the_shell_the_error_is_the_only_line_on_stderr(repo_root, tmp_path):
    result = subprocess.run([sys.executable, "-m", "trainer", "--data", str(tmp_path / "nope"), "--job-dir",
                             str(tmp_path / "job")], cwd=repo_root, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"tlp-train: error: --data {tmp_path / 'nope'}: no such folder"]


def test_a_truncated_shard_is_named_with_its_split_before_a_record_is_read(capsys, data_copy, tmp_path):
    shard = data_copy / "validation-00000-of-00001.tfrecord"
    shard.write_bytes(shard.read_bytes()[:-100])
    _fails_in_one_line(capsys, ["--data", str(data_copy), "--job-dir", str(tmp_path / "job"), *QUICK],
                       "validation shard validation-00000-of-00001.tfrecord", "truncated", "re-run preprocessing")


def test_a_truncated_shard_of_a_folder_without_sizes_is_found_by_reading_it(capsys, data_copy, tmp_path):
    import json

    stats = json.loads((data_copy / "stats.json").read_text())
    del stats["shards"]  # as an older preprocessing wrote it
    (data_copy / "stats.json").write_text(json.dumps(stats))
    shard = data_copy / "validation-00000-of-00001.tfrecord"
    shard.write_bytes(shard.read_bytes()[:-100])
    rc = main(["--data", str(data_copy), "--job-dir", str(tmp_path / "job"), *QUICK])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0
    assert "validation shard validation-00000-of-00001.tfrecord" in err[-1] and "truncated record" in err[-1]


def test_a_shard_that_breaks_during_a_trial_stops_the_search_naming_the_shard(data_copy, tmp_path):
    """Keras Tuner would record a failed trial and go on; a broken shard is the data's fault, not the trial's."""
    import keras_tuner as kt

    from trainer.config import TrainConfig, UserError
    from trainer.search.hypermodel import DataLoss
    from trainer.run import _named_data_loss

    assert issubclass(DataLoss, kt.errors.FatalError)
    shard = data_copy / "train-00000-of-00001.tfrecord"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a flipped byte: the record's CRC no longer matches
    shard.write_bytes(bytes(data))

    def trial():
        raise DataLoss("corrupted record at 1234")

    with pytest.raises(UserError, match="train shard train-00000-of-00001.tfrecord: corrupted record"):
        _named_data_loss(TrainConfig(data_dir=str(data_copy), job_dir=str(tmp_path)), trial)


@pytest.mark.parametrize("size", ["96x", "x96", "0", "96x96x3", "big"])
def test_an_image_size_every_stage_refuses_alike(capsys, tfrecord_data, tmp_path, size):
    """One parser for every stage (preprocessing.tfrecords.parse_image_size): 96x was read as 96x96 here before."""
    with pytest.raises(SystemExit):
        main(["--data", str(tfrecord_data), "--job-dir", str(tmp_path / "job"), "--image-size", size])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "WIDTHxHEIGHT" in err and repr(size) in err


def test_image_size_is_width_by_height_in_every_stage():
    from preprocessing.config import parse_image_size as preprocessing_size
    from trainer.cli import _image_size as trainer_size

    assert preprocessing_size("320x240") == trainer_size("320x240") == (240, 320)


@pytest.mark.parametrize("cause, said", [
    ("dns", "DNS lookup failed"), ("refused", "connection refused"), ("timeout", "no answer within 30 s"),
    ("http", "HTTP 403 Forbidden")])
def test_a_failed_weights_download_names_the_real_cause(cause, said):
    """Keras' get_file raises a bare Exception whose context is the urllib error: read the chain."""
    import socket
    import urllib.error

    from trainer.model.backbones import download_failure

    underlying = {"dns": urllib.error.URLError(socket.gaierror(-2, "Name or service not known")),
                  "refused": urllib.error.URLError(ConnectionRefusedError(111, "Connection refused")),
                  "timeout": urllib.error.URLError(TimeoutError("timed out")),
                  "http": urllib.error.HTTPError("https://x/w.h5", 403, "Forbidden", None, None)}[cause]
    try:
        try:
            raise underlying
        except Exception as error:
            raise Exception(f"URL fetch failure on https://x/w.h5: {error}")  # as keras.utils.get_file does
    except Exception as wrapped:  # noqa: BLE001
        assert said in download_failure(wrapped)
