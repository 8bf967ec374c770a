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
tensorflow/tensorflow#72388); :func:`patch_keras_for_multi_worker` fixes the
two places that fail, for multi-worker strategies only.
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
    workers: int = 1


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
        patch_keras_for_multi_worker()
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
    return Placement(chosen, description, use_mixed, replicas, workers if multi_worker(strategy) else 1)


def scratch_config(config):
    """A non-chief worker's config: its job folder (and default caches) in a new scratch folder.

    Returns ``(config, scratch)``; the caller deletes ``scratch`` at the end.
    An explicit ``--cache-dir`` is kept (the feature cache publishes by
    renaming, so workers can share one); ``--cache-images PATH`` moves into
    the scratch folder (two writers of one tf.data cache file would collide).
    """
    import tempfile

    kind, index = task()
    scratch = tempfile.mkdtemp(prefix=f"tlp-{kind or 'worker'}{index}-")
    changes = {"job_dir": os.path.join(scratch, "job")}
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


_KERAS_PATCHED = False


def patch_keras_for_multi_worker() -> bool:
    """Make Keras 3's TensorFlow ``fit``/``evaluate`` work under a multi-worker strategy.

    Keras 3 (up to at least 3.15, keras-team/keras#20585) fails twice when a
    ``MultiWorkerMirroredStrategy`` spans more than one worker:

    1. ``fit``/``evaluate`` start with ``_maybe_symbolic_build``, which takes
       the first distributed batch and calls ``strategy.reduce("MEAN", batch)``
       on the whole ``(x, y[, sample_weight])`` tuple only to learn its shapes
       and dtypes. ``Strategy.reduce`` does not take nested structures; the
       multi-worker strategy tries to convert the tuple to one tensor:
       ``ValueError: Attempt to convert a value (PerReplica...)``. The batch is
       only needed for shapes, so this takes the first local replica's part
       (no cross-worker reduce, no collective).
    2. Every train/test step reduces its (scalar) metric results across
       workers with ``strategy.reduce("MEAN", v, axis=0)``, which fails on a
       scalar (``Invalid reduction dimension 0 for input with 0 dimensions``,
       tensorflow/tensorflow#72388). This uses ``axis=None``: the mean across
       replicas, as Keras does on one machine.

    Only multi-worker strategies take the patched paths; every other strategy
    calls Keras's own code. Returns False (with a warning) when this Keras does
    not have the internals being patched.
    """
    global _KERAS_PATCHED
    if _KERAS_PATCHED:
        return True
    import keras
    import tensorflow as tf

    try:
        from keras.src.backend.tensorflow import trainer as tf_trainer

        trainer_class = tf_trainer.TensorFlowTrainer
        original_build = trainer_class._maybe_symbolic_build
        original_reduce = tf_trainer.reduce_per_replica
        in_multi_worker_mode = tf_trainer._collective_all_reduce_multi_worker
    except (ImportError, AttributeError) as error:
        log.warning("Keras %s: cannot adapt Model.fit to MultiWorkerMirroredStrategy (%s); training may fail",
                    keras.__version__, error)
        return False

    def local_part(value):
        if isinstance(value, tf.distribute.DistributedValues):
            return value.values[0]
        return value

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        strategy = self._distribute_strategy
        if iterator is None or strategy is None or not in_multi_worker_mode(strategy):
            return original_build(self, iterator=iterator, data_batch=data_batch)
        for _, _, batches in iterator:
            data_batch = tf.nest.map_structure(local_part, next(batches))
            break
        return original_build(self, data_batch=data_batch)

    def reduce_per_replica(values, strategy, reduction):
        if reduction in ("auto", "mean") and in_multi_worker_mode(strategy):
            return tf.nest.map_structure(lambda v: strategy.reduce("MEAN", v, axis=None), values)
        return original_reduce(values, strategy, reduction)

    trainer_class._maybe_symbolic_build = _maybe_symbolic_build
    tf_trainer.reduce_per_replica = reduce_per_replica
    _KERAS_PATCHED = True
    log.debug("Keras %s: Model.fit adapted to MultiWorkerMirroredStrategy", keras.__version__)
    return True


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
