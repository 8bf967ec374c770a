"""The development server's options: :class:`ServerConfig`, the flags that fill it, and their checks.

Every field has a flag of ``tlp-serve`` (``python -m serving.server``) named after TF
Serving's (``--model_base_path`` is ``--model-base-path`` here) with TF
Serving's default where it has one. :func:`check_config` turns a user
mistake into one line (exit status 2) before anything starts.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ServerConfig:
    """Options of the development server; defaults follow TF Serving's where it has one."""

    model_base_path: str  # "" takes base_path from model_config_file
    model_name: str = "classifier"
    model_config_file: str | None = None  # TF Serving's models.config: base path, version policy, labels
    # Re-read model_config_file this often and apply label/version-policy changes; 0 reads it once at start
    # (TF Serving's --model_config_file_poll_wait_seconds, same default).
    model_config_file_poll_wait_seconds: float = 0.0
    host: str = "127.0.0.1"
    port: int = 8500  # 0 picks a free port
    rest_port: int = 8501  # 0 picks a free port; -1 turns REST (and metrics) off
    model_version_policy: str = "latest"  # latest[:N] | all | specific:V1,V2
    version_labels: dict[str, int] = field(default_factory=dict)
    file_system_poll_wait_seconds: float = 1.0  # 0 turns watching off
    enable_batching: bool = False
    batching_parameters_file: str | None = None
    max_batch_size: int | None = None
    batch_timeout_micros: int | None = None
    num_batch_threads: int | None = None
    max_enqueued_batches: int | None = None
    grpc_max_threads: int = 16
    max_message_bytes: int = 64 * 1024 * 1024
    ssl_cert_file: str | None = None  # PEM; with ssl_key_file the gRPC port speaks TLS only
    ssl_key_file: str | None = None
    ssl_client_ca_file: str | None = None  # PEM; when set, clients must present a certificate it signed
    drain_seconds: float = 30.0
    warmup: bool = True
    health_service: bool = False  # grpc.health.v1, as TF Serving's --enable_grpc_healthcheck_service (off)

    def model_settings(self) -> tuple[str, str, str, dict[str, int]]:
        """(name, base path, version policy, labels): the flags, filled in from ``model_config_file``.

        The config's entry named ``model_name`` (or its only entry) gives the
        base path, the version policy and the labels; a non-empty
        ``model_base_path`` overrides the config's path (which usually names a
        container path such as ``/models/classifier``) and explicit labels win.
        """
        if not self.model_config_file:
            return self.model_name, self.model_base_path, self.model_version_policy, dict(self.version_labels)
        from google.protobuf import text_format
        from tensorflow_serving.config import model_server_config_pb2

        with open(self.model_config_file, encoding="utf-8") as handle:
            parsed = text_format.Parse(handle.read(), model_server_config_pb2.ModelServerConfig())
        configs = list(parsed.model_config_list.config)
        chosen = [c for c in configs if c.name == self.model_name] or (configs if len(configs) == 1 else [])
        if not chosen:
            raise ValueError(f"{self.model_config_file} has no model named {self.model_name!r}")
        model = chosen[0]
        policy = self.model_version_policy
        which = model.model_version_policy.WhichOneof("policy_choice")
        if which == "latest":
            policy = f"latest:{model.model_version_policy.latest.num_versions or 1}"
        elif which == "all":
            policy = "all"
        elif which == "specific":
            policy = "specific:" + ",".join(str(v) for v in model.model_version_policy.specific.versions)
        labels = {**dict(model.version_labels), **self.version_labels}
        return model.name, self.model_base_path or model.base_path, policy, labels

    def batching(self):
        """The BatchingConfig (file, then flags), or None when batching is off."""
        from serving.batching import BatchingConfig

        if not self.enable_batching:
            return None
        base = BatchingConfig.from_file(self.batching_parameters_file) if self.batching_parameters_file \
            else BatchingConfig()
        overrides = {name: getattr(self, name) for name in
                     ("max_batch_size", "batch_timeout_micros", "num_batch_threads", "max_enqueued_batches")
                     if getattr(self, name) is not None}
        return BatchingConfig(**{**base.__dict__, **overrides})


def _label(text: str) -> tuple[str, int]:
    name, sep, version = text.partition("=")
    if not sep or not name or not version.isdigit():
        raise argparse.ArgumentTypeError(f"expected LABEL=VERSION (e.g. stable=1), got {text!r}")
    return name, int(version)


