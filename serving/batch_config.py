"""The batch prediction job's options, and the model version it scores with (found without TensorFlow).

:class:`BatchConfig` is what :mod:`serving.batch` (the CLI) builds and
:mod:`serving.batch_job` runs; :func:`resolve_model` turns ``--model`` (an
export folder, whose newest numbered version is taken as TF Serving's default
``latest`` policy takes it, or one version folder) into a :class:`ModelInfo`:
its folder, version number, ``assets/labels.txt`` and
``assets.extra/metadata.json``. It reads those small files through Beam's
``FileSystems`` (local paths, ``gs://``, ``s3://``), so the launching process
never imports TensorFlow; the SavedModel itself is loaded by each worker
(:mod:`serving.batch_handler`).
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass

from preprocessing.errors import PreprocessingError
from trainer.publish.export import ASSETS_EXTRA, DECODE_VERSION, LABELS_ASSET, METADATA_FILE

CSV_MAX_ROWS = 100_000  # predictions.csv is written when at most this many images were scored (~10 MB)
_VERSION = re.compile(r"^[0-9]+$")


class BatchError(PreprocessingError):
    """A problem the user can fix (bad flag, missing model or input, existing output): one line, exit 2.

    A :class:`~preprocessing.errors.PreprocessingError`, so the preprocessing
    modules this job reuses (staging, sources) report theirs the same way.
    """


@dataclass(frozen=True)
class BatchConfig:
    """Everything the job needs besides Beam's own pipeline options."""

    model: str
    input: str
    output: str
    top_k: int = 5
    min_batch_size: int = 16
    max_batch_size: int = 64
    csv_max_rows: int = CSV_MAX_ROWS
    overwrite: bool = False
    progress_seconds: float = 30.0

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise BatchError(f"--top-k must be 1 or more, got {self.top_k}")
        if self.min_batch_size < 1:
            raise BatchError(f"--min-batch-size must be 1 or more, got {self.min_batch_size}")
        if self.max_batch_size < self.min_batch_size:
            raise BatchError(f"--max-batch-size ({self.max_batch_size}) must not be below --min-batch-size "
                             f"({self.min_batch_size})")
        if self.csv_max_rows < 0:
            raise BatchError(f"--csv-max-rows must be 0 or more, got {self.csv_max_rows}")

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ModelInfo:
    """One exported version: where it is and what it says about itself."""

    path: str  # the version folder
    version: int | None  # None when the folder's name is not a number
    labels: tuple[str, ...]
    metadata: dict

    @property
    def normalises_uploads(self) -> bool:
        """Whether the signature decodes original files as preprocessing did (docs/contracts.md, section 4)."""
        return self.metadata.get("export", {}).get("decode") == DECODE_VERSION


def _join(*parts: str) -> str:
    from apache_beam.io.filesystems import FileSystems  # not at import: the CLI sets up logging before Beam logs

    return FileSystems.join(*parts)


def _exists(path: str) -> bool:
    from apache_beam.io.filesystems import FileSystems

    try:
        return FileSystems.exists(path)
    except Exception:  # noqa: BLE001 - a filesystem that cannot answer means "not there"
        return False


def _read_text(path: str) -> str:
    from apache_beam.io.filesystem import CompressionTypes
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        return handle.read().decode("utf-8")


def _versions(base: str) -> list[tuple[int, str]]:
    """``(number, folder)`` of every all-digit folder under ``base`` holding a ``saved_model.pb``."""
    from apache_beam.io.filesystems import FileSystems

    try:
        found = FileSystems.match([_join(base, "*", "saved_model.pb")])[0].metadata_list
    except Exception:  # noqa: BLE001
        return []
    versions = []
    for entry in found:
        folder = FileSystems.split(entry.path)[0]
        name = FileSystems.split(folder)[1]
        if _VERSION.match(name):
            versions.append((int(name), folder))
    return sorted(versions)


def resolve_model(path: str) -> ModelInfo:
    """``--model`` as a version: a version folder as given, or an export folder's newest numbered version."""
    import os

    from apache_beam.io.filesystems import FileSystems

    given = path
    path = path.rstrip("/") if len(path) > 1 else path
    if "://" not in path:
        path = os.path.abspath(path)
    if not _exists(path):
        raise BatchError(f"{given}: model not found (expected JOB/export or JOB/export/VERSION)")
    if _exists(_join(path, "saved_model.pb")):
        folder = path
        name = FileSystems.split(path)[1]
        version = int(name) if _VERSION.match(name) else None
    else:
        versions = _versions(path)
        if not versions:
            raise BatchError(f"{given}: no model version in it (expected numbered version folders with a "
                             "saved_model.pb, as the trainer exports them, or a version folder itself)")
        version, folder = versions[-1]
    labels_path = _join(folder, "assets", LABELS_ASSET)
    try:
        labels = tuple(line.strip() for line in _read_text(labels_path).splitlines() if line.strip())
    except Exception:  # noqa: BLE001
        raise BatchError(f"{folder}: no assets/{LABELS_ASSET}: not a classifier exported by this project's trainer "
                         "(docs/contracts.md, section 4)") from None
    if not labels:
        raise BatchError(f"{labels_path}: empty labels file")
    metadata: dict = {}
    try:
        metadata = json.loads(_read_text(_join(folder, ASSETS_EXTRA, METADATA_FILE)))
    except Exception:  # noqa: BLE001 - optional: exports made by hand may lack it
        pass
    return ModelInfo(path=folder, version=version, labels=labels, metadata=metadata)
