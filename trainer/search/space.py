"""The search space: its default ranges, the user's overrides (``--search-space``), and declaring it.

A resolved space maps each hyperparameter name to a spec dict: ``{"value"}``
(fixed), ``{"values"}`` (a choice) or ``{"min", "max", "step"?, "sampling"?}``
(a range). :func:`declare_space` registers it on a ``keras_tuner.HyperParameters``
with its conditions (dense units under ``dense_layers``, momentum under
``sgd``, the fine-tune rate under ``finetune_depth > 0``); it is the one place
the space's structure lives.
"""

from __future__ import annotations

import copy
import json
import math
from typing import Any

import keras_tuner as kt

from trainer.config import UserError

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


def declare_space(hp: kt.HyperParameters, space: dict[str, dict]) -> dict[str, Any]:
    """Declare every hyperparameter of ``space`` on ``hp``, each under its condition; return this trial's values."""
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
