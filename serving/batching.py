"""Server-side batching with TF Serving's knobs.

Concurrent requests for the same model version and signature are merged
along the first dimension into one model call of up to ``max_batch_size``
rows, waiting at most ``batch_timeout_micros`` for the batch to fill, on
``num_batch_threads`` threads. The queue holds at most
``max_enqueued_batches`` batches' worth of rows; beyond that a request is
refused with UNAVAILABLE, as TF Serving's batch scheduler refuses it, so a
client can back off instead of piling up latency. A request with more rows
than ``max_batch_size`` is split into pieces and reassembled (TF Serving's
``enable_large_batch_splitting``).

If a merged batch fails (one request's image does not decode, say), each
request in it is run again on its own, so only the faulty request gets the
error.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from serving.errors import ServingError, unavailable

log = logging.getLogger("serving.batching")

QUEUE_FULL = "The batch scheduling queue to which this task was submitted is full"


@dataclass(frozen=True)
class BatchingConfig:
    """TF Serving's BatchingParameters (the ones that matter for a single CPU model)."""

    max_batch_size: int = 32
    batch_timeout_micros: int = 2000
    num_batch_threads: int = 2
    max_enqueued_batches: int = 100

    def __post_init__(self):
        for name in ("max_batch_size", "num_batch_threads", "max_enqueued_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.batch_timeout_micros < 0:
            raise ValueError(f"batch_timeout_micros must be >= 0, got {self.batch_timeout_micros}")

    @classmethod
    def from_file(cls, path: str) -> "BatchingConfig":
        """Read a TF Serving batching parameters file (BatchingParameters text proto)."""
        from serving import protos

        with open(path, encoding="utf-8") as handle:
            params = protos.parse_text(handle.read(), protos.BatchingParameters())
        defaults = cls()
        return cls(
            max_batch_size=params.max_batch_size.value if params.HasField("max_batch_size") else defaults.max_batch_size,
            batch_timeout_micros=(params.batch_timeout_micros.value if params.HasField("batch_timeout_micros")
                                  else defaults.batch_timeout_micros),
            num_batch_threads=(params.num_batch_threads.value if params.HasField("num_batch_threads")
                               else defaults.num_batch_threads),
            max_enqueued_batches=(params.max_enqueued_batches.value if params.HasField("max_enqueued_batches")
                                  else defaults.max_enqueued_batches),
        )


class _Task:
    __slots__ = ("inputs", "size", "done", "result", "error", "enqueued")

    def __init__(self, inputs: dict[str, np.ndarray], size: int):
        self.inputs = inputs
        self.size = size
        self.enqueued = time.monotonic()
        self.done = threading.Event()
        self.result: dict[str, np.ndarray] | None = None
        self.error: BaseException | None = None


def batch_size_of(inputs: dict[str, np.ndarray]) -> int | None:
    """The shared first dimension of all inputs, or None when they cannot be batched."""
    sizes = {array.shape[0] if array.ndim else None for array in inputs.values()}
    if len(sizes) != 1 or None in sizes:
        return None
    return sizes.pop()


class Batcher:
    """Merges concurrent ``submit`` calls into batched ``run_fn`` calls."""

    def __init__(self, run_fn: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
                 config: BatchingConfig, label: str = "batcher",
                 on_batch: Callable[[int], None] | None = None):
        self._run = run_fn
        self._config = config
        self._label = label
        self._on_batch = on_batch
        self._cond = threading.Condition()
        self._queue: collections.deque[_Task] = collections.deque()
        self._queued_rows = 0
        self._closed = False
        self._threads = [threading.Thread(target=self._work, name=f"batch-{label}-{i}", daemon=True)
                         for i in range(config.num_batch_threads)]
        for thread in self._threads:
            thread.start()

    def submit(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run ``inputs`` (all with the same first dimension) as part of a batch; blocks until done."""
        size = batch_size_of(inputs)
        if size is None or size == 0:
            return self._run(inputs)
        limit = self._config.max_batch_size
        tasks = [_Task({k: v[start:start + limit] for k, v in inputs.items()}, min(limit, size - start))
                 for start in range(0, size, limit)]
        capacity = self._config.max_enqueued_batches * limit
        with self._cond:
            closed = self._closed
            if not closed:
                if self._queued_rows + size > capacity:
                    raise unavailable(QUEUE_FULL)
                self._queue.extend(tasks)
                self._queued_rows += size
                self._cond.notify_all()
        if closed:  # the version is being unloaded; this request still holds it, so run it alone
            return self._run(inputs)
        for task in tasks:
            task.done.wait()
        for task in tasks:
            if task.error is not None:
                raise task.error
        if len(tasks) == 1:
            return tasks[0].result
        return {k: np.concatenate([t.result[k] for t in tasks]) for k in tasks[0].result}

    def _take(self) -> list[_Task] | None:
        limit = self._config.max_batch_size
        timeout = self._config.batch_timeout_micros / 1e6
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if not self._queue:
                return None
            deadline = self._queue[0].enqueued + timeout  # the batch's clock starts with its first request
            while self._queue and self._queued_rows < limit and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            batch, rows = [], 0
            while self._queue and rows + self._queue[0].size <= limit:
                task = self._queue.popleft()
                batch.append(task)
                rows += task.size
            self._queued_rows -= rows
            return batch

    def _work(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            if batch:
                self._execute(batch)

    def _execute(self, batch: list[_Task]) -> None:
        if self._on_batch is not None:
            self._on_batch(sum(t.size for t in batch))
        if len(batch) == 1:
            self._finish(batch[0])
            return
        merged = {k: np.concatenate([t.inputs[k] for t in batch]) for k in batch[0].inputs}
        try:
            outputs = self._run(merged)
        except ServingError:
            for task in batch:  # isolate the faulty request(s)
                self._finish(task)
            return
        except BaseException as exc:  # noqa: BLE001
            for task in batch:
                task.error = exc
                task.done.set()
            return
        rows = sum(t.size for t in batch)
        if any(np.ndim(v) == 0 or v.shape[0] != rows for v in outputs.values()):
            for task in batch:  # outputs that are not batch-major cannot be split: run each alone
                self._finish(task)
            return
        start = 0
        for task in batch:
            task.result = {k: v[start:start + task.size] for k, v in outputs.items()}
            start += task.size
            task.done.set()

    def _finish(self, task: _Task) -> None:
        try:
            task.result = self._run(task.inputs)
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting request
            task.error = exc
        task.done.set()

    def close(self) -> None:
        """Stop taking requests; the queued ones still run, then the threads exit."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout=30)
