"""``tlp-client`` (also ``python -m serving.client``): classify images, show metadata or status.

The command line over the client library (:mod:`serving.client`):
``predict`` (the default: ``tlp-client --server HOST:PORT --model NAME
IMAGES_OR_FOLDERS...``), ``metadata`` and ``status``. The command may also
come after the common options (``--server H:P status``). Exit status: 0 done,
1 the server refused or could not be reached (``tlp-client: error: SERVER:
CODE: message``), 2 a user mistake (one line on stderr), 130 interrupted.
TensorFlow (which the TF Serving API's protos load) is imported without its
C++ start-up lines (:mod:`preprocessing.console`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from preprocessing.console import PROGRAMS, Parser, add_verbose_flag, also_runs_as, fail, import_tensorflow_quietly
from serving.client_types import ClientOptions, Prediction, ServingClientError
from serving.grpc_client import PredictionClient
from serving.images import expand_images

COMMANDS = ("predict", "metadata", "status")
PROG = PROGRAMS["serving.client"]


def _common(parser: argparse.ArgumentParser) -> set[str]:
    """Add the options every command takes; return those that take a value (for :func:`_command_first`).

    ``add_argument`` returns the Action it made, whose ``option_strings`` and
    ``nargs`` are public; collecting them here keeps the set in step with the
    flags without reading the parser's private ``_actions``.
    """
    d = ClientOptions()
    pick = parser.add_mutually_exclusive_group()
    actions = [
        parser.add_argument("--server", default="127.0.0.1:8500",
                            help="HOST:PORT of the gRPC API (default: %(default)s)"),
        parser.add_argument("--model", default="classifier", help="model name (default: %(default)s)"),
        pick.add_argument("--model-version", type=int, metavar="N",
                          help="ask for this model version (default: the latest served)"),
        pick.add_argument("--label", help="ask for the version with this label, e.g. stable or canary"),
        parser.add_argument("--signature", default=d.signature_name, help="signature name (default: %(default)s)"),
        parser.add_argument("--timeout", type=float, default=d.timeout,
                            help="deadline per attempt, s (default: %(default)s)"),
        parser.add_argument("--retries", type=int, default=d.retries,
                            help="retries on UNAVAILABLE/DEADLINE_EXCEEDED (default: %(default)s)"),
        parser.add_argument("--max-message-bytes", type=int, default=d.max_message_bytes,
                            help="largest gRPC message sent or received (default: %(default)s)"),
        parser.add_argument("--tls", action="store_true", help="use TLS (system roots unless --ca-cert)"),
        parser.add_argument("--ca-cert", help="PEM file of the root certificates to trust (implies --tls)"),
        parser.add_argument("--client-cert", help="PEM client certificate for mutual TLS (implies --tls)"),
        parser.add_argument("--client-key", help="PEM client key for mutual TLS"),
    ]
    add_verbose_flag(parser, "TensorFlow's start-up messages (hidden otherwise)")
    return {option for action in actions if action.nargs != 0 for option in action.option_strings}


def build_parser() -> argparse.ArgumentParser:
    from preprocessing import add_version_flag

    parser = Parser(
        prog=PROG,
        description="Query an image classifier served by TF Serving (gRPC). Without a command, "
                    f"classifies IMAGES_OR_FOLDERS (the 'predict' command){also_runs_as('serving.client')}.",
        epilog=f"examples: {PROG} --server 127.0.0.1:8500 --model classifier photos/ | "
               f"{PROG} status --server 127.0.0.1:8500")
    add_version_flag(parser)
    commands = parser.add_subparsers(dest="command", metavar="{predict,metadata,status}")
    predict = commands.add_parser("predict", help="classify images (the default command)")
    _common(predict)
    predict.add_argument("images", nargs="+", metavar="IMAGES_OR_FOLDERS", help="image files or folders of images")
    predict.add_argument("--top-k", type=int, default=3, help="classes shown per image (default: %(default)s)")
    predict.add_argument("--json", action="store_true", help="one JSON object per image instead of a table")
    predict.add_argument("--batch-size", type=int, default=ClientOptions().batch_size,
                         help="images per request (default: %(default)s)")
    predict.add_argument("--labels", help="labels.txt naming the classes, for models without a labels output")
    predict.add_argument("--normalize-on-client", action="store_true",
                         help="for models exported before the serving graph applied EXIF orientation itself "
                              "(no 'decode' in their assets.extra/metadata.json): send EXIF-rotated JPEGs and "
                              "WebP upright as PNG. Newer exports take every client's bytes untouched")
    for name, text in (("metadata", "print the model's signatures (GetModelMetadata)"),
                       ("status", "print the model's version states (GetModelStatus)")):
        sub = commands.add_parser(name, help=text)
        _common(sub)
        sub.add_argument("--json", action="store_true", help="print JSON")
    return parser


def _options(args) -> ClientOptions:
    labels = None
    if getattr(args, "labels", None):
        with open(args.labels, encoding="utf-8") as handle:
            labels = tuple(line.strip() for line in handle if line.strip())
    return ClientOptions(
        version=args.model_version, version_label=args.label, signature_name=args.signature, timeout=args.timeout,
        retries=args.retries, max_message_bytes=args.max_message_bytes,
        batch_size=getattr(args, "batch_size", ClientOptions().batch_size),
        normalize_on_client=getattr(args, "normalize_on_client", False),
        tls=bool(args.tls or args.ca_cert or args.client_cert), root_certificates=args.ca_cert,
        client_certificate=args.client_cert, client_key=args.client_key, labels=labels)


def _print_table(predictions: list[Prediction], top_k: int) -> None:
    width = max([len("image")] + [len(p.source) for p in predictions])
    lwidth = max([len("label")] + [len(p.label) for p in predictions])
    print(f"{'image':<{width}}  {'label':<{lwidth}}  {'score':>6}  top-{top_k}")
    for p in predictions:
        top = ", ".join(f"{name} {score:.3f}" for name, score in p.top(top_k))
        print(f"{p.source:<{width}}  {p.label:<{lwidth}}  {p.score:6.3f}  {top}")


def _run(args) -> int:
    options = _options(args)
    with PredictionClient(args.server, args.model, options) as client:
        if args.command == "metadata":
            meta = client.metadata()
            if args.json:
                print(json.dumps({"model": meta.name, "version": meta.version, "signatures": {
                    n: {"method_name": s.method_name,
                        "inputs": {k: {"dtype": v.dtype, "shape": v.shape} for k, v in s.inputs.items()},
                        "outputs": {k: {"dtype": v.dtype, "shape": v.shape} for k, v in s.outputs.items()}}
                    for n, s in meta.signatures.items()}}, indent=2))
                return 0
            print(f"model {meta.name} version {meta.version}")
            for name, sig in sorted(meta.signatures.items()):
                if name.startswith("__"):
                    continue
                print(f"signature {name} ({sig.method_name or 'no method'})")
                for kind, tensors_ in (("input", sig.inputs), ("output", sig.outputs)):
                    for alias, info in sorted(tensors_.items()):
                        shape = "unknown" if info.shape is None else list(info.shape)
                        print(f"  {kind:<6} {alias}: {info.dtype} {shape}")
            return 0
        if args.command == "status":
            statuses = client.status()
            if args.json:
                print(json.dumps([s.__dict__ for s in statuses], indent=2))
                return 0
            for s in statuses:
                extra = f" ({s.error_code}: {s.error_message})" if s.error_code != "OK" else ""
                print(f"model {args.model} version {s.version}: {s.state}{extra}")
            return 0
        paths = expand_images(args.images)
        if not paths:
            raise FileNotFoundError("no image files found in " + " ".join(args.images))
        predictions = client.predict(paths)
        if args.json:
            for p in predictions:
                print(json.dumps(p.to_dict(args.top_k)))
        else:
            _print_table(predictions, args.top_k)
    return 0


def _command_first(argv: list[str]) -> list[str]:
    """Put the command first (``--server H:P status`` works too); no command means ``predict``."""
    if not argv or argv[0] in COMMANDS or argv[0] in ("-h", "--help", "--version"):
        return argv
    takes_value = _common(argparse.ArgumentParser(add_help=False))
    i = 0
    while i < len(argv):
        token = argv[i]
        if token.startswith("-"):
            i += 2 if token in takes_value else 1
            continue
        if token in COMMANDS:
            return [token] + argv[:i] + argv[i + 1:]
        break
    return ["predict"] + argv


def main(argv: list[str] | None = None) -> int:
    argv = _command_first(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.error(f"give IMAGES_OR_FOLDERS to classify, or a command: {', '.join(COMMANDS)} (see --help)")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import_tensorflow_quietly(args.verbose)
        return _run(args)
    except (ServingClientError, OSError, ValueError) as exc:
        if args.verbose and not isinstance(exc, ServingClientError):
            raise
        return error_status(exc, args.server)
    except KeyboardInterrupt:
        return 130


def error_status(exc: Exception, server: str, prog: str = PROG) -> int:
    """Print a client CLI's one-line error for ``exc``; return the exit status (shared with serving.loadtest).

    1 when the server refused or could not be reached (a :class:`ServingClientError`,
    printed with the server's address and code), 2 for a user mistake (OSError, ValueError).
    """
    if isinstance(exc, ServingClientError):
        return fail(prog, f"{server}: {exc.code}: {exc.message}", 1)
    return fail(prog, exc, 2)
