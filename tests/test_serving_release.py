"""serving.release: promote / canary / rollback by rewriting the model config, and the development
server applying those rewrites (--model-config-file-poll-wait-seconds) without failing a request."""

from __future__ import annotations

import json
import pathlib
import re
import threading
import time

import pytest

from serving import release
from serving_fixtures import export_tiny, start_server

pytest_plugins = ["serving_fixtures"]

CONFIG = """model_config_list {{
  config {{
    name: "classifier"
    base_path: "{base}"
    model_platform: "tensorflow"
    model_version_policy {{ latest {{ num_versions: 2 }} }}
{labels}  }}
}}
"""


def write_config(path: pathlib.Path, base: pathlib.Path, labels: dict[str, int] | None = None) -> pathlib.Path:
    text = "".join(f'    version_labels {{ key: "{k}" value: {v} }}\n' for k, v in (labels or {}).items())
    path.write_text(CONFIG.format(base=base, labels=text))
    return path


def fake_version(base: pathlib.Path, version: int, accuracy: float | None, created: str = "2026-01-01T00:00:10+00:00"):
    """A version folder holding only assets.extra/metadata.json (enough for the release tool)."""
    extra = base / str(version) / "assets.extra"
    extra.mkdir(parents=True)
    meta = {"export": {"version": version, "created": created}}
    if accuracy is not None:
        meta["metrics"] = {"accuracy": accuracy}
    (extra / "metadata.json").write_text(json.dumps(meta))


def parsed(path: pathlib.Path):
    config = release.read_config(str(path))
    model = config.model_config_list.config[0]
    return dict(model.version_labels), release.served_versions(model)


@pytest.fixture()
def job(tmp_path):
    """JOB/export with versions 1 (0.80), 2 (0.85), 3 (0.70, forced by the gate); config without labels."""
    base = tmp_path / "job" / "export"
    fake_version(base, 1, 0.80)
    fake_version(base, 2, 0.85)
    fake_version(base, 3, 0.70)
    gate = {"publish": True, "forced": True, "new_score": 0.70, "previous_version": 2, "min_accuracy": 0.75,
            "reason": "forced: published although accuracy 0.7000 is below the minimum 0.7500",
            "decided_at": "2026-01-01T00:00:05+00:00"}
    (tmp_path / "job" / "gate.json").write_text(json.dumps(gate))
    config = write_config(tmp_path / "models.config", base)
    return base, config


def run(capsys, *argv) -> tuple[int, str, str]:
    code = release.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tlp-release: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], err


# -- CLI ------------------------------------------------------------------------------------------
def test_promoting_a_version_that_does_not_exist_is_a_one_line_error(job, capsys):
    base, config = job
    before = config.read_text()
    code, _, err = run(capsys, "promote", 9, "--label", "canary", "--model-config-file", config, "--offline")
    assert code == 2
    one_line_error(err, "version 9 does not exist", "1, 2, 3")
    assert config.read_text() == before


def test_a_version_that_failed_the_gate_needs_force(job, capsys):
    base, config = job
    before = config.read_text()
    code, _, err = run(capsys, "promote", 3, "--label", "canary", "--model-config-file", config, "--offline")
    assert code == 2
    one_line_error(err, "version 3 failed the gate", "--force")
    assert config.read_text() == before

    code, out, _ = run(capsys, "promote", 3, "--label", "canary", "--model-config-file", config, "--offline",
                       "--force")
    assert code == 0, out
    assert "warning" in out
    labels, (kind, versions) = parsed(config)
    assert labels == {"canary": 3} and kind == "specific" and versions == [3]
    history = json.loads((config.parent / "models.config.history.json").read_text())
    assert history["events"][-1]["forced"] is True
    assert history["gates"]["3"]["verdict"] == "forced"


def test_min_accuracy_is_a_gate_too(job, capsys):
    _, config = job
    code, _, err = run(capsys, "promote", 1, "--label", "stable", "--model-config-file", config, "--offline",
                       "--min-accuracy", 0.9)
    assert code == 2
    one_line_error(err, "below --min-accuracy")


def test_user_mistakes_are_one_line_errors(job, tmp_path, capsys):
    base, config = job
    code, _, err = run(capsys, "status", "--model-config-file", tmp_path / "nope.config")
    assert code == 2
    one_line_error(err, "not found")
    code, _, err = run(capsys, "promote", 1, "--label", "prod", "--model-config-file", config)
    assert code == 2
    one_line_error(err, "unknown label 'prod'")
    broken = tmp_path / "broken.config"
    broken.write_text("model_config_list { config { name: 'classifier' nonsense: 1 } }\n")
    code, _, err = run(capsys, "promote", 1, "--label", "stable", "--model-config-file", broken)
    assert code == 2
    one_line_error(err, "not a valid ModelServerConfig")
    code, _, err = run(capsys, "status", "--model-config-file", config, "--model-name", "other")
    assert code == 2
    one_line_error(err, "no model named 'other'")


