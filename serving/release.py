"""Release model versions on purpose: promote to ``canary``/``stable``, roll ``stable`` back.

``python -m serving.release`` (console script ``tlp-release``) rewrites TF
Serving's model config (``serving/config/models.config``, a text
``ModelServerConfig``) so that

* the version policy is ``specific``, listing exactly the versions the labels
  point to: exporting a new version changes nothing that is served until it
  is promoted, and no label ever points to a version that the policy unloads;
* every write is atomic (a temporary file in the same folder, fsync,
  ``os.replace``), so a server polling the file (TF Serving's
  ``--model_config_file_poll_wait_seconds``) reads the old or the new config,
  never half of one.

Moving a label to a version that is not loaded yet takes two writes, because
TF Serving checks labels *before* it loads the versions of a new config
(``ServerCore::ReloadConfig`` calls ``UpdateModelVersionLabelMap`` first) and
refuses to move an existing label to a version that is not AVAILABLE, even
with ``--allow_version_labels_for_unavailable_models`` (that flag only lets a
*new* label name an unloaded version). A refused reload keeps the old labels
and never loads the new version, so a one-step write would be stuck forever.
Hence ``promote``/``rollback``:

1. add the version to ``specific`` (labels unchanged) and write;
2. with ``--server`` (repeatable, one per replica): wait until every server's
   GetModelStatus reports the version AVAILABLE (loaded and warmed up), then
   move the label and drop the versions no label names any more, and write.
   Requests in flight on a dropped version finish on it (TF Serving and the
   development server both unload only after the label map has moved).

Without ``--server`` the command stops after step 1 ("staged") and says so;
run the same command again once the version is AVAILABLE to do step 2.
``--offline`` (no server reads the file now; it reads it at start-up, when
every label is new) writes the final config at once.

The history of ``stable`` lives in a JSON file beside the config
(``<config>.history.json``, written atomically like the config): a stack of
the previous stable versions, used by ``rollback``, and a log of every
promote/rollback. Rolling back pops the stack; it does not push, so two
rollbacks go two releases back.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import tempfile
import time

LABELS = ("canary", "stable")
HISTORY_SUFFIX = ".history.json"
SCORE_EPSILON = 1e-9
STATE_AVAILABLE, STATE_END = 30, 50

HEADER = """\
# TF Serving model config (ModelServerConfig, text format), written by `python -m serving.release`
# (tlp-release), which rewrites it on every promote/rollback: the `specific` version policy lists
# exactly the versions the labels point to. Change labels with the tool (it moves a label to a new
# version in two steps: load the version, then move the label): `python -m serving.release --help`,
# docs/kubernetes.md. base_path is the trainer's JOB/export/ (numeric version folders). History of
# `stable` (for rollback): this file's name + .history.json.
"""

GATE_SOURCES = """\
Scores: a version's test accuracy is read from VERSION/assets.extra/metadata.json
(metrics.accuracy; the trainer writes it into the version folder, which is published
by one atomic rename, so it always belongs to that version). The gate verdict comes
from JOB/gate.json (the folder above the base path, or --gate-file) only when it can
be tied to the version: gate.json is rewritten by every trainer run, refused runs
included, and does not name the version it decided on, so it is taken for version V
only when its previous_version + 1 == V, it published, and its new_score equals V's
accuracy. Verdicts seen are kept in the history file, so they survive the next run.
A version "failed the gate" when its verdict is `forced` (published only because of
--force) or its accuracy is below --min-accuracy; promoting it needs --force.
Verdict `unknown` (no gate.json tied to it) does not block."""


class ReleaseError(Exception):
    """A user mistake or a state the command refuses: one line, exit status 2."""


class ServerError(Exception):
    """A server did not load the version in time or failed to: exit status 1."""


# -- the model config --------------------------------------------------------------------------
def read_config(path: str):
    """The ModelServerConfig in ``path`` (ReleaseError when missing or malformed)."""
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    if not os.path.isfile(path):
        raise ReleaseError(f"model config file {path} not found")
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
        return text_format.Parse(text, model_server_config_pb2.ModelServerConfig())
    except (text_format.ParseError, UnicodeDecodeError) as exc:
        raise ReleaseError(f"{path} is not a valid ModelServerConfig text proto: "
                           f"{str(exc).splitlines()[0]}") from None


def model_entry(config, path: str, name: str | None):
    """The ModelConfig named ``name`` (or the only one)."""
    models = list(config.model_config_list.config)
    if not models:
        raise ReleaseError(f"{path} has no model_config_list entries")
    chosen = [m for m in models if m.name == name] if name else models
    if not chosen:
        raise ReleaseError(f"{path} has no model named {name!r} (models: {', '.join(m.name for m in models)})")
    if len(chosen) > 1:
        raise ReleaseError(f"{path} holds several models ({', '.join(m.name for m in models)}): pass --model-name")
    return chosen[0]


def served_versions(model) -> tuple[str, list[int]]:
    """(policy kind, specific versions) of a ModelConfig."""
    which = model.model_version_policy.WhichOneof("policy_choice") or "latest"
    return which, sorted(set(model.model_version_policy.specific.versions)) if which == "specific" else []


def render_config(config, model, labels: dict[str, int], versions: list[int]) -> str:
    """``config`` with ``model``'s policy set to specific ``versions`` and its labels to ``labels``."""
    from google.protobuf import text_format

    model.model_version_policy.Clear()
    model.model_version_policy.specific.versions.extend(sorted(set(versions)))
    model.ClearField("version_labels")
    for label in sorted(labels):
        model.version_labels[label] = int(labels[label])
    return HEADER + text_format.MessageToString(config)


