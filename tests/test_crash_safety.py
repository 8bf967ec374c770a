"""Crash safety: real processes killed with SIGKILL while they write, and broken versions under a running server.

Each writer runs as a real subprocess in its own session and is killed (the
whole process group, by its id) at the moment a temporary it writes appears,
found by polling the filesystem; then what a reader would see is checked, and
the same command is run again. docs/operations.md ("Crash safety") names these
tests for each of its claims.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import write_tfrecord_data
from serving_fixtures import export_tiny, start_server

from serving.client import PredictionClient

pytest_plugins = ["serving_fixtures"]  # one registration: session fixtures built once per run

TRAIN = ["--weights", "none", "--image-size", "32", "--epochs", "1", "--max-trials", "1", "--tuner", "random"]
EXPORT_TMP = re.compile(r"^\.tmp-[0-9]+-.+~[0-9]+$")  # the SavedModel being written (not its -labels staging)
RUN_TIMEOUT_S = 600


def _env() -> dict:
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}


def _trainer(data: Path, job: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "trainer", "--data", str(data), "--job-dir", str(job), *TRAIN, *extra]


def _wait_for(predicate, timeout: float = 60.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(interval)
    return None


def _kill_when(command: list[str], cwd: Path, log: Path, appears, timeout: float = RUN_TIMEOUT_S):
    """Run ``command``; SIGKILL its process group as soon as ``appears()`` returns a path; return that path."""
    with open(log, "w") as handle:
        process = subprocess.Popen(command, cwd=cwd, env=_env(), stdout=handle, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        found = _wait_for(lambda: process.poll() is not None or appears(), timeout=timeout, interval=0.005)
        if found is True or found is None:
            pytest.fail(f"{command[2]} {'exited' if found else 'ran past the timeout'} before the moment to kill it: "
                        f"{log.read_text()[-3000:]}")
        os.killpg(process.pid, signal.SIGKILL)
        assert process.wait(timeout=60) == -signal.SIGKILL
        return found
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=60)


def _entries(folder: Path) -> list[str]:
    try:
        return sorted(os.listdir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return []


def _run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result


# -- the trainer ---------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(2 * RUN_TIMEOUT_S + 120)
def test_trainer_killed_mid_export_leaves_no_version_and_the_rerun_publishes_version_1(tmp_path, repo_root):
    from serving.models import ModelManager
    from serving.servable import LoadedVersion
    from trainer.publish.export import list_versions

    write_tfrecord_data(tmp_path / "data")
    export, command = tmp_path / "job" / "export", _trainer(tmp_path / "data", tmp_path / "job")
    killed = _kill_when(command, repo_root, tmp_path / "killed.log",
                        lambda: next((n for n in _entries(export) if EXPORT_TMP.match(n)), None))

    assert list_versions(str(export)) == []
    assert [n for n in _entries(export) if not n.startswith(".tmp-")] == [], "only hidden temporaries may be left"
    assert killed in _entries(export)  # the kill landed mid-export: a half SavedModel, hidden
    manager = ModelManager("classifier", str(export), poll_seconds=0)
    manager.poll()  # the development server's watcher takes no version from it (nor does TF Serving: not a number)
    assert (manager.available_versions(), manager.states()) == ([], {})

    again = _run(command, repo_root)
    assert list_versions(str(export)) == [1]
    assert _entries(export) == ["1"], "the next export removes the temporary the killed one left"
    assert f"removed {export / killed}, left by a killed run" in again.stderr
    version = LoadedVersion("classifier", 1, str(export / "1"))
    try:
        assert version.warm_up() > 0  # complete: loads, and its warm-up requests run
    finally:
        version.close()


@pytest.mark.slow
@pytest.mark.timeout(2 * RUN_TIMEOUT_S + 120)
def test_trainer_killed_mid_cache_build_rebuilds_the_cache_on_rerun(tmp_path, repo_root):
    write_tfrecord_data(tmp_path / "data")
    cache = tmp_path / "job" / "cache"
    command = _trainer(tmp_path / "data", tmp_path / "job", "--no-export")

    def cache_temporary():
        for key in _entries(cache):
            for name in _entries(cache / key):
                if ".tmp-" in name and (cache / key / name).is_dir():
                    return cache / key / name
        return None

    killed = _kill_when(command, repo_root, tmp_path / "killed.log", cache_temporary)
    final = killed.with_name(killed.name.split(".tmp-")[0])  # e.g. train-pooled
    assert not (killed / "DONE").exists() and not final.exists(), "a half-written cache must never be published"

    again = _run(command, repo_root)
    assert re.search(r"bottleneck features: train, 30 images in", again.stderr), "the cache is built again"
    assert f"removed {killed}, left by a killed run" in again.stderr
    assert (final / "DONE").is_file() and (final.with_name("validation-pooled") / "DONE").is_file()
    assert [n for n in _entries(final.parent) if ".tmp-" in n] == []
    assert not Path(f"{final.parent}.building").exists(), "the re-run's build marker is gone"
    assert (tmp_path / "job" / "summary.json").is_file()


def test_only_temporaries_whose_writer_is_gone_are_removed(tmp_path):
    """What the re-runs above rely on, without deleting a write in flight (another job sharing the folder)."""
    from trainer import staging

    host = staging._host()
    with subprocess.Popen(["sleep", "60"]) as alive, subprocess.Popen(["true"]) as gone:
        gone.wait()
        try:
            keep = [f".tmp-1-{host}~{alive.pid}", f".tmp-2-elsewhere~{gone.pid}", ".tmp-3-1", "1"]
            remove = [f".tmp-4-{host}~{gone.pid}", f".tmp-4-{host}~{gone.pid}-labels", f".tmp-5-{host}~{os.getpid()}",
                      ".tmp-6-elsewhere~7"]
            for name in keep + remove:
                (tmp_path / name).mkdir()
            day_old = time.time() - staging.STALE_AFTER_S - 60
            os.utime(tmp_path / ".tmp-6-elsewhere~7", (day_old, day_old))  # another host's, untouched for a day
            assert sorted(staging.remove_stale(str(tmp_path), ".tmp-")) == sorted(str(tmp_path / n) for n in remove)
            assert sorted(os.listdir(tmp_path)) == sorted(keep)
        finally:
            alive.kill()


# -- preprocessing ---------------------------------------------------------------------------------
def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.timeout(3 * RUN_TIMEOUT_S)
def test_preprocessing_killed_mid_write_leaves_the_output_whole_and_the_rerun_removes_its_staging(tmp_path,
                                                                                                  repo_root):
    from preprocessing.sample_data import SampleSpec, generate

    generate(str(tmp_path / "photos"), SampleSpec(per_class=30))
    out = tmp_path / "data"
    command = [sys.executable, "-m", "preprocessing", "--input", str(tmp_path / "photos"), "--output", str(out),
               "--image-size", "32", "--progress-seconds", "0", "--overwrite"]
    _run(command, repo_root)
    before = _tree(out)

    def shard_in_staging():
        for folder in tmp_path.glob("data.staging-*"):
            if any(".tfrecord" in p.name for p in folder.rglob("*")):
                return folder
        return None

    killed = _kill_when(command, repo_root, tmp_path / "killed.log", shard_in_staging)
    assert _tree(out) == before, "the published output must be untouched by a killed run"
    assert killed.exists(), "the killed run's staging folder is what the next run must clean"

    again = _run(command, repo_root)
    assert f"removed {killed}, left by a killed run" in again.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("data")) == ["data"]
    assert json.loads((out / "stats.json").read_text())["accounted"]


# -- tlp-release: the model config -----------------------------------------------------------------
CONFIG = """model_config_list {{
  config {{
    name: "classifier"
    base_path: "{base}"
    model_platform: "tensorflow"
    model_version_policy {{ specific {{ versions: 1 }} }}
    version_labels {{ key: "stable" value: 1 }}
  }}
}}
"""

# The real `tlp-release` main(), with os.replace paused for the config file: the new config is written (and
# fsynced) to its temporary, and the process is killed there, before the rename.
PAUSED_RELEASE = """
import os, sys, time
config, marker = os.path.abspath(sys.argv[1]), sys.argv[2]
replace = os.replace
def paused(src, dst):
    if os.path.abspath(dst) == config:
        with open(marker + ".part", "w") as handle:
            handle.write(src)
        replace(marker + ".part", marker)
        time.sleep(600)
    replace(src, dst)
