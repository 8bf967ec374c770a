"""Temporary names that say who wrote them, so a later run can tell a killed run's leftover from a write in flight.

Shared by the preprocessing job's staging folders (``DATA.staging-<owner>-<id>``)
and the trainer's temporaries (:mod:`trainer.staging`). ``<owner>`` is
``<host>~<pid>``. A temporary is left behind when its writer ran on this host
and is gone (or had this very process id: a restarted container reuses its
pid), or when it has been untouched for :data:`STALE_AFTER_S` (a writer on
another host, whose process cannot be checked). Names without an owner are
someone else's and are never taken for leftovers. Needs no TensorFlow.
"""

from __future__ import annotations

import os
import re
import socket
import time
from typing import Callable

STALE_AFTER_S = 24 * 3600.0
_OWNER = re.compile(r"(?P<host>[A-Za-z0-9._]+)~(?P<pid>[0-9]+)")


def host() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"


def owner() -> str:
    """``<host>~<pid>`` of this process, for a temporary name."""
    return f"{host()}~{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists, as another user's process
        return True
    return True


def left_behind(name: str, modified: Callable[[], float | None]) -> bool:
    """Whether the temporary called ``name`` was left by a writer that is gone; ``modified()``: its mtime or None."""
    match = _OWNER.search(name)
    if match is None:
        return False
    if match["host"] == host() and (int(match["pid"]) == os.getpid() or not _alive(int(match["pid"]))):
        return True
    mtime = modified()
    return mtime is not None and time.time() - mtime > STALE_AFTER_S
