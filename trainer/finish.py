"""After the retrain: evaluate on the held-out split, gate, and export a new version when the gate allows.

Reads the evaluation split batch by batch; the gate and the export's own
check read its encoded images (docs/contracts.md section 3: ``eval/``,
``gate.json``, ``export/<version>/``).
"""

from __future__ import annotations

import logging
import os

from trainer.config import TrainConfig, UserError

log = logging.getLogger("trainer")

CHECK_IMAGES = 16
GATE_BATCH = 64

def evaluate_gate_export(model, history, info, image_size, backbone_name, best_values, config, *,
                         feature_cache: str | None = None) -> dict:
    """``feature_cache``: the run's bottleneck feature folder (``eval/label_issues.*``); None: looked up."""
    from trainer.data import info as data_info
    from trainer.data import records

    split = info.eval_split
    if split != "test":
        log.warning("no test split in %s: evaluating and gating on the validation split", config.data_dir)
    dataset = records.eval_dataset(info, split, image_size, config.batch_size)
    result: dict = {"eval_split": split}
    from trainer.report.evaluate import evaluate_model
    from trainer.report.mistakes import MistakeCollector

    mistakes = MistakeCollector(info.labels)
    metrics = evaluate_model(model, dataset, info.labels, config.eval_dir, history=history, top_k=config.top_k,
                             total=info.size(split), on_batch=mistakes.add)
    result["accuracy"] = float(metrics["accuracy"])
    log.info("%s accuracy of the retrained model: %.4f (%s)", split, result["accuracy"], config.eval_dir)
    wrote = mistakes.write(config.eval_dir)
    result["mistakes"] = wrote["count"]
    log.info("mistakes: %d of %d %s images misclassified: %s, %s", wrote["count"], wrote["examined"], split,
             wrote["csv"], wrote["png"])
    found = _label_issues(info, feature_cache, backbone_name, image_size, config)
    if found is not None:
        result["label_issues"] = found
    if not config.export:
        return result

    def eval_batches():
        return records.encoded_batches(info, split, GATE_BATCH)

    publish, reason = _gate(result["accuracy"], eval_batches, info.size(split), info.labels, config)
    result["published"] = publish
    result["gate"] = reason
    if not publish:
        log.warning("not published: %s", reason)
        return result
    from trainer.publish.export import ExportError, export_model

    metadata = {"backbone": backbone_name, "hyperparameters": best_values, "metrics": {"accuracy": result["accuracy"]},
                "eval_split": split, "data": {"dir": config.data_dir, "counts": info.counts, "labels": info.labels}}
    try:
        exported = export_model(model, config.export_dir, labels=info.labels, image_size=image_size,
                                resize_mode=info.resize_mode, check_images=records.encoded_examples(info, split, CHECK_IMAGES)[0], metadata=metadata,
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
    from trainer.data import info as data_info
    from trainer.data import records

    if config.max_pixels:
        return config.max_pixels
    return int(data_info.read_options(config.data_dir).get("max_pixels") or DEFAULT_MAX_PIXELS)


def _label_issues(info, cache_path, backbone_name, image_size, config: TrainConfig) -> int | None:
    """``eval/label_issues.*`` unless ``--no-find-label-issues``; skipped, in one line, without the feature cache
    or (unless asked for) on random weights."""
    from trainer.report import label_issues

    for stale in (label_issues.LABEL_ISSUES_CSV, label_issues.LABEL_ISSUES_PNG):  # an earlier model's, not this one's
        if os.path.exists(os.path.join(config.eval_dir, stale)):
            os.remove(os.path.join(config.eval_dir, stale))
    if config.find_label_issues is False:
        return None
    if config.weights.lower() == "none":
        if config.find_label_issues is None:
            log.info("label issues: skipped, --weights none gives random features, which say nothing about the "
                     "labels (pass pretrained weights, or --find-label-issues to look anyway)")
            return None
        log.warning("label issues: --weights none: the features are random, so the ranking says little")
    cache_path = cache_path or label_issues.find_cache(config.feature_cache_dir, info, backbone_name, image_size)
    if not label_issues.cache_ready(cache_path):
        log.info("label issues: skipped, no cached bottleneck features of the train and validation splits under %s",
                 cache_path or config.feature_cache_dir)
        return None
    try:
        found = label_issues.find_label_issues(info, cache_path, config.eval_dir, seed=config.seed)
    except (label_issues.LabelIssuesError, ValueError) as error:
        log.warning("label issues: skipped: %s", error)
        return None
    log.info("label issues: %d of %d train and validation images look mislabelled or ambiguous (confident learning "
             "on out-of-fold predictions, %.1fs): %s, %s", found["count"], found["examined"], found["seconds"],
             found["csv"], found["png"])
    return found["count"]


def _gate(score: float, batches, count: int, label_names, config: TrainConfig) -> tuple[bool, str]:
    """Publish only at or above ``--min-accuracy`` and not below the latest published version (``JOB/gate.json``)."""
    from trainer.publish.gate import decide

    decision = decide(score, config.export_dir, batches, None, min_accuracy=config.min_accuracy,
                      force=config.force, out_path=os.path.join(config.job_dir, "gate.json"),
                      label_names=label_names, num_images=count)
    return decision.publish, decision.reason
