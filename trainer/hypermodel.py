"""The search space and the two-phase transfer-learning trial.

:class:`TransferHyperModel` is a ``keras_tuner.HyperModel``. ``build(hp)``
returns the whole classifier (``image [0, 255] -> backbone preprocessing ->
frozen backbone -> head -> softmax``), which is what gets exported.
``fit(hp, model, ...)`` trains it the way practitioners do by hand:

1. the head alone, on bottleneck features of the frozen backbone read from the
   on-disk cache (:mod:`trainer.bottleneck`), so no trial or epoch runs the
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
import copy
import json
import logging
import math
import os
from typing import Any, Callable

import keras
import keras_tuner as kt

from trainer.backbones import Backbone
from trainer.config import UserError

log = logging.getLogger("trainer.hypermodel")

POOLINGS = ("avg", "max", "flatten")
POOLED_FEATURES = ("avg", "max")  # poolings whose features the cache holds as vectors
OPTIMIZERS = ("adam", "sgd")

# name -> (kind, default spec). Kinds: choice, int, float, boolean, fixed.
_DEFAULT_SPACE: dict[str, dict] = {
    "pooling": {"values": ["avg", "max"]},
    "head_batchnorm": {"values": [False, True]},
    "dense_layers": {"min": 0, "max": 2},
    "dense_units_1": {"values": [128, 256, 512]},
    "dense_units_2": {"values": [64, 128, 256]},
    "dropout": {"min": 0.0, "max": 0.5, "step": 0.1},
    "l2": {"values": [0.0, 1e-5, 1e-4, 1e-3]},
    "optimizer": {"values": ["adam", "sgd"]},
    "momentum": {"values": [0.9]},
    "head_learning_rate": {"min": 1e-4, "max": 1e-2, "sampling": "log"},
    "finetune_depth": {"min": 0, "max": 2},
    "finetune_learning_rate": {"min": 1e-5, "max": 1e-3, "sampling": "log"},
}
_INT_NAMES = {"dense_layers", "dense_units_1", "dense_units_2", "finetune_depth"}


def default_max_depth(num_train: int, num_blocks: int) -> int:
    """How many top blocks are worth unfreezing, by the transfer-learning rule of thumb.

    Small datasets overfit a deep fine-tune and gain little from it, so the
    range grows with the data: under 1,000 training images, up to 10% of the
    blocks; under 10,000, 25%; under 100,000, half; beyond that, all of them.
    (Data close to ImageNet needs even less; narrow the range with
    ``--search-space`` when you know that.)
    """
    fraction = 0.1 if num_train < 1000 else 0.25 if num_train < 10000 else 0.5 if num_train < 100000 else 1.0
    return max(1, min(num_blocks, math.ceil(fraction * num_blocks)))


def load_search_space(text_or_path: str | None) -> dict:
    """``--search-space``: a JSON object, or a path to a file holding one; empty when not given."""
    if not text_or_path:
        return {}
    text = text_or_path
    if not text_or_path.lstrip().startswith("{"):
        import tensorflow as tf

        if not tf.io.gfile.exists(text_or_path):
            raise UserError(f"--search-space {text_or_path}: no such file (and not a JSON object)")
        with tf.io.gfile.GFile(text_or_path) as handle:
            text = handle.read()
    try:
        value = json.loads(text)
    except ValueError as error:
        raise UserError(f"--search-space: not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise UserError("--search-space: must be a JSON object of hyperparameter name -> range")
    return value


def resolve_space(overrides: dict, *, num_blocks: int, num_train: int) -> dict[str, dict]:
    """The default ranges with the user's overrides applied, each normalised to a spec dict.

    A scalar fixes a value, a list is a choice, ``{"min", "max", "step"?,
    "sampling"?}`` a range, ``{"values": [...]}`` a choice, ``{"value": v}`` fixed.
    """
    space = copy.deepcopy(_DEFAULT_SPACE)
    space["finetune_depth"]["max"] = default_max_depth(num_train, num_blocks)
    for name, spec in overrides.items():
        if name not in space:
            raise UserError(f"--search-space: unknown hyperparameter {name!r}; known: {', '.join(space)}")
        if isinstance(spec, list):
            spec = {"values": spec}
        elif not isinstance(spec, dict):
            spec = {"value": spec}
        if not ({"values"} <= spec.keys() or {"value"} <= spec.keys() or {"min", "max"} <= spec.keys()):
            raise UserError(f"--search-space: {name!r} needs a value, a list, or min and max")
        space[name] = spec
    _check(space, num_blocks)
    return space


def _spec_values(spec: dict) -> list:
    if "value" in spec:
        return [spec["value"]]
    if "values" in spec:
        return list(spec["values"])
    return [spec["min"], spec["max"]]


def pooling_values(space: dict) -> list:
    """The poolings a resolved search space can choose."""
    return _spec_values(space["pooling"])


def max_finetune_depth(space: dict) -> int:
    """The deepest fine-tune a resolved search space can choose."""
    return max(int(v) for v in _spec_values(space["finetune_depth"]))


def _check(space: dict, num_blocks: int) -> None:
    for value in _spec_values(space["pooling"]):
        if value not in POOLINGS:
            raise UserError(f"--search-space: pooling {value!r} is not one of {', '.join(POOLINGS)}")
    for value in _spec_values(space["optimizer"]):
        if value not in OPTIMIZERS:
            raise UserError(f"--search-space: optimizer {value!r} is not one of {', '.join(OPTIMIZERS)}")
    for value in _spec_values(space["finetune_depth"]):
        if not isinstance(value, int) or not 0 <= value <= num_blocks:
            raise UserError(f"--search-space: finetune_depth {value!r} must be an integer from 0 to "
                            f"{num_blocks} (the backbone's blocks)")
    for value in _spec_values(space["dense_layers"]):
        if not isinstance(value, int) or not 0 <= value <= 2:
            raise UserError(f"--search-space: dense_layers {value!r} must be 0, 1 or 2")
    for name, spec in space.items():
        if "min" in spec and spec["min"] > spec["max"]:
            raise UserError(f"--search-space: {name!r} has min {spec['min']} above max {spec['max']}")


def declare(hp: kt.HyperParameters, name: str, spec: dict):
    """Register one hyperparameter from its spec and return its value for this trial."""
    if "value" in spec:
        return hp.Fixed(name, spec["value"])
    if "values" in spec:
        values = list(spec["values"])
        numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if len(numbers) == len(values) and any(isinstance(v, float) for v in values):
            values = [float(v) for v in values]
        if len(values) == 1:
            return hp.Fixed(name, values[0])
        if all(isinstance(v, bool) for v in values) and sorted(values) == [False, True]:
            return hp.Boolean(name, default=values[0])
        return hp.Choice(name, values, default=values[0])
    if name in _INT_NAMES:
        if spec["min"] == spec["max"]:
            return hp.Fixed(name, int(spec["min"]))
        return hp.Int(name, int(spec["min"]), int(spec["max"]), step=int(spec.get("step", 1)),
                      default=int(spec["min"]))
    if spec["min"] == spec["max"]:
        return hp.Fixed(name, float(spec["min"]))
    return hp.Float(name, float(spec["min"]), float(spec["max"]), step=spec.get("step"),
                    sampling=spec.get("sampling", "linear"))


def _values_above(spec: dict, threshold: int) -> list:
    values = _spec_values(spec) if "min" not in spec else list(range(int(spec["min"]), int(spec["max"]) + 1))
    return [v for v in values if v > threshold]


@keras.saving.register_keras_serializable(package="trainer")
class BackbonePreprocess(keras.layers.Layer):
    """The preprocessing a backbone's ImageNet weights expect, as part of the model.

    ``tf``: ``x / 127.5 - 1``; ``caffe``: RGB to BGR minus the ImageNet means;
    ``torch``: ``(x / 255 - mean) / std``; ``none``: the backbone does its own.
    Input: float ``[B, H, W, 3]`` in [0, 255], RGB.
    """

    def __init__(self, mode: str = "tf", **kwargs):
        super().__init__(**kwargs)
        self.mode = mode

    def call(self, images):
        from keras import ops

        from trainer.backbones import IMAGENET_MEAN_RGB, TORCH_MEAN, TORCH_STD

        images = ops.cast(images, self.compute_dtype)
        if self.mode == "tf":
            return images / 127.5 - 1.0
        if self.mode == "caffe":
            bgr = ops.flip(images, axis=-1)
            return bgr - ops.convert_to_tensor(IMAGENET_MEAN_RGB[::-1], dtype=self.compute_dtype)
        if self.mode == "torch":
            mean = ops.convert_to_tensor([m * 255.0 for m in TORCH_MEAN], dtype=self.compute_dtype)
            std = ops.convert_to_tensor([s * 255.0 for s in TORCH_STD], dtype=self.compute_dtype)
            return (images - mean) / std
        return images

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


def set_finetune_depth(backbone_model: keras.Model, backbone: Backbone, depth: int) -> int:
    """Unfreeze the top ``depth`` blocks (all when ``depth`` covers them); BN layers stay frozen.

    Returns the number of layers made trainable.
    """
    blocks = backbone.blocks(backbone_model)
    backbone_model.trainable = True
    for layer in backbone_model.layers:
        layer.trainable = False
    if depth >= len(blocks):
        chosen = [layer for layer in backbone_model.layers if not isinstance(layer, keras.layers.InputLayer)]
    else:
        chosen = [layer for block in blocks[len(blocks) - depth:] for layer in block] if depth > 0 else []
    count = 0
    for layer in chosen:
        if isinstance(layer, keras.layers.BatchNormalization):
            continue
        layer.trainable = True
        count += 1
    if count == 0:
        backbone_model.trainable = False
    return count


def make_optimizer(name: str, learning_rate: float, momentum: float = 0.9):
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate=learning_rate, momentum=momentum)
    return keras.optimizers.Adam(learning_rate=learning_rate)


class TrialInputs:
    """The data a trial trains on: cached bottleneck features and image batches.

    ``features(split, pooling)`` (pooling ``avg``/``max``: pooled vectors;
    None: feature maps) and ``images(split, augment)`` return fresh tf.data
    datasets of ``(x, labels)``; ``class_weight`` is a dict or None.
    ``activations(split)``, when given, returns the cached input of the
    backbone layer ``boundary``, which serves fine-tunes of up to
    ``max_cached_depth`` blocks.
    """

    def __init__(self, features: Callable, images: Callable, class_weight: dict | None = None,
                 activations: Callable | None = None, boundary: str | None = None, max_cached_depth: int = 0):
        self.features = features
        self.images = images
        self.class_weight = class_weight
        self.activations = activations
        self.boundary = boundary
        self.max_cached_depth = max_cached_depth

    def cached_finetune(self, depth: int) -> bool:
        """Whether a fine-tune of the top ``depth`` blocks reads cached activations (:mod:`trainer.finetune_cache`)."""
        return self.activations is not None and 0 < depth <= self.max_cached_depth

    def without_activations(self) -> "TrialInputs":
        return TrialInputs(self.features, self.images, self.class_weight)


class DataLoss(kt.errors.FatalError):
    """A shard could not be read during a trial. Keras Tuner lets a ``FatalError`` through instead of
    recording a failed trial; the run names the shard (:func:`trainer.data.corrupt_data_error`)."""


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

    def build_backbone(self) -> keras.Model:
        model = self.backbone.build(self.image_size, self.weights_path)
        model.trainable = False
        return model

    def declare_space(self, hp: kt.HyperParameters) -> dict[str, Any]:
        """Declare every hyperparameter on ``hp``, each under its condition, and return this trial's values.

        The one place the space's structure lives: ``build`` reads its values
        from here. Keras Tuner finds conditional hyperparameters by calling
        ``build`` until every condition has been active once; inside
        :meth:`declaring_only` those calls stop here instead of building a
        backbone each time (seconds per call, several calls per search).
        """
        space = self.space
        values = {name: declare(hp, name, space[name])
                  for name in ("pooling", "head_batchnorm", "dense_layers", "dropout", "l2")}
        for i in (1, 2):
            allowed = _values_above(space["dense_layers"], i - 1)
            if not allowed:
                continue
            with hp.conditional_scope("dense_layers", allowed):
                if values["dense_layers"] >= i:
                    values[f"dense_units_{i}"] = declare(hp, f"dense_units_{i}", space[f"dense_units_{i}"])
        values["optimizer"] = declare(hp, "optimizer", space["optimizer"])
        if "sgd" in _spec_values(space["optimizer"]):
            with hp.conditional_scope("optimizer", ["sgd"]):
                if values["optimizer"] == "sgd":
                    values["momentum"] = declare(hp, "momentum", space["momentum"])
        values["head_learning_rate"] = declare(hp, "head_learning_rate", space["head_learning_rate"])
        values["finetune_depth"] = declare(hp, "finetune_depth", space["finetune_depth"])
        deeper = _values_above(space["finetune_depth"], 0)
        if deeper:
            with hp.conditional_scope("finetune_depth", deeper):
                if values["finetune_depth"] > 0:
                    values["finetune_learning_rate"] = declare(hp, "finetune_learning_rate",
                                                               space["finetune_learning_rate"])
        return values

    @contextlib.contextmanager
    def declaring_only(self):
        """Within this block ``build(hp)`` declares the space and returns ``None`` (for a tuner's constructor)."""
        self._declaring_only = True
        try:
            yield self
        finally:
            self._declaring_only = False

    def build_head(self, values: dict[str, Any], feature_shape) -> keras.Model:
        """The head on ``feature_shape`` backbone outputs, from :meth:`declare_space`'s values."""
        pooling, dense_layers, dropout, l2 = (values[k] for k in ("pooling", "dense_layers", "dropout", "l2"))
        regularizer = keras.regularizers.L2(l2) if l2 else None
        features = keras.Input(shape=tuple(feature_shape), name="features")
        if pooling == "avg":
            pooled = keras.layers.GlobalAveragePooling2D(name="pool")(features)
        elif pooling == "max":
            pooled = keras.layers.GlobalMaxPooling2D(name="pool")(features)
        else:
            pooled = keras.layers.Flatten(name="pool")(features)
        top_input = keras.Input(shape=tuple(pooled.shape[1:]), name="pooled")
        x = top_input
        if values["head_batchnorm"]:
            x = keras.layers.BatchNormalization(name="head_bn")(x)
        for i in range(1, dense_layers + 1):
            x = keras.layers.Dense(values[f"dense_units_{i}"], activation="relu", kernel_regularizer=regularizer,
                                   name=f"dense_{i}")(x)
            if dropout:
                x = keras.layers.Dropout(dropout, name=f"dropout_{i}")(x)
        if dropout and dense_layers == 0:
            x = keras.layers.Dropout(dropout, name="dropout")(x)
        logits = keras.layers.Dense(self.num_classes, kernel_regularizer=regularizer, name="logits")(x)
        outputs = keras.layers.Activation("softmax", dtype="float32", name="probabilities")(logits)
        top = keras.Model(top_input, outputs, name="head_top")
        return keras.Model(features, top(pooled), name="head")

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
        backbone_model = self.build_backbone()
        head = self.build_head(values, backbone_model.output.shape[1:])
        inputs = keras.Input(shape=(*self.image_size, 3), name="image")
        x = BackbonePreprocess(self.backbone.preprocess, name="backbone_preprocess")(inputs)
        x = backbone_model(x, training=False)
        outputs = head(x)
        return keras.Model(inputs, outputs, name=f"{self.backbone.name}_classifier")

    # -- training -------------------------------------------------------------------------------

    def fit(self, hp: kt.HyperParameters, model: keras.Model, *args, callbacks=None, epochs=None,
            initial_epoch: int = 0, **kwargs) -> dict[str, float]:
        """Train ``model`` in two phases (see the module docstring); return the validation metrics."""
        import tensorflow as tf

        if self.inputs is None:
            raise kt.errors.FatalError("TransferHyperModel.fit needs TrialInputs")
        callbacks = list(callbacks or [])
        checkpoints = [cb for cb in callbacks if type(cb).__name__ == "SaveBestEpoch"]
        callbacks = [cb for cb in callbacks if cb not in checkpoints]
        callbacks, hparams = _own_hparams_logger(callbacks, hp)
        budget = max(1, int(epochs or self.epochs) - int(initial_epoch or 0))
        warm = "tuner/trial_id" in hp.values
        depth = hp.get("finetune_depth")
        backbone_model = _find_backbone(model)
        head = model.get_layer("head")
        try:
            with strategy_scope(self.strategy):
                self.last_history = {}
                result = None
                if not (warm and depth > 0):
                    pooling = hp.get("pooling") if hp.get("pooling") in POOLED_FEATURES else None
                    trainee = head.get_layer("head_top") if pooling else head
                    trainee.compile(optimizer=self._optimizer(hp, hp.get("head_learning_rate")),
                                    loss="sparse_categorical_crossentropy", metrics=["accuracy"])
                    history = trainee.fit(self.inputs.features("train", pooling),
                                          validation_data=self.inputs.features("validation", pooling),
                                          epochs=budget, callbacks=self._callbacks(callbacks + hparams),
                                          class_weight=self.inputs.class_weight, shuffle=False,
                                          verbose=self.verbose)
                    self.last_history["phase1"] = _check_history(history.history, "head")
                    result = _best(history.history)
                if depth > 0:
                    set_finetune_depth(backbone_model, self.backbone, depth)
                    trainee, train, validation = self._finetune_data(model, backbone_model, depth)
                    trainee.compile(optimizer=self._optimizer(hp, hp.get("finetune_learning_rate")),
                                    loss="sparse_categorical_crossentropy", metrics=["accuracy"])
                    start = len(self.last_history.get("phase1", {}).get("loss", []))
                    history = trainee.fit(train, validation_data=validation, initial_epoch=start,
                                          epochs=start + budget, callbacks=self._callbacks(callbacks + hparams),
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
        from trainer.finetune_cache import upper_backbone

        upper = upper_backbone(backbone_model, self.inputs.boundary)
        activations = keras.Input(shape=tuple(upper.input.shape[1:]), name="activations")
        trainee = keras.Model(activations, model.get_layer("head")(upper(activations, training=False)),
                              name="cached_finetune")
        return trainee, self.inputs.activations("train"), self.inputs.activations("validation")

    def _optimizer(self, hp, learning_rate):
        name = hp.get("optimizer")
        momentum = hp.get("momentum") if name == "sgd" and hp.is_active("momentum") else 0.9
        return make_optimizer(name, learning_rate, momentum)

    def _callbacks(self, callbacks: list) -> list:
        return [keras.callbacks.TerminateOnNaN(),
                keras.callbacks.EarlyStopping(monitor="val_loss", patience=self.patience,
                                              restore_best_weights=True),
                *callbacks]


def _own_hparams_logger(callbacks: list, hp: kt.HyperParameters) -> tuple[list, list]:
    """Swap Keras Tuner's hparams callback (one fit only) for :func:`trainer.reports.hparams_callback`.

    Keras Tuner adds TensorBoard's hparams callback next to a ``TensorBoard``
    callback, pointed at the trial's own run; that callback cannot span the
    two phases of a trial, the project's logger can.
    """
    keras_tuner_hparams = [cb for cb in callbacks if type(cb).__module__.startswith("tensorboard.plugins.hparams")]
    rest = [cb for cb in callbacks if cb not in keras_tuner_hparams]
    boards = [cb for cb in rest if isinstance(cb, keras.callbacks.TensorBoard)]
    if not keras_tuner_hparams or not boards:
        return rest, []
    from trainer.reports import hparams_callback

    log_dir = str(boards[0].log_dir)
    trial_id = os.path.basename(os.path.dirname(log_dir.rstrip("/")))
    return rest, [hparams_callback(log_dir, hp.values, trial_id=trial_id)]


def _find_backbone(model: keras.Model) -> keras.Model:
    for layer in model.layers:
        if isinstance(layer, keras.Model) and layer.name != "head":
            return layer
    raise ValueError("model has no nested backbone")


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
