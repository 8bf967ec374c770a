"""A development server that speaks TF Serving's gRPC and REST APIs.

Production runs the real ``tensorflow/serving`` (see ``serving/config/``).
This server serves the same ``BASE/<version>/`` folders through the same API,
so the client, the load test and the demo run here and against TF Serving
unchanged:

* ``tensorflow.serving.PredictionService``: ``Predict`` and ``GetModelMetadata``;
  ``tensorflow.serving.ModelService``: ``GetModelStatus``;
* ``grpc.health.v1.Health`` with ``--enable-grpc-healthcheck-service`` (off by
  default, as TF Serving's ``--enable_grpc_healthcheck_service``): the names
  TF Serving registers, ``""``, ``ModelService`` and ``PredictionService``
  (short names, see ``HEALTH_SERVICES``), SERVING once a version is loaded;
  NOT_SERVING while draining; NOT_FOUND for any other name;
* REST on ``--rest-port``: ``/v1/models/NAME[/versions/N|/labels/L][/metadata|:predict]``
  and Prometheus metrics at ``/monitoring/prometheus/metrics``.

Run ``python -m serving.server --model-base-path JOB/export`` (``--help`` for
the options). SIGTERM or Ctrl-C stops accepting requests, lets the ones in
flight finish (up to ``--drain-seconds``), then exits 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field

log = logging.getLogger("serving.server")

# What tensorflow_model_server --enable_grpc_healthcheck_service answers (model_servers/server.cc): gRPC's
# default health service ("" for the whole server) plus SetServingStatus("ModelService") and
# SetServingStatus("PredictionService") - the short names, not the fully-qualified service names.
HEALTH_SERVICES = ("", "ModelService", "PredictionService")


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


def _spec(model_spec):
    from serving.service import Spec

    choice = model_spec.WhichOneof("version_choice")
    return Spec(
        name=model_spec.name,
        version=model_spec.version.value if choice == "version" else None,
        label=model_spec.version_label if choice == "version_label" else None,
        signature_name=model_spec.signature_name,
    )


def _handle(core, context, api: str, model_name: str, fn):
    """Run ``fn`` under metrics; a ServingError aborts the RPC with its code and message."""
    from serving.errors import ServingError
    from serving.tensors import TensorError

    try:
        with core.track(model_name, api, "GRPC"):
            try:
                return fn()
            except TensorError as exc:
                from serving.errors import invalid

                raise invalid(str(exc)) from exc
    except ServingError as exc:
        context.abort(exc.code, exc.message)
    except Exception as exc:  # noqa: BLE001 - a bug must not kill the server; the client sees INTERNAL
        import grpc

        log.exception("%s failed", api)
        context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")


def _servicers(core):
    from tensorflow_serving.apis import (get_model_metadata_pb2, get_model_status_pb2, model_service_pb2_grpc,
                                         predict_pb2, prediction_service_pb2_grpc)

    from serving import tensors

    class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
        def Predict(self, request, context):  # noqa: N802 - gRPC method name
            def run():
                spec = _spec(request.model_spec)
                inputs = {alias: tensors.from_proto(proto) for alias, proto in request.inputs.items()}
                loaded, signature_name, outputs = core.predict(spec, inputs, list(request.output_filter))
                response = predict_pb2.PredictResponse()
                response.model_spec.name = loaded.name
                response.model_spec.version.value = loaded.version
                response.model_spec.signature_name = signature_name
                for alias, value in outputs.items():
                    tensors.to_proto(value, proto=response.outputs[alias])
                return response

            return _handle(core, context, "Predict", request.model_spec.name, run)

        def GetModelMetadata(self, request, context):  # noqa: N802
            def run():
                loaded, signature_map = core.metadata(_spec(request.model_spec), request.metadata_field)
                response = get_model_metadata_pb2.GetModelMetadataResponse()
                response.model_spec.name = loaded.name
                response.model_spec.version.value = loaded.version
                response.metadata["signature_def"].Pack(signature_map)
                return response

            return _handle(core, context, "GetModelMetadata", request.model_spec.name, run)

    class ModelService(model_service_pb2_grpc.ModelServiceServicer):
        def GetModelStatus(self, request, context):  # noqa: N802
            def run():
                if not request.HasField("model_spec"):  # get_model_status_impl.cc
                    from serving.errors import invalid

                    raise invalid("Missing ModelSpec")
                response = get_model_status_pb2.GetModelStatusResponse()
                for version, state in core.status(_spec(request.model_spec)):
                    status = response.model_version_status.add()
                    status.version = version
                    status.state = state.state
                    status.status.error_code = state.error_code.value[0]
                    status.status.error_message = state.error_message
                return response

            return _handle(core, context, "GetModelStatus", request.model_spec.name, run)

    return PredictionService(), ModelService(), prediction_service_pb2_grpc, model_service_pb2_grpc


class ModelServer:
    """The server as an object: ``start()``, then ``stop()``; ``port``/``rest_port`` are the bound ports."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.port: int | None = None
        self.rest_port: int | None = None
        self._grpc = None
        self._rest = None
        self._rest_thread = None
        self._health = None
        self._stopped = threading.Event()
        self._announced: int | None = None

    def start(self) -> "ModelServer":
        import grpc
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc

        from serving.metrics import Metrics
        from serving.models import ModelManager, VersionPolicy
        from serving.service import ServingCore

        cfg = self.config
        self.metrics = Metrics()
        self._health = health.HealthServicer(experimental_non_blocking=True)
        for service in HEALTH_SERVICES:
            self._health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)

        def on_change(manager):
            versions = manager.available_versions()
            if versions and self.port is not None and versions[-1] != self._announced:
                log.info("now serving model %s version %d (loaded: %s)", manager.name, versions[-1],
                         ", ".join(map(str, versions)))
            self._announced = versions[-1] if versions else None
            if versions and not self._stopped.is_set():
                for service in HEALTH_SERVICES:
                    self._health.set(service, health_pb2.HealthCheckResponse.SERVING)

        name, base_path, policy, labels = cfg.model_settings()
        self.manager = ModelManager(
            name=name, base_path=base_path, policy=VersionPolicy.parse(policy), labels=labels,
            poll_seconds=cfg.file_system_poll_wait_seconds, warmup=cfg.warmup, on_change=on_change)
        self.core = ServingCore(self.manager, self.metrics, cfg.batching())
        self.manager.start()
        # (monotonic time, phase, labels, versions): "start", then "applying"/"applied" per config change.
        self.config_events: list[tuple[float, str, dict, list]] = [
            (time.monotonic(), "start", dict(self.manager.labels), self.manager.available_versions())]
        if cfg.model_config_file and cfg.model_config_file_poll_wait_seconds > 0:
            self._config_thread = threading.Thread(target=self._watch_config, args=((name, base_path, policy, labels),),
                                                   name="watch-model-config", daemon=True)
            self._config_thread.start()

        options = [("grpc.max_receive_message_length", cfg.max_message_bytes),
                   ("grpc.max_send_message_length", cfg.max_message_bytes),
                   ("grpc.so_reuseport", 0)]
        self._grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=cfg.grpc_max_threads,
                                                            thread_name_prefix="grpc"), options=options)
        prediction, model, prediction_grpc, model_grpc = _servicers(self.core)
        prediction_grpc.add_PredictionServiceServicer_to_server(prediction, self._grpc)
        model_grpc.add_ModelServiceServicer_to_server(model, self._grpc)
        if cfg.health_service:
            health_pb2_grpc.add_HealthServicer_to_server(self._health, self._grpc)
        address = f"[{cfg.host}]:{cfg.port}" if ":" in cfg.host else f"{cfg.host}:{cfg.port}"
        if cfg.ssl_cert_file:
            with open(cfg.ssl_key_file, "rb") as key, open(cfg.ssl_cert_file, "rb") as cert:
                pair = (key.read(), cert.read())
            client_ca = open(cfg.ssl_client_ca_file, "rb").read() if cfg.ssl_client_ca_file else None
            credentials = grpc.ssl_server_credentials([pair], root_certificates=client_ca,
                                                      require_client_auth=client_ca is not None)
            self.port = self._grpc.add_secure_port(address, credentials)
        else:
            self.port = self._grpc.add_insecure_port(address)
        if not self.port:
            raise OSError(f"cannot listen on {address} for gRPC (port in use?)")
        self._grpc.start()
        if cfg.rest_port >= 0:
            from serving.rest import make_rest_server

            self._rest = make_rest_server(self.core, cfg.host, cfg.rest_port)
            self.rest_port = self._rest.server_address[1]
            self._rest_thread = threading.Thread(target=self._rest.serve_forever, name="rest", daemon=True)
            self._rest_thread.start()
        versions = self.manager.available_versions()
        where = f"{cfg.host}:{self.port} (gRPC)" + (f", {cfg.host}:{self.rest_port} (REST)" if self._rest else "")
        if versions:
            log.info("serving model %s version %d on %s", name, versions[-1], where)
        else:
            log.info("listening on %s; no version of model %s yet, watching %s", where, name, base_path)
        return self

    def _watch_config(self, settings: tuple) -> None:
        """Re-read --model-config-file every poll interval; apply label and version-policy changes.

        As TF Serving's --model_config_file_poll_wait_seconds, but a config that
        fails to parse is logged and the previous one kept, and a label moves
        only once its new version is loaded and warmed up (ModelManager.apply_config),
        so no request fails. The base path and model name are read once at start.
        """
        from serving.models import VersionPolicy

        cfg = self.config
        last = settings
        while not self._stopped.wait(cfg.model_config_file_poll_wait_seconds):
            try:
                name, base_path, policy, labels = cfg.model_settings()
                parsed = VersionPolicy.parse(policy)
            except Exception as exc:  # noqa: BLE001 - a bad edit must not take the server down
                message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                if ("error", message) != last:
                    log.error("model config %s not applied, keeping the previous one: %s",
                              cfg.model_config_file, message)
                last = ("error", message)
                continue
            if (name, base_path, policy, labels) == last:
                continue
            if last[0] != "error" and (name, base_path) != tuple(last[:2]):
                log.warning("model config %s changes the model name or base path (%s at %s): that needs a "
                            "restart; applying its version policy and labels only", cfg.model_config_file,
                            name, base_path)
            self.config_events.append((time.monotonic(), "applying", dict(labels), []))
            log.info("model config %s changed: applying version policy %s, labels %s", cfg.model_config_file,
                     policy, labels)
            try:
                effective = self.manager.apply_config(parsed, labels)
            except Exception:  # noqa: BLE001
                log.exception("applying model config %s failed", cfg.model_config_file)
                continue
            versions = self.manager.available_versions()
            self.config_events.append((time.monotonic(), "applied", effective, versions))
            log.info("model config applied: labels %s, loaded versions %s%s", effective,
                     ", ".join(map(str, versions)) or "none",
                     "" if effective == labels else f" (wanted labels {labels}: see the warnings above)")
            last = (name, base_path, policy, labels)

    def stop(self, grace: float | None = None) -> None:
        """Drain: report NOT_SERVING, refuse new requests, finish those in flight, release everything."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        grace = self.config.drain_seconds if grace is None else grace
        if self._health is not None:
            self._health.enter_graceful_shutdown()
        if self._rest is not None:
            self._rest.shutdown()
        if self._grpc is not None:
            self._grpc.stop(grace).wait()
        if self._rest is not None:
            self.core.wait_idle(grace)
            self._rest.server_close()
        if hasattr(self, "manager"):
            self.manager.stop()

    def wait(self) -> None:
        self._stopped.wait()

    def __enter__(self) -> "ModelServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop(grace=5)


def _label(text: str) -> tuple[str, int]:
    name, sep, version = text.partition("=")
    if not sep or not name or not version.isdigit():
        raise argparse.ArgumentTypeError(f"expected LABEL=VERSION (e.g. stable=1), got {text!r}")
    return name, int(version)


def build_parser() -> argparse.ArgumentParser:
    from preprocessing import add_version_flag

    d = ServerConfig(model_base_path="")
    p = argparse.ArgumentParser(
        prog="python -m serving.server",
        description="Development server speaking TF Serving's gRPC and REST APIs over BASE/<version>/ SavedModels.")
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
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    add_version_flag(p)
    return p


def config_from_args(args: argparse.Namespace) -> ServerConfig:
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


def _check(config: ServerConfig) -> None:
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    config = config_from_args(args)
    try:
        _check(config)
    except Exception as exc:  # noqa: BLE001 - user mistakes: one line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    server = ModelServer(config)
    stop = threading.Event()

    def on_signal(signum, _frame):
        log.info("received %s: draining requests in flight (up to %.0fs)", signal.Signals(signum).name,
                 config.drain_seconds)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        server.start()
    except Exception as exc:  # noqa: BLE001
        print(f"error: cannot start the server: {exc}", file=sys.stderr)
        server.stop(grace=0)
        return 1
    while not stop.wait(0.5):
        pass
    server.stop()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
