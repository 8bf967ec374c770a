"""The whole trainer run: check inputs, search, retrain the best, evaluate, gate, export.

:func:`run` is what ``python -m trainer`` does (see :mod:`trainer.cli`); it
writes the job folder of docs/contracts.md section 3 and returns a summary
dict. Every user mistake surfaces as :class:`trainer.config.UserError` before
any long computation starts.
"""

from __future__ import annotations

import json
import logging
import os
import time

from trainer.config import TrainConfig, UserError

log = logging.getLogger("trainer")

CHECK_IMAGES = 16


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
    with tf.io.gfile.GFile(path, "w") as handle:
        json.dump(value, handle, indent=2, sort_keys=True, default=str)


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

    from trainer import distribute

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
    """Run ``body``; a shard that stops reading mid-run becomes one line naming the shard and its split."""
    import tensorflow as tf

    from trainer import data
    from trainer.hypermodel import DataLoss

    try:
        return body()
    except (tf.errors.DataLossError, DataLoss):
        from preprocessing import tfrecords

        shards = {split: tfrecords.list_shards(config.data_dir, split) for split in tfrecords.SPLITS}
        raise data.corrupt_data_error(config.data_dir, shards) from None


def _run(config: TrainConfig, placement=None, chief: bool = True) -> dict:
    import keras
    import tensorflow as tf

    from trainer import backbones, bottleneck, data, distribute, finetune_cache, hypermodel, search
    from trainer.augment import build_augmenter

    started = time.perf_counter()
    role = distribute.tuning_role()
    backbone = backbones.get_backbone(config.backbone)
    image_size = tuple(config.image_size or (backbone.default_size, backbone.default_size))
    backbones.check_image_size(backbone, image_size)
    info = data.inspect_data(config.data_dir, config.validation_fraction)
    check_job_dir(config.job_dir)
    overrides = hypermodel.load_search_space(config.search_space)
    weights_path = backbones.resolve_weights(config.weights, backbone)
    random_init = weights_path is None
    if random_init:
        weights_path = bottleneck.materialize_random_weights(backbone, image_size, config.feature_cache_dir,
                                                             config.seed, calibrate_on=info)
    probe = backbone.build(image_size, weights_path)
    num_blocks = len(backbone.blocks(probe))
    feature_shape = tuple(int(d) for d in probe.output.shape[1:])
    space = hypermodel.resolve_space(overrides, num_blocks=num_blocks, num_train=info.size("train"))
    max_depth = hypermodel.max_finetune_depth(space)
    boundary = finetune_cache.boundary_layer(backbone, probe, max_depth) if config.finetune_cache else None
    del probe
    keras.backend.clear_session()
    identity = search.search_identity(config, space, image_size, _weights_id(config.weights, weights_path),
                                      mixed_precision=distribute.uses_mixed_precision(config.mixed_precision))
    mode = search.prepare_project(config, identity) if role != "worker" else "worker"
    if placement is None:
        placement = distribute.configure(config.strategy, config.mixed_precision)

    log.info("data %s: %d classes; %s", config.data_dir, info.num_classes, data.describe_counts(info))
    log.info("running on %s; mixed precision %s", placement.description, "on" if placement.mixed_precision else "off")
    if config.export and config.export_precision == "float16" and not placement.mixed_precision:
        raise UserError("--export-precision float16 keeps the training's mixed_float16 compute; "
                        "it needs --mixed-precision")
    if random_init:
        log.info("--weights none: a seeded random initialisation, batch-norm statistics from up to %d training "
                 "images (%s)", bottleneck.CALIBRATION_IMAGES, weights_path)
    log.info("backbone %s at %dx%d: %d blocks, features %s", backbone.name, image_size[0], image_size[1],
             num_blocks, "x".join(map(str, feature_shape)))
    budget = f"up to {config.trial_budget} trials" if config.trial_budget else "trials as Hyperband schedules them"
    log.info("search: %s (%s tuner, %s, %d epochs per phase) in %s",
             {"resume": "resuming the previous search", "fresh": "starting afresh",
              "worker": "worker of a distributed search"}[mode],
             config.tuner, budget, config.epochs, config.tuner_dir)

    weights = data.class_weights(info) if config.class_weights else None
    if weights:
        log.info("class weights: %s", ", ".join(f"{info.labels[i]}={w:.2f}" for i, w in weights.items()))
    batch = config.batch_size * placement.replicas
    cache = bottleneck.FeatureCache(config.feature_cache_dir, backbone, weights_path, image_size, info,
                                    keep_maps="flatten" in hypermodel.pooling_values(space))
    augmenter = build_augmenter(config.augment, config.seed)

    def images(split, augment=False):
        cache_to = config.cache_images
        if cache_to and cache_to != "memory":
            cache_to = os.path.join(cache_to, f"{split}-{image_size[0]}x{image_size[1]}")
        return data.image_dataset(info, split, image_size, batch, shuffle=(split == "train"), seed=config.seed,
                                  augmenter=augmenter if augment else None, cache=cache_to,
                                  replicas=placement.replicas, ordered=placement.workers > 1)

    def features(split, pooling=None):
        return cache.dataset(split, batch, shuffle=(split == "train"), seed=config.seed, replicas=placement.replicas,
                             pooling=pooling)

    activations, acts_cache = None, None
    if boundary:
        acts_cache = finetune_cache.ActivationCache(config.feature_cache_dir, backbone, weights_path, image_size, info,
                                                    boundary=boundary, views=config.finetune_cache,
                                                    augment=config.augment, seed=config.seed)
        log.info("fine-tune cache: %d augmented views of every training image at %s (below the top %d blocks)",
                 config.finetune_cache, boundary, max_depth)

        def activations(split):
            return acts_cache.dataset(split, batch, shuffle=(split == "train"), seed=config.seed,
                                      replicas=placement.replicas)
    elif config.finetune_cache and max_depth == 0:
        log.info("--finetune-cache: no trial fine-tunes (finetune_depth is 0), so nothing is cached")
    elif config.finetune_cache:
        log.warning("--finetune-cache: no single layer input below the top %d of %d blocks to cache (the whole "
                    "backbone may be unfrozen, or layers above reach below it); fine-tuning on images",
                    max_depth, num_blocks)

    inputs = hypermodel.TrialInputs(features, images, weights, activations=activations, boundary=boundary,
                                    max_cached_depth=max_depth if boundary else 0)
    model_builder = hypermodel.TransferHyperModel(
        backbone, weights_path, image_size, info.num_classes, space, inputs, epochs=config.epochs,
        patience=config.early_stopping_patience, strategy=placement.strategy,
        precision="mixed_float16" if placement.mixed_precision else "float32")
    tuner = search.create_tuner(model_builder, config, placement.strategy)
    if placement.workers > 1:
        _check_same_search(tuner, placement, config)
    complete = mode == "resume" and search.is_complete(tuner)
    if complete:
        log.info("the resumed search has run all its trials: on to the final fit (caches built only as it needs them)")
    elif role != "chief":
        cache.ensure()
        if acts_cache is not None:
            acts_cache.ensure()
    if role != "worker":
        search.record_identity(config, identity)
    search_board = os.path.join(config.tensorboard_dir, "search")
    callbacks = [keras.callbacks.TensorBoard(log_dir=search_board)]
    if role != "worker":
        from trainer.reports import write_hparams_config

        write_hparams_config(search_board, tuner.oracle.get_space())
    search.run_search(tuner, config, callbacks)
    counts = search.trial_counts(tuner)
    log.info("search finished: %s", ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items())))
    if role == "worker":
        return {"role": "worker", "trials": counts}

    _trials_table(tuner, config)
    best = search.best_trial(tuner.oracle)
    best_values = {k: v for k, v in best.hyperparameters.values.items() if not k.startswith("tuner/")}
    _write_json(os.path.join(config.job_dir, "best_hyperparameters.json"),
                {"trial_id": best.trial_id, "score": best.score, "objective": search.OBJECTIVE.name,
                 "values": best_values, "backbone": backbone.name, "image_size": list(image_size)})
    log.info("best trial %s: val_accuracy %.4f with %s", best.trial_id, best.score, best_values)

    cache.ensure()
    if acts_cache is not None and config.finetune_cache_final:
        acts_cache.ensure()
    model, history = retrain(model_builder, best.hyperparameters, config)
    if not chief:
        log.info("retrained; waiting for the chief to evaluate, gate and export")
        distribute.barrier(placement.strategy)
        return {"role": "worker", "trials": counts, "best_trial": best.trial_id}
    summary = {"role": role, "trials": counts, "best_trial": best.trial_id, "best_score": best.score,
               "best_hyperparameters": best_values, "search_mode": mode,
               "class_weights": {info.labels[i]: round(w, 4) for i, w in (weights or {}).items()}}
    summary.update(_evaluate_gate_export(model, history, info, image_size, backbone.name, best_values, config))
    summary["seconds"] = round(time.perf_counter() - started, 1)
    _write_json(os.path.join(config.job_dir, "summary.json"), summary)
    if placement.workers > 1:
        distribute.barrier(placement.strategy)  # the other workers wait for this, then all exit together
    return summary


