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
import sys  # noqa: E402
from typing import Sequence  # noqa: E402

from preprocessing import add_version_flag, beam_cli  # noqa: E402
from preprocessing.console import PROGRAMS, Parser, add_verbose_flag  # noqa: E402
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


def main(argv: Sequence[str] | None = None) -> int:
    """The command; ``argv`` ``None`` means this process is the program (``sys.argv``) and runs just this job."""
    return beam_cli.run_program(PROG, build_parser(), argv, _job, loggers=("serving.batch", "preprocessing"))


def _job(args: argparse.Namespace, beam_args: list[str], program: bool) -> None:
    config = config_from_args(args)
    from serving.batch_job import run

    # as the program, this process runs one job: its local workers can be forks of it (batch_job.run)
    run(config, beam_args, fork=program)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
