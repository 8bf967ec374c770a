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

Under ``MultiWorkerMirroredStrategy`` every worker runs the same program, but
only the chief (:func:`is_chief`: task type ``chief``, or ``worker`` 0 when the
cluster has no chief) writes the shared job folder; the others write to a
scratch folder that is deleted at the end (what the TensorFlow and Keras
multi-worker guides recommend). Keras 3's ``Model.fit`` does not run under a
multi-worker strategy as released (keras-team/keras#20585,
tensorflow/tensorflow#72388); :func:`trainer.compat.keras.patch_fit_for_multi_worker` fixes the
two places that fail, for multi-worker strategies only.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any

from trainer.compat import keras as compat_keras
from trainer.config import UserError

log = logging.getLogger("trainer.distribute")

STRATEGIES = ("auto", "default", "mirrored", "multi_worker")


@dataclass
class Placement:
    strategy: object | None
    description: str
    mixed_precision: bool
    replicas: int = 1
    workers: int = 1
    worker_index: int = 0  # this process among ``workers`` (the chief first)


def _tf_config() -> dict:
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        raise UserError("TF_CONFIG: not valid JSON") from None
    if not isinstance(value, dict):
        raise UserError("TF_CONFIG: must be a JSON object with 'cluster' and 'task'")
    return value


def _tf_config_workers() -> int:
    cluster = _tf_config().get("cluster") or {}
    return len(cluster.get("worker", [])) + len(cluster.get("chief", []))


def task() -> tuple[str | None, int]:
    """This process's ``(task type, index)`` from ``TF_CONFIG``; ``(None, 0)`` without one."""
    spec = _tf_config().get("task") or {}
    try:
        return spec.get("type"), int(spec.get("index", 0))
    except (TypeError, ValueError):
        raise UserError(f"TF_CONFIG: task index {spec.get('index')!r} is not an integer") from None


def worker_index() -> int:
    """This task's place among the cluster's workers, the chief (when the cluster names one) first."""
    kind, index = task()
    has_chief = bool((_tf_config().get("cluster") or {}).get("chief"))
    return index + 1 if kind == "worker" and has_chief else index


def is_chief() -> bool:
    """Whether this process is the chief of a ``TF_CONFIG`` cluster (True without ``TF_CONFIG``).

    TensorFlow's rule: task type ``chief``; or ``worker`` 0 when the cluster
    names no chief. Every other task (other workers, an evaluator) is not.
    """
    config = _tf_config()
    kind, index = task()
    if kind is None:
        return True
    if kind == "chief":
        return True
    return kind == "worker" and index == 0 and not (config.get("cluster") or {}).get("chief")


def multi_worker(strategy: str = "auto") -> bool:
    """Whether ``--strategy`` (with ``TF_CONFIG``) means ``MultiWorkerMirroredStrategy``."""
    return strategy == "multi_worker" or (strategy == "auto" and _tf_config_workers() > 1)


def writes_shared_outputs(strategy: str = "auto") -> bool:
    """False on the non-chief workers of a multi-worker run: they must not write the shared job folder."""
    return not multi_worker(strategy) or is_chief()


def uses_mixed_precision(mixed_precision: bool | None = None) -> bool:
    """``--mixed-precision`` resolved: as asked, else on exactly when a GPU is present."""
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU")) if mixed_precision is None else bool(mixed_precision)


def configure(strategy: str = "auto", mixed_precision: bool | None = None) -> Placement:
    """Create the strategy (before any other TensorFlow op) and set the precision policy."""
    import keras
    import tensorflow as tf

    if strategy not in STRATEGIES:
        raise UserError(f"--strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    workers = _tf_config_workers()
    if multi_worker(strategy):
        compat_keras.patch_fit_for_multi_worker()
        chosen = tf.distribute.MultiWorkerMirroredStrategy()
        kind, index = task()
        description = (f"MultiWorkerMirroredStrategy over {workers} workers from TF_CONFIG "
                       f"(this is {kind or 'worker'} {index}, {'the chief' if is_chief() else 'not the chief'})")
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
    use_mixed = uses_mixed_precision(mixed_precision)
    keras.mixed_precision.set_global_policy("mixed_float16" if use_mixed else "float32")
    if use_mixed and not has_gpu:
        log.warning("mixed precision on a CPU is slow; it is meant for GPUs")
    replicas = chosen.num_replicas_in_sync if chosen is not None else 1
    if multi_worker(strategy):
        return Placement(chosen, description, use_mixed, replicas, workers, worker_index())
    return Placement(chosen, description, use_mixed, replicas)


def scratch_config(config):
    """A non-chief worker's config: its job folder (and default caches) in a new scratch folder.

    Returns ``(config, scratch)``; the caller deletes ``scratch`` at the end.
    The feature cache stays where the chief keeps it (``--cache-dir``, else
    ``JOB/cache``): caches publish by renaming, the chief builds them, and a
    worker waits for the chief's (building its own only when none appears,
    as on a disk it does not share). ``--cache-images PATH`` moves into
    the scratch folder (two writers of one tf.data cache file would collide).
    """
    import tempfile

    kind, index = task()
    scratch = tempfile.mkdtemp(prefix=f"tlp-{kind or 'worker'}{index}-")
    changes = {"job_dir": os.path.join(scratch, "job"), "cache_dir": config.feature_cache_dir}
    if config.cache_images and config.cache_images != "memory":
        changes["cache_images"] = os.path.join(scratch, "images")
    log.info("%s %d is not the chief: it writes to the scratch folder %s (deleted at the end), not %s",
             kind or "worker", index, scratch, config.job_dir)
    return config.replace(**changes), scratch


def tuning_role() -> str:
    """``single`` (no distributed tuning), ``chief`` (runs the oracle) or ``worker`` (runs trials)."""
    if "KERASTUNER_ORACLE_IP" not in os.environ:
        return "single"
    missing = [k for k in ("KERASTUNER_ORACLE_PORT", "KERASTUNER_TUNER_ID") if k not in os.environ]
    if missing:
        raise UserError(f"KERASTUNER_ORACLE_IP is set but {', '.join(missing)} is not")
    return "chief" if "chief" in os.environ["KERASTUNER_TUNER_ID"] else "worker"


def _sum_over_workers(strategy, values):
    """Each worker's float64 ``values`` summed over all replicas (a collective: every worker must call it)."""
    import tensorflow as tf

    local = tf.constant(values, dtype=tf.float64)
    per_replica = strategy.experimental_distribute_values_from_function(lambda context: local)
    return strategy.reduce("SUM", per_replica, axis=None).numpy()


def same_on_all_workers(strategy, numbers) -> bool:
    """Whether every worker passed the same (small, integer) ``numbers``; every worker must call it."""
    values = [float(n) for n in numbers]
    squares = [v * v for v in values]
    total = _sum_over_workers(strategy, values + squares)
    replicas = strategy.num_replicas_in_sync
    sums, sums_of_squares = total[:len(values)], total[len(values):]
    # n * sum(x^2) == (sum x)^2 exactly when every replica's x is the same.
    return all(abs(replicas * q - s * s) < 0.5 for s, q in zip(sums, sums_of_squares))


def barrier(strategy) -> None:
    """Wait until every worker reaches this point."""
    _sum_over_workers(strategy, [1.0])


class strategy_scope:
    """``strategy.scope()``, or nothing when there is no strategy."""

    def __init__(self, strategy):
        self.strategy = strategy
        self.context = None

    def __enter__(self):
        if self.strategy is not None:
            self.context = self.strategy.scope()
            self.context.__enter__()
        return self

    def __exit__(self, *exc: Any):
        if self.context is not None:
            return self.context.__exit__(*exc)
        return False
