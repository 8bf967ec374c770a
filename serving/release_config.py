"""The files ``serving.release`` owns: TF Serving's model config and the ``stable`` history beside it.

The model config (a text ``ModelServerConfig``) is rewritten with a
``specific`` version policy listing exactly the labelled versions; the
history (``<config>.history.json``) keeps the previous stable versions for
``rollback``, a log of every promote/rollback and the gate verdicts seen.
Both are written atomically (a temporary file in the same folder, fsync,
``os.replace``), so a server polling the config reads the old or the new one,
never half of one. Why and when they are written: :mod:`serving.release`.
"""

from __future__ import annotations

import json
import os
import tempfile

HISTORY_SUFFIX = ".history.json"

HEADER = """\
# TF Serving model config (ModelServerConfig, text format), written by `python -m serving.release`
# (tlp-release), which rewrites it on every promote/rollback: the `specific` version policy lists
# exactly the versions the labels point to. Change labels with the tool (it moves a label to a new
# version in two steps: load the version, then move the label): `python -m serving.release --help`,
# docs/kubernetes.md. base_path is the trainer's JOB/export/ (numeric version folders). History of
# `stable` (for rollback): this file's name + .history.json.
"""


class ReleaseError(Exception):
    """A user mistake or a state the command refuses: one line, exit status 2."""


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
