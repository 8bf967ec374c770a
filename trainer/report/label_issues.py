"""Suspect labels: training and validation images whose given class the model contradicts with confidence.

``eval/label_issues.csv`` and ``eval/label_issues.png``, from the bottleneck
features the search already cached (``JOB/cache/<key>/{train,validation}-pooled``,
:mod:`trainer.data.features`):

1. **Out-of-fold probabilities.** A logistic regression (scikit-learn, on
   standardised average-pooled features, ``C`` = :data:`REGULARIZATION`) is fitted K times
   (stratified K-fold, default 5); each image is scored by the fit that did not see it.
   On cached features this costs seconds.
2. **Confident learning** (Northcutt et al., 2021, the ``cleanlab`` package):
   ``cleanlab.filter.find_label_issues`` flags the images whose given label
   the out-of-fold probabilities contradict (pruning by the estimated noise
   rate of each class pair, not a hand-set threshold) and ranks them by
   ``self_confidence``; ``cleanlab.rank.get_label_quality_scores`` gives each
   its score, the out-of-fold probability of the given label (lower is more suspect).

Each CSV row, the most suspect first: ``path, split, given_label,
suggested_label`` (the out-of-fold arg-max), ``score`` and ``suggested_score``
(the probability of the suggested class). The PNG shows the
:data:`GALLERY_SIZE` most suspect with both labels.

**Memory.** The fit needs the pooled features of train and validation in
memory as one float32 array: N x D x 4 bytes (3,400 images of MobileNetV2's
1,280 channels: 17 MB; a million: 5 GB), plus the N x C probabilities. Above
:data:`MAX_FEATURE_BYTES` the step is skipped and says so. Source paths are
not held for every image: after the ranking, one streamed pass over the
records picks the paths (and the gallery's encoded images) of the flagged rows
only, checking on the way that the records' labels are the cached ones, in
the same order.

Run on its own over a finished job: ``python -m trainer.report.label_issues --job-dir JOB``
(``--data`` and the validation fraction default to the job's ``tuner/search.json``).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import sys
import warnings

import numpy as np

from preprocessing import tfrecords
from trainer import staging
from trainer.data import records

log = logging.getLogger("trainer")

LABEL_ISSUES_CSV = "label_issues.csv"
LABEL_ISSUES_PNG = "label_issues.png"
SPLITS = ("train", "validation")
FOLDS = 5
GALLERY_SIZE = 40
# scikit-learn's C on standardised features; on clothing-small (MobileNetV2, 1,280 channels) 0.01 had the best
# out-of-fold log loss and accuracy of 1, 0.1, 0.01, 0.001 (0.41 and 85.9%; 1.0: 0.65 and 84.3%, overconfident).
REGULARIZATION = 0.01
MAX_FEATURE_BYTES = 8 << 30
CSV_COLUMNS = ("path", "split", "given_label", "suggested_label", "score", "suggested_score")


def _features():
    """:mod:`trainer.data.features`, imported when first needed: it imports Keras (``--help`` stays quick)."""
    from trainer.data import features

    return features


class LabelIssuesError(Exception):
    """The cached features cannot be matched to the data (a stale cache, other data)."""


def pooled_path(cache_path: str, split: str) -> str:
    """Where :class:`trainer.data.features.FeatureCache` saves a split's pooled vectors (its ``pooled_path``)."""
    return os.path.join(cache_path, f"{split}-pooled")


def cache_ready(cache_path: str | None) -> bool:
    """Whether ``cache_path`` holds the complete pooled features of train and validation."""
    return bool(cache_path) and all(_features().is_saved(pooled_path(cache_path, s)) for s in SPLITS)


def _done(cache_path: str, split: str) -> dict:
    import tensorflow as tf

    with tf.io.gfile.GFile(os.path.join(pooled_path(cache_path, split), _features().DONE)) as handle:
        return json.loads(handle.read() or "{}")


def find_cache(cache_dir: str, info, backbone: str | None = None, image_size=None) -> str | None:
    """The feature cache under ``cache_dir`` for ``info``'s train and validation counts, the newest if several.

    ``backbone`` and ``image_size`` narrow it to ``<backbone>-<H>x<W>-<digest>``
    folders (the names :func:`trainer.data.features.cache_key` gives).
    """
    import tensorflow as tf

    if not tf.io.gfile.isdir(cache_dir):
        return None
    prefix = f"{backbone}-{image_size[0]}x{image_size[1]}-" if backbone and image_size else ""
    found = []
    for name in tf.io.gfile.listdir(cache_dir):
        name = name.rstrip("/")
        path = os.path.join(cache_dir, name)
        if not re.fullmatch(r"[\w.]+-\d+x\d+-[0-9a-f]{16}", name) or not name.startswith(prefix):
            continue
        if cache_ready(path) and all(_done(path, s).get("count") == info.size(s) for s in SPLITS):
            stamp = tf.io.gfile.stat(os.path.join(pooled_path(path, "validation"), _features().DONE)).mtime_nsec
            found.append((stamp, path))
    return max(found)[1] if found else None


