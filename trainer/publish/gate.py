"""The publishing gate: may the newly trained model become the next served version?

Like TFX's model blessing: the candidate must reach an absolute bar
(``min_accuracy``) and must not be worse than the baseline, the version being
served now, i.e. the latest version under the export base. The baseline is
scored on the same test images through its exported SavedModel (the exact
graph TF Serving runs), so the comparison is like for like. ``force`` publishes
anyway and says so in the record.

Call :func:`decide` before exporting the candidate (afterwards the latest
version would be the candidate itself; pass ``candidate_version`` then).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np

from trainer import staging

log = logging.getLogger(__name__)

SCORE_BATCH = 64
SCORE_EPSILON = 1e-9  # accuracies are k/N on the same N images: equal means equal


@dataclass(frozen=True)
class GateDecision:
    """The gate's verdict. ``reason`` is one readable sentence; scores are test accuracies."""

    publish: bool
    reason: str
    new_score: float
    min_accuracy: float
    previous_version: int | None
    previous_score: float | None
    forced: bool

    def to_dict(self) -> dict:
        return asdict(self)


def score_version(version_dir: str, images, labels: Sequence[int] | None, *,
                  label_names: Sequence[str] | None = None,
                  load_predict_fn: Callable | None = None, batch_size: int = SCORE_BATCH) -> float:
    """Accuracy of the exported SavedModel in ``version_dir`` on encoded ``images`` with true ``labels``
    (or on the ``(images, labels)`` batches a callable ``images()`` yields; ``labels`` is then None).

    With ``label_names`` (the candidate's ``labels.txt`` order) a prediction is
    right when its class *name* matches, so a baseline trained with another
    class order or class set is still judged fairly; without, class ids are
    compared.
    """
    if load_predict_fn is None:
        from trainer.publish.export import load_predict_fn
    predict = load_predict_fn(version_dir)
    names = np.asarray([str(n) for n in label_names], dtype=object) if label_names is not None else None
    correct = total = 0
    for batch, expected in _batches(images, labels, batch_size):
        outputs = predict(list(batch))
        expected = np.asarray(expected, dtype=np.int64)
        if names is not None:
            predicted = np.asarray([v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in outputs["labels"]],
                                   dtype=object)
            correct += int(np.sum(predicted == names[expected]))
        else:
            correct += int(np.sum(np.asarray(outputs["class_ids"]).astype(np.int64) == expected))
        total += len(expected)
    if not total:
        raise ValueError("the gate needs at least one test image")
    return correct / total


def _batches(images, labels, batch_size: int):
    """``(images, labels)`` batches: from ``images()`` when it is a callable yielding batches (streamed
    from the records, so the test split is never held in memory), else slices of the two sequences."""
    if callable(images):
        yield from images()
        return
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    for start in range(0, len(images), batch_size):
        yield images[start:start + batch_size], labels[start:start + batch_size]


def _write(decision: GateDecision, out_path: str, extra: dict) -> None:
    import tensorflow as tf

    parent = os.path.dirname(out_path)
    if parent:
        tf.io.gfile.makedirs(parent)
    staging.write_text(out_path, json.dumps({**decision.to_dict(), **extra}, indent=2) + "\n")


def decide(new_score: float, export_base: str, test_images, test_labels: Sequence[int] | None, *,
           min_accuracy: float = 0.0, force: bool = False, out_path: str | None = None,
           label_names: Sequence[str] | None = None, candidate_version: int | None = None,
           load_predict_fn: Callable | None = None, num_images: int | None = None) -> GateDecision:
    """Decide whether the candidate (test accuracy ``new_score``) is published under ``export_base``.

    Refused when ``new_score < min_accuracy``, or when the latest version under
    ``export_base`` (below ``candidate_version`` if given) scores higher on
    ``test_images``/``test_labels`` (or the batches ``test_images()`` yields,
    with ``num_images`` saying how many); published otherwise (a tie publishes).
    ``force`` publishes regardless; ``forced`` is True when it changed the
    outcome (a candidate that passes anyway is not "forced"). A baseline
    that cannot be loaded or run does not block: it is logged and the decision
    rests on ``min_accuracy``. ``label_names``: see :func:`score_version`.
    The decision is logged and, with ``out_path`` (``JOB/gate.json``), written
    as JSON with the test image count and the time.
    """
    from trainer.publish import export

    new_score = float(new_score)
    if num_images is None:
        num_images = len(test_images)
    versions = [v for v in export.list_versions(export_base)
                if candidate_version is None or v < int(candidate_version)]
    previous_version = versions[-1] if versions else None
    previous_score = None
    baseline_note = ""
    if previous_version is not None:
        version_dir = os.path.join(export_base, str(previous_version))
        try:
            previous_score = score_version(version_dir, test_images, test_labels, label_names=label_names,
                                           load_predict_fn=load_predict_fn)
        except Exception as error:  # noqa: BLE001 - a broken baseline must not block a good candidate
            baseline_note = f"; version {previous_version} could not be scored ({type(error).__name__}: {error})"
            log.warning("gate: baseline version %d at %s could not be scored: %s", previous_version, version_dir,
                        error)

    if new_score < min_accuracy:
        verdict, reason = False, f"accuracy {new_score:.4f} is below the minimum {min_accuracy:.4f}"
    elif previous_score is not None and new_score + SCORE_EPSILON < previous_score:
        verdict, reason = False, (f"accuracy {new_score:.4f} is worse than version {previous_version}'s "
                                  f"{previous_score:.4f} on the same {num_images} test images")
    elif previous_score is not None:
        verdict, reason = True, (f"accuracy {new_score:.4f} is not worse than version {previous_version}'s "
                                 f"{previous_score:.4f} and meets the minimum {min_accuracy:.4f}")
    else:
        first = "no earlier version" if previous_version is None else "no comparable earlier version"
        verdict, reason = True, f"accuracy {new_score:.4f} meets the minimum {min_accuracy:.4f} ({first})"
    reason += baseline_note
    forced = bool(force) and not verdict
    if forced:
        reason = f"forced: published although {reason}"

    decision = GateDecision(publish=verdict or forced, reason=reason, new_score=new_score,
                            min_accuracy=float(min_accuracy), previous_version=previous_version,
                            previous_score=previous_score, forced=forced)
    (log.info if decision.publish else log.warning)("gate: %s: %s", "PUBLISH" if decision.publish else "REFUSE",
                                                    reason)
    if out_path:
        _write(decision, out_path, {"num_test_images": num_images, "export_base": export_base,
                                    "decided_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")})
    return decision