def test_rollback_without_history_is_a_one_line_error(job, capsys):
    _, config = job
    code, _, err = run(capsys, "rollback", "--model-config-file", config, "--offline")
    assert code == 2
    one_line_error(err, "nothing to roll back to")
    assert run(capsys, "promote", 1, "--label", "stable", "--model-config-file", config, "--offline")[0] == 0
    code, _, err = run(capsys, "rollback", "--model-config-file", config, "--offline")
    assert code == 2
    one_line_error(err, "nothing to roll back to")


def test_promote_and_rollback_keep_exactly_the_labelled_versions(job, capsys):
    _, config = job
    flags = ("--model-config-file", config, "--offline")
    assert run(capsys, "promote", 1, "--label", "stable", *flags)[0] == 0
    assert run(capsys, "promote", 2, "--label", "canary", *flags)[0] == 0
    assert parsed(config) == ({"stable": 1, "canary": 2}, ("specific", [1, 2]))
    assert run(capsys, "promote", 2, "--label", "stable", *flags)[0] == 0
    assert parsed(config) == ({"stable": 2, "canary": 2}, ("specific", [2]))
    code, out, _ = run(capsys, "rollback", *flags)
    assert code == 0, out
    assert parsed(config) == ({"stable": 1, "canary": 2}, ("specific", [1, 2]))
    assert "# TF Serving model config" in config.read_text()  # the header saying who rewrites it
    assert not list(config.parent.glob(".models.config.*.tmp")), "temporary files left behind"
    history = json.loads((config.parent / "models.config.history.json").read_text())
    assert history["stable"] == []
    assert [e["action"] for e in history["events"]] == ["promote", "promote", "promote", "rollback"]


def test_without_a_server_the_label_move_is_staged_in_two_writes(job, capsys):
    _, config = job
    assert run(capsys, "promote", 1, "--label", "stable", "--model-config-file", config, "--offline")[0] == 0
    code, out, _ = run(capsys, "promote", 2, "--label", "stable", "--model-config-file", config)
    assert code == 0
    assert "staged" in out and "step 1/2" in out
    assert parsed(config) == ({"stable": 1}, ("specific", [1, 2]))  # loaded, the label did not move
    code, out, _ = run(capsys, "promote", 2, "--label", "stable", "--model-config-file", config)
    assert code == 0 and "step 2/2" in out
    assert parsed(config) == ({"stable": 2}, ("specific", [2]))
    history = json.loads((config.parent / "models.config.history.json").read_text())
    assert history["stable"] == [1]


def test_status_shows_versions_scores_gate_and_labels(job, capsys):
    _, config = job
    assert run(capsys, "promote", 1, "--label", "stable", "--model-config-file", config, "--offline")[0] == 0
    code, out, _ = run(capsys, "status", "--model-config-file", config)
    assert code == 0
    lines = out.splitlines()
    assert "stable=1" in lines[1]
    rows = {line.split()[0]: line.split() for line in lines[3:6]}
    assert rows["1"][:5] == ["1", "0.8000", "unknown", "stable", "yes"]
    assert rows["2"][:5] == ["2", "0.8500", "unknown", "-", "no"]
    assert rows["3"][:5] == ["3", "0.7000", "forced", "-", "no"]
    code, out, _ = run(capsys, "status", "--model-config-file", config, "--json")
    data = json.loads(out)
    assert data["labels"] == {"stable": 1}
    assert data["policy"] == {"kind": "specific", "versions": [1]}
    assert [(v["version"], v["gate"], v["labels"]) for v in data["versions"]] == [
        (1, "unknown", ["stable"]), (2, "unknown", []), (3, "forced", [])]


def test_the_shipped_config_serves_exactly_its_labelled_versions(repo_root):
    labels, (kind, versions) = parsed(repo_root / "serving" / "config" / "models.config")
    assert kind == "specific" and versions == sorted(set(labels.values()))
    assert "serving.release" in (repo_root / "serving" / "config" / "models.config").read_text()


