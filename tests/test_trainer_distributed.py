"""The distributed paths, proven on CPU in real subprocesses.

- Data parallelism: ``--strategy mirrored`` (with ``--mixed-precision``, as on
  several GPUs) over two logical CPU devices, set up in the subprocess so other
  tests keep one device and float32.
- Distributed tuning: Keras Tuner's chief/worker mode, a chief oracle and two
  worker processes on 127.0.0.1 sharing one search.
- Synchronous multi-worker training: ``MultiWorkerMirroredStrategy`` over two
  ``python -m trainer`` processes on 127.0.0.1 (``TF_CONFIG``), both phases;
  only the chief writes the job folder.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
from serving_fixtures import float16_ops

QUICK = ["--weights", "none", "--image-size", "32", "--epochs", "1", "--batch-size", "8", "--no-export"]

MIRRORED = """
import sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from trainer.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KERASTUNER_", "TF_CONFIG"))}
    env.update(TF_CPP_MIN_LOG_LEVEL="2", **extra)
    return env


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_mirrored_mixed_precision_search_on_two_logical_cpus(tfrecord_data, tmp_path, repo_root):
    """The multi-GPU configuration (mirrored + float16), with both phases, down to a float32 export."""
    from trainer.data import info as data_info
    from trainer.data import records
    from trainer.publish.export import load_predict_fn

    space = json.dumps({"finetune_depth": [1], "dense_layers": 0})
    result = subprocess.run(
        [sys.executable, "-c", MIRRORED, "--data", str(tfrecord_data), "--job-dir", str(tmp_path), "--tuner", "random",
         "--max-trials", "1", "--strategy", "mirrored", "--mixed-precision", "--search-space", space,
         *[a for a in QUICK if a != "--no-export"]],
        cwd=repo_root, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MirroredStrategy over 2 devices" in result.stderr and "mixed precision on" in result.stderr
    best = json.loads((tmp_path / "best_hyperparameters.json").read_text())
    assert best["values"]["finetune_depth"] == 1 and best["score"] is not None
    images, _ = records.encoded_examples(data_info.inspect_data(str(tfrecord_data)), "test")
    probabilities = load_predict_fn(str(tmp_path / "export" / "1"))(images)["probabilities"]
    assert probabilities.dtype.name == "float32" and probabilities.shape == (len(images), 3)
    # Trained in mixed_float16, exported in float32 (--export-precision's default): no float16 op in the
    # graph, and the export's own check held the SavedModel to the Keras model it was built from.
    assert "computes in float32 (trained in mixed_float16)" in result.stderr
    assert float16_ops(tmp_path / "export" / "1") == []
    assert json.loads((tmp_path / "summary.json").read_text())["export_version"] == 1


def test_a_chief_and_two_workers_complete_one_search_on_features_extracted_once(tfrecord_data, tmp_path, repo_root):
    port = str(_free_port())
    args = [sys.executable, "-m", "trainer", "--data", str(tfrecord_data), "--job-dir", str(tmp_path),
            "--tuner", "random", "--max-trials", "2", "--search-space", json.dumps({"finetune_depth": 0}), *QUICK]
    oracle = dict(KERASTUNER_ORACLE_IP="127.0.0.1", KERASTUNER_ORACLE_PORT=port)
    chief = subprocess.Popen(args, cwd=repo_root, env=_env(KERASTUNER_TUNER_ID="chief", **oracle),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    workers = [subprocess.Popen(args, cwd=repo_root, env=_env(KERASTUNER_TUNER_ID=f"tuner{i}", **oracle),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        worker_logs = [w.communicate(timeout=300)[0] for w in workers]
        chief_log = chief.communicate(timeout=120)[0]
    finally:
        for process in (chief, *workers):
            if process.poll() is None:
                process.kill()
                process.wait()
    assert [w.returncode for w in workers] == [0, 0], "\n".join(log[-2000:] for log in worker_logs)
    assert chief.returncode == 0, chief_log[-3000:]
    assert sum(log.count("done in") for log in worker_logs) == 2
    # The bottleneck features are extracted once for the whole search, by the chief; the workers read them.
    assert chief_log.count("bottleneck features: train,") == 1
    assert all("bottleneck features: train," not in log for log in worker_logs)
    assert all("using the cache the chief built" in log for log in worker_logs)
    trials = json.loads((tmp_path / "tuner" / "trials.json").read_text())
    rows = trials if isinstance(trials, list) else trials.get("trials", [])
    assert sum(1 for row in rows if str(row.get("status")).upper() == "COMPLETED") == 2
    assert (tmp_path / "best_hyperparameters.json").exists()


@pytest.mark.timeout(600)
def test_two_workers_train_one_model_and_only_the_chief_writes_the_job_folder(tmp_path, repo_root):
    """``MultiWorkerMirroredStrategy`` from TF_CONFIG: the head phase on cached features and a fine-tune phase.

    The data has two shards per split: each worker decodes only its own shard's images in the fine-tune
    phase, so every image is decoded once per epoch across the cluster, not once per worker.
    """
    from conftest import write_tfrecord_data

    tfrecord_data = write_tfrecord_data(tmp_path / "data", shards=2)
    job = tmp_path / "job"
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    hosts = [f"127.0.0.1:{_free_port()}" for _ in range(2)]
    args = [sys.executable, "-m", "trainer", "--data", str(tfrecord_data), "--job-dir", str(job), "--tuner", "random",
            "--max-trials", "1", "--search-space", json.dumps({"finetune_depth": [1], "dense_layers": 0}),
            *[a for a in QUICK if a != "--no-export"]]
    workers = []
    for index in range(2):
        tf_config = json.dumps({"cluster": {"worker": hosts}, "task": {"type": "worker", "index": index}})
        workers.append(subprocess.Popen(args, cwd=repo_root, env=_env(TF_CONFIG=tf_config, TMPDIR=str(scratch)),
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        logs = [w.communicate(timeout=540)[0] for w in workers]
    finally:
        for process in workers:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert [w.returncode for w in workers] == [0, 0], "\n\n".join(log[-3000:] for log in logs)
    chief_log, other_log = logs
    assert "MultiWorkerMirroredStrategy over 2 workers" in chief_log and "the chief" in chief_log
    assert "worker 1 is not the chief" in other_log
    after_redirect = other_log.split("is not the chief", 1)[1].split("\n", 1)[1]
    assert str(scratch) in after_redirect
    assert all(str(job / "cache") in line for line in after_redirect.splitlines() if str(job) in line)
    # The features are extracted once for the job: by the chief; the other worker reads the chief's cache.
    assert chief_log.count("bottleneck features: train,") == 1 and "bottleneck features: train," not in other_log
    assert "using the cache the chief built" in other_log
    for index, log in enumerate(logs):
        for split in ("train", "validation"):
            assert (f"{split}: worker {index} of 2 reads its own 1 of 2 shards "
                    f"({split}-{index:05d}-of-00002.tfrecord)") in log, log[-3000:]
    # Both phases ran on both workers, in lockstep: the same trial, the same validation score.
    assert all(log.count("done in") == 1 and "val_accuracy" in log for log in logs)
    scores = [log.split("done in", 1)[1].split("val_accuracy", 1)[1].split(";")[0].strip() for log in logs]
    assert scores[0] == scores[1]
    best = json.loads((job / "best_hyperparameters.json").read_text())
    assert best["values"]["finetune_depth"] == 1 and best["score"] is not None
    # One export, by the chief; the other worker wrote nothing here, and its scratch folder is gone.
    assert sorted(p.name for p in (job / "export").iterdir() if not p.name.startswith(".")) == ["1"]
    assert json.loads((job / "summary.json").read_text())["export_version"] == 1
    assert "published version 1" in chief_log and "published" not in other_log
    assert not list(scratch.iterdir()), "the non-chief worker left its scratch folder behind"
    written = {p.relative_to(job).parts[0] for p in job.rglob("*")}
    assert written <= {"tuner", "tensorboard", "best_hyperparameters.json", "eval", "gate.json", "export", "cache",
                       "summary.json"}


def _wait_for_line(path, pattern: str, process, timeout: float = 300.0) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(pattern, path.read_text()) if path.exists() else None
        if found:
            return found
        if process.poll() is not None:
            pytest.fail(f"{path.name} exited before {pattern!r}: {path.read_text()[-3000:]}")
        time.sleep(0.2)
    pytest.fail(f"no {pattern!r} in {path.name} within {timeout:.0f} s: {path.read_text()[-3000:]}")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_killed_worker_and_a_killed_chief_restarted_with_the_same_ids_finish_the_search(tfrecord_data, tmp_path,
                                                                                           repo_root):
    """docs/trainer.md, "Distributed tuning: when a process dies": Keras Tuner's own recovery, with our chief.

    A worker killed mid-trial leaves its trial open in the oracle; restarted
    with the same ``KERASTUNER_TUNER_ID`` it is handed that trial again. A
    chief killed mid-search leaves the workers waiting on their calls;
    restarted with the same command it reloads ``oracle.json`` and serves the
    trial in flight (which may run a second time, as seen here: Keras Tuner
    retries it when its result did not reach the chief whole), and the search
    ends with each of its trials completed in the chief's table.
    """
    port = str(_free_port())
    job = tmp_path / "job"
    args = [sys.executable, "-m", "trainer", "--data", str(tfrecord_data), "--job-dir", str(job),
            "--tuner", "random", "--max-trials", "3", "--search-space", json.dumps({"finetune_depth": 0}), *QUICK]
    oracle = dict(KERASTUNER_ORACLE_IP="127.0.0.1", KERASTUNER_ORACLE_PORT=port)
    processes = []

    def start(name: str, tuner_id: str):
        log = open(tmp_path / f"{name}.log", "w")
        process = subprocess.Popen(args, cwd=repo_root, env=_env(KERASTUNER_TUNER_ID=tuner_id, **oracle),
                                   stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        processes.append(process)
        return process, tmp_path / f"{name}.log"

    def kill(process):
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=60)

    starting = r"trial (\d+) \(\d+ of \d+\) starting"
    try:
        chief, chief_log = start("chief-1", "chief")
        worker, worker_log = start("worker-1", "tuner0")
        first = _wait_for_line(worker_log, starting, worker).group(1)
        kill(worker)
        worker, worker_log = start("worker-2", "tuner0")
        assert _wait_for_line(worker_log, starting, worker).group(1) == first, "the killed worker's trial comes back"
        _wait_for_line(worker_log, rf"trial (?!{first}\b)\d+ \(\d+ of \d+\) starting", worker)
        kill(chief)
        chief, chief_log = start("chief-2", "chief")
        assert worker.wait(timeout=600) == 0, worker_log.read_text()[-3000:]
        assert chief.wait(timeout=300) == 0, chief_log.read_text()[-3000:]
    finally:
        for process in processes:
            if process.poll() is None:
                kill(process)
    rows = json.loads((job / "tuner" / "trials.json").read_text())["trials"]
    assert sorted(str(row["status"]).upper() for row in rows) == ["COMPLETED"] * 3
    assert (job / "best_hyperparameters.json").exists() and (job / "summary.json").exists()
