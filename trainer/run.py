"""The whole trainer run: check inputs, search, retrain the best, evaluate, gate, export.

:func:`run` is what ``python -m trainer`` does (see :mod:`trainer.cli`); it
writes the job folder of docs/contracts.md section 3 and returns a summary
dict. Every user mistake surfaces as :class:`trainer.config.UserError` before
any long computation starts (:func:`_plan`).

Imports run one way: ``cli -> run -> search -> data -> model``, and
``run -> finish -> publish, report`` (docs/architecture.md).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass

from trainer import distribute, finish, staging
from trainer.config import TrainConfig, UserError

log = logging.getLogger("trainer")


def check_job_dir(job_dir: str) -> None:
    """Fail at once (not after an hour of search) when the job folder cannot be written."""
    import tensorflow as tf

    probe = os.path.join(job_dir, f".write-probe-{os.getpid()}")
    try:
        tf.io.gfile.makedirs(job_dir)
        with tf.io.gfile.GFile(probe, "w") as handle:
            handle.write("ok")
        tf.io.gfile.remove(probe)
    except (tf.errors.OpError, OSError) as error:
        reason = getattr(error, "message", None) or getattr(error, "strerror", None) or str(error)
        raise UserError(f"--job-dir {job_dir}: cannot write there ({str(reason).splitlines()[0][:160]})") from None

def _write_json(path: str, value) -> None:
    import tensorflow as tf

    tf.io.gfile.makedirs(os.path.dirname(path))
    staging.write_text(path, json.dumps(value, indent=2, sort_keys=True, default=str))

def _weights_id(weights: str, weights_path: str | None) -> str:
    if weights.lower() in ("imagenet", "none"):
        return weights.lower()
    return os.path.abspath(weights) if "://" not in weights else weights

def run(config: TrainConfig, placement=None) -> dict:
    """Run the trainer end to end; see the module docstring.

    On a worker of a multi-worker strategy that is not the chief, everything
    goes to a scratch folder that is deleted at the end, and the run stops
    after the retrain (the chief evaluates, gates and exports).
    """
    import tensorflow as tf

    if distribute.writes_shared_outputs(config.strategy):
        existed = tf.io.gfile.exists(config.job_dir)
        try:
            return _named_data_loss(config, lambda: _run(config, placement))
        except BaseException:
            if not existed:
                _remove_if_empty(config.job_dir)
            raise
    import shutil

    config, scratch = distribute.scratch_config(config)
    try:
        return _named_data_loss(config, lambda: _run(config, placement, chief=False))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

def _remove_if_empty(job_dir: str) -> None:
    """A failed run leaves no empty job folder behind (only one it created, and only while empty)."""
    import tensorflow as tf

    try:
        if tf.io.gfile.isdir(job_dir) and not tf.io.gfile.listdir(job_dir):
            tf.io.gfile.rmtree(job_dir)
    except tf.errors.OpError:
        pass

def _named_data_loss(config: TrainConfig, body):
    """Run ``body``; a shard that stops reading mid-run, or a full disk, becomes one line naming the shard or path."""
    import tensorflow as tf

    from trainer.data import info as data_info

    from trainer.data import records
    from trainer.search.hypermodel import DataLoss

    try:
        return body()
    except (tf.errors.DataLossError, DataLoss):
        from preprocessing import tfrecords

        shards = {split: tfrecords.list_shards(config.data_dir, split) for split in tfrecords.SPLITS}
        raise data_info.corrupt_data_error(config.data_dir, shards) from None
    except (OSError, RuntimeError, ValueError, tf.errors.OpError) as error:
        full = staging.disk_full_message(error, config.job_dir)
        if not full:
            raise
        raise UserError(full) from None

def _check_same_search(tuner, placement, config: TrainConfig) -> None:
    """Every worker of a multi-worker strategy must run the same trials: refuse when their tuner states differ."""
    from trainer.search import tuner as search

    counts = search.trial_counts(tuner)
    state = [sum(counts.values()), counts.get("COMPLETED", 0)]
    if not distribute.same_on_all_workers(placement.strategy, state):
        raise UserError(f"--job-dir {config.job_dir}: the workers hold different searches ({state[0]} trials here); "
                        "a multi-worker search cannot resume (the other workers start from empty scratch "
                        "folders): pass --overwrite or use a new --job-dir")

def _trials_table(tuner, config: TrainConfig) -> None:
    from trainer.search.tables import write_trials_table

    write_trials_table(tuner.oracle, config.tuner_dir, elapsed_s=tuner.__dict__.get("trial_seconds", {}))


@dataclass
class Plan:
    """What the checked command amounts to, known before any long computation starts."""

    backbone: object
    image_size: tuple[int, int]
    info: object
    weights_path: str
    random_init: bool
    space: dict
    num_blocks: int
    feature_shape: tuple
    max_depth: int
    boundary: str | None


def _plan(config: TrainConfig) -> Plan:
    """Check the data, job folder, backbone, weights and search space; raise :class:`UserError` on any mistake."""
    import keras

    from trainer.data import info as data_info

    from trainer.data import records
    from trainer.model import backbones, classifier, random_weights
    from trainer.search import space as search_space

    backbone = backbones.get_backbone(config.backbone)
    image_size = tuple(config.image_size or (backbone.default_size, backbone.default_size))
    backbones.check_image_size(backbone, image_size)
    info = data_info.inspect_data(config.data_dir, config.validation_fraction)
    check_job_dir(config.job_dir)
    overrides = search_space.load_search_space(config.search_space)
    weights_path = backbones.resolve_weights(config.weights, backbone)
    random_init = weights_path is None
    if random_init:
        def calibration_images():
            images, _ = next(iter(records.image_dataset(info, "train", image_size,
                                                        random_weights.CALIBRATION_IMAGES)))
            return images

        weights_path = random_weights.materialize_random_weights(backbone, image_size, config.feature_cache_dir,
                                                                 config.seed, calibration_images=calibration_images)
    probe = backbone.build(image_size, weights_path)
    num_blocks = len(backbone.blocks(probe))
    feature_shape = tuple(int(d) for d in probe.output.shape[1:])
    space = search_space.resolve_space(overrides, num_blocks=num_blocks, num_train=info.size("train"))
    max_depth = search_space.max_finetune_depth(space)
    boundary = classifier.boundary_layer(backbone, probe, max_depth) if config.finetune_cache else None
    del probe
    keras.backend.clear_session()
    return Plan(backbone, image_size, info, weights_path, random_init, space, num_blocks, feature_shape, max_depth,
                boundary)


def _log_plan(plan: Plan, config: TrainConfig, placement, mode: str) -> None:
    from trainer.data import info as data_info
    from trainer.data import records
    from trainer.model import random_weights

    log.info("data %s: %d classes; %s", config.data_dir, plan.info.num_classes, data_info.describe_counts(plan.info))
    log.info("running on %s; mixed precision %s", placement.description, "on" if placement.mixed_precision else "off")
    if plan.random_init:
        log.info("--weights none: a seeded random initialisation, batch-norm statistics from up to %d training "
                 "images (%s)", random_weights.CALIBRATION_IMAGES, plan.weights_path)
    log.info("backbone %s at %dx%d: %d blocks, features %s", plan.backbone.name, plan.image_size[0],
             plan.image_size[1], plan.num_blocks, "x".join(map(str, plan.feature_shape)))
    budget = f"up to {config.trial_budget} trials" if config.trial_budget else "trials as Hyperband schedules them"
    log.info("search: %s (%s tuner, %s, %d epochs per phase) in %s",
             {"resume": "resuming the previous search", "fresh": "starting afresh",
              "worker": "worker of a distributed search"}[mode],
             config.tuner, budget, config.epochs, config.tuner_dir)


def _caches(plan: Plan, config: TrainConfig):
    """The bottleneck feature cache and, with ``--finetune-cache``, the activation cache (or None)."""
    from trainer.data.activations import ActivationCache
    from trainer.data.features import FeatureCache
    from trainer.search import space as search_space

    features = FeatureCache(config.feature_cache_dir, plan.backbone, plan.weights_path, plan.image_size, plan.info,
                            keep_maps="flatten" in search_space.pooling_values(plan.space))
    if plan.boundary:
        log.info("fine-tune cache: %d augmented views of every training image at %s (below the top %d blocks)",
                 config.finetune_cache, plan.boundary, plan.max_depth)
        return features, ActivationCache(config.feature_cache_dir, plan.backbone, plan.weights_path, plan.image_size,
                                         plan.info, boundary=plan.boundary, views=config.finetune_cache,
                                         augment=config.augment, seed=config.seed)
    if config.finetune_cache and plan.max_depth == 0:
        log.info("--finetune-cache: no trial fine-tunes (finetune_depth is 0), so nothing is cached")
    elif config.finetune_cache:
        log.warning("--finetune-cache: no single layer input below the top %d of %d blocks to cache (the whole "
                    "backbone may be unfrozen, or layers above reach below it); fine-tuning on images",
                    plan.max_depth, plan.num_blocks)
    return features, None


def _run(config: TrainConfig, placement=None, chief: bool = True) -> dict:
    import keras

    from trainer.data import info as data_info

    from trainer.data import records
    from trainer.data.inputs import TrialInputs
    from trainer.model.augment import build_augmenter
    from trainer.search import final
    from trainer.search import identity as search_identity
    from trainer.search import tuner as search
    from trainer.search.hypermodel import TransferHyperModel

    started = time.perf_counter()
    role = distribute.tuning_role()
    plan = _plan(config)
    identity = search_identity.search_identity(config, plan.space, plan.image_size,
                                      _weights_id(config.weights, plan.weights_path),
                                      mixed_precision=distribute.uses_mixed_precision(config.mixed_precision),
                                      carve=plan.info.carved_validation)
    mode = search_identity.prepare_project(config, identity) if role != "worker" else "worker"
    if placement is None:
        placement = distribute.configure(config.strategy, config.mixed_precision)
    if config.export and config.export_precision == "float16" and not placement.mixed_precision:
        raise UserError("--export-precision float16 keeps the training's mixed_float16 compute; "
                        "it needs --mixed-precision")
    _log_plan(plan, config, placement, mode)

    weights = data_info.class_weights(plan.info) if config.class_weights else None
    if weights:
        log.info("class weights: %s", ", ".join(f"{plan.info.labels[i]}={w:.2f}" for i, w in weights.items()))
    features, activations = _caches(plan, config)
    inputs = TrialInputs.from_caches(
        plan.info, plan.image_size, config.batch_size * placement.replicas, features=features,
        activations=activations, max_cached_depth=plan.max_depth, augmenter=build_augmenter(config.augment, config.seed),
        cache_images=config.cache_images, class_weight=weights, seed=config.seed, replicas=placement.replicas,
        ordered=placement.workers > 1,
        worker=(placement.worker_index, placement.workers) if placement.workers > 1 else None)
    model_builder = TransferHyperModel(
        plan.backbone, plan.weights_path, plan.image_size, plan.info.num_classes, plan.space, inputs,
        epochs=config.epochs, patience=config.early_stopping_patience, strategy=placement.strategy,
        precision="mixed_float16" if placement.mixed_precision else "float32")
    tuner = search.create_tuner(model_builder, config, placement.strategy)
    if placement.workers > 1:
        _check_same_search(tuner, placement, config)
    if mode == "resume" and search.is_complete(tuner):
        log.info("the resumed search has run all its trials: on to the final fit (caches built only as it needs them)")
    else:
        from trainer.data.build_once import build_once

        for cache in (features, activations):
            if cache is not None:
                build_once(cache, role if chief else "worker")
    if role != "worker":
        search_identity.record_identity(config, identity)
    search_board = os.path.join(config.tensorboard_dir, "search")
    if role != "worker":
        from trainer.search.hparams import write_hparams_config

        write_hparams_config(search_board, tuner.oracle.get_space())
    search.run_search(tuner, config, [keras.callbacks.TensorBoard(log_dir=search_board)])
    counts = search.trial_counts(tuner)
    log.info("search finished: %s", ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items())))
    if role == "worker":
        return {"role": "worker", "trials": counts}

    _trials_table(tuner, config)
    best = search.best_trial(tuner.oracle)
    best_values = {k: v for k, v in best.hyperparameters.values.items() if not k.startswith("tuner/")}
    _write_json(os.path.join(config.job_dir, "best_hyperparameters.json"),
                {"trial_id": best.trial_id, "score": best.score, "objective": search.OBJECTIVE.name,
                 "values": best_values, "backbone": plan.backbone.name, "image_size": list(plan.image_size)})
    log.info("best trial %s: val_accuracy %.4f with %s", best.trial_id, best.score, best_values)

    features.ensure()
    if activations is not None and config.finetune_cache_final:
        activations.ensure()
    model, history = final.retrain(model_builder, best.hyperparameters, config)
    if not chief:
        log.info("retrained; waiting for the chief to evaluate, gate and export")
        distribute.barrier(placement.strategy)
        return {"role": "worker", "trials": counts, "best_trial": best.trial_id}
    summary = {"role": role, "trials": counts, "best_trial": best.trial_id, "best_score": best.score,
               "best_hyperparameters": best_values, "search_mode": mode,
               "class_weights": {plan.info.labels[i]: round(w, 4) for i, w in (weights or {}).items()}}
    summary.update(finish.evaluate_gate_export(model, history, plan.info, plan.image_size, plan.backbone.name,
                                               best_values, config, feature_cache=features.path))
    summary["seconds"] = round(time.perf_counter() - started, 1)
    _write_json(os.path.join(config.job_dir, "summary.json"), summary)
    if placement.workers > 1:
        distribute.barrier(placement.strategy)  # the other workers wait for this, then all exit together
    return summary
