"""Every trainer setting, typed and defaulted, in one place.

The CLI (:mod:`trainer.cli`) mirrors these fields as flags; library users build
a :class:`TrainConfig` directly. Nothing here imports TensorFlow, so ``--help``
and argument errors answer at once.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

TUNERS = ("hyperband", "bayesian", "random", "grid")
# The names of trainer.model.backbones.REGISTRY, here so that --help needs no Keras (a test keeps them equal).
BACKBONES = ("mobilenet_v2", "efficientnet_b0", "resnet50", "vgg16", "densenet121", "xception",
             "efficientnet_v2_b0", "efficientnet_v2_s", "convnext_tiny", "mobilenet_v3_large")
DEFAULT_MAX_TRIALS = 10


class UserError(Exception):
    """A mistake in the user's input: the CLI prints ``str(error)`` as one line and exits non-zero."""


@dataclass(frozen=True)
class AugmentConfig:
    """Which random augmentations run on training batches (never in the exported model)."""

    enabled: bool = True
    flip: bool = True
    rotation: float = 0.05
    zoom: float = 0.1
    contrast: float = 0.1

    @property
    def active(self) -> bool:
        return self.enabled and (self.flip or self.rotation > 0 or self.zoom > 0 or self.contrast > 0)


@dataclass(frozen=True)
class TrainConfig:
    """One trainer run: where the data is, where results go, and how to search."""

    data_dir: str
    job_dir: str
    backbone: str = "mobilenet_v2"
    weights: str = "imagenet"
    image_size: tuple[int, int] | None = None
    tuner: str = "hyperband"
    max_trials: int | None = None
    max_search_time_s: float | None = None  # past it no new trial starts; the best so far is retrained
    epochs: int = 10
    final_epochs: int | None = None
    batch_size: int = 32
    seed: int = 42
    search_space: str | None = None
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    class_weights: bool = True
    validation_fraction: float = 0.2
    early_stopping_patience: int = 3
    mixed_precision: bool | None = None
    strategy: str = "auto"
    cache_images: str | None = None
    finetune_cache: int = 0
    finetune_cache_final: bool = False
    overwrite: bool = False
    min_accuracy: float = 0.0
    force: bool = False
    cache_dir: str | None = None
    export: bool = True
    export_precision: str = "float32"  # float32 | float16 (keep the training's mixed_float16 compute)
    max_pixels: int | None = None  # largest upload the serving graph decodes; None: the data's --max-pixels
    top_k: int = 3
    find_label_issues: bool | None = None  # eval/label_issues.*; None: when the bottleneck feature cache exists

    @property
    def trial_budget(self) -> int | None:
        """The most trials: ``max_trials``, else 10; Hyperband is uncapped unless asked (its schedule decides)."""
        if self.max_trials is not None:
            return self.max_trials
        return None if self.tuner == "hyperband" else DEFAULT_MAX_TRIALS

    @property
    def tuner_dir(self) -> str:
        return os.path.join(self.job_dir, "tuner")

    @property
    def tensorboard_dir(self) -> str:
        return os.path.join(self.job_dir, "tensorboard")

    @property
    def eval_dir(self) -> str:
        return os.path.join(self.job_dir, "eval")

    @property
    def export_dir(self) -> str:
        return os.path.join(self.job_dir, "export")

    @property
    def feature_cache_dir(self) -> str:
        return self.cache_dir or os.path.join(self.job_dir, "cache")

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)
