"""A bounded gRPC load test: throughput, latency percentiles and errors by status code.

``tlp-loadtest --server HOST:PORT --model NAME --concurrency C --requests N [--batch B] IMAGES...``
(also ``python -m serving.loadtest``)

C threads share one channel and send Predict requests of B images (cycled
from IMAGES) until N requests have been sent or ``--duration`` seconds have
passed, whichever comes first: the test is bounded in both. Requests are
not retried, so every failure is counted under its status code. Works
against TF Serving and the development server alike.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class LoadTestConfig:
    """One run's bounds and shape; every field has a CLI flag."""

    server: str = "127.0.0.1:8500"
    model: str = "classifier"
    concurrency: int = 4
    requests: int = 200
    batch: int = 1
    duration: float = 60.0  # seconds; the run stops at this bound even if requests remain
    timeout: float = 10.0  # deadline per request
    version: int | None = None
    label: str | None = None
    signature: str = "serving_default"

    def __post_init__(self):
        for name in ("concurrency", "requests", "batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.duration <= 0 or self.timeout <= 0:
            raise ValueError("--duration and --timeout must be positive")


@dataclass
class LoadTestResult:
    requests: int
    ok: int
    errors: dict[str, int]
    elapsed_s: float
    requests_per_s: float
    images_per_s: float
    latency_ms: dict[str, float]
    versions: dict[int, int] = field(default_factory=dict)  # answering model version -> requests
    stopped_by: str = "requests"  # or "duration"

    def summary(self) -> str:
        lat = self.latency_ms
        lines = [
            f"requests {self.requests} ({self.ok} ok, {self.requests - self.ok} failed) in {self.elapsed_s:.2f}s"
            f" (stopped by {self.stopped_by})",
            f"throughput {self.requests_per_s:.1f} requests/s, {self.images_per_s:.1f} images/s",
            f"latency ms  p50 {lat.get('p50', float('nan')):.2f}  p95 {lat.get('p95', float('nan')):.2f}"
            f"  p99 {lat.get('p99', float('nan')):.2f}  max {lat.get('max', float('nan')):.2f}",
            "errors " + (", ".join(f"{code} {n}" for code, n in sorted(self.errors.items())) or "none"),
        ]
        if self.versions:
            lines.append("versions " + ", ".join(f"{v}: {n}" for v, n in sorted(self.versions.items())))
        return "\n".join(lines)


def percentiles(latencies_s: Sequence[float]) -> dict[str, float]:
    if not latencies_s:
        return {}
    ms = np.asarray(latencies_s) * 1000.0
    return {"p50": float(np.percentile(ms, 50)), "p95": float(np.percentile(ms, 95)),
            "p99": float(np.percentile(ms, 99)), "max": float(ms.max()), "mean": float(ms.mean())}


def run_load(images: Sequence[bytes], config: LoadTestConfig, stop: threading.Event | None = None) -> LoadTestResult:
    """Run the load test with the given encoded images; see the module docstring.

    ``stop``, when set by another thread, ends the run early (requests in flight finish).
    """
    from serving.client_types import ClientOptions, ServingClientError
    from serving.grpc_client import PredictionClient

    if not images:
        raise ValueError("no images to send")
    options = ClientOptions(version=config.version, version_label=config.label, signature_name=config.signature,
                            timeout=config.timeout, retries=0)
    cycle = itertools.cycle(images)
    batches = [[next(cycle) for _ in range(config.batch)] for _ in range(min(len(images), 16))]
    lock = threading.Lock()
    issued = 0
    latencies: list[float] = []
    errors: Counter = Counter()
    versions: Counter = Counter()
    with PredictionClient(config.server, config.model, options) as client:
        client.resolve_signature()  # read the signature's names once, outside the timing
        started = time.perf_counter()
        deadline = started + config.duration

        def worker(index: int) -> None:
            nonlocal issued
            n = index
            while True:
                with lock:
                    if issued >= config.requests or time.perf_counter() >= deadline or (stop and stop.is_set()):
                        return
                    issued += 1
                t0 = time.perf_counter()
                try:
                    response, _ = client.predict_bytes(batches[n % len(batches)])
                except ServingClientError as exc:
                    with lock:
                        errors[exc.code] += 1
                else:
                    elapsed = time.perf_counter() - t0
                    with lock:
                        latencies.append(elapsed)
                        versions[response.model_spec.version.value] += 1
                n += config.concurrency

        threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(config.concurrency)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=config.duration + config.timeout + 5)
        elapsed = time.perf_counter() - started
    ok = len(latencies)
    return LoadTestResult(
        requests=issued, ok=ok, errors=dict(errors), elapsed_s=elapsed,
        requests_per_s=issued / elapsed if elapsed else 0.0, images_per_s=ok * config.batch / elapsed if elapsed else 0.0,
        latency_ms=percentiles(latencies), versions=dict(versions),
        stopped_by="requests" if issued >= config.requests else ("stop" if stop and stop.is_set() else "duration"))


def build_parser() -> argparse.ArgumentParser:
    from preprocessing import add_version_flag
    from preprocessing.console import PROGRAMS, Parser, add_verbose_flag, also_runs_as

    d = LoadTestConfig()
    p = Parser(prog=PROGRAMS["serving.loadtest"],
               description="Bounded gRPC Predict load test: throughput, p50/p95/p99 latency, errors by status "
                           f"code{also_runs_as('serving.loadtest')}.")
    p.add_argument("images", nargs="+", metavar="IMAGES_OR_FOLDERS", help="images to send (cycled)")
    p.add_argument("--server", default=d.server, help="HOST:PORT (default: %(default)s)")
    p.add_argument("--model", default=d.model, help="model name (default: %(default)s)")
    p.add_argument("--concurrency", type=int, default=d.concurrency, help="requests in flight (default: %(default)s)")
    p.add_argument("--requests", type=int, default=d.requests, help="requests to send (default: %(default)s)")
    p.add_argument("--batch", type=int, default=d.batch, help="images per request (default: %(default)s)")
    p.add_argument("--duration", type=float, default=d.duration,
                   help="stop after this many seconds at most (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=d.timeout, help="deadline per request, s (default: %(default)s)")
    pick = p.add_mutually_exclusive_group()
    pick.add_argument("--model-version", type=int, help="model version to ask for")
    pick.add_argument("--label", help="version label to ask for")
    p.add_argument("--signature", default=d.signature, help="signature name (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    add_verbose_flag(p, "TensorFlow's start-up messages (hidden otherwise)")
    add_version_flag(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from preprocessing.console import PROGRAMS, import_tensorflow_quietly
    from serving.client_cli import error_status
    from serving.client_types import ServingClientError
    from serving.images import expand_images

    try:
        config = LoadTestConfig(server=args.server, model=args.model, concurrency=args.concurrency,
                                requests=args.requests, batch=args.batch, duration=args.duration,
                                timeout=args.timeout, version=args.model_version, label=args.label,
                                signature=args.signature)
        paths = expand_images(args.images)
        if not paths:
            raise ValueError("no image files found in " + " ".join(args.images))
        images = []
        for path in paths:
            with open(path, "rb") as handle:
                images.append(handle.read())
        import_tensorflow_quietly(args.verbose)  # the TF Serving API's protos load it
        result = run_load(images, config)
    except (ServingClientError, OSError, ValueError) as exc:
        if args.verbose and not isinstance(exc, ServingClientError):
            raise
        return error_status(exc, args.server, PROGRAMS["serving.loadtest"])
    print(json.dumps(asdict(result), indent=2) if args.json else result.summary())
    return 0 if result.ok == result.requests else 1


if __name__ == "__main__":
    sys.exit(main())