os.replace = paused
from serving.release import main
sys.exit(main(sys.argv[3:]))
"""


def _release_setup(tmp_path: Path) -> tuple[Path, list[str]]:
    base = tmp_path / "export"
    for version in (1, 2):
        (base / str(version)).mkdir(parents=True)
    config = tmp_path / "models.config"
    config.write_text(CONFIG.format(base=base))
    return config, ["promote", "2", "--label", "stable", "--model-config-file", str(config), "--offline"]


def test_release_killed_between_write_and_rename_leaves_the_config_whole(tmp_path, repo_root):
    from serving.release import read_config
    from serving.server_config import ServerConfig

    config, args = _release_setup(tmp_path)
    before = config.read_bytes()
    marker, script = tmp_path / "paused", tmp_path / "paused_release.py"
    script.write_text(PAUSED_RELEASE)
    pending = _kill_when([sys.executable, str(script), str(config), str(marker), *args], repo_root,
                         tmp_path / "killed.log", lambda: marker.exists() and marker.read_text(), timeout=300)

    temporary = Path(pending)
    assert temporary.parent == config.parent and temporary.name.startswith(".models.config.")
    assert dict(read_config(str(temporary)).model_config_list.config[0].version_labels) == {"stable": 2}
    assert config.read_bytes() == before, "the config a server reads is the old one, whole"
    name, _, _, labels = ServerConfig(model_base_path="", model_config_file=str(config)).model_settings()
    assert (name, labels) == ("classifier", {"stable": 1})  # the development server reads the named file only

    subprocess.run([sys.executable, "-m", "serving.release", *args], cwd=repo_root, env=_env(), check=True,
                   capture_output=True, timeout=300)
    assert dict(read_config(str(config)).model_config_list.config[0].version_labels) == {"stable": 2}


REWRITER = """
import sys
from serving.release_config import atomic_write
path, first, second = sys.argv[1], open(sys.argv[2]).read(), open(sys.argv[3]).read()
for i in range(200):
    atomic_write(path, second if i % 2 == 0 else first)
