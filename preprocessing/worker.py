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


def configure_console() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT, DATE_FORMAT))
    handler.addFilter(ConsoleFilter())
    logging.getLogger().addHandler(handler)


def main() -> None:
    configure_console()
    from apache_beam.runners.worker import sdk_worker_main

    sdk_worker_main.main(sys.argv)


if __name__ == "__main__":
    main()