def build_parser() -> argparse.ArgumentParser:
    from preprocessing import add_version_flag
    from preprocessing.console import PROGRAMS, Parser, add_verbose_flag, also_runs_as

    d = ServerConfig(model_base_path="")
    p = Parser(
        prog=PROGRAMS["serving.server"],
        description="Development server speaking TF Serving's gRPC and REST APIs over BASE/<version>/ "
                    f"SavedModels{also_runs_as('serving.server')}.")
    p.add_argument("--model-base-path", default="",
                   help="folder holding numeric version folders (JOB/export); required without --model-config-file")
    p.add_argument("--model-config-file",
                   help="TF Serving models.config (e.g. serving/config/models.config): version policy, labels, "
                        "and the base path unless --model-base-path is given")
    p.add_argument("--model-config-file-poll-wait-seconds", type=float,
                   default=d.model_config_file_poll_wait_seconds,
                   help="re-read --model-config-file this often and apply label and version-policy changes "
                        "(a label moves once its version is loaded); 0 reads it once (default: %(default)s)")
    p.add_argument("--model-name", default=d.model_name, help="name clients ask for (default: %(default)s)")
    p.add_argument("--host", default=d.host, help="address to bind (default: %(default)s; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=d.port, help="gRPC port, 0 for any free (default: %(default)s)")
    p.add_argument("--rest-port", type=int, default=d.rest_port,
                   help="REST and metrics port, 0 for any free, -1 for none (default: %(default)s)")
    p.add_argument("--model-version-policy", default=d.model_version_policy,
                   help="latest[:N], all or specific:V1,V2 (default: %(default)s)")
    p.add_argument("--version-label", action="append", type=_label, default=[], metavar="LABEL=VERSION",
                   help="name a version, e.g. stable=1 (repeatable)")
    p.add_argument("--file-system-poll-wait-seconds", type=float, default=d.file_system_poll_wait_seconds,
                   help="how often to look for new versions, 0 to never (default: %(default)s)")
    p.add_argument("--enable-batching", action="store_true", help="merge concurrent requests into batches")
    p.add_argument("--batching-parameters-file", help="TF Serving batching parameters file (text proto)")
    p.add_argument("--max-batch-size", type=int, help="rows per batch (default 32, overrides the file)")
    p.add_argument("--batch-timeout-micros", type=int, help="longest wait for a batch to fill (default 2000)")
    p.add_argument("--num-batch-threads", type=int, help="threads running batches (default 2)")
    p.add_argument("--max-enqueued-batches", type=int, help="queue length in batches before UNAVAILABLE (default 100)")
    p.add_argument("--grpc-max-threads", type=int, default=d.grpc_max_threads,
                   help="gRPC worker threads (default: %(default)s)")
    p.add_argument("--max-message-bytes", type=int, default=d.max_message_bytes,
                   help="largest gRPC message accepted or sent (default: %(default)s)")
    p.add_argument("--ssl-cert", help="PEM server certificate: serve gRPC over TLS (with --ssl-key)")
    p.add_argument("--ssl-key", help="PEM private key of --ssl-cert")
    p.add_argument("--ssl-client-ca", help="PEM CA: require client certificates it signed (mutual TLS)")
    p.add_argument("--drain-seconds", type=float, default=d.drain_seconds,
                   help="on SIGTERM, how long requests in flight may take to finish (default: %(default)s)")
    p.add_argument("--no-warmup", dest="warmup", action="store_false",
                   help="do not replay assets.extra/tf_serving_warmup_requests")
    p.add_argument("--enable-grpc-healthcheck-service", dest="health_service", action="store_true",
                   default=d.health_service,
                   help="answer grpc.health.v1 for \"\", ModelService and PredictionService, as TF Serving's "
                        "--enable_grpc_healthcheck_service (default: off, as TF Serving)")
    p.add_argument("--no-health-service", dest="health_service", action="store_false",
                   help=argparse.SUPPRESS)  # the former opt-out; the service is now off unless enabled
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="level of the server's log lines (default: %(default)s; --verbose: DEBUG)")
    add_verbose_flag(p, "TensorFlow's start-up and first-load messages (hidden otherwise)")
    add_version_flag(p)
    return p


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """The :class:`ServerConfig` that :func:`build_parser`'s flags describe."""
    return ServerConfig(
        model_base_path=args.model_base_path, model_name=args.model_name,
        model_config_file=args.model_config_file,
        model_config_file_poll_wait_seconds=args.model_config_file_poll_wait_seconds, host=args.host, port=args.port,
        rest_port=args.rest_port, model_version_policy=args.model_version_policy,
        version_labels=dict(args.version_label), file_system_poll_wait_seconds=args.file_system_poll_wait_seconds,
        enable_batching=args.enable_batching or bool(args.batching_parameters_file),
        batching_parameters_file=args.batching_parameters_file, max_batch_size=args.max_batch_size,
        batch_timeout_micros=args.batch_timeout_micros, num_batch_threads=args.num_batch_threads,
        max_enqueued_batches=args.max_enqueued_batches, grpc_max_threads=args.grpc_max_threads,
        max_message_bytes=args.max_message_bytes, ssl_cert_file=args.ssl_cert, ssl_key_file=args.ssl_key,
        ssl_client_ca_file=args.ssl_client_ca, drain_seconds=args.drain_seconds, warmup=args.warmup,
        health_service=args.health_service)


def check_config(config: ServerConfig) -> None:
    """Raise ValueError (or the config parser's error) naming the first mistake in ``config``."""
    from serving.models import VersionPolicy

    if config.model_config_file and not os.path.isfile(config.model_config_file):
        raise ValueError(f"--model-config-file {config.model_config_file} not found")
    if config.model_config_file_poll_wait_seconds < 0:
        raise ValueError("--model-config-file-poll-wait-seconds must be 0 (read once) or more")
    if not config.model_base_path and not config.model_config_file:
        raise ValueError("give --model-base-path (or a --model-config-file naming a base_path)")
    _, base_path, policy, _ = config.model_settings()
    if not os.path.isdir(base_path) and "://" not in base_path:
        raise ValueError(f"model base path {base_path} is not a folder")
    VersionPolicy.parse(policy)
    if config.batching_parameters_file and not os.path.isfile(config.batching_parameters_file):
        raise ValueError(f"--batching-parameters-file {config.batching_parameters_file} not found")
    config.batching()
    if bool(config.ssl_cert_file) != bool(config.ssl_key_file):
        raise ValueError("--ssl-cert and --ssl-key go together")
    for path in (config.ssl_cert_file, config.ssl_key_file, config.ssl_client_ca_file):
        if path and not os.path.isfile(path):
            raise ValueError(f"{path} not found")
    for port in (config.port, config.rest_port):
        if not -1 <= port <= 65535:
            raise ValueError(f"port {port} is out of range")
