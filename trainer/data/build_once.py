"""Building a cache once per distributed job: the chief builds, the workers wait for it.

The chief (or a single process) builds the cache with a ``<cache>.building``
marker beside it, whose content it rewrites every :data:`HEARTBEAT_S`
seconds while it works. A worker waits for the chief's cache: up to
``patience_s`` for a marker to appear, then as long as the marker keeps
changing. It builds its own when no marker appears (a worker that does not
share the chief's filesystem), when the marker goes away without a cache
(the chief's build failed), or when the marker stops changing for
:data:`STALE_S` (the chief was killed). Staleness is judged by the worker's
own clock, so hosts need not agree on the time.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time

log = logging.getLogger("trainer.data.features")

HEARTBEAT_S = 15.0
STALE_S = 120.0


def _read(path: str) -> str | None:
    import tensorflow as tf

    try:
        with tf.io.gfile.GFile(path) as handle:
            return handle.read()
    except tf.errors.OpError:
        return None


def _write(marker: str, count: int) -> None:
    import tensorflow as tf

    with tf.io.gfile.GFile(marker, "w") as handle:
        handle.write(json.dumps({"pid": os.getpid(), "host": os.uname().nodename, "beat": count}))


def _beat(marker: str, stop: threading.Event) -> None:
    count = 1
    while not stop.wait(HEARTBEAT_S):
        _write(marker, count)
        count += 1


def build_once(cache, role: str, *, patience_s: float = 120.0, poll_s: float = 1.0, stale_s: float = STALE_S) -> None:
    """Build ``cache`` (a ``FeatureCache`` or ``ActivationCache``) here, or wait for the chief's (module docstring)."""
    import tensorflow as tf

    marker = f"{cache.path}.building"
    if role != "worker":
        tf.io.gfile.makedirs(os.path.dirname(marker) or ".")
        _write(marker, 0)  # before the build starts, so a worker sees it from the first moment
        stop = threading.Event()
        beating = threading.Thread(target=_beat, args=(marker, stop), daemon=True)
        beating.start()
        try:
            cache.ensure()
        finally:
            stop.set()
            beating.join()
            if tf.io.gfile.exists(marker):
                tf.io.gfile.remove(marker)
        return
    started = reported = changed = time.monotonic()
    seen, last = False, None
    while not cache.ready():
        content = _read(marker)
        now = time.monotonic()
        if content != last:
            last, changed = content, now
        seen = seen or content is not None
        reason = None
        if seen and content is None:
            reason = "its build stopped"
        elif not seen and now - started > patience_s:
            reason = f"none after {patience_s:.0f}s"
        elif content is not None and now - changed > stale_s:
            reason = f"its marker has not changed for {stale_s:.0f}s"
        if reason:
            log.info("%s: no cache from the chief (%s); building it here", cache.path, reason)
            cache.ensure()
            return
        if now - reported >= 30.0:
            reported = now
            log.info("waiting for the chief's cache at %s (%.0fs)", cache.path, now - started)
        time.sleep(poll_s)
    log.info("using the cache the chief built at %s", cache.path)
