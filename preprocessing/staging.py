"""Write to a staging folder and move it into place only when the job succeeded.

The staging folder is a sibling of the output (``DATA.staging-<run id>``) on
the same filesystem, so the final move is a rename: locally one atomic
``os.replace`` of the folder; on object stores, a rename of each file. An
existing, non-empty output is refused unless ``overwrite`` is set.

Staging folders name their writer (:mod:`preprocessing.owners`), so a job
that was killed leaves one a later run can recognise: the next run on the
same output removes local ``DATA.staging-*`` and ``DATA.old-*`` folders whose
writer is gone, and says so. (On object stores a leftover is never read, since
only a committed output is, and is left for a bucket lifecycle rule.)
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid

from apache_beam.io.filesystems import FileSystems

from preprocessing import owners
from preprocessing.errors import PreprocessingError

_log = logging.getLogger("preprocessing")


def _is_local(path: str) -> bool:
    return "://" not in path


def _exists_with_content(path: str) -> bool:
    if _is_local(path):
        if os.path.isdir(path):
            return any(True for _ in os.scandir(path))
        return os.path.exists(path)
    try:
        return bool(FileSystems.match([FileSystems.join(path, "**")], limits=[1])[0].metadata_list)
    except Exception:  # noqa: BLE001
        return False


class Staging:
    """One run's staging folder for ``output``."""

    def __init__(self, output: str, overwrite: bool) -> None:
        output = output.rstrip("/")
        self.output = os.path.abspath(output) if _is_local(output) else output
        self.overwrite = overwrite
        self.path = f"{self.output}.staging-{owners.owner()}-{uuid.uuid4().hex[:8]}"

    def check(self) -> None:
        """Refuse an existing output (unless overwriting) before any work is done."""
        if _exists_with_content(self.output) and not self.overwrite:
            raise PreprocessingError(f"{self.output}: output already exists (use --overwrite to replace it)")
        if _is_local(self.output):
            parent = os.path.dirname(self.output)
            if os.path.exists(parent) and not os.path.isdir(parent):
                raise PreprocessingError(f"{self.output}: cannot create the output, {parent} is not a folder")

    def create(self) -> str:
        if _is_local(self.path):
            self._remove_leftovers()
            os.makedirs(self.path)
        return self.path

    def _remove_leftovers(self) -> None:
        parent, name = os.path.split(self.output)
        try:
            entries = list(os.scandir(parent))
        except OSError:
            return
        for entry in entries:
            if not (entry.name.startswith(f"{name}.staging-") or entry.name.startswith(f"{name}.old-")):
                continue
            if owners.left_behind(entry.name, lambda: entry.stat().st_mtime):
                shutil.rmtree(entry.path, ignore_errors=True)
                _log.info("removed %s, left by a killed run", entry.path)

    def join(self, name: str) -> str:
        return FileSystems.join(self.path, name)

    def commit(self) -> None:
        """Move the staging folder's content to the output, replacing an old output if allowed."""
        if _is_local(self.output):
            old = None
            if os.path.exists(self.output):
                if _exists_with_content(self.output):
                    old = f"{self.output}.old-{owners.owner()}-{uuid.uuid4().hex[:8]}"
                    os.replace(self.output, old)
                else:
                    os.rmdir(self.output)
            os.replace(self.path, self.output)
            if old:
                shutil.rmtree(old, ignore_errors=True)
            return
        if _exists_with_content(self.output):
            old_files = [m.path for m in FileSystems.match([FileSystems.join(self.output, "**")])[0].metadata_list]
            FileSystems.delete(old_files)
        sources = [m.path for m in FileSystems.match([FileSystems.join(self.path, "**")])[0].metadata_list]
        destinations = [self.output + source[len(self.path):] for source in sources]
        FileSystems.rename(sources, destinations)
        self.discard()

    def discard(self) -> None:
        """Remove the staging folder (after a failure, or after a remote commit)."""
        try:
            if _is_local(self.path):
                shutil.rmtree(self.path, ignore_errors=True)
            elif FileSystems.exists(self.path) or _exists_with_content(self.path):
                FileSystems.delete([self.path])
        except Exception as error:  # noqa: BLE001
            _log.warning("could not remove the staging folder %s: %s", self.path, error)


def remove_tree(path: str) -> None:
    """Delete ``path`` and everything under it (a local folder, or an object-store prefix); warn if it fails."""
    try:
        leftovers = [m.path for m in FileSystems.match([FileSystems.join(path, "**")])[0].metadata_list]
        if leftovers:
            FileSystems.delete(leftovers)
        if FileSystems.exists(path):
            FileSystems.delete([path])
    except Exception as error:  # noqa: BLE001 - a leftover temporary folder is not worth failing the job
        _log.warning("could not remove the temporary folder %s: %s", path, error)
