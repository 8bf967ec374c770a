"""What a release decides and waits for: versions and their gate verdicts, servers, moving a label.

:func:`inventory` lists the versions on disk with the test accuracy their own
metadata records and the gate verdict that can be tied to them;
:func:`wait_available` asks every server (GetModelStatus) until a version is
AVAILABLE; :class:`Release` is one command's view of all that and moves a
label in the two writes :mod:`serving.release` explains.
"""

from __future__ import annotations

import json
import os
import time

from serving.release_config import (ReleaseError, atomic_write, model_entry, read_config, read_history, render_config,
                                    served_versions)

SCORE_EPSILON = 1e-9
STATE_AVAILABLE, STATE_END = 30, 50


class ServerError(Exception):
    """A server did not load the version in time or failed to: exit status 1."""


# -- versions and their scores -------------------------------------------------------------------
def _read_json(path: str) -> dict | None:
    try:
        import tensorflow as tf

        with tf.io.gfile.GFile(path, "r") as handle:
            data = json.loads(handle.read())
        return data if isinstance(data, dict) else None
    except Exception:  # noqa: BLE001 - a missing or broken file means "no information"
        return None


def version_info(base_path: str, version: int) -> dict:
    """Accuracy and export time recorded in the version's own metadata.json."""
    from trainer.publish.export import ASSETS_EXTRA, METADATA_FILE

    meta = _read_json(os.path.join(base_path, str(version), ASSETS_EXTRA, METADATA_FILE)) or {}
    accuracy = (meta.get("metrics") or {}).get("accuracy")
    return {"accuracy": float(accuracy) if isinstance(accuracy, (int, float)) else None,
            "exported": (meta.get("export") or {}).get("created")}


def gate_for(version: int, info: dict, gate: dict | None) -> dict | None:
    """The gate record ``gate`` (JOB/gate.json) if it belongs to ``version``, else None."""
    if not gate or not gate.get("publish"):
        return None
    previous = gate.get("previous_version")
    if (int(previous) if isinstance(previous, int) else 0) + 1 != version:
        return None
    score = gate.get("new_score")
    if info["accuracy"] is not None and (not isinstance(score, (int, float))
                                         or abs(float(score) - info["accuracy"]) > SCORE_EPSILON):
        return None
    if info["exported"] and gate.get("decided_at") and str(gate["decided_at"]) > str(info["exported"]):
        return None
    return {"verdict": "forced" if gate.get("forced") else "passed", "reason": str(gate.get("reason", "")),
            "score": score, "decided_at": gate.get("decided_at")}


def inventory(base_path: str, gate_file: str | None, history: dict) -> dict[int, dict]:
    """Every version on disk: accuracy, gate verdict (recording newly tied verdicts in ``history``)."""
    from trainer.publish.export import list_versions

    gate = _read_json(gate_file) if gate_file else None
    found = {}
    for version in list_versions(base_path):
        info = version_info(base_path, version)
        tied = gate_for(version, info, gate)
        if tied is not None:
            history["gates"][str(version)] = tied
        record = history["gates"].get(str(version))
        info["gate"] = record["verdict"] if record else "unknown"
        info["gate_reason"] = record["reason"] if record else ""
        if info["accuracy"] is None and record and isinstance(record.get("score"), (int, float)):
            info["accuracy"] = float(record["score"])
        found[version] = info
    return found


# -- servers -------------------------------------------------------------------------------------
def version_state(server: str, model_name: str, version: int, timeout: float = 5.0) -> tuple[int, str]:
    """(state, error message) of ``version`` on ``server`` from GetModelStatus; state 0 when unknown."""
    import grpc
    from tensorflow_serving.apis import get_model_status_pb2, model_service_pb2_grpc

    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = model_name
    request.model_spec.version.value = version
    with grpc.insecure_channel(server) as channel:
        stub = model_service_pb2_grpc.ModelServiceStub(channel)
        try:
            response = stub.GetModelStatus(request, timeout=timeout)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return 0, ""
            raise ServerError(f"{server}: GetModelStatus failed: {exc.code().name}: {exc.details()}") from None
    for status in response.model_version_status:
        if status.version == version:
            return status.state, status.status.error_message
    return 0, ""


