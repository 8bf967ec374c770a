"""The development server's life: hot swapping versions under load, skipping broken folders, draining on SIGTERM."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
from serving_fixtures import export_tiny, start_server

from serving.client import PredictionClient, VersionStatus
from serving.loadtest import LoadTestConfig, run_load

pytest_plugins = ["serving_fixtures"]  # one registration: session fixtures built once per run


def _wait_for(predicate, timeout=30.0, interval=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def test_a_new_version_appearing_mid_load_is_swapped_in_with_zero_failed_requests(tiny_model, split_images, tmp_path):
    model, labels = tiny_model
    images = split_images["test"]
    export_tiny(model, labels, tmp_path, images)
    with start_server(tmp_path, enable_batching=True, max_batch_size=8, batch_timeout_micros=500,
                      rest_port=-1) as server:
        target = f"127.0.0.1:{server.port}"
        stop, outcome = threading.Event(), {}
        load = threading.Thread(target=lambda: outcome.update(result=run_load(
            images, LoadTestConfig(server=target, concurrency=3, requests=100_000, duration=60), stop)))
        load.start()
        try:
            time.sleep(0.2)
            export_tiny(model, labels, tmp_path, images)  # version 2, published while requests flow
            with PredictionClient(target) as client:
                swapped = _wait_for(lambda: client.status() == [VersionStatus(2, "AVAILABLE"), VersionStatus(1, "END")])
            time.sleep(0.3)
        finally:
            stop.set()
            load.join()
    result = outcome["result"]
    assert swapped
    assert result.errors == {} and result.ok == result.requests
    assert set(result.versions) == {1, 2}


def test_a_folder_that_is_not_a_savedmodel_is_logged_skipped_and_reported(tiny_model, split_images, tmp_path, caplog):
    model, labels = tiny_model
    export_tiny(model, labels, tmp_path, split_images["test"][:2])
    broken = tmp_path / "2"
    broken.mkdir()
    (broken / "saved_model.pb").write_bytes(b"this is not a protobuf")
    with caplog.at_level(logging.ERROR, logger="serving.models"):
        with start_server(tmp_path, rest_port=-1) as server:
            with PredictionClient(f"127.0.0.1:{server.port}") as client:
                statuses = client.status()
                assert client.predict(split_images["test"][:1])[0].model_version == 1
    assert [(s.version, s.state) for s in statuses] == [(2, "END"), (1, "AVAILABLE")]  # newest first, as TF Serving
    assert statuses[0].error_code == "DATA_LOSS"  # as TF Serving: its ReadBinaryProto's status (test_crash_safety)
    assert statuses[0].error_message == f"Can't parse {broken / 'saved_model.pb'} as binary proto"
    assert any("skipping model classifier version 2" in r.getMessage() for r in caplog.records)


def test_labels_follow_the_config_when_two_versions_are_served(tiny_model, split_images, tmp_path):
    model, labels = tiny_model
    for _ in range(2):
        export_tiny(model, labels, tmp_path, split_images["test"][:2])
    with start_server(tmp_path, rest_port=-1, model_version_policy="all",
                      version_labels={"stable": 1, "canary": 2}) as server:
        target = f"127.0.0.1:{server.port}"
        answers = {}
        for label in ("stable", "canary"):
            with PredictionClient(target, version_label=label) as client:
                answers[label] = client.predict(split_images["test"][:1])[0].model_version
        with PredictionClient(target) as latest:
            answers["latest"] = latest.predict(split_images["test"][:1])[0].model_version
    assert answers == {"stable": 1, "canary": 2, "latest": 2}


def test_sigterm_drains_the_request_in_flight_then_exits_zero(tiny_model, split_images, tmp_path, repo_root):
    model, labels = tiny_model
    export_tiny(model, labels, tmp_path, split_images["test"][:2])
    env = {**os.environ, "PYTHONPATH": str(repo_root), "TF_CPP_MIN_LOG_LEVEL": "2"}
    # A request waits up to 1.5 s for its batch to fill: it is surely in flight when SIGTERM arrives.
    process = subprocess.Popen(
        [sys.executable, "-m", "serving.server", "--model-base-path", str(tmp_path), "--port", "0",
         "--rest-port", "0", "--enable-batching", "--max-batch-size", "64", "--batch-timeout-micros", "1500000"],
        cwd=repo_root, env=env, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(process.stderr.readline, "")), daemon=True)
    reader.start()
    try:
        assert _wait_for(lambda: any("serving model classifier version 1 on" in line for line in lines), timeout=120)
        ready = next(line for line in lines if "serving model classifier version 1 on" in line)
        grpc_port, rest_port = re.search(r"127\.0\.0\.1:(\d+) \(gRPC\), 127\.0\.0\.1:(\d+) \(REST\)", ready).groups()
        outcome = {}
        with PredictionClient(f"127.0.0.1:{grpc_port}", retries=0, timeout=30) as client:
            client.wait_until_ready(timeout=30)
            request = threading.Thread(target=lambda: outcome.update(p=client.predict(split_images["test"][:1])))
            request.start()
            time.sleep(0.5)
            process.send_signal(signal.SIGTERM)
            request.join(timeout=30)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    reader.join(timeout=5)
    assert outcome["p"][0].model_version == 1
    assert any("received SIGTERM: draining" in line for line in lines)


def test_a_server_started_before_any_export_becomes_ready_when_the_first_version_lands(tiny_model, split_images,
                                                                                        tmp_path):
    model, labels = tiny_model
    with start_server(tmp_path, rest_port=-1, health_service=True) as server:
        with PredictionClient(f"127.0.0.1:{server.port}", retries=0) as client:
            with pytest.raises(TimeoutError, match="NOT_SERVING"):  # health: NOT_SERVING until a version loads
                client.wait_until_ready(timeout=0.5)
            export_tiny(model, labels, tmp_path, split_images["test"][:2])
            client.wait_until_ready(timeout=30)
            assert client.predict(split_images["test"][:1])[0].model_version == 1
