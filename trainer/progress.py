"""Progress that fits where it is read: a live bar on a terminal, plain log lines everywhere else.

On a terminal (stderr is a TTY) a `rich <https://rich.readthedocs.io>`_
progress bar: done of total, images/s, time spent and time left, redrawn in
place; log lines written meanwhile appear above it. Anywhere else (a
Kubernetes container, a file, a pipe) one plain log line every 30 s, through
:mod:`logging`, with no carriage returns, which is what log collectors want::

    bottleneck features: train, 12,800 of 50,000 images (25%), 412 images/s, ETA 1m30s

The first line comes after one interval, so short steps stay quiet. One bar
is live at a time: a new one closes any that was left open (a step that
failed half-way).
"""

from __future__ import annotations

import atexit
import logging
import time

log = logging.getLogger("trainer.progress")

INTERVAL_S = 30.0

_live: "Progress | None" = None  # the progress whose bar is on the terminal now


def duration(seconds: float) -> str:
    """``7s``, ``1m30s``, ``2h05m``."""
    seconds = int(round(max(0.0, seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def terminal_console():
    """A rich console on stderr when stderr is a terminal that can redraw a line (and progress is logged); else None."""
    if not log.isEnabledFor(logging.INFO):
        return None
    from rich.console import Console

    console = Console(stderr=True)
    return console if console.is_terminal and not console.is_dumb_terminal else None


class Progress:
    """Counts units done out of ``total``: a bar on a terminal, else a log line every ``interval_s`` seconds.

    ``console``: the rich console to draw on (default: :func:`terminal_console`,
    None when stderr is no terminal); ``False`` forces log lines.
    Call :meth:`close` when done (or use it as a context manager); the bar
    also closes by itself once ``total`` is reached.
    """

    def __init__(self, what: str, total: int | None, unit: str = "images", interval_s: float = INTERVAL_S,
                 clock=time.monotonic, console=None):
        self.what, self.total, self.unit, self.interval_s, self.clock = what, total, unit, interval_s, clock
        self.done = 0
        self.started = self.reported = clock()
        self._bar = None
        console = terminal_console() if console is None else console
        if console:
            self._bar = _bar(console, what, total, unit)
            global _live
            if _live is not None:
                _live.close()
            _live = self

    @property
    def on_terminal(self) -> bool:
        return self._bar is not None

    def add(self, count: int) -> None:
        self.done += count
        if self._bar is not None:
            bar, task = self._bar
            bar.advance(task, count)
            if self.total and self.done >= self.total:
                self.close()
            return
        now = self.clock()
        if now - self.reported >= self.interval_s and (not self.total or self.done < self.total):
            self.reported = now
            log.info("%s", self.line(now))

    def close(self) -> None:
        """Stop the bar, leaving its last state on the terminal (nothing to do for log lines)."""
        global _live
        if self._bar is not None:
            bar, _ = self._bar
            self._bar = None
            bar.stop()
        if _live is self:
            _live = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def line(self, now: float | None = None) -> str:
        elapsed = max((now if now is not None else self.clock()) - self.started, 1e-9)
        rate = self.done / elapsed
        if self.total:
            eta = duration((self.total - self.done) / rate) if rate > 0 else "?"
            return (f"{self.what}, {self.done:,} of {self.total:,} {self.unit} ({100 * self.done / self.total:.0f}%), "
                    f"{rate:,.0f} {self.unit}/s, ETA {eta}")
        return f"{self.what}, {self.done:,} {self.unit}, {rate:,.0f} {self.unit}/s"


def _bar(console, what: str, total: int | None, unit: str):
    """A started rich progress display with one task: ``(progress, task id)``."""
    from rich import progress as rp
    from rich.text import Text

    class Rate(rp.ProgressColumn):
        def render(self, task) -> Text:
            return Text(f"{task.speed:,.0f} {unit}/s" if task.speed else f"? {unit}/s", style="progress.data.speed")

    bar = rp.Progress(rp.TextColumn("{task.description}"), rp.BarColumn(), rp.MofNCompleteColumn(),
                      rp.TextColumn(unit), rp.TaskProgressColumn(), Rate(), rp.TimeElapsedColumn(),
                      rp.TextColumn("left"), rp.TimeRemainingColumn(), console=console, refresh_per_second=4)
    task = bar.add_task(what, total=total)
    bar.start()
    return bar, task


@atexit.register
def _close_live() -> None:
    if _live is not None:
        _live.close()


def epoch_callback(what: str, images_per_epoch: int, interval_s: float = INTERVAL_S, console=None):
    """A Keras callback showing ``what``'s epochs as :class:`Progress`: images done of the epoch's total."""
    import keras

    class EpochProgress(keras.callbacks.Callback):
        progress: Progress | None = None

        def on_epoch_begin(self, epoch, logs=None):
            epochs = self.params.get("epochs")
            self.steps = self.params.get("steps") or 0
            self.progress = Progress(f"{what} epoch {epoch + 1}/{epochs}", images_per_epoch, "images",
                                     interval_s=interval_s, console=console)
            self.step = 0

        def on_train_batch_end(self, batch, logs=None):
            self.step += 1
            if self.steps:
                done = min(images_per_epoch, round(images_per_epoch * self.step / self.steps))
                self.progress.add(done - self.progress.done)

        def on_epoch_end(self, epoch, logs=None):
            self.progress.close()

        def on_train_end(self, logs=None):
            if self.progress is not None:
                self.progress.close()

    return EpochProgress()
