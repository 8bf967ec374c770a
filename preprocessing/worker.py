"""Entry point of the local runner's worker processes: Beam's SDK harness, with readable logs.

``python -m preprocessing.worker`` is what :mod:`preprocessing.runners` starts
instead of ``python -m apache_beam.runners.worker.sdk_worker_main``; it runs
that same harness. The difference is logging, set up before Beam is imported:
the worker shares the console with the driver, and Beam's harness otherwise
prints its bootstrap INFO lines ("Logging handler created.") and the import-time
"apitools not found" notice (optional GCP client libraries, unused locally)
through a default handler in the raw ``LEVEL:name:message`` format. Here the
console gets this package's own INFO lines (progress) and every WARNING or
worse from anything else, in the driver's format.
"""

from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s %(levelname)s %(message)s"
DATE_FORMAT = "%H:%M:%S"


class ConsoleFilter(logging.Filter):
    """This package's records at any level; others from WARNING up, minus Beam's 'apitools not found'."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "preprocessing" or record.name.startswith("preprocessing."):
            return True
        return record.levelno >= logging.WARNING and not record.getMessage().startswith("apitools not found")


# Its level (set by the driver through --sdk_harness_log_level_overrides) says whether the harness's raw
# tracebacks of failed bundles reach the console: DEBUG when the driver shows Beam's own logs (--verbose).
TRACEBACKS_LOGGER = "preprocessing.worker.tracebacks"


class QuietTracebacks:
    """``sys.stderr`` minus the tracebacks Beam's harness prints for a failed bundle.

    The harness prints them straight to stderr (``sdk_worker._execute``) and
    also returns them to the driver, which raises the same error; the CLI
    turns that into one line. Everything else is passed through.
    """

    def __init__(self, stream) -> None:
        self._stream = stream
        self._dropped = False

    def write(self, text: str) -> int:
        dropped, self._dropped = self._dropped, False
        if text.startswith("Traceback (most recent call last):") and \
                not logging.getLogger(TRACEBACKS_LOGGER).isEnabledFor(logging.DEBUG):
            self._dropped = True
            return len(text)
        if dropped and text == "\n":  # print()'s line end after the dropped traceback
            return len(text)
        return self._stream.write(text)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def configure_console() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT, DATE_FORMAT))
    handler.addFilter(ConsoleFilter())
    logging.getLogger().addHandler(handler)
    sys.stderr = QuietTracebacks(sys.stderr)


def main() -> None:
    configure_console()
    from apache_beam.runners.worker import sdk_worker_main

    sdk_worker_main.main(sys.argv)


if __name__ == "__main__":
    main()
