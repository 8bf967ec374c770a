"""``tlp-preprocess`` (also ``python -m preprocessing``): image folders or a CSV manifest -> TFRecords.

Flags mirror :class:`preprocessing.config.PreprocessConfig`; flags this parser
does not know go to Beam's ``PipelineOptions`` when Beam defines them
(``--runner``, ``--project``, ``--temp_location``, ``--direct_num_workers`` ...)
or when they come after ``--``; any other is an error.
A problem the user can fix is one line on stderr (``tlp-preprocess: error: ...``)
and exit status 2; a failed job is one line and exit status 1 (the traceback
with ``--verbose``).
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse  # noqa: E402
import sys  # noqa: E402
from typing import Sequence  # noqa: E402

from preprocessing import add_version_flag, beam_cli, tfrecords  # noqa: E402
from preprocessing.console import PROGRAMS, Parser, add_verbose_flag, also_runs_as  # noqa: E402
from preprocessing.config import DEFAULT_MAX_PIXELS, PreprocessConfig, parse_image_size, parse_split  # noqa: E402
from preprocessing import worker  # noqa: E402  (its log format, shared with the Beam workers)

PROG = PROGRAMS["preprocessing"]
EXIT_USER_ERROR = 2
_DEFAULTS = PreprocessConfig(input="", output="")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog=PROG,
        allow_abbrev=False,  # a Beam flag must never be taken for an abbreviation of ours
        description=(
            "Turn a folder of labelled images (ROOT/<class>/<image> or ROOT/{train,validation,test}/<class>/<image>) "
            "or a CSV manifest (path,label[,split]) into sharded TFRecords, labels.txt, stats.json and errors.jsonl, "
            f"with an Apache Beam pipeline{also_runs_as('preprocessing')}."
        ),
        epilog=(
            "Apache Beam's own options (--runner DataflowRunner --project P --region R --temp_location gs://B/tmp, "
            "--direct_num_workers 4, ...) are passed to Beam; any other unknown flag is an error, so a typo never "
            "falls back silently to a default. Flags that this Beam does not define (a runner's own options) go "
            "after --, unchecked. Without --runner the job runs locally on Beam's FnApiRunner with one worker "
            "process per CPU core."
        ),
    )
    parser.add_argument("--input", required=True, help="image folder or CSV manifest (local path or gs://, s3://, ...)")
    parser.add_argument("--output", required=True, help="data folder to write (must not exist unless --overwrite)")
    parser.add_argument(
        "--image-size", default="x".join(str(v) for v in _DEFAULTS.image_size[::-1]), metavar="N|WxH",
        help="output size: one number for a square, or WIDTHxHEIGHT (default %(default)s)",
    )
    parser.add_argument(
        "--resize-mode", choices=tfrecords.RESIZE_MODES, default=_DEFAULTS.resize_mode,
        help="stretch ignores the aspect ratio; pad keeps it and adds black bars; crop keeps it and cuts the "
             "edges (default %(default)s)",
    )
    parser.add_argument(
        "--image-format", choices=tfrecords.IMAGE_FORMATS, default=_DEFAULTS.image_format,
        help="encoding of the stored images (default %(default)s)",
    )
    parser.add_argument("--jpeg-quality", type=int, default=_DEFAULTS.jpeg_quality, metavar="Q",
                        help="JPEG quality 1-100 (default %(default)s)")
    parser.add_argument(
        "--split", default=",".join(f"{fraction * 100:g}" for fraction in _DEFAULTS.split), metavar="TRAIN,VAL,TEST",
        help="shares of train, validation and test for inputs that name no split; each image's split comes from "
             "its sha256, so re-runs and added files never move an image (default %(default)s)",
    )
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, metavar="N",
                        help="reject images with more pixels than this, before decoding them (default %(default)s)")
    parser.add_argument("--num-shards", type=int, default=_DEFAULTS.num_shards, metavar="N",
                        help="TFRecord shards per split. 0 (default) chooses per split from its record count R: "
                             "min(R, max(64, R x estimated record size / 128 MiB)), one empty shard when R is 0, so "
                             "a split of 64+ records always has 64+ shards (4 or more for each of 16 trainer workers) "
                             "and no shard is much over 128 MiB; N writes exactly N per split (empty ones when a split "
                             "has fewer records). Records go to shards in sha256 order, sizes within one record "
                             "(less any input rejected when converted)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--progress-seconds", type=float, default=_DEFAULTS.progress_seconds, metavar="S",
                        help="seconds between progress lines; 0 turns them off (default %(default)s)")
    add_verbose_flag(parser, "Apache Beam's own logs")
    add_version_flag(parser)
    return parser


def config_from_args(args: argparse.Namespace) -> PreprocessConfig:
    return PreprocessConfig(
        input=args.input,
        output=args.output,
        image_size=parse_image_size(args.image_size),
        resize_mode=args.resize_mode,
        image_format=args.image_format,
        jpeg_quality=args.jpeg_quality,
        split=parse_split(args.split),
        max_pixels=args.max_pixels,
        num_shards=args.num_shards,
        overwrite=args.overwrite,
        progress_seconds=args.progress_seconds,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """The command; ``argv`` ``None`` means this process is the program (``sys.argv``) and runs just this job."""
    return beam_cli.run_program(PROG, build_parser(), argv, _job)


def _job(args: argparse.Namespace, beam_args: list[str], program: bool) -> None:
    config = config_from_args(args)
    from preprocessing.job import run

    # as the program, this process runs one job: its local workers can be forks of it, with Beam already
    # imported (preprocessing.worker; stopped by beam_cli); otherwise job.run starts them as new processes
    worker.start_standby(worker.local_workers(beam_args), fork=program)
    run(config, beam_args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
