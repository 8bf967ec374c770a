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

def evaluate_gate_export(model, history, info, image_size, backbone_name, best_values, config) -> dict:
    from trainer.data import info as data_info
    from trainer.data import records

    split = info.eval_split
    if split != "test":
        log.warning("no test split in %s: evaluating and gating on the validation split", config.data_dir)
    dataset = records.image_dataset(info, split, image_size, config.batch_size)
    result: dict = {"eval_split": split}
    from trainer.report.evaluate import evaluate_model

    metrics = evaluate_model(model, dataset, info.labels, config.eval_dir, history=history, top_k=config.top_k,
                             total=info.size(split))
    result["accuracy"] = float(metrics["accuracy"])
    log.info("%s accuracy of the retrained model: %.4f (%s)", split, result["accuracy"], config.eval_dir)
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


def _gate(score: float, batches, count: int, label_names, config: TrainConfig) -> tuple[bool, str]:
    """Publish only at or above ``--min-accuracy`` and not below the latest published version (``JOB/gate.json``)."""
    from trainer.publish.gate import decide

    decision = decide(score, config.export_dir, batches, None, min_accuracy=config.min_accuracy,
                      force=config.force, out_path=os.path.join(config.job_dir, "gate.json"),
                      label_names=label_names, num_images=count)
    return decision.publish, decision.reason
