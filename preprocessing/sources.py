"""What the input is and which files it names (docs/contracts.md, section 1).

Three layouts: ``ROOT/<class>/<image>``, ``ROOT/{train,validation,test}/<class>/<image>``
or a CSV manifest ``path,label[,split]`` (relative paths from the CSV's folder).
:func:`inspect_input` looks at the input once, in the launching process, and
turns an unusable one into a :class:`~preprocessing.errors.PreprocessingError`;
the per-file functions here run inside the Beam job and turn each listed file
or manifest row into an :class:`InputItem` or a :class:`~preprocessing.images.Rejected`.
Paths go through Beam's ``FileSystems``, so ``gs://`` and friends work too.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass, field
from typing import Iterator, NamedTuple

from apache_beam.io.filesystems import FileSystems

from preprocessing.errors import PreprocessingError
from preprocessing.images import Rejected
from preprocessing.tfrecords import SPLITS

CLASS_FOLDERS = "class folders"
SPLIT_FOLDERS = "split folders"
MANIFEST = "csv manifest"
REQUIRED_COLUMNS = ("path", "label")
OPTIONAL_COLUMNS = ("split",)


class InputItem(NamedTuple):
    """One input file: where it is, what it was called in the input, its class and given split."""

    path: str
    source_id: str
    label: str
    split: str  # "" when the input names none


@dataclass(frozen=True)
class InputSpec:
    """The input as inspected: its layout and what the job needs to list it."""

    path: str
    layout: str
    columns: tuple[str, ...] = ()
    unknown_columns: tuple[str, ...] = ()
    empty_class_folders: tuple[str, ...] = field(default=())

    @property
    def base_dir(self) -> str:
        """Folder that relative manifest paths start from."""
        return FileSystems.split(self.path)[0] if self.layout == MANIFEST else self.path


def _is_local(path: str) -> bool:
    return "://" not in path


def _any_file(pattern: str) -> bool:
    try:
        return bool(FileSystems.match([pattern], limits=[1])[0].metadata_list)
    except Exception:  # noqa: BLE001 - a filesystem that cannot list means "nothing here"
        return False


def inspect_input(path: str) -> InputSpec:
    """Decide the layout of ``path`` and refuse inputs that cannot work, with a one-line reason."""
    path = path.rstrip("/") if len(path) > 1 else path
    if _is_local(path):
        path = os.path.abspath(path)
        if not os.path.exists(path):
            raise PreprocessingError(f"{path}: input not found")
        if os.path.isfile(path):
            return _inspect_manifest(path)
    elif FileSystems.exists(path) and path.lower().endswith(".csv"):
        return _inspect_manifest(path)
    if not _any_file(FileSystems.join(path, "*", "**")):
        raise PreprocessingError(
            f"{path}: no images found (expected ROOT/<class>/<image>, ROOT/<split>/<class>/<image> or a CSV manifest)"
        )
    layout = SPLIT_FOLDERS if any(_any_file(FileSystems.join(path, split, "**")) for split in SPLITS) else CLASS_FOLDERS
    empty = ()
    if _is_local(path):
        empty = _check_local_classes(path, layout)
    return InputSpec(path=path, layout=layout, empty_class_folders=empty)


def _check_local_classes(root: str, layout: str) -> tuple[str, ...]:
    """Class folders of a local input; refuses a single class, returns the empty ones."""
    parents = [os.path.join(root, split) for split in SPLITS] if layout == SPLIT_FOLDERS else [root]
    classes: dict[str, bool] = {}
    empty = []
    for parent in parents:
        if not os.path.isdir(parent):
            continue
        for entry in sorted(os.scandir(parent), key=lambda e: e.name):
            if not entry.is_dir() or entry.name.startswith("."):
                continue
            has_files = any(
                not name.startswith(".") for _, _, names in os.walk(entry.path) for name in names
            )
            classes[entry.name] = classes.get(entry.name, False) or has_files
            if not has_files:
                empty.append(entry.path)
    usable = sorted(name for name, has_files in classes.items() if has_files)
    if len(usable) < 2:
        found = f"only {usable[0]!r}" if usable else "none"
        raise PreprocessingError(f"{root}: need at least two class folders with images, found {found}")
    return tuple(empty)


def _inspect_manifest(path: str) -> InputSpec:
    try:
        with FileSystems.open(path) as handle:
            head = handle.read(1 << 16)
    except Exception as error:  # noqa: BLE001
        raise PreprocessingError(f"{path}: cannot read the manifest ({error})") from None
    text = head.decode("utf-8-sig", errors="replace")
    if "\x00" in text or "\ufffd" in text[:200]:
        raise PreprocessingError(f"{path}: not a CSV manifest (binary content); give a folder or a CSV with path,label[,split]")
    lines = text.splitlines()
    if not lines or not lines[0].strip():
        raise PreprocessingError(f"{path}: empty manifest (expected a header line path,label[,split])")
    columns = tuple(column.strip().lower() for column in next(csv.reader([lines[0]])))
    missing = [column for column in REQUIRED_COLUMNS if column not in columns]
    if missing:
        header = ",".join(columns)
        header = header if len(header) <= 60 else header[:57] + "..."
        raise PreprocessingError(
            f"{path}: manifest header {header!r} lacks column(s) {', '.join(missing)} (expected a CSV with path,label[,split])"
        )
    if not any(line.strip() for line in lines[1:]):
        raise PreprocessingError(f"{path}: manifest has a header but no rows")
    unknown = tuple(column for column in columns if column not in REQUIRED_COLUMNS + OPTIONAL_COLUMNS)
    return InputSpec(path=path, layout=MANIFEST, columns=columns, unknown_columns=unknown)


def list_files(root: str) -> Iterator[str]:
    """Every file under ``root``, at any depth, as it is found (nothing held but the walk's own state).

    Local folders are walked (``os.walk``, symbolic links to folders not
    followed: as Beam's local file system lists them); on other file systems
    (``gs://`` ...) Beam's ``FileSystems.match`` lists them, which holds the
    whole listing. A file that cannot be stat'ed (a broken link) is listed all
    the same: reading it fails, and it is reported, not dropped.
    """
    if _is_local(root):
        for folder, _, names in os.walk(root):
            for name in names:
                yield os.path.join(folder, name)
        return
    for metadata in FileSystems.match([FileSystems.join(root, "**")])[0].metadata_list:
        yield metadata.path


def item_from_path(path: str, spec: InputSpec) -> InputItem | None:
    """A listed file as an input item; ``None`` for files that are not inputs (top-level or hidden).

    Raises :class:`Rejected` for files in the wrong place (e.g. an image
    directly in a split folder, or outside the split folders).
    """
    root = spec.path.rstrip("/") + "/"
    relative = path[len(root):] if path.startswith(root) else path
    parts = relative.replace("\\", "/").split("/")
    if len(parts) < 2 or any(part.startswith(".") for part in parts):
        return None
    if spec.layout == SPLIT_FOLDERS:
        if parts[0] not in SPLITS:
            raise Rejected(f"outside the split folders ({', '.join(SPLITS)}): {parts[0]}/ is not a split")
        if len(parts) < 3:
            raise Rejected(f"directly in the {parts[0]}/ folder, not in a class folder below it")
        return InputItem(path=path, source_id=path, label=parts[1], split=parts[0])
    return InputItem(path=path, source_id=path, label=parts[0], split="")


def item_from_row(line: str, spec: InputSpec) -> InputItem | None:
    """One manifest line as an input item; ``None`` for blank lines.

    Raises :class:`Rejected` (with the row's path, or the line when it has
    none) for blank labels, a missing path or an unknown split.
    """
    if not line.strip():
        return None
    values = next(csv.reader(io.StringIO(line)), [])
    row = {column: (values[index].strip() if index < len(values) else "") for index, column in enumerate(spec.columns)}
    given = row.get("path", "")
    if not given:
        raise RowRejected(line, "manifest row has no path")
    path = given if "://" in given or os.path.isabs(given) else FileSystems.join(spec.base_dir, given)
    if not row.get("label"):
        raise RowRejected(path, "manifest row has a blank label")
    split = row.get("split", "").lower()
    if split and split not in SPLITS:
        raise RowRejected(path, f"manifest row has unknown split {row['split']!r} (expected {', '.join(SPLITS)} or blank)")
    return InputItem(path=path, source_id=given, label=row["label"], split=split)


class RowRejected(Rejected):
    """A manifest row rejected before any file was read; carries the path to report."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(reason)
        self.path = path
