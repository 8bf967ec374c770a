"""Prometheus metrics with TF Serving's names, served at TF Serving's path.

TF Serving exposes ``/monitoring/prometheus/metrics`` on its REST port when
``--monitoring_config_file`` enables Prometheus. The names below are TF
Serving's (``:tensorflow:serving:request_count`` by ``model_name`` and
``status``, ``:tensorflow:serving:request_latency`` by ``model_name``, ``API``
and ``entrypoint``), except that prometheus_client, following the exposition
conventions, adds ``_total`` to the counter's sample name. Each server owns
its registry, so several servers in one process (tests) do not mix counts.
"""

from __future__ import annotations

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

PROMETHEUS_PATH = "/monitoring/prometheus/metrics"
_LATENCY_BUCKETS_US = (100, 250, 500, 1000, 2500, 5000, 10000, 25000, 50000, 100000, 250000, 500000,
                       1000000, 2500000, 10000000)

prometheus_client.disable_created_metrics()


class Metrics:
    """Request counts, latencies, batch sizes and loaded versions of one server."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.request_count = Counter(
            ":tensorflow:serving:request_count", "The total number of requests.",
            ["model_name", "status"], registry=self.registry)
        self.request_latency = Histogram(
            ":tensorflow:serving:request_latency", "Distribution of the request latency in microseconds.",
            ["model_name", "API", "entrypoint"], buckets=_LATENCY_BUCKETS_US, registry=self.registry)
        self.batch_size = Histogram(
            ":tensorflow:serving:batching_session:processed_batch_size",
            "Distribution of the number of rows in each batch run by the model.",
            ["model_name"], buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024), registry=self.registry)
        self.available_versions = Gauge(
            ":tensorflow:serving:model_available_versions", "Number of versions of a model currently served.",
            ["model_name"], registry=self.registry)

    def observe(self, model_name: str, api: str, entrypoint: str, status: str, seconds: float) -> None:
        self.request_count.labels(model_name, status).inc()
        self.request_latency.labels(model_name, api, entrypoint).observe(seconds * 1e6)

    def exposition(self) -> tuple[bytes, str]:
        """The text exposition and its content type."""
        return prometheus_client.generate_latest(self.registry), prometheus_client.CONTENT_TYPE_LATEST