def load_pooled(cache_path: str, split: str, pooling: str = "avg") -> tuple[np.ndarray, np.ndarray]:
    """``(features float32 [N, D], labels int64 [N])`` of a split, read batch by batch into one array."""
    import tensorflow as tf

    pick = _features().POOLED.index(pooling)
    done = _done(cache_path, split)
    count, channels = int(done["count"]), int(done["channels"])
    features = np.empty((count, channels), np.float32)
    labels = np.empty(count, np.int64)
    at = 0
    for element in tf.data.Dataset.load(pooled_path(cache_path, split)).as_numpy_iterator():
        batch = element[pick]
        if at + len(batch) > count:
            raise LabelIssuesError(f"{pooled_path(cache_path, split)} holds more than the {count} rows it records")
        features[at:at + len(batch)] = batch
        labels[at:at + len(batch)] = element[2]
        at += len(batch)
    if at != count:
        raise LabelIssuesError(f"{pooled_path(cache_path, split)} holds {at} rows, not the {count} it records")
    return features, labels


def out_of_fold_probabilities(features: np.ndarray, labels: np.ndarray, num_classes: int, *, folds: int = FOLDS,
                              seed: int = 0, regularization: float = REGULARIZATION) -> np.ndarray:
    """``[N, num_classes]`` probabilities, each row from a logistic regression fitted on the other folds.

    Stratified K-fold (fewer folds when no class has ``folds`` images); a
    class missing from a fold's training part gets probability 0 there.
    ``regularization`` is scikit-learn's ``C`` (inverse strength) on standardised features.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    labels = np.asarray(labels, dtype=np.int64)
    splits = max(2, min(folds, int(np.bincount(labels).max())))
    probabilities = np.zeros((len(labels), num_classes), np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "the least populated class has only 1 member", convergence chatter
        for train, held_out in StratifiedKFold(splits, shuffle=True, random_state=seed).split(features, labels):
            if len(np.unique(labels[train])) < 2:
                probabilities[held_out, labels[train][0]] = 1.0
                continue
            # tol 1e-3: on clothing-small the same probabilities as the default 1e-4 (85.9% out of fold, log loss
            # 0.41, 189 issues against 186) in a tenth of the time (3.5 s against 38 s for the five fits).
            model = make_pipeline(StandardScaler(), LogisticRegression(C=regularization, tol=1e-3, max_iter=500))
            model.fit(features[train], labels[train])
            probabilities[np.ix_(held_out, model.classes_)] = model.predict_proba(features[held_out])
    return probabilities


def rank_label_issues(labels: np.ndarray, probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(flagged indices, most suspect first; label quality score of every row)`` by confident learning.

    Classes without an image are left out of the problem (cleanlab needs
    every class to occur) and mapped back.
    """
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    labels = np.asarray(labels, dtype=np.int64)
    present = np.flatnonzero(np.bincount(labels, minlength=probabilities.shape[1]))
    if len(present) < 2 or len(labels) < 2:
        return np.zeros(0, np.int64), np.ones(len(labels))
    local = np.searchsorted(present, labels)
    probs = probabilities[:, present]
    probs = np.clip(probs, 1e-12, None)
    probs = probs / probs.sum(axis=1, keepdims=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ranked = find_label_issues(local, probs, return_indices_ranked_by="self_confidence", n_jobs=1)
        scores = get_label_quality_scores(local, probs, method="self_confidence")
    return np.asarray(ranked, dtype=np.int64), np.asarray(scores, dtype=np.float64)


def find_label_issues(info, cache_path: str, out_dir: str, *, folds: int = FOLDS, seed: int = 0,
                      pooling: str = "avg", gallery_size: int = GALLERY_SIZE) -> dict:
    """Write ``out_dir/label_issues.csv`` and ``.png`` for ``info``'s train and validation images.

    Returns ``{count, examined, csv, png, seconds}``. Raises
    :class:`LabelIssuesError` when the cache does not match the records.
    """
    import time

    import tensorflow as tf

    started = time.perf_counter()
    counts = {split: int(_done(cache_path, split)["count"]) for split in SPLITS}
    channels = int(_done(cache_path, "train")["channels"])
    need = sum(counts.values()) * channels * 4
    if need > MAX_FEATURE_BYTES:
        raise LabelIssuesError(f"the pooled features of {sum(counts.values())} images need {need / 2**30:.1f} GiB "
                               f"in memory (over {MAX_FEATURE_BYTES / 2**30:.0f} GiB)")
    parts = [load_pooled(cache_path, split, pooling) for split in SPLITS]
    features = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    del parts
    probabilities = out_of_fold_probabilities(features, labels, info.num_classes, folds=folds, seed=seed)
    del features
    ranked, scores = rank_label_issues(labels, probabilities)
    suggested = probabilities.argmax(axis=1)
    rank_of = {int(index): rank for rank, index in enumerate(ranked)}
    paths: dict[int, str] = {}
    images: dict[int, bytes] = {}
    offset = 0
    for split in SPLITS:
        at = offset
        for sources, record_labels, encoded in records.record_fields(
                info, split, (tfrecords.SOURCE_ID, tfrecords.LABEL, tfrecords.ENCODED)).as_numpy_iterator():
            if not np.array_equal(record_labels, labels[at:at + len(record_labels)]):
                raise LabelIssuesError(f"the cached features at {cache_path} are not those of {info.data_dir} "
                                       f"({split} labels differ); delete the cache or point at the right one")
            for i in range(len(record_labels)):
                rank = rank_of.get(at + i)
                if rank is not None:
                    paths[at + i] = sources[i].decode("utf-8", "replace")
                    if rank < gallery_size:
                        images[at + i] = bytes(encoded[i])
            at += len(record_labels)
        if at - offset != counts[split]:
            raise LabelIssuesError(f"{split}: {at - offset} records, but the cache at {cache_path} has {counts[split]}")
        offset = at

    def split_of(index: int) -> str:
        return SPLITS[0] if index < counts[SPLITS[0]] else SPLITS[1]

    names = info.labels
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for index in ranked:
        writer.writerow([paths[index], split_of(index), names[labels[index]], names[suggested[index]],
                         f"{scores[index]:.6f}", f"{probabilities[index, suggested[index]]:.6f}"])
    tf.io.gfile.makedirs(out_dir)
    csv_path = os.path.join(out_dir, LABEL_ISSUES_CSV)
    staging.write_text(csv_path, buf.getvalue())
    png_path = _gallery(ranked[:gallery_size], images, paths, labels, suggested, scores, names,
                        os.path.join(out_dir, LABEL_ISSUES_PNG), total=len(labels))
    return {"count": int(len(ranked)), "examined": int(len(labels)), "csv": csv_path, "png": png_path,
            "seconds": round(time.perf_counter() - started, 1)}


def _gallery(shown, images, paths, labels, suggested, scores, names, path: str, *, total: int) -> str:
    from trainer.report.gallery import COLUMNS, plot_gallery

    rows = []
    for start in range(0, len(shown), COLUMNS):
        chunk = shown[start:start + COLUMNS]
        cells = [(images[i], f"{names[labels[i]]} -> {names[suggested[i]]}\n{scores[i]:.3f} "
                             f"{os.path.basename(paths[i])[:14]}") for i in chunk]
        rows.append((f"#{start + 1}-{start + len(chunk)}", cells))
    title = (f"Suspect labels: the {len(shown)} most suspect of {len(paths)} flagged (of {total} train and "
             "validation images)\ngiven -> suggested, score = out-of-fold probability of the given label")
    return plot_gallery(rows, path, title=title, empty=f"no label issues found (of {total} images)")


def main(argv=None) -> int:
    """``python -m trainer.report.label_issues --job-dir JOB [--data DATA] [--out DIR]``: see the module docstring."""
    from preprocessing.console import Parser, fail
    from trainer.config import UserError

    prog = "python -m trainer.report.label_issues"
    parser = Parser(prog=prog, description="Find suspect labels of a finished job's train and validation images "
                                           "from its cached bottleneck features (confident learning).")
    parser.add_argument("--job-dir", required=True, help="the trainer's job folder")
    parser.add_argument("--data", "--data-dir", dest="data", default=None,
                        help="the data folder (default: the one in JOB/tuner/search.json)")
    parser.add_argument("--cache", default=None, help="a feature cache folder (default: the newest matching one "
                                                      "under JOB/cache)")
    parser.add_argument("--out", default=None, help="where the CSV and PNG go (default JOB/eval)")
    parser.add_argument("--folds", type=int, default=FOLDS, help=f"cross-validation folds (default {FOLDS})")
    parser.add_argument("--pooling", choices=("avg", "max"), default="avg", help="pooled features to fit on")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname).1s %(message)s", datefmt="%H:%M:%S")
    try:
        from preprocessing.console import import_tensorflow_quietly
        from trainer.data.info import inspect_data

        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        import_tensorflow_quietly(False, "label issues", log)

        search = _read_json(os.path.join(args.job_dir, "tuner", "search.json"))
        data = args.data or search.get("data_dir")
        if not data:
            raise UserError(f"--data is needed: no data_dir in {args.job_dir}/tuner/search.json")
        info = inspect_data(data, float(search.get("validation_fraction", 0.2)))
        cache = args.cache or find_cache(os.path.join(args.job_dir, "cache"), info, search.get("backbone"),
                                         search.get("image_size"))
        if not cache_ready(cache):
            raise UserError(f"no cached pooled features of {data}'s train and validation splits under "
                            f"{args.cache or os.path.join(args.job_dir, 'cache')}")
        result = find_label_issues(info, cache, args.out or os.path.join(args.job_dir, "eval"), folds=args.folds,
                                   seed=args.seed, pooling=args.pooling)
    except (UserError, LabelIssuesError) as error:
        return fail(prog, error)
    log.info("label issues: %d of %d train and validation images flagged in %.1fs (features %s): %s, %s",
             result["count"], result["examined"], result["seconds"], cache, result["csv"], result["png"])
    return 0


def _read_json(path: str) -> dict:
    import tensorflow as tf

    if not tf.io.gfile.exists(path):
        return {}
    with tf.io.gfile.GFile(path) as handle:
        return json.loads(handle.read())


if __name__ == "__main__":
    sys.exit(main())
