"""Release model versions on purpose: promote to ``canary``/``stable``, roll ``stable`` back.

``tlp-release`` (also ``python -m serving.release``) rewrites TF
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

This module is the command line (``status``, ``promote``, ``rollback``); the
config and history files are :mod:`serving.release_config`, the versions, the
servers and the two-step label move :mod:`serving.release_plan`. Their public
names are importable from here too.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys

from preprocessing.console import PROGRAMS, Parser, add_verbose_flag, also_runs_as, fail, import_tensorflow_quietly
from serving.release_config import (HEADER, HISTORY_SUFFIX, ReleaseError, atomic_write, history_path, model_entry,
                                    read_config, read_history, render_config, served_versions, write_history)
from serving.release_plan import (SCORE_EPSILON, STATE_AVAILABLE, STATE_END, Release, ServerError, gate_for,
                                  inventory, labels_text, version_info, version_state, wait_available)

__all__ = ["GATE_SOURCES", "HEADER", "HISTORY_SUFFIX", "LABELS", "SCORE_EPSILON", "STATE_AVAILABLE", "STATE_END",
           "Release", "ReleaseError", "ServerError", "atomic_write", "build_parser", "cmd_promote", "cmd_rollback",
           "cmd_status", "gate_for", "history_path", "inventory", "main", "model_entry", "read_config", "read_history",
           "render_config", "served_versions", "version_info", "version_state", "wait_available", "write_history"]

LABELS = ("canary", "stable")
PROG = PROGRAMS["serving.release"]

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


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


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
    print(f"policy {policy}   labels {labels_text(release.labels)}")
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

    parser = Parser(
        prog=PROG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Release exported versions on purpose: show them, promote one to a label "
                    "(canary or stable), roll stable back. Rewrites TF Serving's model config with a "
                    "`specific` version policy listing exactly the labelled versions"
                    f"{also_runs_as('serving.release')}.",
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
        add_verbose_flag(sub, "TensorFlow's start-up messages (hidden otherwise)")

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
        parser.error("give a command: status, promote or rollback (see --help)")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import_tensorflow_quietly(args.verbose)  # TF Serving's config protos load it; its C++ lines would bury an error
    try:
        if args.command == "promote" and args.label not in LABELS:
            raise ReleaseError(f"unknown label {args.label!r}: use one of {', '.join(LABELS)}")
        if args.command == "promote" and args.version < 1:
            raise ReleaseError(f"version must be a positive integer, got {args.version}")
        return {"status": cmd_status, "promote": cmd_promote, "rollback": cmd_rollback}[args.command](args)
    except ReleaseError as exc:
        if args.verbose:
            raise
        return fail(PROG, exc, 2)
    except ServerError as exc:
        if args.verbose:
            raise
        return fail(PROG, exc, 1)


if __name__ == "__main__":
    sys.exit(main())