def _check_same_search(tuner, placement, config: TrainConfig) -> None:
    """Every worker of a multi-worker strategy must run the same trials: refuse when their tuner states differ."""
    from trainer import distribute, search

    counts = search.trial_counts(tuner)
    state = [sum(counts.values()), counts.get("COMPLETED", 0)]
    if not distribute.same_on_all_workers(placement.strategy, state):
        raise UserError(f"--job-dir {config.job_dir}: the workers hold different searches ({state[0]} trials here); "
                        "a multi-worker search cannot resume (the other workers start from empty scratch "
                        "folders): pass --overwrite or use a new --job-dir")


def retrain(model_builder, hyperparameters, config: TrainConfig):
    """Train a fresh model with the best hyperparameters (same two phases); return it and its history."""
    import keras

    keras.backend.clear_session()
    epochs = config.final_epochs or config.epochs
    inputs = model_builder.inputs
    cached = inputs is not None and inputs.cached_finetune(hyperparameters.get("finetune_depth"))
    if cached and not config.finetune_cache_final:
        model_builder.inputs = inputs.without_activations()
    log.info("retraining the best hyperparameters (%d epochs per phase%s)", epochs,
             ", fine-tuning on the cached activations" if cached and config.finetune_cache_final
             else ", fine-tuning on freshly augmented images" if cached else "")
    values = hyperparameters.copy()
    for key in [k for k in values.values if k.startswith("tuner/")]:
        values.values.pop(key)
    from trainer.hypermodel import strategy_scope

    with strategy_scope(model_builder.strategy):
        model = model_builder.build(values)
    board = keras.callbacks.TensorBoard(log_dir=os.path.join(config.tensorboard_dir, "final"))
    model_builder.fit(values, model, epochs=epochs, callbacks=[board])
    precision = model_builder.precision if config.export_precision == "float16" else "float32"
    if model_builder.strategy is not None or precision != model_builder.precision:
        model = _inference_copy(model_builder, values, model, precision)
    return model, dict(model_builder.last_history)


