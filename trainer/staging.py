"""Temporary names for write-then-rename that say who wrote them, and removing those a killed run left.

The export (``EXPORT/.tmp-<version>-<owner>``) and the feature caches
(``<path>.tmp-<owner>-<uuid>``) write into a temporary sibling and rename it
into place, so readers never see half of one. A process killed in between
leaves its temporary behind: never read (readers look only at the final
names, and a cache only with its DONE marker), but it holds a whole SavedModel
or feature set. ``<owner>`` is ``<host>~<pid>``, so a later write to the same
place can tell a leftover from a write in flight: it removes a temporary whose
writer ran on this host and is gone (or had this very process id: a restarted
container reuses its pid), or one untouched for :data:`STALE_AFTER_S` (a
writer on another host, whose process cannot be checked). Names without an
owner are someone else's and are left alone.
"""

from __future__ import annotations

import logging
import os
import re

from preprocessing import owners

log = logging.getLogger("trainer.staging")

STALE_AFTER_S = owners.STALE_AFTER_S
owner = owners.owner
_host = owners.host


def is_stale(path: str) -> bool:
    """Whether the temporary ``path`` was left by a writer that is gone (see the module docstring)."""
    import tensorflow as tf

    def modified():
        try:
            return tf.io.gfile.stat(path).mtime_nsec / 1e9
        except tf.errors.OpError:
            return None

    return owners.left_behind(os.path.basename(path.rstrip("/")), modified)


def remove_stale(folder: str, prefix: str) -> list[str]:
    """Remove the stale temporaries named ``prefix*`` directly under ``folder``; return their paths."""
    import tensorflow as tf

    try:
        names = tf.io.gfile.listdir(folder)
    except tf.errors.OpError:
        return []
    removed = []
    for name in sorted(names):
        path = os.path.join(folder, name.rstrip("/"))
        if not name.startswith(prefix) or not is_stale(path):
            continue
        try:
            if tf.io.gfile.isdir(path):
                tf.io.gfile.rmtree(path)
            else:
                tf.io.gfile.remove(path)
        except tf.errors.OpError as error:
            log.warning("could not remove %s, left by a killed run: %s", path, str(error).splitlines()[0])
            continue
        log.info("removed %s, left by a killed run", path)
        removed.append(path)
    return removed


def write_text(path: str, text: str) -> None:
    """Write a small file (JSON, CSV) so that a reader sees the old content or the new, never part of one.

    Local paths: a hidden ``.<name>.tmp-<owner>`` sibling, flushed and fsynced,
    then :func:`os.replace`. Object stores (``gs://``, ``s3://``) publish an
    object whole when its upload ends, so they are written in place. A failed
    write (a full disk, a file size limit) removes its temporary and leaves
    the old file as it was.
    """
    if "://" in path:
        import tensorflow as tf

        with tf.io.gfile.GFile(path, "w") as handle:
            handle.write(text)
        return
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    temp = os.path.join(folder, f".{name}.tmp-{owner()}")
    try:
        with open(temp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        try:
            os.remove(temp)
        except OSError:
            pass
        raise


_DISK_FULL = re.compile(r"No space left on device|File too large|Disk quota exceeded|errno = (?:28|27|122)\b")
_PATH_IN_MESSAGE = re.compile(r"(?:[a-z][a-z0-9+.-]*://|/)[^\s'\",;:]+")


def disk_full(error: BaseException) -> tuple[str, str] | None:
    """``(path, reason)`` when ``error`` is a write refused for lack of space, or None.

    ENOSPC (a full disk), EFBIG (a file size limit, ``RLIMIT_FSIZE``) and
    EDQUOT (a quota) reach us as ``OSError`` from Python, as TensorFlow
    ``OpError`` messages, or from h5py with the errno in the text; the path is
    the error's own, else the first path its message names (else "").
    """
    import errno

    for cause in (error, error.__cause__, error.__context__):
        if cause is None:
            continue
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            return str(cause.filename or ""), os.strerror(cause.errno)
        text = str(getattr(cause, "message", None) or cause)
        found = _DISK_FULL.search(text)
        if found:
            path = _PATH_IN_MESSAGE.search(re.sub(r"\{\{.*?\}\}", " ", text))  # not TF's "/job:localhost" node names
            reason = {"28": "No space left on device", "27": "File too large", "122": "Disk quota exceeded"}.get(
                found.group(0)[-3:].strip(" ="), found.group(0))
            return (path.group(0) if path else ""), reason
    return None


def disk_full_message(error: BaseException, default_path: str) -> str | None:
    """The one line a user gets for :func:`disk_full` errors (None for any other error)."""
    full = disk_full(error)
    if full is None:
        return None
    return (f"{full[0] or default_path}: {full[1]} (the disk is full or a file size limit was reached); "
            "nothing half-written was published: free space and re-run the same command")
