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

Run ``tlp-serve --model-base-path JOB/export`` (or ``python -m serving.server``;
``--help`` for the options). SIGTERM or Ctrl-C stops accepting requests, lets
the ones in flight finish (up to ``--drain-seconds``), then exits 0. A mistake
in the options is one line, ``tlp-serve: error: ...``, and exit status 2;
TensorFlow's C++ lines of the start-up and the first model load are hidden
unless ``--verbose`` (:mod:`preprocessing.console`).

This module is the server's lifecycle (:class:`ModelServer`: start, watch the
model config, drain, stop) and its ``main``; the options and their flags are
in :mod:`serving.server_config`, the gRPC servicers in :mod:`serving.grpc_api`,
the REST API in :mod:`serving.rest`. ``ServerConfig``, ``build_parser`` and
``config_from_args`` are importable from here too.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from concurrent import futures

from preprocessing.console import PROGRAMS, StderrHandler, cpp_stderr_silenced, fail, import_tensorflow_quietly
from serving.server_config import ServerConfig, build_parser, check_config, config_from_args

__all__ = ["HEALTH_SERVICES", "ModelServer", "ServerConfig", "build_parser", "config_from_args", "main"]

log = logging.getLogger("serving.server")
PROG = PROGRAMS["serving.server"]

# What tensorflow_model_server --enable_grpc_healthcheck_service answers (model_servers/server.cc): gRPC's
# default health service ("" for the whole server) plus SetServingStatus("ModelService") and
# SetServingStatus("PredictionService") - the short names, not the fully-qualified service names.
HEALTH_SERVICES = ("", "ModelService", "PredictionService")


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

        from serving.grpc_api import servicers
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
        prediction, model, prediction_grpc, model_grpc = servicers(self.core)
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(level="DEBUG" if args.verbose else args.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", handlers=[StderrHandler()])
    config = config_from_args(args)
    try:
        if config.model_config_file:  # read with TF Serving's protos, which load TensorFlow
            import_tensorflow_quietly(args.verbose, "serving", log)
        check_config(config)
    except Exception as exc:  # noqa: BLE001 - user mistakes: one line, no traceback
        if args.verbose:
            raise
        return fail(PROG, exc)
    import_tensorflow_quietly(args.verbose, "serving", log)
    server = ModelServer(config)
    stop = threading.Event()

    def on_signal(signum, _frame):
        log.info("received %s: draining requests in flight (up to %.0fs)", signal.Signals(signum).name,
                 config.drain_seconds)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        # the first load prints CUDA's and oneDNN's once-only C++ lines; the server's own log lines still show
        with contextlib.nullcontext() if args.verbose else cpp_stderr_silenced():
            server.start()
    except Exception as exc:  # noqa: BLE001
        server.stop(grace=0)
        if args.verbose:
            raise
        return fail(PROG, f"cannot start the server: {exc}", 1)
    while not stop.wait(0.5):
        pass
    server.stop()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
