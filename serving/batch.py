"""``tlp-predict`` (also ``python -m serving.batch``): score a folder of photos, a CSV manifest or TFRecords offline.

A Beam job (:mod:`serving.batch_pipeline`) with ``RunInference``: the
exported SavedModel's own ``serving_default`` signature on the original file
bytes, one model per worker, batched by Beam's ``BatchElements``. It runs
where the preprocessing job runs and takes Beam's options the same way
(:mod:`preprocessing.cli`): flags this parser does not know go to Beam's
``PipelineOptions`` when Beam defines them (``--runner``, ``--project``,
``--direct_num_workers`` ...) or when they come after ``--``; any other is an
error. A problem the user can fix is one line on stderr
(``tlp-predict: error: ...``) and exit status 2; a failed job is one line and
exit status 1 (the traceback with ``--verbose``), as in every program of the
project (:mod:`preprocessing.console`).
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse  # noqa: E402
import difflib  # noqa: E402
import logging  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
from typing import Sequence  # noqa: E402

from preprocessing import add_version_flag, worker  # noqa: E402
from preprocessing.console import PROGRAMS, Parser, add_verbose_flag, fail  # noqa: E402
from preprocessing.errors import PreprocessingError  # noqa: E402
from serving.batch_config import CSV_MAX_ROWS, BatchConfig  # noqa: E402

PROG = PROGRAMS.get("serving.batch", "tlp-predict")
_DEFAULTS = BatchConfig(model="", input="", output="")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog=PROG,
        allow_abbrev=False,  # a Beam flag must never be taken for an abbreviation of ours
        description=(
            "Score images offline with an exported model: a folder (class folders, split folders or plain), a CSV "
            "manifest (path[,label,split]) or TFRecords (a data folder, a .tfrecord file or a pattern) -> sharded "
            "JSON lines with the top-k labels and scores, predictions.csv when small, errors.jsonl and "
            "summary.json. An Apache Beam pipeline with RunInference; each image goes through the model's own "
            "serving signature (decoded inside the graph, as the server does it). Also: python -m serving.batch."
        ),
        epilog=(
            "Apache Beam's own options (--runner DataflowRunner --project P --region R --temp_location gs://B/tmp, "
            "--direct_num_workers 4, ...) are passed to Beam; any other unknown flag is an error. Flags that this "
            "Beam does not define (a runner's own options) go after --, unchecked. Without --runner the job runs "
            "locally on Beam's FnApiRunner with one worker process per CPU core."
        ),
    )
    parser.add_argument("--model", required=True, metavar="JOB/export[/VERSION]",
                        help="an export folder (its newest version is used) or one version folder")
    parser.add_argument("--input", required=True, metavar="PHOTOS_OR_CSV_OR_TFRECORDS",
                        help="image folder, CSV manifest, or TFRecords (data folder, file or pattern); local path or "
                             "gs://, s3://, ...")
    parser.add_argument("--output", required=True, help="folder to write (must not exist unless --overwrite)")
    parser.add_argument("--top-k", type=int, default=_DEFAULTS.top_k, metavar="K",
                        help="labels and scores written per image, best first (default %(default)s)")
    parser.add_argument("--min-batch-size", type=int, default=_DEFAULTS.min_batch_size, metavar="N",
                        help="smallest batch Beam's BatchElements hands the model (default %(default)s)")
    parser.add_argument("--max-batch-size", type=int, default=_DEFAULTS.max_batch_size, metavar="N",
                        help="largest batch (default %(default)s); BatchElements grows batches between the two "
                             "from measured run times")
    parser.add_argument("--csv-max-rows", type=int, default=_DEFAULTS.csv_max_rows, metavar="N",
                        help=f"write predictions.csv too when at most N images were scored (default {CSV_MAX_ROWS:,}"
                             "; 0: never)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--progress-seconds", type=float, default=_DEFAULTS.progress_seconds, metavar="S",
                        help="seconds between each worker's progress lines; 0 turns them off (default %(default)s)")
    add_verbose_flag(parser, "Apache Beam's own logs and TensorFlow's start-up lines")
    add_version_flag(parser)
    return parser


def config_from_args(args: argparse.Namespace) -> BatchConfig:
    return BatchConfig(model=args.model, input=args.input, output=args.output, top_k=args.top_k,
                       min_batch_size=args.min_batch_size, max_batch_size=args.max_batch_size,
                       csv_max_rows=args.csv_max_rows, overwrite=args.overwrite,
                       progress_seconds=args.progress_seconds)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format=worker.FORMAT,
                        datefmt=worker.DATE_FORMAT)
    for name in ("serving.batch", "preprocessing"):
        logging.getLogger(name).setLevel(logging.INFO)
    if not verbose:
        for handler in logging.getLogger().handlers:
            handler.addFilter(_drop_noise)


def _drop_noise(record: logging.LogRecord) -> bool:
    """The local runner's raw copies of worker logs (the worker printed them already) and Beam's GCP notice."""
    message = record.getMessage()
    return not (message.startswith("Worker: ") or message.startswith("apitools not found"))


def _split_args(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Our flags, then Beam's: unknown flags are Beam's only when Beam defines them, or when after ``--``."""
    passthrough: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, passthrough = argv[:at], argv[at + 1:]
    args, beam_args = parser.parse_known_args(argv)
    from preprocessing.runners import unknown_flags

    unknown = unknown_flags(beam_args)
    if unknown:
        ours = re.findall(r"--[a-z][a-z-]*", parser.format_usage())
        hints = [difflib.get_close_matches(flag, ours, n=1) for flag in unknown]
        hint = "; ".join(f"did you mean {h[0]}?" for h in hints if h)
        parser.error(f"unrecognized arguments: {' '.join(unknown)} (neither a flag of this job nor an Apache "
                     f"Beam option{'; ' + hint if hint else ''}; flags for a runner's own options go after --)")
    return args, beam_args + passthrough


def main(argv: Sequence[str] | None = None) -> int:
    """The command; ``argv`` ``None`` means this process is the program (``sys.argv``) and runs just this job.

    As the program it leaves with ``os._exit`` once the output is published and
    the streams are flushed, as ``python -m preprocessing`` does (Python's own
    teardown of Beam, gRPC and TensorFlow only costs time).
    """
    try:
        code = _main(argv)
    finally:
        worker.stop_standby()
    if argv is None:
        _leave(code)
    return code


def _leave(code: int) -> None:
    import atexit

    getattr(atexit, "_run_exitfuncs", lambda: None)()  # logging.shutdown and anything else registered
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def _main(argv: Sequence[str] | None) -> int:
    program = argv is None
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    _setup_logging("--verbose" in argv or "-v" in argv)
    args, beam_args = _split_args(parser, argv)
    try:
        config = config_from_args(args)
        from serving.batch_job import run

        # as the program, this process runs one job: its local workers can be forks of it (batch_job.run)
        run(config, beam_args, fork=program)
    except PreprocessingError as error:  # BatchError is one; so are the reused staging checks
        return fail(PROG, error)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; the output was not written", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001
        if args.verbose:
            raise
        return fail(PROG, f"the job failed: {_reason(error)} (run with --verbose for the traceback)", 1)
    return 0


def _reason(error: Exception) -> str:
    """One line for a failed job: a worker's error arrives as a whole traceback, whose last line says what failed."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if lines and lines[0].startswith("Traceback"):
        return lines[-1]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
