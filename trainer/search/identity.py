"""What defines a search, recorded in ``JOB/tuner/search.json`` and compared on every start.

Keras Tuner reloads an existing project, which is how an interrupted search
resumes; but it would also silently keep an old search space or tuner when the
command changed. So a different search is refused (``--overwrite`` starts
afresh), the same one resumes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

from trainer import staging
from trainer.config import TrainConfig, UserError
from trainer.search.tuner import OBJECTIVE

log = logging.getLogger("trainer.search")

SEARCH_FILE = "search.json"

# Settings that change what a trial measures; every other flag may change on resume (docs/trainer.md).
def search_identity(config: TrainConfig, space: dict, image_size, weights_id: str, *,
                    mixed_precision: bool = False, carve: bool = False) -> dict:
    """The settings that define a search: a resume must match all of them.

    Everything that changes a trial's score is here, the data folder's digest
    included, so a resumed search never ranks trials trained differently.
    ``--max-trials``, the final fit (``--final-epochs``, ``--finetune-cache-final``),
    caching locations, verbosity and the export gate are not: they change no
    trial already run.
    """
    identity = {
        "tuner": config.tuner,
        "backbone": config.backbone,
        "weights": weights_id,
        "image_size": list(image_size),
        "search_space": space,
        "epochs": config.epochs,
        "seed": config.seed,
        "objective": OBJECTIVE.name,
        "data_dir": config.data_dir if "://" in config.data_dir else os.path.abspath(config.data_dir),
        "data_digest": data_digest(config.data_dir),
        "batch_size": config.batch_size,
        "strategy": config.strategy,
        "mixed_precision": bool(mixed_precision),
        "augment": dataclasses.asdict(config.augment),
        "class_weights": config.class_weights,
        "validation_fraction": config.validation_fraction,
        "early_stopping_patience": config.early_stopping_patience,
    }
    if carve:
        from preprocessing.tfrecords import CARVE_METHOD

        identity["validation_carve"] = CARVE_METHOD  # absent with a validation split; changed in December 2026
    if config.finetune_cache:
        identity["finetune_cache"] = config.finetune_cache  # absent when off, so older searches still resume
    return identity

def data_digest(data_dir: str) -> str:
    """sha256 of ``labels.txt`` and ``stats.json``'s content (or, without it, of the shard names and sizes).

    ``stats.json``'s counts per split and class, source sizes and options
    change when the folder is rewritten from other photos or options; its
    run times (``run``), metrics check (``cross_check``), carve histogram (``carve_histogram``,
    added in December 2026, so a folder written before still matches) and shard sizes (``shards``, which
    follow the order records happened to be written in) are left out, so
    re-running the same preprocessing command keeps the same digest.
    """
    import hashlib

    import tensorflow as tf

    from preprocessing import tfrecords

    digest = hashlib.sha256()
    labels = os.path.join(data_dir, tfrecords.LABELS_FILE)
    if tf.io.gfile.exists(labels):
        with tf.io.gfile.GFile(labels, "rb") as handle:
            digest.update(handle.read())
    stats = os.path.join(data_dir, tfrecords.STATS_FILE)
    if tf.io.gfile.exists(stats):
        with tf.io.gfile.GFile(stats, "rb") as handle:
            try:
                content = json.loads(handle.read())
            except ValueError:
                content = {}
        content = {k: v for k, v in content.items() if k not in ("run", "cross_check", "shards", "carve_histogram")}
        digest.update(json.dumps(content, sort_keys=True).encode())
    else:
        for shard in sorted(tf.io.gfile.glob(os.path.join(data_dir, "*.tfrecord*"))):
            digest.update(f"{os.path.basename(shard)}:{tf.io.gfile.stat(shard).length}".encode())
    return digest.hexdigest()[:16]

def _shown(value) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":")) if value is not None else "(unset)"
    return text if len(text) <= 60 else text[:57] + "..."

def prepare_project(config: TrainConfig, identity: dict) -> str:
    """Refuse a changed search, or clear the project with ``--overwrite``; return "resume" or "fresh".

    A refusal lists every setting that differs, old and new. Settings that a
    record from an older trainer does not hold yet are taken as they are now
    (logged), so such searches still resume.
    """
    import tensorflow as tf

    project = config.tuner_dir
    record = os.path.join(project, SEARCH_FILE)
    if config.overwrite and tf.io.gfile.exists(project):
        tf.io.gfile.rmtree(project)
        log.info("--overwrite: removed the previous search in %s; starting afresh", project)
        return "fresh"
    if not tf.io.gfile.exists(project) or not tf.io.gfile.listdir(project):
        return "fresh"
    if not tf.io.gfile.exists(record):
        raise UserError(f"--job-dir {config.job_dir}: {project} holds a search this trainer did not record; "
                        "pass --overwrite to start afresh")
    with tf.io.gfile.GFile(record) as handle:
        previous = json.load(handle)
    unrecorded = sorted(k for k in identity if k not in previous and k != "finetune_cache")
    if unrecorded:
        log.info("%s predates the check of %s: taking the current values", record, ", ".join(unrecorded))
        previous = {**previous, **{k: identity[k] for k in unrecorded}}
    changed = sorted(k for k in set(previous) | set(identity) if previous.get(k) != identity.get(k))
    if changed:
        differences = "; ".join(f"{k} {_shown(previous.get(k))} -> {_shown(identity.get(k))}" for k in changed)
        raise UserError(f"--job-dir {config.job_dir}: holds a search with different settings ({differences}); "
                        "re-run with the same settings to resume, or pass --overwrite to start afresh")
    return "resume"

def record_identity(config: TrainConfig, identity: dict) -> None:
    import tensorflow as tf

    tf.io.gfile.makedirs(config.tuner_dir)
    staging.write_text(os.path.join(config.tuner_dir, SEARCH_FILE), json.dumps(identity, indent=2, sort_keys=True))
