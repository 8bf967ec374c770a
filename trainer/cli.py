"""``tlp-train --data DATA --job-dir JOB [options]`` (also ``python -m trainer``).

Flags mirror :class:`trainer.config.TrainConfig`. A user mistake prints one
line (``tlp-train: error: ...``, :mod:`preprocessing.console`) and exits 2;
nothing prints a traceback for bad input.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from preprocessing import add_version_flag
from preprocessing.console import (PROGRAMS, Parser, StderrHandler, add_verbose_flag, also_runs_as, at_least, fail,
                                   import_tensorflow_quietly)
from trainer.config import BACKBONES, DEFAULT_MAX_TRIALS, TUNERS, AugmentConfig, TrainConfig, UserError

PROG = PROGRAMS["trainer"]


def _image_size(text: str) -> tuple[int, int]:
    """(height, width) from N or WIDTHxHEIGHT, parsed as every stage parses it."""
    from preprocessing.tfrecords import parse_image_size

    try:
        return parse_image_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error).removeprefix("--image-size ")) from None


_positive = at_least(1)
_count = at_least(0)


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} must be between 0 and 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig(data_dir="", job_dir="")
    a = AugmentConfig()
    p = Parser(prog=PROG, description=(
        "Search a transfer-learning classifier over TFRecords written by the preprocessing job: "
        "head and fine-tune depth of an ImageNet backbone, chosen by Keras Tuner; then retrain the best, "
        "evaluate it on the test split and export a versioned SavedModel if it passes the gate"
        f"{also_runs_as('trainer')}."))
    io = p.add_argument_group("inputs and outputs")
    io.add_argument("--data", required=True, help="preprocessing output folder (TFRecords, labels.txt, stats.json)")
    io.add_argument("--job-dir", required=True, help="where the tuner project, logs, eval and export/<version> go")
    io.add_argument("--cache-dir", default=None,
                    help="bottleneck feature cache (default: JOB/cache); share it between jobs to reuse features")
    io.add_argument("--cache-images", default=None, metavar="memory|PATH",
                    help="also cache decoded images for fine-tuning: in memory or in files at PATH (default: off)")
    model = p.add_argument_group("model")
    model.add_argument("--backbone", default=d.backbone, choices=BACKBONES, metavar="NAME",
                       help=f"{', '.join(BACKBONES)} (default {d.backbone}; the README's backbone guide compares them)")
    model.add_argument("--weights", default=d.weights,
                       help="imagenet (download; needs internet), none (random init, for plumbing tests) "
                            "or PATH to a local .weights.h5 of the backbone without its top (default imagenet)")
    model.add_argument("--image-size", type=_image_size, default=None, metavar="N|WxH",
                       help="model input size: one number for a square, or WIDTHxHEIGHT as in preprocessing "
                            "(default: the backbone's own, e.g. 224); smaller is faster")
    s = p.add_argument_group("search")
    s.add_argument("--tuner", choices=TUNERS, default=d.tuner, help=f"search algorithm (default {d.tuner})")
    s.add_argument("--max-trials", type=_positive, default=None,
                   help=f"most hyperparameter sets to try (default {DEFAULT_MAX_TRIALS}; Hyperband: its own schedule "
                        "unless given)")
    s.add_argument("--max-search-time", type=_duration, default=None, metavar="DURATION",
                   help="time budget of the search, e.g. 45m, 2h, 1h30m or seconds: past it no new trial starts, the "
                        "trial in flight finishes, and the best so far is retrained and exported (at least one "
                        "trial runs; default: no limit)")
    s.add_argument("--epochs", type=_positive, default=d.epochs,
                   help=f"most epochs per training phase; early stopping on validation loss (default {d.epochs})")
    s.add_argument("--final-epochs", type=_positive, default=None,
                   help="epochs per phase when retraining the best (default: --epochs)")
    s.add_argument("--patience", type=_positive, default=d.early_stopping_patience,
                   help=f"early-stopping patience in epochs (default {d.early_stopping_patience})")
    s.add_argument("--batch-size", type=_positive, default=d.batch_size,
                   help=f"batch size per device (default {d.batch_size})")
    s.add_argument("--seed", type=int, default=d.seed, help=f"random seed of the search and data order "
                                                             f"(default {d.seed})")
    s.add_argument("--search-space", default=None, metavar="FILE|JSON",
                   help='widen or fix hyperparameters, e.g. \'{"finetune_depth": [0, 1, 2], "pooling": "avg"}\' '
                        "(see docs/trainer.md)")
    s.add_argument("--validation-fraction", type=_fraction, default=d.validation_fraction,
                   help="share of train carved out as validation when the data has no validation split "
                        f"(default {d.validation_fraction})")
    s.add_argument("--overwrite", action="store_true",
                   help="discard a previous search in JOB/tuner and start afresh (default: resume it)")
    t = p.add_argument_group("training")
    t.add_argument("--augment", action=argparse.BooleanOptionalAction, default=a.enabled,
                   help="random augmentation of fine-tuning batches (default on)")
    t.add_argument("--flip", action=argparse.BooleanOptionalAction, default=a.flip, help="random horizontal flip")
    t.add_argument("--rotation", type=float, default=a.rotation,
                   help=f"random rotation, fraction of a full turn; 0 turns it off (default {a.rotation})")
    t.add_argument("--zoom", type=float, default=a.zoom, help=f"random zoom fraction; 0 is off (default {a.zoom})")
    t.add_argument("--contrast", type=float, default=a.contrast,
                   help=f"random contrast factor; 0 is off (default {a.contrast})")
    t.add_argument("--class-weights", action=argparse.BooleanOptionalAction, default=d.class_weights,
                   help="weight classes by inverse frequency (default on)")
    t.add_argument("--finetune-cache", type=_count, default=d.finetune_cache, metavar="VIEWS",
                   help="fine-tune the search's trials on cached activations of the frozen lower backbone: "
                        "VIEWS augmented copies of every training image, computed once; about 3x faster per step "
                        "on a CPU, at the price of VIEWS fixed augmentations per image (default 0: off, "
                        "every step runs the whole backbone on freshly augmented images)")
    t.add_argument("--finetune-cache-final", action=argparse.BooleanOptionalAction, default=d.finetune_cache_final,
                   help="retrain the best trial on the cached activations too (default: off, the final model "
                        "fine-tunes on freshly augmented images)")
    t.add_argument("--mixed-precision", action=argparse.BooleanOptionalAction, default=None,
                   help="float16 compute (default: on when a GPU is present)")
    t.add_argument("--strategy", default="auto", choices=("auto", "default", "mirrored", "multi_worker"),
                   help="auto: MultiWorkerMirrored from TF_CONFIG, Mirrored on several GPUs, else one device")
    g = p.add_argument_group("publishing")
    g.add_argument("--min-accuracy", type=_fraction, default=d.min_accuracy,
                   help="publish only at or above this test accuracy (default 0)")
    g.add_argument("--force", action="store_true", help="publish even when the gate says no")
    g.add_argument("--no-export", dest="export", action="store_false",
                   help="stop after evaluation (no gate, no SavedModel)")
    g.add_argument("--find-label-issues", action=argparse.BooleanOptionalAction, default=None,
                   help="after the evaluation, flag train and validation images whose label the model contradicts "
                        "(confident learning on the cached bottleneck features): JOB/eval/label_issues.csv and "
                        ".png (default: on when the feature cache exists)")
    g.add_argument("--max-pixels", type=_positive, default=None, metavar="N",
                   help="the serving graph refuses uploads with more pixels than this, from their header, before "
                        "decoding (decompression bombs); recorded in the export's metadata (default: the "
                        "preprocessing job's --max-pixels, from the data's stats.json)")
    g.add_argument("--export-precision", choices=("float32", "float16"), default=d.export_precision,
                   help="compute dtype of the exported model: float32 whatever the training policy (the default: "
                        "TF Serving's CPU image runs float16 convolutions slowly), or float16 to keep "
                        "--mixed-precision's mixed_float16 compute in the SavedModel")
    add_verbose_flag(p, "TensorFlow's start-up messages (hidden otherwise)")
    add_version_flag(p)
    return p


def _duration(text: str) -> float:
    """``90``, ``45s``, ``30m``, ``2h``, ``1h30m``, ``1d``: seconds."""
    import re

    units = {"d": 86400, "h": 3600, "m": 60, "s": 1}
    value = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", value):
        seconds = float(value)
    elif re.fullmatch(r"(\d+(\.\d+)?[dhms])+", value):
        seconds = sum(float(n) * units[u] for n, _, u in re.findall(r"(\d+(\.\d+)?)([dhms])", value))
    else:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration (e.g. 45m, 2h, 1h30m, or seconds)")
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be more than zero")
    return seconds


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    augment = AugmentConfig(enabled=args.augment, flip=args.flip, rotation=args.rotation, zoom=args.zoom,
                            contrast=args.contrast)
    return TrainConfig(
        data_dir=args.data, job_dir=args.job_dir, backbone=args.backbone, weights=args.weights,
        image_size=args.image_size, tuner=args.tuner, max_trials=args.max_trials,
        max_search_time_s=args.max_search_time, epochs=args.epochs,
        final_epochs=args.final_epochs, batch_size=args.batch_size, seed=args.seed, search_space=args.search_space,
        augment=augment, class_weights=args.class_weights, validation_fraction=args.validation_fraction,
        early_stopping_patience=args.patience, mixed_precision=args.mixed_precision, cache_images=args.cache_images,
        finetune_cache=args.finetune_cache, finetune_cache_final=args.finetune_cache_final,
        overwrite=args.overwrite, min_accuracy=args.min_accuracy, force=args.force, cache_dir=args.cache_dir,
        export=args.export, export_precision=args.export_precision, max_pixels=args.max_pixels,
        strategy=args.strategy, find_label_issues=args.find_label_issues)


def _setup_logging(verbose: bool) -> None:
    root = logging.getLogger()
    if not any(isinstance(h, StderrHandler) for h in root.handlers):
        handler = StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname).1s %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
    logging.getLogger("trainer").setLevel(logging.DEBUG if verbose else logging.INFO)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.WARNING)


def main(argv=None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        config = config_from_args(args)
        import_tensorflow_quietly(args.verbose, "training", logging.getLogger("trainer"))
        import tensorflow as tf

        tf.get_logger().setLevel(logging.ERROR)
        from trainer import distribute, run

        placement = distribute.configure(config.strategy, config.mixed_precision)
        summary = run.run(config, placement)
    except UserError as error:
        return fail(PROG, error)
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: interrupted; re-run the same command to resume the search\n")
        return 130
    if summary.get("role") == "worker":
        return 0
    if summary.get("published") is False:
        logging.getLogger("trainer").warning("finished without publishing: %s", summary.get("gate"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
