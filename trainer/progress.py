"""Progress a person and a log collector can both read: one plain log line at a steady interval.

``bottleneck features: train, 12,800 of 50,000 images (25%), 412 images/s, ETA 1m30s``

Lines go through :mod:`logging` (no carriage returns, no bars), which is what
Kubernetes collects from a container's stderr; on a terminal they read the
same. The first line comes after one interval, so short steps stay quiet.
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger("trainer.progress")

INTERVAL_S = 30.0


def duration(seconds: float) -> str:
    """``7s``, ``1m30s``, ``2h05m``."""
    seconds = int(round(max(0.0, seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """Counts units done out of ``total`` and logs ``what`` every ``interval_s`` seconds."""

    def __init__(self, what: str, total: int | None, unit: str = "images", interval_s: float = INTERVAL_S,
                 clock=time.monotonic):
        self.what, self.total, self.unit, self.interval_s, self.clock = what, total, unit, interval_s, clock
        self.done = 0
        self.started = self.reported = clock()

    def add(self, count: int) -> None:
        self.done += count
        now = self.clock()
        if now - self.reported >= self.interval_s and (not self.total or self.done < self.total):
            self.reported = now
            log.info("%s", self.line(now))

    def line(self, now: float | None = None) -> str:
        elapsed = max((now if now is not None else self.clock()) - self.started, 1e-9)
        rate = self.done / elapsed
        if self.total:
            eta = duration((self.total - self.done) / rate) if rate > 0 else "?"
            return (f"{self.what}, {self.done:,} of {self.total:,} {self.unit} ({100 * self.done / self.total:.0f}%), "
                    f"{rate:,.0f} {self.unit}/s, ETA {eta}")
        return f"{self.what}, {self.done:,} {self.unit}, {rate:,.0f} {self.unit}/s"


def epoch_callback(what: str, images_per_epoch: int, interval_s: float = INTERVAL_S):
    """A Keras callback logging ``what``'s epochs as :class:`Progress` lines: images done of the epoch's total."""
    import keras

    class EpochProgress(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            epochs = self.params.get("epochs")
            self.steps = self.params.get("steps") or 0
            self.progress = Progress(f"{what} epoch {epoch + 1}/{epochs}", images_per_epoch, "images",
                                     interval_s=interval_s)
            self.step = 0

        def on_train_batch_end(self, batch, logs=None):
            self.step += 1
            if self.steps:
                done = min(images_per_epoch, round(images_per_epoch * self.step / self.steps))
                self.progress.add(done - self.progress.done)

    return EpochProgress()
