"""The versions of one model: the version policy, and watching the base path to swap versions safely.

TF Serving serves ``BASE/<version>/`` folders whose names are integers; it
picks the versions to serve with a version policy (by default the latest
one), replays ``assets.extra/tf_serving_warmup_requests`` before a version
takes traffic, and polls the base path so that a new version is loaded and
swapped in while requests keep flowing. :class:`ModelManager` does the same
for one model (loading and warming up one version is
:class:`serving.servable.LoadedVersion`'s job):

* a new version is loaded and warmed up *before* it becomes visible; the old
  one is unloaded only after that, and requests already holding it finish on
  it (they keep a reference), so a swap fails no request;
* a folder that is not a valid SavedModel (or whose warm-up fails) is logged,
  reported as ``END`` with its error by GetModelStatus, and skipped - the
  policy then chooses among the remaining versions. It is tried again only if
  a file in it changes (repaired in place, or a copy into it completed);
* version labels (``stable``, ``canary``) map to version numbers.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import grpc

from serving.errors import ServingError, invalid, not_found
from serving.servable import DEFAULT_SIGNATURE, LoadedVersion

__all__ = ["AVAILABLE", "DEFAULT_SIGNATURE", "END", "LOADING", "START", "STATE_NAMES", "UNLOADING", "LoadedVersion",
           "ModelManager", "VersionPolicy", "VersionState"]

log = logging.getLogger("serving.models")

# ModelVersionStatus.State (tensorflow_serving/apis/get_model_status.proto)
START, LOADING, AVAILABLE, UNLOADING, END = 10, 20, 30, 40, 50
STATE_NAMES = {0: "UNKNOWN", START: "START", LOADING: "LOADING", AVAILABLE: "AVAILABLE",
               UNLOADING: "UNLOADING", END: "END"}


@dataclass(frozen=True)
class VersionPolicy:
    """Which versions to serve: ``latest`` N (TF Serving's default, N=1), ``all``, or ``specific`` ones."""

    kind: str = "latest"
    num_versions: int = 1
    versions: tuple[int, ...] = ()

    @classmethod
    def parse(cls, text: str) -> "VersionPolicy":
        """``latest``, ``latest:N``, ``all`` or ``specific:V1,V2``."""
        kind, _, arg = text.strip().partition(":")
        try:
            if kind == "latest":
                policy = cls("latest", int(arg) if arg else 1)
                if policy.num_versions < 1:
                    raise ValueError
                return policy
            if kind == "all" and not arg:
                return cls("all")
            if kind == "specific" and arg:
                return cls("specific", versions=tuple(sorted(int(v) for v in arg.split(","))))
        except ValueError:
            pass
        raise ValueError(f"version policy must be latest[:N], all or specific:V1,V2 - got {text!r}")

    def select(self, candidates: list[int]) -> list[int]:
        candidates = sorted(candidates)
        if self.kind == "all":
            return candidates
        if self.kind == "specific":
            return [v for v in candidates if v in self.versions]
        return candidates[-self.num_versions:]


@dataclass
class VersionState:
    """What GetModelStatus reports for one version."""

    state: int
    error_code: grpc.StatusCode = grpc.StatusCode.OK
    error_message: str = ""


@dataclass
class ModelManager:
    """Serves the versions of one model found under ``base_path`` (see the module docstring)."""

    name: str
    base_path: str
    policy: VersionPolicy = field(default_factory=VersionPolicy)
    labels: dict[str, int] = field(default_factory=dict)
    poll_seconds: float = 1.0
    warmup: bool = True
    on_change: Callable[["ModelManager"], None] | None = None

    def __post_init__(self):
        self._lock = threading.Lock()
        self._available: dict[int, LoadedVersion] = {}
        self._states: dict[int, VersionState] = {}
        self._failed: dict[int, tuple] = {}  # version -> its files (_fingerprint) when it failed
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._warned_empty = False
        # Labels as configured; self.labels holds those in effect (a label moves only once its version is
        # AVAILABLE, see _move_labels). _poll_lock serialises polls of the base path and config changes.
        self._wanted_labels: dict[str, int] = dict(self.labels)
        self._poll_lock = threading.Lock()

    # -- queries -------------------------------------------------------------------------------
    def available_versions(self) -> list[int]:
        with self._lock:
            return sorted(self._available)

    def states(self) -> dict[int, VersionState]:
        """Every version's state, newest first (as TF Serving's ServableStateMonitor orders them)."""
        with self._lock:
            return dict(sorted(self._states.items(), reverse=True))

    def resolve(self, name: str, version: int | None = None, label: str | None = None) -> LoadedVersion:
        """The version a request's model spec asks for, or TF Serving's NOT_FOUND/INVALID_ARGUMENT."""
        with self._lock:  # the label and the version map are read together: a label move is atomic
            if label is not None and label != "":
                if name == self.name and label in self.labels:
                    version = self.labels[label]
                else:
                    raise invalid(f"Unrecognized servable version label: {label}")
            if name == self.name:
                if version is None and self._available:
                    return self._available[max(self._available)]
                if version is not None and version in self._available:
                    return self._available[version]
        if version is None:
            raise not_found(f"Servable not found for request: Latest({name})")
        raise not_found(f"Servable not found for request: Specific({name}, {version})")

    # -- loading ---------------------------------------------------------------------------------
    def _candidates(self) -> dict[int, str]:
        import tensorflow as tf

        found = {}
        try:
            names = tf.io.gfile.listdir(self.base_path)
        except Exception:  # noqa: BLE001 - a missing base path just means no versions yet
            return found
        for entry in names:
            entry = entry.rstrip("/")
            if re.fullmatch(r"[0-9]+", entry):
                path = os.path.join(self.base_path, entry)
                if tf.io.gfile.isdir(path):
                    found[int(entry)] = path
        return found

    @staticmethod
    def _fingerprint(path: str) -> tuple:
        """Every file under a version folder with its size and mtime: a failed version is retried when it changes.

        (The folder's own mtime would miss a file completed, or copied into ``variables/``, after a failed load.)
        """
        import tensorflow as tf

        files = []
        try:
            for folder, _, names in tf.io.gfile.walk(path):
                for name in names:
                    stat = tf.io.gfile.stat(os.path.join(folder, name))
                    files.append((os.path.relpath(os.path.join(folder, name), path), stat.length, stat.mtime_nsec))
        except tf.errors.OpError:
            pass
        return tuple(sorted(files))

    def _load(self, version: int, path: str) -> None:
        with self._lock:
            self._states[version] = VersionState(LOADING)
        log.info("loading model %s version %d from %s", self.name, version, path)
        started = time.monotonic()
        try:
            loaded = LoadedVersion(self.name, version, path)
            warmed = loaded.warm_up() if self.warmup else 0
        except Exception as exc:  # noqa: BLE001 - any broken folder is skipped, never fatal
            # As TF Serving: a failed load is published as END with the load's own status (BasicManager's
            # error_callback in tensorflow_serving/core/basic_manager.cc), which GetModelStatus returns
            # (tensorflow_serving/model_servers/get_model_status_impl.cc).
            code = exc.code if isinstance(exc, ServingError) else grpc.StatusCode.UNKNOWN
            message = (exc.message if isinstance(exc, ServingError) else str(exc)).strip().splitlines()
            message = message[0] if message else type(exc).__name__
            log.error("skipping model %s version %d at %s: not a servable SavedModel: %s: %s",
                      self.name, version, path, code.name, message)
            with self._lock:
                self._states[version] = VersionState(END, code, message)
                self._failed[version] = self._fingerprint(path)
            return
        with self._lock:
            self._available[version] = loaded
            self._states[version] = VersionState(AVAILABLE)
        log.info("model %s version %d available (loaded in %.1fs, %d warm-up requests)",
                 self.name, version, time.monotonic() - started, warmed)

    def _unload(self, version: int) -> None:
        with self._lock:
            loaded = self._available.pop(version, None)
            if loaded is None:
                return
            self._states[version] = VersionState(UNLOADING)
        loaded.close()
        with self._lock:
            self._states[version] = VersionState(END)
        log.info("model %s version %d unloaded", self.name, version)

    def poll(self) -> bool:
        """Look at the base path once, load and unload per the policy; True if anything changed."""
        with self._poll_lock:
            return self._poll()

    def apply_config(self, policy: "VersionPolicy", labels: dict[str, int]) -> dict[str, int]:
        """Serve ``policy`` and ``labels`` (a re-read model config) without failing a request.

        Newly listed versions are loaded and warmed up first; then the labels
        move, all at once, each only to a version that is AVAILABLE (a label
        whose new version could not be loaded stays where it was while that
        version is still loaded); then versions neither the policy nor a label
        names are unloaded (requests in flight keep their version until they
        finish). Returns the labels now in effect.
        """
        with self._poll_lock:
            self.policy = policy
            self._wanted_labels = dict(labels)
            self._poll()
            with self._lock:
                return dict(self.labels)

    def _move_labels(self) -> bool:
        """Point the labels in effect at the wanted versions that are AVAILABLE; True if any moved."""
        with self._lock:
            current, moved = dict(self.labels), {}
            for label, version in self._wanted_labels.items():
                old = current.get(label)
                if version in self._available or old is None or old not in self._available:
                    moved[label] = version  # a new label may name a version still loading (TF Serving's flag)
                else:
                    moved[label] = old
                    log.warning("label %s of model %s stays at version %d: version %d is not available",
                                label, self.name, old, version)
            changed = moved != current
            self.labels = moved
        return changed

    def _poll(self) -> bool:
        found = self._candidates()
        for version, fingerprint in list(self._failed.items()):
            if version not in found or self._fingerprint(found[version]) != fingerprint:
                self._failed.pop(version)
        changed = False
        while True:  # a version that fails to load drops out, and the policy chooses again
            candidates = [v for v in found if v not in self._failed]
            desired = self.policy.select(candidates)
            missing = sorted(set(desired) - set(self.available_versions()), reverse=True)
            if not missing or self._stop.is_set():
                break
            for version in missing:
                self._load(version, found[version])
                changed = True
        if not found and not self._warned_empty:
            log.warning("no versions of model %s found under %s yet (waiting for one)", self.name, self.base_path)
            self._warned_empty = True
        if self._move_labels():
            changed = True
        available = set(self.available_versions())
        keep = set(desired) & available
        with self._lock:  # never unload a version a label still points to
            keep |= set(self.labels.values()) & available
        if keep:
            for version in sorted(available - keep):
                self._unload(version)
                changed = True
        if changed and self.on_change is not None:
            self.on_change(self)
        return changed

    def start(self) -> None:
        """Poll once now, then keep polling every ``poll_seconds`` on a daemon thread."""
        self.poll()
        if self.poll_seconds > 0:
            self._thread = threading.Thread(target=self._watch, name=f"watch-{self.name}", daemon=True)
            self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.poll()
            except Exception:  # noqa: BLE001 - the watcher must outlive a bad poll
                log.exception("polling %s failed", self.base_path)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        for version in self.available_versions():
            with self._lock:
                loaded = self._available.get(version)
            if loaded is not None:
                loaded.close()
