"""preprocessing stage (and, in :mod:`preprocessing.tfrecords`, the contract every stage shares)."""

DISTRIBUTION = "transfer-learning-pipeline"


def package_version() -> str:
    """The installed distribution's version, which every CLI's ``--version`` prints."""
    from importlib import metadata

    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "unknown (not installed: run `make install`)"


def add_version_flag(parser) -> None:
    """``--version``: print ``PROG VERSION`` and exit 0, as users of command-line tools expect."""
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}",
                        help="print the program's version and exit")
