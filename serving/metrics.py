"""TF Serving's metrics, under TF Serving's names, printed as TF Serving prints them.

TF Serving exposes ``/monitoring/prometheus/metrics`` on its REST port when
``--monitoring_config_file`` enables Prometheus. What it exports, and so what
this server exports, so that dashboards and alerts move to production
unchanged:

* ``:tensorflow:serving:request_count{model_name,status}`` (counter): one per
  gRPC ``Predict`` (``Classify``, ``Regress``) and one per REST request under
  ``/v1/``, whatever its outcome; ``status`` is the canonical code name
  (``OK``, ``NOT_FOUND``, ``INVALID_ARGUMENT``...). gRPC ``GetModelMetadata``
  and ``GetModelStatus`` are not counted (``prediction_service_impl.cc``,
  ``model_service_impl.cc``, ``http_server.cc``);
* ``:tensorflow:serving:request_latency{model_name,API,entrypoint}``
  (histogram, microseconds): successful requests only. gRPC: ``API`` is
  ``Predict`` and ``entrypoint`` ``GRPC``; REST: ``API`` is the verb from the
  URL (``predict``, ``classify``, ``regress``; empty for the GET status and
  metadata routes) and ``entrypoint`` ``REST``;
* ``:tensorflow:serving:runtime_latency{model_name,API,runtime}`` (histogram,
  microseconds): the model run itself (``API="Predict"``, ``runtime="TF1"``),
  including the batching queue when batching is on, as TF Serving times its
  (batching) session's ``Run`` (``predict_util.cc``);
* ``:tensorflow:serving:batching_session:wrapped_run_count`` (counter, no
  labels): batches run with ``--enable-batching`` (``batching_session.cc``).

Both latency histograms use TF Serving's buckets, ``Buckets::Exponential(10,
1.8, 33)``: 33 finite bounds from 10 µs to about 24 minutes, then ``+Inf``
(``servables/tensorflow/util.cc``).

The text follows ``util/prometheus_exporter.cc``: one ``# TYPE`` line per
metric and no ``# HELP``; the metric name is TF's with every character outside
``[a-zA-Z0-9_]`` turned into ``:``; counters print their integer value under
the metric's own name (no ``_total`` suffix: prometheus_client would add one,
and its ``# TYPE`` line too, which is why this module renders the text itself);
histogram bounds and sums print with six significant digits. The content type
is ``text/plain``.

Each server owns its metrics, so several servers in one process (tests) do not
mix counts.
"""

from __future__ import annotations

import bisect
import re
import threading

PROMETHEUS_PATH = "/monitoring/prometheus/metrics"
CONTENT_TYPE = "text/plain"

# gRPC methods whose requests TF Serving counts and times (prediction_service_impl.cc);
# GetModelMetadata and GetModelStatus record nothing.
_GRPC_RECORDED_APIS = frozenset({"Predict", "Classify", "Regress"})


def exponential_buckets(scale: float, growth_factor: float, bucket_count: int) -> tuple[float, ...]:
    """TF monitoring's ``Buckets::Exponential``: ``scale * growth_factor**i``, computed as TF computes it."""
    bounds, bound = [], float(scale)
    for _ in range(bucket_count):
        bounds.append(bound)
        bound *= growth_factor
    return tuple(bounds)


LATENCY_BUCKETS_US = exponential_buckets(10, 1.8, 33)


def _number(value: float) -> str:
    """A double as ``absl::StrCat`` prints it: six significant digits, no trailing zeros."""
    return format(float(value), ".6g")


def prometheus_metric_name(name: str) -> str:
    """TF's metric name (``/tensorflow/serving/request_count``) as Prometheus sees it."""
    name = re.sub(r"[^a-zA-Z0-9_]", ":", name)
    return "_" + name if name[:1].isdigit() else name


def _label_name(name: str) -> str:
    name = re.sub(r"[^a-zA-Z0-9]", "_", name)
    return "_" + name if name[:1].isdigit() else name


def _label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


class _Metric:
    kind = ""

    def __init__(self, name: str, description: str, *label_names: str):
        self.name = name
        self.description = description
        self.label_names = label_names
        self._cells: dict[tuple[str, ...], object] = {}
        self._lock = threading.Lock()

    def labels(self, *values: str):
        """The cell of one combination of label values (made on first use)."""
        if len(values) != len(self.label_names):
            raise ValueError(f"{self.name} takes labels {self.label_names}, got {values}")
        key = tuple(str(v) for v in values)
        with self._lock:
            cell = self._cells.get(key)
            if cell is None:
                cell = self._cells[key] = self._new_cell()
            return cell

    def _points(self):
        with self._lock:
            items = sorted(self._cells.items())
        return items

    def _label_texts(self, key: tuple[str, ...]) -> list[str]:
        return [f'{_label_name(n)}="{_label_value(v)}"' for n, v in zip(self.label_names, key)]


