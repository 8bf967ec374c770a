"""The whole pipeline, end to end, in one command (``make demo``).

Photos -> TFRecords (Beam, DirectRunner) -> a short Keras Tuner search with
fine-tuning -> a versioned SavedModel -> the development TF Serving-compatible
server on 127.0.0.1 -> predictions on the held-out test split through the gRPC
client, printed beside the true labels.

With no ``--input`` it first generates a small sample dataset, so it needs no
data of the user's own. Each stage runs as its own CLI, exactly as a user
would run it, so the demo also proves the commands the README documents.
Re-running is safe: the data folder is rebuilt (``--overwrite``), the search
resumes from ``job/tuner`` (and is complete, so it goes straight to the final
fit), a new model version is published only if the gate allows it, and the
server is always stopped, even on failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Sequence

from preprocessing import add_version_flag
from preprocessing.console import (PROGRAMS, Parser, add_verbose_flag, at_least, error_line, fail,
                                   import_tensorflow_quietly, stderr_silenced)
from trainer.config import BACKBONES, TUNERS

MODEL_NAME = "classifier"
PROG = PROGRAMS["scripts.demo"]


@dataclass(frozen=True)
class DemoConfig:
    """What the demo runs on and how hard it searches."""

    workdir: str = "demo-output"
    input: str | None = None  # None: generate the sample dataset
    per_class: int = 60
    image_size: int | None = None  # None: 64 px for the generated sample, the backbone's own size for photos
    backbone: str = "mobilenet_v2"
    weights: str = "auto"
    tuner: str = "random"
    max_trials: int = 3
    epochs: int = 4
    batch_size: int = 32
    seed: int = 0
    extra_train_args: Sequence[str] = field(default_factory=tuple)
    verbose: bool = False  # each stage's --verbose, and their TensorFlow start-up lines unfiltered


@dataclass(frozen=True)
class DemoResult:
    data_dir: str
    job_dir: str
    version: int
    predictions: list  # (path, true label, predicted label, score)
    accuracy: float  # on the original test photos, through gRPC
    record_accuracy: float  # on the test records' bytes, through gRPC
    trainer_accuracy: float  # the trainer's evaluation of the served version (its export metadata)
    seconds: dict  # wall time of each stage


SHARED_WEIGHTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.pardir, "shared",
                              "weights", "mobilenet_v2_1.0_224_imagenet_notop.weights.h5")


def resolve_weights(weights: str, backbone: str) -> str:
    """``auto``: the best pretrained weights this machine has.

    The ImageNet MobileNetV2 file in ``../shared/weights`` when present (the
    project's dev machines and CI), else ``imagenet`` when Keras can download
    it, else ``none`` (random features: the pipeline runs, but predictions are
    close to chance; say so).
    """
    if weights != "auto":
        return weights
    if backbone == "mobilenet_v2" and os.path.isfile(SHARED_WEIGHTS):
        return os.path.normpath(SHARED_WEIGHTS)
    try:
        import urllib.request

        urllib.request.urlopen("https://storage.googleapis.com", timeout=5).close()
        return "imagenet"
    except OSError:
        print(f"{PROG}: no pretrained weights available offline; using --weights none "
              "(random backbone: expect low accuracy, far from what ImageNet weights give). "
              "Pass --weights PATH for real results.", flush=True)
        return "none"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _step(title: str) -> None:
    print(f"\n=== {title} ===", flush=True)


# TensorFlow's C++ start-up chatter (absl INFO lines) ignores TF_CPP_MIN_LOG_LEVEL since TF 2.16; the demo hides it.
_NOISE = re.compile(r"^(I\d{4} \d\d:\d\d:|WARNING: All log messages before absl::InitializeLog|"
                    r"E\d{4} .*(cuInit|cuda_platform|oneDNN supports DT_UINT8)|To enable the following instructions: AVX|"
                    r"WARNING:root:apitools not found)")


def _relay(stream, verbose: bool = False) -> None:
    for line in iter(stream.readline, ""):
        if verbose or not _NOISE.match(line):
            sys.stderr.write(line)
            sys.stderr.flush()
    stream.close()


def _start(args: Sequence[str], verbose: bool = False) -> tuple[subprocess.Popen, threading.Thread]:
    """Start one stage's CLI; its stdout goes to the terminal, its stderr too, less TensorFlow's start-up noise."""
    process = subprocess.Popen(list(args), stderr=subprocess.PIPE, text=True, errors="replace")
    relay = threading.Thread(target=_relay, args=(process.stderr, verbose), daemon=True)
    relay.start()
    return process, relay


def _run(args: Sequence[str], verbose: bool = False) -> None:
    print("$ " + " ".join(args), flush=True)
    process, relay = _start(args, verbose)
    returncode = process.wait()
    relay.join()
    if returncode != 0:
        raise SystemExit(error_line(PROG, f"step failed (exit {returncode}): {' '.join(args)}"))


def _venv_command(name: str) -> str:
    """``.venv/bin/NAME`` as the person can type it from here: the script beside this interpreter."""
    path = os.path.join(os.path.dirname(sys.executable), name)
    relative = os.path.relpath(path)
    return relative if not relative.startswith("..") else path


def photo_path(images: str, source_id: str) -> str:
    """A record's original photo: its source id is relative to the input folder, or to a manifest's folder."""
    if os.path.isabs(source_id) or "://" in source_id:
        return source_id
    base = images if os.path.isdir(images) else os.path.dirname(os.path.abspath(images))
    return os.path.join(base, source_id)


def _test_split(data_dir: str) -> list[tuple[str, str, bytes]]:
    """(source path, true label, encoded image) of every test record, read back from the TFRecords."""
    import tensorflow as tf

    from preprocessing import tfrecords

    shards = tfrecords.list_shards(data_dir, "test")
    items = []
    with stderr_silenced():  # TFRecordDataset's C++ side logs a line about its buffer size on every start
        for record in tf.data.TFRecordDataset(shards):
            parsed = tfrecords.parse_example(record)
            items.append((parsed[tfrecords.SOURCE_ID].numpy().decode("utf-8"),
                          parsed[tfrecords.TEXT].numpy().decode("utf-8"),
                          parsed[tfrecords.ENCODED].numpy()))
    return items


SAMPLE_IMAGE_SIZE = 64  # the generated shapes need no more, and the demo stays about 3 minutes on 2 cores


def demo_image_size(config: DemoConfig) -> int:
    """``--image-size``, else 64 px for the generated sample and the backbone's own size for a user's photos."""
    if config.image_size is not None:
        return config.image_size
    if config.input is None:
        return SAMPLE_IMAGE_SIZE
    from trainer.model.backbones import get_backbone

    return get_backbone(config.backbone).default_size


def run(config: DemoConfig) -> DemoResult:
    py = sys.executable
    workdir = os.path.abspath(config.workdir)
    os.makedirs(workdir, exist_ok=True)
    images = config.input or os.path.join(workdir, "images")
    data_dir = os.path.join(workdir, "data")
    job_dir = os.path.join(workdir, "job")
    export_base = os.path.join(job_dir, "export")
    weights = resolve_weights(config.weights, config.backbone)
    image_size = demo_image_size(config)
    verbose = ["--verbose"] if config.verbose else []

    if config.input is None:
        _step("1/5 generate a sample dataset")
        if os.path.isdir(images):
            print(f"sample dataset already at {images}")
        else:
            _run([py, "-m", "preprocessing.sample_data", images, "--per-class", str(config.per_class),
                  "--seed", str(config.seed), *verbose], config.verbose)
    else:
        _step(f"1/5 use the photos in {images}")
        if config.image_size is None:
            print(f"training at {image_size}x{image_size} px, {config.backbone}'s own input size "
                  f"(the generated sample uses {SAMPLE_IMAGE_SIZE}); --image-size changes it", flush=True)

    seconds = {}
    _step("2/5 preprocessing: Beam job -> TFRecords")
    started = time.monotonic()
    _run([py, "-m", "preprocessing", "--input", images, "--output", data_dir,
          "--image-size", str(image_size), "--overwrite", *verbose], config.verbose)

    seconds["preprocessing"] = time.monotonic() - started
    _step("3/5 trainer: Keras Tuner search, final fit, evaluation, export")
    started = time.monotonic()
    _run([py, "-m", "trainer", "--data", data_dir, "--job-dir", job_dir,
          "--backbone", config.backbone, "--weights", weights,
          "--image-size", str(image_size), "--tuner", config.tuner,
          "--max-trials", str(config.max_trials), "--epochs", str(config.epochs),
          "--batch-size", str(config.batch_size), "--seed", str(config.seed), *verbose, *config.extra_train_args],
         config.verbose)

    import_tensorflow_quietly(config.verbose)  # the client and the export helpers need it in this process
    from trainer.publish.export import latest_version

    seconds["trainer"] = time.monotonic() - started
    version = latest_version(export_base)
    if version is None:
        raise SystemExit(error_line(PROG, f"the trainer published no model version under {export_base}"))

    _step(f"4/5 serving: development server on 127.0.0.1, model {MODEL_NAME!r} version {version}")
    started = time.monotonic()
    port, rest_port = _free_port(), _free_port()
    server, _ = _start([py, "-m", "serving.server", "--model-base-path", export_base,
                        "--model-name", MODEL_NAME, "--port", str(port), "--rest-port", str(rest_port), *verbose],
                       config.verbose)
    try:
        from serving.client import PredictionClient

        client = PredictionClient(f"127.0.0.1:{port}", MODEL_NAME)
        client.wait_until_ready(timeout=120)
        seconds["server start"] = time.monotonic() - started
        started = time.monotonic()
        _step("5/5 client: held-out test images through gRPC")
        items = _test_split(data_dir)
        if not items:
            raise SystemExit(error_line(PROG, f"the data in {data_dir} has no test split to predict on"))
        paths = [photo_path(images, path) for path, _, _ in items]
        predictions = client.predict(paths)
        rows = [(path, truth, prediction.label, prediction.score)
                for (path, truth, _), prediction in zip(items, predictions)]
        seconds["gRPC predictions (photos)"] = time.monotonic() - started
        record_predictions = client.predict([encoded for _, _, encoded in items])
        record_accuracy = sum(p.label == truth for (_, truth, _), p in zip(items, record_predictions)) / len(items)
        client.close()
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()

    correct = sum(truth == predicted for _, truth, predicted, _ in rows)
    accuracy = correct / len(rows)
    width = min(60, max(len(os.path.basename(p)) for p, *_ in rows))
    print(f"\n{'image':<{width}}  {'true':<12} {'predicted':<12} score")
    for path, truth, predicted, score in rows:
        mark = "" if truth == predicted else "  <- wrong"
        print(f"{os.path.basename(path)[:width]:<{width}}  {truth:<12} {predicted:<12} {score:.3f}{mark}")
    from trainer.report.evaluate import accuracy_interval

    low, high = accuracy_interval(correct, len(rows))
    print(f"\ngRPC accuracy on the held-out test photos: {correct}/{len(rows)} = {accuracy:.1%} "
          f"(95% interval {low:.1%}-{high:.1%})")
    trainer_accuracy = _served_accuracy(export_base, version, job_dir)
    print(f"gRPC accuracy on the test records the trainer evaluated: {record_accuracy:.1%} "
          f"(the trainer's own evaluation of version {version}: {trainer_accuracy:.1%})")
    print(f"\nOutputs:\n  TFRecords, labels, stats, errors: {data_dir}"
          f"\n  evaluation (metrics.json, PNGs):  {os.path.join(job_dir, 'eval')}"
          f"{_eval_extras(os.path.join(job_dir, 'eval'))}"
          f"\n  SavedModel:                       {os.path.join(export_base, str(version))}"
          f"\n  TensorBoard:                      {_venv_command('tensorboard')} --logdir "
          f"{os.path.join(job_dir, 'tensorboard')}")
    return DemoResult(data_dir, job_dir, version, rows, accuracy, record_accuracy, trainer_accuracy, seconds)


def _served_accuracy(export_base: str, version: int, job_dir: str) -> float:
    """The trainer's test accuracy of the version served (its metadata), not of a retrain the gate refused."""
    try:
        with open(os.path.join(export_base, str(version), "assets.extra", "metadata.json")) as handle:
            return float(json.load(handle)["metrics"]["accuracy"])
    except (OSError, KeyError, TypeError, ValueError):
        with open(os.path.join(job_dir, "eval", "metrics.json")) as handle:
            return json.load(handle)["accuracy"]


def _eval_extras(eval_dir: str) -> str:
    """Where the mistakes gallery and the suspect labels are, with their counts (lines of the outputs list)."""
    lines = ""
    for name, what, csv_name in (("mistakes.png", "mistakes gallery (evaluation)", "mistakes.csv"),
                                 ("label_issues.png", "label issues (train, validation)", "label_issues.csv")):
        if os.path.exists(os.path.join(eval_dir, csv_name)):
            with open(os.path.join(eval_dir, csv_name)) as handle:
                count = max(0, sum(1 for _ in handle) - 1)
            lines += f"\n  {what + ':':<33} {count}, {os.path.join(eval_dir, name)} and {csv_name}"
    return lines


def _check(args: argparse.Namespace) -> None:
    """What the stages would refuse only minutes in (a missing --input, a missing weights file), refused now."""
    if args.input is not None and "://" not in args.input and not os.path.exists(args.input):
        raise ValueError(f"--input {args.input}: no such folder or CSV manifest")
    if args.weights not in ("auto", "imagenet", "none") and not os.path.isfile(args.weights):
        raise ValueError(f"--weights {args.weights}: no such file (auto, imagenet, none, or a .weights.h5 file)")
    if os.path.exists(args.workdir) and not os.path.isdir(args.workdir):
        raise ValueError(f"--workdir {args.workdir} is a file, not a folder")


def build_parser() -> argparse.ArgumentParser:
    defaults = DemoConfig()
    parser = Parser(
        prog=PROG,
        description="Run the whole pipeline end to end: photos -> TFRecords -> search -> SavedModel -> "
                    "server -> gRPC predictions. Without --input it generates a sample dataset.")
    parser.add_argument("--workdir", default=defaults.workdir, help="where everything is written (default %(default)s)")
    parser.add_argument("--input", default=None,
                        help="your own photos: a folder per class, split folders, or a CSV manifest (default: generated sample)")
    parser.add_argument("--per-class", type=at_least(6), default=defaults.per_class,
                        help="sample images per class, at least 6 so that each split has one (default %(default)s)")
    parser.add_argument("--image-size", type=at_least(32), default=defaults.image_size,
                        help=f"image side in pixels (default: {SAMPLE_IMAGE_SIZE} for the generated sample, the "
                             "backbone's own size, e.g. 224, for --input)")
    parser.add_argument("--backbone", default=defaults.backbone, choices=BACKBONES, metavar="NAME",
                        help=f"{', '.join(BACKBONES)} (default %(default)s)")
    parser.add_argument("--weights", default=defaults.weights,
                        help="auto, imagenet, none, or a local .weights.h5 file (default %(default)s: a local copy of "
                             "the ImageNet MobileNetV2 weights where this checkout has one, else imagenet if it can be "
                             "downloaded, else none)")
    parser.add_argument("--tuner", default=defaults.tuner, choices=TUNERS, help="search algorithm (default %(default)s)")
    parser.add_argument("--max-trials", type=at_least(1), default=defaults.max_trials,
                        help="search trials (default %(default)s)")
    parser.add_argument("--epochs", type=at_least(1), default=defaults.epochs,
                        help="epochs per phase (default %(default)s)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    add_verbose_flag(parser, "passed to every stage, whose TensorFlow start-up lines then show too")
    add_version_flag(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _check(args)
    except ValueError as error:
        return fail(PROG, error)
    config = dataclasses.replace(DemoConfig(), workdir=args.workdir, input=args.input, per_class=args.per_class,
                                 image_size=args.image_size, backbone=args.backbone, weights=args.weights,
                                 tuner=args.tuner, max_trials=args.max_trials, epochs=args.epochs, seed=args.seed,
                                 verbose=args.verbose)
    started = time.monotonic()
    run(config)
    print(f"\ndemo finished in {time.monotonic() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
