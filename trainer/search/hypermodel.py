"""The two-phase transfer-learning trial, as a Keras Tuner ``HyperModel``.

:class:`TransferHyperModel` is a ``keras_tuner.HyperModel``. ``build(hp)``
returns the whole classifier (``image [0, 255] -> backbone preprocessing ->
frozen backbone -> head -> softmax``), which is what gets exported.
``fit(hp, model, ...)`` trains it the way practitioners do by hand:

1. the head alone, on bottleneck features of the frozen backbone read from the
   on-disk cache (:mod:`trainer.data.features`), so no trial or epoch runs the
   backbone again;
2. when ``finetune_depth > 0``, the top ``depth`` blocks of the backbone
   unfrozen and trained with the (low) fine-tune learning rate on augmented
   images. Batch normalization layers stay frozen (``trainable=False``, which
   in Keras 3 also runs them in inference mode) so their moving statistics
   never move.

Both phases stop early on validation loss and restore the best weights. A
trial whose loss becomes NaN, or that runs out of memory, raises
``FailedTrialError``: Keras Tuner records it as failed and goes on.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from typing import Any, Callable

import keras
import keras_tuner as kt

from trainer import distribute
from trainer.compat import keras_tuner as kt_compat
from trainer.data.inputs import TrialInputs
from trainer.model import classifier
from trainer.model.backbones import Backbone
from trainer.progress import epoch_callback
from trainer.search import space as search_space

log = logging.getLogger("trainer.search.hypermodel")


class DataLoss(kt.errors.FatalError):
    """A shard could not be read during a trial. Keras Tuner lets a ``FatalError`` through instead of
    recording a failed trial; the run names the shard (:func:`trainer.data.records.corrupt_data_error`)."""


class TransferHyperModel(kt.HyperModel):
    """Head + fine-tune depth search over one backbone (see the module docstring)."""

    def __init__(self, backbone: Backbone, weights_path: str | None, image_size: tuple[int, int],
                 num_classes: int, space: dict[str, dict], inputs: TrialInputs | None = None, *,
                 epochs: int = 10, patience: int = 3, strategy=None, precision: str = "float32",
                 verbose: int = 0):
        super().__init__(name=f"transfer_{backbone.name}", tunable=True)
        self.backbone = backbone
        self.weights_path = weights_path
        self.image_size = tuple(image_size)
        self.num_classes = num_classes
        self.space = space
        self.inputs = inputs
        self.epochs = epochs
        self.patience = patience
        self.strategy = strategy
        self.precision = precision
        self.verbose = verbose
        self.last_history: dict[str, dict] = {}
        self._declaring_only = False

    # -- building -------------------------------------------------------------------------------

    def declare_space(self, hp: kt.HyperParameters) -> dict[str, Any]:
        """Declare the space on ``hp`` (:func:`trainer.search.space.declare_space`) and return this trial's values.

        Keras Tuner finds conditional hyperparameters by calling ``build``
        until every condition has been active once; inside
        :meth:`declaring_only` those calls stop here instead of building a
        backbone each time (seconds per call, several calls per search).
        """
        return search_space.declare_space(hp, self.space)

    @contextlib.contextmanager
    def declaring_only(self):
        """Within this block ``build(hp)`` declares the space and returns ``None`` (for a tuner's constructor)."""
        self._declaring_only = True
        try:
            yield self
        finally:
            self._declaring_only = False

    def build(self, hp: kt.HyperParameters) -> keras.Model | None:
        """The full classifier: float32 ``[None, H, W, 3]`` in [0, 255] -> softmax ``[None, C]`` float32.

        Layers compute in ``self.precision``. It is set here, at every build,
        because ``keras.backend.clear_session()`` (which Keras Tuner calls
        before each trial's build) resets the global policy to float32.
        """
        values = self.declare_space(hp)
        if self._declaring_only:
            return None
        keras.mixed_precision.set_global_policy(self.precision)
        return classifier.build_classifier(self.backbone, self.weights_path, self.image_size, self.num_classes, values)

    # -- training -------------------------------------------------------------------------------

    def fit(self, hp: kt.HyperParameters, model: keras.Model, *args, callbacks=None, epochs=None,
            initial_epoch: int = 0, **kwargs) -> dict[str, float]:
        """Train ``model`` in two phases (see the module docstring); return the validation metrics."""
        import tensorflow as tf

        if self.inputs is None:
            raise kt.errors.FatalError("TransferHyperModel.fit needs TrialInputs")
        callbacks = list(callbacks or [])
        checkpoints = [cb for cb in callbacks if kt_compat.is_save_best_epoch(cb)]
        callbacks = [cb for cb in callbacks if cb not in checkpoints]
        callbacks, hparams = _own_hparams_logger(callbacks, hp)
        budget = max(1, int(epochs or self.epochs) - int(initial_epoch or 0))
        warm = "tuner/trial_id" in hp.values
        depth = hp.get("finetune_depth")
        backbone_model = classifier.find_backbone(model)
        head = model.get_layer("head")
        try:
            with distribute.strategy_scope(self.strategy):
                self.last_history = {}
                result = None
                if not (warm and depth > 0):
                    pooling = hp.get("pooling") if hp.get("pooling") in search_space.POOLED_FEATURES else None
                    trainee = head.get_layer("head_top") if pooling else head
                    trainee.compile(optimizer=self._optimizer(hp, hp.get("head_learning_rate")),
                                    loss="sparse_categorical_crossentropy", metrics=["accuracy"])
                    history = trainee.fit(self.inputs.features("train", pooling),
                                          validation_data=self.inputs.features("validation", pooling),
                                          epochs=budget, callbacks=self._callbacks(callbacks + hparams, "head"),
                                          class_weight=self.inputs.class_weight, shuffle=False,
                                          verbose=self.verbose)
                    self.last_history["phase1"] = _check_history(history.history, "head")
                    result = _best(history.history)
                if depth > 0:
                    classifier.set_finetune_depth(backbone_model, self.backbone, depth)
                    trainee, train, validation = self._finetune_data(model, backbone_model, depth)
                    trainee.compile(optimizer=self._optimizer(hp, hp.get("finetune_learning_rate")),
                                    loss="sparse_categorical_crossentropy", metrics=["accuracy"])
                    start = len(self.last_history.get("phase1", {}).get("loss", []))
                    steps = {} if self.inputs.cached_finetune(depth) else {
                        "steps_per_epoch": self.inputs.image_steps("train"),
                        "validation_steps": self.inputs.image_steps("validation")}
                    history = trainee.fit(train, validation_data=validation, initial_epoch=start, **steps,
                                          epochs=start + budget,
                                          callbacks=self._callbacks(callbacks + hparams, f"fine-tune (top {depth} blocks)"),
                                          class_weight=self.inputs.class_weight, shuffle=False,
                                          verbose=self.verbose)
                    self.last_history["phase2"] = _check_history(history.history, "fine-tune")
                    result = _best(history.history)
        except tf.errors.ResourceExhaustedError as error:
            raise kt.errors.FailedTrialError(f"out of memory: {str(error).splitlines()[0][:200]}") from None
        except tf.errors.DataLossError as error:
            raise DataLoss(error) from None  # the data, not the trial, is broken: stop the search
        for checkpoint in checkpoints:
            model.save_weights(checkpoint.filepath)
        for logger in hparams:
            logger.record_score(result)
        return result

    def _finetune_data(self, model: keras.Model, backbone_model: keras.Model, depth: int):
        """The model phase 2 trains and its train and validation data.

        On images: the whole classifier. On cached activations: ``boundary ->
        upper backbone -> head``, built from the classifier's own layers, so
        training it trains the classifier.
        """
        if not self.inputs.cached_finetune(depth):
            return (model, self.inputs.images("train", augment=True),
                    self.inputs.images("validation", augment=False))
        upper = classifier.upper_backbone(backbone_model, self.inputs.boundary)
        activations = keras.Input(shape=tuple(upper.input.shape[1:]), name="activations")
        trainee = keras.Model(activations, model.get_layer("head")(upper(activations, training=False)),
                              name="cached_finetune")
        return trainee, self.inputs.activations("train"), self.inputs.activations("validation")

    def _optimizer(self, hp, learning_rate):
        name = hp.get("optimizer")
        momentum = hp.get("momentum") if name == "sgd" and hp.is_active("momentum") else 0.9
        return classifier.make_optimizer(name, learning_rate, momentum)

    def _callbacks(self, callbacks: list, phase: str) -> list:
        progress = []
        if self.inputs.train_size:
            progress = [epoch_callback(phase, self.inputs.train_size)]
        return [keras.callbacks.TerminateOnNaN(),
                keras.callbacks.EarlyStopping(monitor="val_loss", patience=self.patience,
                                              restore_best_weights=True),
                *progress, *callbacks]


def _own_hparams_logger(callbacks: list, hp: kt.HyperParameters) -> tuple[list, list]:
    """Swap Keras Tuner's hparams callback (one fit only) for :func:`trainer.search.hparams.hparams_callback`.

    Keras Tuner adds TensorBoard's hparams callback next to a ``TensorBoard``
    callback, pointed at the trial's own run; that callback cannot span the
    two phases of a trial, the project's logger can.
    """
    from tensorboard.plugins.hparams import api as hparams_api

    keras_tuner_hparams = [cb for cb in callbacks if isinstance(cb, hparams_api.KerasCallback)]
    rest = [cb for cb in callbacks if cb not in keras_tuner_hparams]
    boards = [cb for cb in rest if isinstance(cb, keras.callbacks.TensorBoard)]
    if not keras_tuner_hparams or not boards:
        return rest, []
    from trainer.search.hparams import hparams_callback

    log_dir = str(boards[0].log_dir)
    trial_id = os.path.basename(os.path.dirname(log_dir.rstrip("/")))
    return rest, [hparams_callback(log_dir, hp.values, trial_id=trial_id)]


def _check_history(history: dict, phase: str) -> dict:
    losses = history.get("loss", [])
    if not losses or any(not math.isfinite(v) for v in losses):
        raise kt.errors.FailedTrialError(f"{phase} loss became NaN or infinite")
    return {k: [float(v) for v in vals] for k, vals in history.items()}


def _best(history: dict) -> dict[str, float]:
    """The validation metrics of the epoch EarlyStopping restored (lowest val_loss)."""
    losses = history["val_loss"]
    best = min(range(len(losses)), key=lambda i: losses[i] if math.isfinite(losses[i]) else math.inf)
    return {"val_loss": float(losses[best]), "val_accuracy": float(history["val_accuracy"][best]),
            "accuracy": float(history["accuracy"][best]), "loss": float(history["loss"][best])}