# -- the development server under load ---------------------------------------------------------------
class Load:
    """A few threads sending Predict to the active targets (labels, None = unlabelled), bounded in
    requests and seconds; each answer is recorded as (sent, received, target, version or error)."""

    def __init__(self, port: int, image: bytes, threads: int = 2, max_requests: int = 20000, max_seconds: float = 150,
                 pause: float = 0.005):
        import grpc

        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.image = image
        self.targets: list[str | None] = ["stable", None]
        self.records: list[tuple[float, float, str | None, object]] = []
        self.stop = threading.Event()
        self.deadline = time.monotonic() + max_seconds
        self.max_requests = max_requests
        self.pause = pause  # between requests: steady load without starving the server of CPU
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def _request(self, target):
        from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
        from tensorflow_serving.apis import predict_pb2

        request = predict_pb2.PredictRequest()
        request.model_spec.name = "classifier"
        if target is not None:
            request.model_spec.version_label = target
        request.model_spec.signature_name = "serving_default"
        request.inputs["image_bytes"].CopyFrom(tensor_pb2.TensorProto(
            dtype=types_pb2.DT_STRING, string_val=[self.image],
            tensor_shape=tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=1)])))
        request.output_filter.append("class_ids")
        return request

    def _run(self, index: int) -> None:
        import grpc
        from tensorflow_serving.apis import prediction_service_pb2_grpc

        stub = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        sent = 0
        while not self.stop.is_set() and sent < self.max_requests and time.monotonic() < self.deadline:
            targets = list(self.targets)
            target = targets[(sent + index) % len(targets)]
            started = time.monotonic()
            try:
                reply = stub.Predict(self._request(target), timeout=30)
                outcome = reply.model_spec.version.value
            except grpc.RpcError as exc:
                outcome = f"{exc.code().name}: {exc.details()}"
            with self._lock:
                self.records.append((started, time.monotonic(), target, outcome))
            sent += 1
            self.stop.wait(self.pause)

    def __enter__(self):
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=60)
        self.channel.close()