def _inference_copy(model_builder, values, model, precision: str):
    """The same classifier rebuilt outside any strategy under ``precision``, with ``model``'s weights.

    Evaluation and export get a plain copy because Keras's predict on a
    distributed model pads uneven batches, and a float32 one because a
    ``mixed_float16`` graph runs its convolutions in float16, which TF
    Serving's CPU image computes slowly. Mixed precision keeps the variables
    in float32, so the weights copy over unchanged.
    """
    import keras

    training = model_builder.precision
    model_builder.precision = precision
    try:
        plain = model_builder.build(values)
    finally:
        model_builder.precision = training
        keras.mixed_precision.set_global_policy(training)
    plain.set_weights(model.get_weights())
    if precision != training:
        log.info("the evaluated and exported model computes in %s (trained in %s)", precision, training)
    return plain


def _trials_table(tuner, config: TrainConfig) -> None:
    from trainer.reports import write_trials_table

    write_trials_table(tuner.oracle, config.tuner_dir, elapsed_s=tuner.__dict__.get("trial_seconds", {}))


def _evaluate_gate_export(model, history, info, image_size, backbone_name, best_values, config) -> dict:
    from trainer import data

    split = info.eval_split
    if split != "test":
        log.warning("no test split in %s: evaluating and gating on the validation split", config.data_dir)
    dataset = data.image_dataset(info, split, image_size, config.batch_size)
    result: dict = {"eval_split": split}
    from trainer.evaluate import evaluate_model

    metrics = evaluate_model(model, dataset, info.labels, config.eval_dir, history=history, top_k=config.top_k)
    result["accuracy"] = float(metrics["accuracy"])
    log.info("%s accuracy of the retrained model: %.4f (%s)", split, result["accuracy"], config.eval_dir)
    if not config.export:
        return result

    images, labels = data.encoded_examples(info, split)
    publish, reason = _gate(result["accuracy"], images, labels, info.labels, config)
    result["published"] = publish
    result["gate"] = reason
    if not publish:
        log.warning("not published: %s", reason)
        return result
    from trainer.export import ExportError, export_model

    metadata = {"backbone": backbone_name, "hyperparameters": best_values, "metrics": {"accuracy": result["accuracy"]},
                "eval_split": split, "data": {"dir": config.data_dir, "counts": info.counts, "labels": info.labels}}
    try:
        exported = export_model(model, config.export_dir, labels=info.labels, image_size=image_size,
                                resize_mode=info.resize_mode, check_images=images[:CHECK_IMAGES], metadata=metadata,
                                max_pixels=_serving_max_pixels(config))
    except ExportError as error:
        raise UserError(f"export to {config.export_dir} failed: {error}") from None
    result["export_version"] = exported.version
    result["export_path"] = exported.path
    log.info("published version %d at %s (max |diff| vs Keras %.2g)", exported.version, exported.path,
             exported.max_abs_diff)
    return result


def _serving_max_pixels(config: TrainConfig) -> int:
    """``--max-pixels``, else the limit preprocessing applied to the training images, else its default."""
    from preprocessing.config import DEFAULT_MAX_PIXELS
    from trainer import data

    if config.max_pixels:
        return config.max_pixels
    return int(data.read_options(config.data_dir).get("max_pixels") or DEFAULT_MAX_PIXELS)


def _gate(score: float, images, labels, label_names, config: TrainConfig) -> tuple[bool, str]:
    """Publish only at or above ``--min-accuracy`` and not below the latest published version (``JOB/gate.json``)."""
    from trainer.gate import decide

    decision = decide(score, config.export_dir, images, labels, min_accuracy=config.min_accuracy,
                      force=config.force, out_path=os.path.join(config.job_dir, "gate.json"),
                      label_names=label_names)
    return decision.publish, decision.reason
