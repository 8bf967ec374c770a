"""The final model: the best hyperparameters trained afresh, and the copy that is evaluated and exported."""

from __future__ import annotations

import logging
import os

from trainer import distribute
from trainer.config import TrainConfig

log = logging.getLogger("trainer")


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
    with distribute.strategy_scope(model_builder.strategy):
        model = model_builder.build(values)
    board = keras.callbacks.TensorBoard(log_dir=os.path.join(config.tensorboard_dir, "final"))
    model_builder.fit(values, model, epochs=epochs, callbacks=[board])
    precision = model_builder.precision if config.export_precision == "float16" else "float32"
    if model_builder.strategy is not None or precision != model_builder.precision:
        model = inference_copy(model_builder, values, model, precision)
    return model, dict(model_builder.last_history)

def inference_copy(model_builder, values, model, precision: str):
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