def wait_applied(server, predicate, timeout: float = 60.0) -> float:
    """The time the server reported a config applied whose effective labels satisfy ``predicate``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for when, phase, labels, _ in list(server.config_events):
            if phase == "applied" and predicate(labels):
                return when
        time.sleep(0.05)
    raise AssertionError(f"the server never applied the expected labels: {server.config_events}")


def states(events):
    """[(valid_from, valid_until, labels, versions)]: a config's answers are allowed from the moment the
    server starts applying it until the next config has been applied (the transition window)."""
    applied = [(when, labels, versions) for when, phase, labels, versions in events if phase in ("start", "applied")]
    starts = [float("-inf")] + [when for when, phase, _, _ in events if phase == "applying"]
    assert len(starts) == len(applied), events
    result = []
    for i, (_, labels, versions) in enumerate(applied):
        until = applied[i + 1][0] if i + 1 < len(applied) else float("inf")
        result.append((starts[i], until, labels, versions))
    return result


def test_promote_canary_stable_and_rollback_under_load_fail_no_request(tiny_model, split_images, tmp_path, capsys):
    model, labels = tiny_model
    images = split_images["test"]
    base = tmp_path / "job" / "export"
    export_tiny(model, labels, base, images[:3])
    config = write_config(tmp_path / "models.config", base)
    flags = ["--model-config-file", str(config), "--model-base-path", str(base)]
    assert release.main(["promote", "1", "--label", "stable", "--offline", *flags]) == 0

    with start_server(base, model_config_file=str(config), model_config_file_poll_wait_seconds=0.2) as server:
        assert server.manager.labels == {"stable": 1}
        target = [f"127.0.0.1:{server.port}"]
        with Load(server.port, images[0]) as load:
            time.sleep(1.0)
            export_tiny(model, labels, base, images[:3])  # version 2: on disk, not served (specific policy)
            time.sleep(1.0)
            assert server.manager.available_versions() == [1]

            assert release.main(["promote", "2", "--label", "canary", "--server", *target, "--timeout", "60",
                                 *flags]) == 0
            wait_applied(server, lambda l: l.get("canary") == 2)
            load.targets.append("canary")
            time.sleep(1.0)

            assert release.main(["promote", "2", "--label", "stable", "--server", *target, "--timeout", "60",
                                 *flags]) == 0
            wait_applied(server, lambda l: l.get("stable") == 2)
            deadline = time.monotonic() + 30
            while server.manager.available_versions() != [2] and time.monotonic() < deadline:
                time.sleep(0.05)
            assert server.manager.available_versions() == [2]  # version 1: no label, out of the policy
            time.sleep(1.0)

            assert release.main(["rollback", "--server", *target, "--timeout", "60", *flags]) == 0
            wait_applied(server, lambda l: l.get("stable") == 1)
            time.sleep(1.0)

            # One write that moves canary to a version not loaded yet (what TF Serving would refuse): the
            # development server still loads and warms version 3 before the label moves, then unloads 2.
            export_tiny(model, labels, base, images[:3])
            assert release.main(["promote", "3", "--label", "canary", "--offline", *flags]) == 0
            wait_applied(server, lambda l: l.get("canary") == 3)
            time.sleep(1.0)
        events = list(server.config_events)
    out = capsys.readouterr().out
    assert "step 1/2" in out and "step 2/2" in out

    records = load.records
    failures = [r for r in records if not isinstance(r[3], int)]
    assert not failures, f"{len(failures)} of {len(records)} requests failed, e.g. {failures[:3]}"
    timeline = states(events)
    assert [s[2] for s in timeline][-1] == {"stable": 1, "canary": 3}

    def allowed(target, sent, received):
        versions = set()
        for valid_from, valid_until, labels, loaded in timeline:
            if sent <= valid_until and received >= valid_from:
                versions.add(labels.get(target) if target is not None else max(loaded))
        return versions

    wrong = [(t, v, sorted(v2 for v2 in allowed(t, s, r) if v2 is not None))
             for s, r, t, v in records if v not in allowed(t, s, r)]
    assert not wrong, f"{len(wrong)} answers from a version their label did not name then, e.g. {wrong[:5]}"
    seen = {(t, v) for _, _, t, v in records}
    assert {("stable", 1), ("stable", 2), ("canary", 2), ("canary", 3), (None, 1), (None, 2), (None, 3)} <= seen, seen
    # Load ran across every change: answers after the last change applied come from the final targets.
    last_applied = max(when for when, phase, _, _ in events if phase == "applied")
    final = [(t, v) for s, _, t, v in records if s > last_applied]
    assert {t for t, _ in final} == {"stable", "canary", None}, "the load stopped before the last change"
    assert all(v == {"stable": 1, "canary": 3, None: 3}[t] for t, v in final)


def test_a_config_that_does_not_parse_is_logged_and_the_previous_one_kept(exported_base, tmp_path, caplog):
    import logging

    config = write_config(tmp_path / "models.config", exported_base, {"stable": 1})
    with start_server(exported_base, model_config_file=str(config), model_config_file_poll_wait_seconds=0.1) as server:
        with caplog.at_level(logging.ERROR, logger="serving.server"):
            config.write_text("model_config_list { config { name: 'classifier' oops } }\n")
            deadline = time.monotonic() + 10
            while not any("not applied" in r.getMessage() for r in caplog.records) and time.monotonic() < deadline:
                time.sleep(0.05)
        assert any("keeping the previous one" in r.getMessage() for r in caplog.records)
        assert server.manager.labels == {"stable": 1}
        assert server.manager.resolve("classifier", label="stable").version == 1


def test_the_server_flag_reaches_the_config():
    from serving.server import build_parser, config_from_args

    args = build_parser().parse_args(["--model-config-file", "m.config", "--model-config-file-poll-wait-seconds", "5"])
    assert config_from_args(args).model_config_file_poll_wait_seconds == 5
    assert config_from_args(build_parser().parse_args([])).model_config_file_poll_wait_seconds == 0


def test_a_version_that_fails_to_load_is_not_labelled_and_the_config_is_restored(exported_base, tmp_path, capsys):
    import shutil

    base = tmp_path / "export"
    shutil.copytree(exported_base / "1", base / "1")
    (base / "2").mkdir()
    (base / "2" / "saved_model.pb").write_bytes(b"not a SavedModel")
    config = write_config(tmp_path / "models.config", base)
    flags = ["--model-config-file", str(config), "--model-base-path", str(base)]
    assert release.main(["promote", "1", "--label", "stable", "--offline", *flags]) == 0
    before = config.read_text()
    with start_server(base, model_config_file=str(config), model_config_file_poll_wait_seconds=0.1) as server:
        capsys.readouterr()
        code = release.main(["promote", "2", "--label", "canary", "--server", f"127.0.0.1:{server.port}",
                             "--timeout", "30", *flags])
        out, err = capsys.readouterr()
        assert code == 1, out + err
        server_log = re.compile(r"^\d\d:\d\d:\d\d [A-Z] ")  # the in-process server's own log lines share stderr
        one_line_error("\n".join(line for line in err.splitlines() if not server_log.match(line)),
                       "version 2 failed to load")
        assert config.read_text() == before and "restored" in out
        assert server.manager.resolve("classifier", label="stable").version == 1
    history = json.loads((config.parent / "models.config.history.json").read_text())
    assert [e["label"] for e in history["events"]] == ["stable"]


def test_the_command_line_prints_one_line_and_exits_2(job, repo_root):
    import subprocess
    import sys

    _, config = job
    result = subprocess.run([sys.executable, "-m", "serving.release", "promote", "9", "--label", "stable",
                             "--model-config-file", str(config)], capture_output=True, text=True, cwd=repo_root,
                            timeout=120)
    assert result.returncode == 2
    one_line_error(result.stderr, "version 9 does not exist")