def atomic_write(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically: temp file in the same folder, fsync, os.replace."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.chmod(tmp, 0o644)
        except OSError:
            pass
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


# -- history -------------------------------------------------------------------------------------
def history_path(config_path: str) -> str:
    return config_path + HISTORY_SUFFIX


def read_history(config_path: str) -> dict:
    path = history_path(config_path)
    if not os.path.exists(path):
        return {"stable": [], "events": [], "gates": {}}
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        raise ReleaseError(f"history file {path} is unreadable: {exc}") from None
    data.setdefault("stable", [])
    data.setdefault("events", [])
    data.setdefault("gates", {})
    return data


def write_history(config_path: str, history: dict) -> None:
    atomic_write(history_path(config_path), json.dumps(history, indent=2, sort_keys=True) + "\n")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


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


# -- commands ------------------------------------------------------------------------------------
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
                 f"labels {_labels_text(labels)})")

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


def _labels_text(labels: dict[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(labels.items())) or "none"


def cmd_status(args) -> int:
    release = Release(args)
    rows = []
    labelled = {}
    for label, version in release.labels.items():
        labelled.setdefault(version, []).append(label)
    for version in sorted(set(release.versions) | set(labelled)):
        info = release.versions.get(version)
        served = version in release.specific if release.policy == "specific" else None
        rows.append({"version": version, "on_disk": info is not None,
                     "accuracy": info["accuracy"] if info else None,
                     "gate": info["gate"] if info else "missing",
                     "gate_reason": info["gate_reason"] if info else "",
                     "exported": info["exported"] if info else None,
                     "labels": sorted(labelled.get(version, [])), "in_policy": served})
    if args.json:
        print(json.dumps({"model": release.model.name, "config": release.path, "base_path": release.base_path,
                          "gate_file": release.gate_file,
                          "policy": {"kind": release.policy, "versions": release.specific},
                          "labels": release.labels, "versions": rows,
                          "stable_history": release.history["stable"]}, indent=2))
        return 0
    print(f"model {release.model.name}   config {release.path}   base {release.base_path}")
    policy = (f"specific {', '.join(map(str, release.specific))}" if release.policy == "specific"
              else f"{release.policy} (not managed by serving.release yet: the first promote rewrites it)")
    print(f"policy {policy}   labels {_labels_text(release.labels)}")
    header = f"{'VERSION':>7}  {'ACCURACY':>8}  {'GATE':<8}  {'LABELS':<14}  {'SERVED':<6}  EXPORTED"
    print(header)
    for row in rows:
        accuracy = f"{row['accuracy']:.4f}" if row["accuracy"] is not None else "-"
        served = {True: "yes", False: "no", None: "policy"}[row["in_policy"]]
        gate = row["gate"] if row["on_disk"] else "MISSING"
        print(f"{row['version']:>7}  {accuracy:>8}  {gate:<8}  {','.join(row['labels']) or '-':<14}  "
              f"{served:<6}  {row['exported'] or '-'}")
    if not rows:
        print(f"(no versions under {release.base_path})")
    if release.history["stable"]:
        print(f"rollback would restore stable -> {release.history['stable'][-1]}")
    return 0


def cmd_promote(args) -> int:
    release = Release(args)
    version, label = args.version, args.label
    release.check_promotable(version, args.force)
    previous = release.labels.get(label)
    done = release.move_label(label, version)
    if done and previous != version:
        if label == "stable" and previous is not None:
            release.history["stable"].append(previous)
        release.history["events"].append({"at": _now(), "action": "promote", "label": label, "version": version,
                                          "previous": previous, "forced": bool(args.force)})
    write_history(release.path, release.history)
    return 0


def cmd_rollback(args) -> int:
    release = Release(args)
    current = release.labels.get("stable")
    stack = release.history["stable"]
    while stack and (stack[-1] == current):
        stack.pop()
    if not stack:
        raise ReleaseError(f"nothing to roll back to: no earlier stable version in {history_path(release.path)}")
    target = stack[-1]
    if target not in release.versions:
        raise ReleaseError(f"cannot roll back to version {target}: it is no longer under {release.base_path}")
    if release.move_label("stable", target):
        stack.pop()
        release.history["events"].append({"at": _now(), "action": "rollback", "label": "stable",
                                          "version": target, "previous": current})
    write_history(release.path, release.history)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from preprocessing import add_version_flag

    parser = argparse.ArgumentParser(
        prog="python -m serving.release",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Release exported versions on purpose: show them, promote one to a label "
                    "(canary or stable), roll stable back. Rewrites TF Serving's model config with a "
                    "`specific` version policy listing exactly the labelled versions.",
        epilog=GATE_SOURCES + "\n\nExamples:\n"
               "  tlp-release status --model-config-file serving/config/models.config --model-base-path JOB/export\n"
               "  tlp-release promote 3 --label canary --model-config-file models.config --server 127.0.0.1:8500\n"
               "  tlp-release promote 3 --label stable --model-config-file models.config --server 127.0.0.1:8500\n"
               "  tlp-release rollback --model-config-file models.config --server 127.0.0.1:8500\n"
               "Exit status: 0 done (or staged), 2 a mistake or a refused release (one line on stderr), "
               "1 a server did not load the version.")
    add_version_flag(parser)
    commands = parser.add_subparsers(dest="command", metavar="{status,promote,rollback}")

    def common(sub):
        sub.add_argument("--model-config-file", required=True,
                         help="TF Serving model config (text ModelServerConfig) to read and rewrite")
        sub.add_argument("--model-base-path",
                         help="where the numeric version folders are (default: the config's base_path, usually "
                              "a container path such as /models/classifier; give JOB/export locally)")
        sub.add_argument("--model-name", help="model entry in the config (default: its only entry)")
        sub.add_argument("--gate-file", help="the trainer's gate.json (default: gate.json in the folder above "
                                             "the base path, i.e. JOB/gate.json)")

    def moving(sub):
        sub.add_argument("--server", action="append", default=[], metavar="HOST:PORT",
                         help="gRPC address of a server reading this config (repeat for every replica): wait "
                              "until it reports the version AVAILABLE before moving the label")
        sub.add_argument("--timeout", type=float, default=300.0,
                         help="seconds to wait for AVAILABLE (default: %(default)s)")
        sub.add_argument("--offline", action="store_true",
                         help="no server reads the config now (it will at start-up): write the final config "
                              "in one step")

    status = commands.add_parser("status", help="versions on disk, their scores and gate verdicts, the labels",
                                 description="Versions on disk with test accuracy and gate verdict, and what "
                                             "each label points to.", epilog=GATE_SOURCES,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    common(status)
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")

    promote = commands.add_parser("promote", help="point a label (canary|stable) at a version",
                                  description="Point LABEL at VERSION: add the version to the policy, wait "
                                              "until it is AVAILABLE (--server), then move the label.",
                                  epilog=GATE_SOURCES, formatter_class=argparse.RawDescriptionHelpFormatter)
    promote.add_argument("version", type=int, metavar="VERSION")
    promote.add_argument("--label", required=True, help="canary or stable")
    common(promote)
    moving(promote)
    promote.add_argument("--force", action="store_true", help="promote a version that failed the gate")
    promote.add_argument("--min-accuracy", type=float,
                         help="refuse (without --force) a version whose recorded accuracy is below this")

    rollback = commands.add_parser("rollback", help="point stable back at the previous stable version",
                                   description="Point stable back at the version it named before the last "
                                               "promote (from the history file beside the config).")
    common(rollback)
    moving(rollback)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "tensorflow" not in sys.modules:  # its C++ start-up lines would bury a one-line error
        from trainer.quiet import stderr_silenced

        with stderr_silenced():
            import tensorflow  # noqa: F401
            from tensorflow_serving.config import model_server_config_pb2  # noqa: F401
    try:
        if args.command == "promote" and args.label not in LABELS:
            raise ReleaseError(f"unknown label {args.label!r}: use one of {', '.join(LABELS)}")
        if args.command == "promote" and args.version < 1:
            raise ReleaseError(f"version must be a positive integer, got {args.version}")
        return {"status": cmd_status, "promote": cmd_promote, "rollback": cmd_rollback}[args.command](args)
    except ReleaseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