def wait_available(servers: list[str], model_name: str, version: int, timeout: float, say) -> None:
    """Block until every server reports ``version`` AVAILABLE (ServerError on END or timeout)."""
    deadline = time.monotonic() + timeout
    pending = list(servers)
    while pending:
        for server in list(pending):
            state, message = version_state(server, model_name, version)
            if state == STATE_AVAILABLE:
                say(f"{server}: version {version} is AVAILABLE")
                pending.remove(server)
            elif state == STATE_END and message:
                raise ServerError(f"{server}: version {version} failed to load: {message}")
        if pending:
            if time.monotonic() > deadline:
                raise ServerError(f"version {version} is not AVAILABLE on {', '.join(pending)} after {timeout:g}s "
                                  f"(is the server polling this config file?)")
            time.sleep(0.2)


# -- one command's view --------------------------------------------------------------------------
class Release:
    """One command's view of the config, the versions on disk and the history."""

    def __init__(self, args):
        self.args = args
        self.path = args.model_config_file
        self.config = read_config(self.path)
        self.model = model_entry(self.config, self.path, args.model_name)
        self.base_path = args.model_base_path or self.model.base_path
        if not self.base_path:
            raise ReleaseError(f"{self.path} names no base_path for {self.model.name}: pass --model-base-path")
        self.history = read_history(self.path)
        self.gate_file = args.gate_file or os.path.join(os.path.dirname(self.base_path.rstrip("/")), "gate.json")
        self.versions = inventory(self.base_path, self.gate_file, self.history)
        self.labels = dict(self.model.version_labels)
        self.policy, self.specific = served_versions(self.model)

    def say(self, message: str) -> None:
        print(message, flush=True)

    def write(self, labels: dict[str, int], versions: list[int], what: str) -> None:
        text = render_config(self.config, self.model, labels, versions)
        atomic_write(self.path, text)
        self.labels, self.specific, self.policy = dict(labels), sorted(set(versions)), "specific"
        self.say(f"wrote {self.path}: {what} (versions {', '.join(map(str, self.specific)) or 'none'}; "
                 f"labels {labels_text(labels)})")

    def check_promotable(self, version: int, force: bool) -> None:
        if version not in self.versions:
            on_disk = ", ".join(map(str, sorted(self.versions))) or "none"
            hint = "" if self.versions or self.args.model_base_path else \
                "; if the config's base_path is a container path, pass --model-base-path"
            raise ReleaseError(f"version {version} does not exist under {self.base_path} (versions: {on_disk}{hint})")
        info = self.versions[version]
        failed = []
        if info["gate"] == "forced":
            failed.append(f"it was published only with --force ({info['gate_reason']})")
        minimum = self.args.min_accuracy
        if minimum is not None:
            if info["accuracy"] is None:
                failed.append(f"it records no test accuracy to compare with --min-accuracy {minimum:g}")
            elif info["accuracy"] < minimum:
                failed.append(f"its accuracy {info['accuracy']:.4f} is below --min-accuracy {minimum:g}")
        if failed and not force:
            raise ReleaseError(f"version {version} failed the gate: {'; '.join(failed)} (use --force to promote it)")
        if failed:
            self.say(f"warning: promoting version {version} although {'; '.join(failed)} (--force)")

    def move_label(self, label: str, version: int) -> bool:
        """Point ``label`` at ``version`` (two writes when the version is not served yet). True when done."""
        args = self.args
        if self.labels.get(label) == version and self.policy == "specific" and \
                self.specific == sorted(set(self.labels.values())):
            self.say(f"{label} already points to version {version}")
            return True
        final_labels = {**self.labels, label: version}
        final_versions = sorted(set(final_labels.values()))
        before = render_config(self.config, self.model, self.labels, self.specific or []) \
            if self.policy == "specific" else None
        if args.offline:
            self.write(final_labels, final_versions, f"{label} -> {version} (--offline: one write)")
            return True
        served_now = set(self.specific) if self.policy == "specific" else set()
        if version not in served_now:
            staged = sorted(served_now | set(self.labels.values()) | {version})
            self.write(self.labels, staged, f"step 1/2: load version {version}")
            if not args.server:
                self.say(f"staged: version {version} is now in the version policy, the labels did not move. "
                         f"Once the server reports version {version} AVAILABLE, run the same command again "
                         f"to move {label} (or pass --server HOST:PORT to wait here).")
                return False
        if args.server:
            self.say(f"waiting for version {version} to be AVAILABLE on {', '.join(args.server)} "
                     f"(up to {args.timeout:g}s)")
            try:
                wait_available(args.server, self.model.name, version, args.timeout, self.say)
            except ServerError:
                if before is not None and version not in served_now:
                    atomic_write(self.path, before)
                    self.say(f"restored {self.path} as it was (version {version} removed from the policy)")
                raise
        self.write(final_labels, final_versions, f"step 2/2: {label} -> {version}")
        return True


def labels_text(labels: dict[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(labels.items())) or "none"
