"""The command-line shell of the project's Beam jobs (``tlp-preprocess`` and ``tlp-predict``).

Both take Beam's options the same way: flags the job's parser does not know
go to Beam's ``PipelineOptions`` when Beam defines them (``--runner``,
``--project``, ``--direct_num_workers`` ...) or when they come after ``--``;
any other is an error with a "did you mean" hint. Both answer a user's
mistake with one line and exit status 2, a failed job with one line and exit
status 1 (the traceback with ``--verbose``), and, as the program, leave with
``os._exit`` once the output is published and the streams are flushed
(Python's own teardown of Beam, gRPC and TensorFlow took ~0.4 s per run).
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import re
import sys
from typing import Callable, Sequence

from preprocessing import worker
from preprocessing.console import fail
from preprocessing.errors import PreprocessingError


def setup_logging(verbose: bool, loggers: Sequence[str] = ("preprocessing",)) -> None:
    """INFO for the job's own ``loggers``, WARNING for the rest; the workers' format (:mod:`preprocessing.worker`)."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format=worker.FORMAT,
                        datefmt=worker.DATE_FORMAT)
    for name in loggers:
        logging.getLogger(name).setLevel(logging.INFO)
    if not verbose:
        for handler in logging.getLogger().handlers:
            handler.addFilter(_drop_forwarded_worker_logs)


def _drop_forwarded_worker_logs(record: logging.LogRecord) -> bool:
    """The local runner's raw-proto copies of worker logs (the worker printed them readably) and Beam's GCP notice."""
    message = record.getMessage()
    return not (message.startswith("Worker: ") or message.startswith("apitools not found"))


def split_args(parser: argparse.ArgumentParser, argv: list[str],
               program: bool = False) -> tuple[argparse.Namespace, list[str]]:
    """Our flags, then Beam's: unknown flags are Beam's only when Beam defines them, or when after ``--``.

    Beam is imported only past ``--help`` and our own flags' errors; by the
    program (``program``), without what it does not use
    (:func:`preprocessing.worker.import_beam_lean`).
    """
    passthrough: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, passthrough = argv[:at], argv[at + 1:]
    args, beam_args = parser.parse_known_args(argv)
    if program:
        worker.import_beam_lean()
    from preprocessing.runners import unknown_flags

    unknown = unknown_flags(beam_args)
    if unknown:
        ours = re.findall(r"--[a-z][a-z-]*", parser.format_usage())
        hints = [difflib.get_close_matches(flag, ours, n=1) for flag in unknown]
        hint = "; ".join(f"did you mean {h[0]}?" for h in hints if h)
        parser.error(f"unrecognized arguments: {' '.join(unknown)} (neither a flag of this job nor an Apache "
                     f"Beam option{'; ' + hint if hint else ''}; flags for a runner's own options go after --)")
    return args, beam_args + passthrough


Job = Callable[[argparse.Namespace, list, bool], None]


def run_program(prog: str, parser: argparse.ArgumentParser, argv: Sequence[str] | None, job: Job, *,
                loggers: Sequence[str] = ("preprocessing",)) -> int:
    """Parse ``argv`` and run ``job(args, beam_args, program)``; ``argv`` None: this process is the program.

    ``program`` tells the job it may fork its local workers from this process
    (:mod:`preprocessing.worker`); the standby workers are stopped here either way.
    """
    program = argv is None
    try:
        code = _run(prog, parser, list(sys.argv[1:] if argv is None else argv), job, program, loggers)
    finally:
        worker.stop_standby()
    if program:
        _leave(code)
    return code


def _run(prog, parser, argv, job, program, loggers) -> int:
    setup_logging("--verbose" in argv or "-v" in argv, loggers)
    args, beam_args = split_args(parser, argv, program)
    try:
        job(args, beam_args, program)
    except PreprocessingError as error:
        return fail(prog, error)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; the output was not written", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001
        if args.verbose:
            raise
        return fail(prog, f"the job failed: {failure_reason(error)} (run with --verbose for the traceback)", 1)
    return 0


def failure_reason(error: Exception) -> str:
    """One line for a failed job: a worker's error arrives as a whole traceback, whose last line says what failed."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if lines and lines[0].startswith("Traceback"):
        return lines[-1]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def _leave(code: int) -> None:
    import atexit

    getattr(atexit, "_run_exitfuncs", lambda: None)()  # logging.shutdown and anything else registered
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