class _CounterCell:
    def __init__(self):
        self._value = 0
        self._lock = threading.Lock()

    def inc(self, amount: int = 1) -> None:
        with self._lock:
            self._value += int(amount)

    def get(self) -> int:
        with self._lock:
            return self._value


class Counter(_Metric):
    """TF monitoring's ``Counter<N>``: an int64 per combination of label values."""

    kind = "counter"

    def _new_cell(self):
        return _CounterCell()

    def lines(self) -> list[str]:
        name = prometheus_metric_name(self.name)
        out = [f"# TYPE {name} counter"]
        for key, cell in self._points():
            out.append(f"{name}{{{','.join(self._label_texts(key))}}} {cell.get()}")
        return out


class _SamplerCell:
    def __init__(self, bounds: tuple[float, ...]):
        self._bounds = bounds
        self._buckets = [0] * (len(bounds) + 1)  # the last one runs to DBL_MAX
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        # tsl Histogram::Add: the first bucket whose limit is above the value (upper_bound).
        index = bisect.bisect_right(self._bounds, value)
        with self._lock:
            self._buckets[index] += 1
            self._sum += value

    def snapshot(self) -> tuple[list[int], float]:
        with self._lock:
            return list(self._buckets), self._sum

    @property
    def count(self) -> int:
        return sum(self.snapshot()[0])


class Sampler(_Metric):
    """TF monitoring's ``Sampler<N>``: a histogram per combination of label values."""

    kind = "histogram"

    def __init__(self, name: str, description: str, buckets: tuple[float, ...], *label_names: str):
        super().__init__(name, description, *label_names)
        self.buckets = tuple(buckets)

    def _new_cell(self):
        return _SamplerCell(self.buckets)

    def lines(self) -> list[str]:
        name = prometheus_metric_name(self.name)
        out = [f"# TYPE {name} histogram"]
        for key, cell in self._points():
            labels = self._label_texts(key)
            prefix = f"{name}_bucket{{{','.join(labels)}{',' if labels else ''}"
            buckets, total = cell.snapshot()
            cumulative = 0
            for i, count in enumerate(buckets):
                cumulative += count
                bound = _number(self.buckets[i]) if i < len(self.buckets) else "+Inf"
                out.append(f'{prefix}le="{bound}"}} {cumulative}')
            out.append(f"{name}_sum{{{','.join(labels)}}} {_number(total)}")
            out.append(f"{name}_count{{{','.join(labels)}}} {cumulative}")
        return out


class Metrics:
    """The metrics of one server (see the module docstring for what each one counts)."""

    def __init__(self) -> None:
        self.request_count = Counter(
            "/tensorflow/serving/request_count", "The total number of requests.", "model_name", "status")
        self.request_latency = Sampler(
            "/tensorflow/serving/request_latency",
            "Distribution of wall time (in microseconds) for Tensorflow Serving request.",
            LATENCY_BUCKETS_US, "model_name", "API", "entrypoint")
        self.runtime_latency = Sampler(
            "/tensorflow/serving/runtime_latency",
            "Distribution of wall time (in microseconds) for Tensorflow runtime.",
            LATENCY_BUCKETS_US, "model_name", "API", "runtime")
        self.wrapped_run_count = Counter(
            "/tensorflow/serving/batching_session/wrapped_run_count",
            "Total count of run calls on the wrapped session")

    def all(self) -> list[_Metric]:
        return [self.request_count, self.request_latency, self.runtime_latency, self.wrapped_run_count]

    def observe(self, model_name: str, api: str, entrypoint: str, status: str, seconds: float) -> None:
        """Record one finished request as TF Serving would (see the module docstring)."""
        if entrypoint == "GRPC" and api not in _GRPC_RECORDED_APIS:
            return
        if status == "OK":
            self.request_latency.labels(model_name, api, entrypoint).observe(int(seconds * 1e6))
        self.request_count.labels(model_name, status).inc()

    def observe_run(self, model_name: str, api: str, seconds: float) -> None:
        """Record the wall time of running the model (``runtime_latency``, runtime ``TF1``)."""
        self.runtime_latency.labels(model_name, api, "TF1").observe(int(seconds * 1e6))

    def exposition(self) -> tuple[bytes, str]:
        """The text TF Serving's PrometheusExporter prints and its content type."""
        return render(self.all()).encode("utf-8"), CONTENT_TYPE


def render(metrics) -> str:
    """``PrometheusExporter::GeneratePage``: every metric, sorted by name, lines joined by newlines, one at the end."""
    lines: list[str] = []
    for metric in sorted(metrics, key=lambda m: m.name):
        lines.extend(metric.lines())
    return "\n".join(lines) + "\n"
