"""Where training runs: the tf.distribute strategy and mixed precision.

- ``TF_CONFIG`` naming more than one worker: ``MultiWorkerMirroredStrategy``
  (several machines, synchronous data parallelism).
- Several GPUs (or ``--strategy mirrored``): ``MirroredStrategy`` over all of
  them (on a CPU-only machine, over its logical CPU devices, which is how the
  tests prove this path).
- Otherwise the default strategy (one GPU or the CPU).

Distributed *tuning* (several trials at once on different machines) is Keras
Tuner's own chief/worker mode, switched on by ``KERASTUNER_TUNER_ID``,
``KERASTUNER_ORACLE_IP`` and ``KERASTUNER_ORACLE_PORT``; see :func:`tuning_role`.

Mixed precision (``mixed_float16``) is on by default when a GPU is present;
the classifier's softmax stays float32 either way.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

from trainer.config import UserError

log = logging.getLogger("trainer.distribute")

STRATEGIES = ("auto", "default", "mirrored", "multi_worker")


@dataclass
class Placement:
    strategy: object | None
    description: str
    mixed_precision: bool
    replicas: int = 1


def _tf_config_workers() -> int:
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        return 0
    try:
        cluster = json.loads(raw).get("cluster", {})
    except ValueError:
        raise UserError("TF_CONFIG: not valid JSON") from None
    return len(cluster.get("worker", [])) + len(cluster.get("chief", []))


def configure(strategy: str = "auto", mixed_precision: bool | None = None) -> Placement:
    """Create the strategy (before any other TensorFlow op) and set the precision policy."""
    import keras
    import tensorflow as tf

    if strategy not in STRATEGIES:
        raise UserError(f"--strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    workers = _tf_config_workers()
    if strategy == "multi_worker" or (strategy == "auto" and workers > 1):
        chosen = tf.distribute.MultiWorkerMirroredStrategy()
        description = f"MultiWorkerMirroredStrategy over {workers} workers from TF_CONFIG"
    else:
        gpus = tf.config.list_logical_devices("GPU")
        if strategy == "mirrored" or (strategy == "auto" and len(gpus) > 1):
            devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
            chosen = tf.distribute.MirroredStrategy(devices=devices)
            description = f"MirroredStrategy over {len(devices)} devices ({', '.join(devices)})"
        else:
            chosen = None
            description = f"one device ({'GPU' if gpus else 'CPU'})"
    has_gpu = bool(tf.config.list_physical_devices("GPU"))
    use_mixed = has_gpu if mixed_precision is None else bool(mixed_precision)
    keras.mixed_precision.set_global_policy("mixed_float16" if use_mixed else "float32")
    if use_mixed and not has_gpu:
        log.warning("mixed precision on a CPU is slow; it is meant for GPUs")
    replicas = chosen.num_replicas_in_sync if chosen is not None else 1
    return Placement(chosen, description, use_mixed, replicas)


def tuning_role() -> str:
    """``single`` (no distributed tuning), ``chief`` (runs the oracle) or ``worker`` (runs trials)."""
    if "KERASTUNER_ORACLE_IP" not in os.environ:
        return "single"
    missing = [k for k in ("KERASTUNER_ORACLE_PORT", "KERASTUNER_TUNER_ID") if k not in os.environ]
    if missing:
        raise UserError(f"KERASTUNER_ORACLE_IP is set but {', '.join(missing)} is not")
    return "chief" if "chief" in os.environ["KERASTUNER_TUNER_ID"] else "worker"