"""


def test_a_reader_polling_the_config_never_sees_a_partial_file_during_200_rewrites(tmp_path, repo_root):
    config, _ = _release_setup(tmp_path)
    first = config.read_text()
    second = first.replace("versions: 1 }", "versions: 1 versions: 2 }").replace(
        'version_labels { key: "stable" value: 1 }',
        'version_labels { key: "canary" value: 2 }\n    version_labels { key: "stable" value: 1 }')
    assert second != first and len(second) != len(first)
    (tmp_path / "first").write_text(first)
    (tmp_path / "second").write_text(second)
    writer = subprocess.Popen([sys.executable, "-c", REWRITER, str(config), str(tmp_path / "first"),
                               str(tmp_path / "second")], cwd=repo_root, env=_env())
    seen, reads = set(), 0
    try:
        while writer.poll() is None:
            seen.add(config.read_text())
            reads += 1
    finally:
        if writer.poll() is None:
            writer.kill()
        writer.wait(timeout=60)
    assert writer.returncode == 0
    assert seen <= {first, second}, "a reader saw a partial config"
    assert seen == {first, second} and reads > 200, "the reader should have overlapped the rewrites"
    assert config.read_text() == first and sorted(os.listdir(tmp_path)) == ["export", "first", "models.config",
                                                                            "second"]


# -- the development server and a broken version ---------------------------------------------------
def _truncate_pb(version: Path) -> None:
    pb = version / "saved_model.pb"
    pb.write_bytes(pb.read_bytes()[: pb.stat().st_size // 2])


def _garbage_pb(version: Path) -> None:
    (version / "saved_model.pb").write_bytes(bytes(range(256)) * 16)


def _no_variables(version: Path) -> None:
    shutil.rmtree(version / "variables")


def _no_variables_data(version: Path) -> None:
    for data in (version / "variables").glob("variables.data-*"):
        data.unlink()


# What GetModelStatus reports for a version that failed to load, as TF Serving does: state END with the load's
# own status (tensorflow_serving/core/basic_manager.cc publishes kEnd with the error in its error_callback;
# tensorflow_serving/model_servers/get_model_status_impl.cc returns that state's health as the status). An
# unparsable saved_model.pb is DATA_LOSS "Can't parse <file> as binary proto" (ReadBinaryProto,
# tensorflow/core/platform/env.cc). A missing variables/ is NOT_FOUND from TensorFlow's Python loader, which the
# development server uses; TF Serving's C++ loader instead loads such a model without its variables ("no
# checkpoints were restored", tensorflow/cc/saved_model/loader.cc) and fails later, at warm-up or on a request.
BROKEN = {
    "truncated-saved_model.pb": (_truncate_pb, "DATA_LOSS", "Can't parse {path}/saved_model.pb as binary proto"),
    "garbage-saved_model.pb": (_garbage_pb, "DATA_LOSS", "Can't parse {path}/saved_model.pb as binary proto"),
    "variables-missing": (_no_variables, "NOT_FOUND", "{path}/variables/variables"),
}


def _drop_broken_version(base: Path, version: int, damage) -> Path:
    """Copy version 1, damage the copy out of sight, and rename it in (it appears whole, as a broken export would)."""
    hidden = base / f".staging-{version}"
    shutil.copytree(base / "1", hidden)
    damage(hidden)
    os.rename(hidden, base / str(version))
    return base / str(version)


@pytest.mark.parametrize("broken", sorted(BROKEN))
def test_a_broken_version_is_reported_logged_once_and_the_good_one_keeps_serving(broken, tiny_model, split_images,
                                                                                   tmp_path, caplog):
    damage, code, message = BROKEN[broken]
    model, labels = tiny_model
    images = split_images["test"][:2]
    export_tiny(model, labels, tmp_path, images)
    with caplog.at_level(logging.INFO, logger="serving.models"):
        with start_server(tmp_path, rest_port=-1) as server, \
                PredictionClient(f"127.0.0.1:{server.port}", timeout=30) as client:
            assert client.predict(images[:1])[0].model_version == 1
            path = _drop_broken_version(tmp_path, 2, damage)
            statuses = _wait_for(lambda: [s for s in client.status() if s.version == 2 and s.state == "END"] and
                                 client.status(), timeout=120)
            assert statuses, "the broken version was never reported"
            for _ in range(3):  # later polls neither retry it nor log it again, and never drop version 1
                server.manager.poll()
            assert client.predict(images[:1])[0].model_version == 1
            final = client.status()
    assert [(s.version, s.state, s.error_code) for s in final] == [(2, "END", code), (1, "AVAILABLE", "OK")]
    assert message.format(path=path) in final[0].error_message
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR and "version 2" in r.getMessage()]
    assert len(errors) == 1, errors
    assert str(path) in errors[0] and code in errors[0] and message.format(path=path) in errors[0]


def test_a_broken_version_repaired_in_place_is_loaded_on_a_later_poll(tiny_model, split_images, tmp_path):
    model, labels = tiny_model
    images = split_images["test"][:2]
    export_tiny(model, labels, tmp_path, images)
    with start_server(tmp_path, rest_port=-1) as server, \
            PredictionClient(f"127.0.0.1:{server.port}", timeout=30) as client:
        broken = _drop_broken_version(tmp_path, 2, _no_variables_data)
        assert _wait_for(lambda: [s.state for s in client.status() if s.version == 2] == ["END"], timeout=120)
        for data in (tmp_path / "1" / "variables").glob("variables.data-*"):  # 2/ itself does not change
            shutil.copy2(data, broken / "variables" / data.name)
        assert _wait_for(lambda: [(s.version, s.state) for s in client.status()] == [(2, "AVAILABLE"), (1, "END")],
                         timeout=120), client.status()
        assert client.predict(images[:1])[0].model_version == 2
