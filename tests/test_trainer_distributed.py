"""The distributed paths, proven on CPU in real subprocesses.

- Data parallelism: ``--strategy mirrored`` (with ``--mixed-precision``, as on
  several GPUs) over two logical CPU devices, set up in the subprocess so other
  tests keep one device and float32.
- Distributed tuning: Keras Tuner's chief/worker mode, a chief oracle and two
  worker processes on 127.0.0.1 sharing one search.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

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
    from trainer import data
    from trainer.export import load_predict_fn

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
    images, _ = data.encoded_examples(data.inspect_data(str(tfrecord_data)), "test")
    probabilities = load_predict_fn(str(tmp_path / "export" / "1"))(images)["probabilities"]
    assert probabilities.dtype.name == "float32" and probabilities.shape == (len(images), 3)


def test_a_chief_and_two_workers_complete_one_search(tfrecord_data, tmp_path, repo_root):
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
    trials = json.loads((tmp_path / "tuner" / "trials.json").read_text())
    rows = trials if isinstance(trials, list) else trials.get("trials", [])
    assert sum(1 for row in rows if str(row.get("status")).upper() == "COMPLETED") == 2
    assert (tmp_path / "best_hyperparameters.json").exists()
