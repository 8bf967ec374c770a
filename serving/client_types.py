"""What the gRPC client returns and how it is told to talk: plain data, no gRPC, no TensorFlow.

:class:`~serving.grpc_client.PredictionClient` fills these in from the
server's answers; the CLI (:mod:`serving.client_cli`) builds
:class:`ClientOptions` from its flags. Import them from :mod:`serving.client`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024


class ServingClientError(Exception):
    """A failed call: the gRPC status code name (``code``) and the server's message."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Prediction:
    """One image's answer. ``probabilities`` are in class-id order; ``labels`` name them when known."""

    source: str
    label: str
    score: float
    class_id: int
    probabilities: tuple[float, ...]
    labels: tuple[str, ...] | None = None
    model_version: int | None = None

    def name_of(self, class_id: int) -> str:
        if self.labels is not None and class_id < len(self.labels):
            return self.labels[class_id]
        return self.label if class_id == self.class_id else f"class_{class_id}"

    @property
    def probability_by_label(self) -> dict[str, float]:
        return {self.name_of(i): p for i, p in enumerate(self.probabilities)}

    def top(self, k: int = 3) -> list[tuple[str, float]]:
        order = np.argsort(-np.asarray(self.probabilities), kind="stable")[:k]
        return [(self.name_of(int(i)), float(self.probabilities[i])) for i in order]

    def to_dict(self, top_k: int | None = None) -> dict:
        out = {"image": self.source, "label": self.label, "score": self.score, "class_id": self.class_id,
               "model_version": self.model_version, "probabilities": self.probability_by_label}
        if top_k:
            out["top"] = [{"label": name, "score": score} for name, score in self.top(top_k)]
        return out


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...] | None  # None: unknown rank; -1: any size


@dataclass(frozen=True)
class Signature:
    name: str
    inputs: dict[str, TensorInfo]
    outputs: dict[str, TensorInfo]
    method_name: str = ""


@dataclass(frozen=True)
class ModelMetadata:
    name: str
    version: int
    signatures: dict[str, Signature]


@dataclass(frozen=True)
class VersionStatus:
    version: int
    state: str  # START, LOADING, AVAILABLE, UNLOADING, END
    error_code: str = "OK"
    error_message: str = ""


@dataclass(frozen=True)
class ClientOptions:
    """How the client talks to the server (every field has a CLI flag)."""

    version: int | None = None
    version_label: str | None = None
    signature_name: str = "serving_default"
    timeout: float = 10.0  # deadline of one attempt, seconds
    retries: int = 3  # extra attempts on UNAVAILABLE / DEADLINE_EXCEEDED
    backoff_initial: float = 0.1
    backoff_max: float = 2.0
    batch_size: int = 32  # images per Predict request
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    tls: bool = False
    root_certificates: str | None = None  # PEM file; None: system roots
    client_certificate: str | None = None  # PEM, for mutual TLS
    client_key: str | None = None
    labels: tuple[str, ...] | None = None  # class names, if the model has no string output
    normalize_on_client: bool = False  # for exports before the in-graph decode: send JPEGs upright (to_decodable)
