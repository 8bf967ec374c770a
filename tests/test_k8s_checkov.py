"""An outside scanner passes the manifests: Checkov, on every rendered overlay.

Checkov runs from its own virtual environment, .venv-checkov (made by
`make install` / `make test` from requirements-checkov.txt; it cannot share
.venv, see that file). The tests skip, saying so, when it is missing; point
$CHECKOV at another checkov executable to use that one.

A check is skipped only in the manifest itself, with checkov's annotation
(`checkov.io/skipN: CHECK=reason`), and only the checks in ALLOWED_SKIPS may
be: docs/kubernetes.md says why each one is.
"""

from __future__ import annotations

import copy
import json
import os
import pathlib
import re
import subprocess

import pytest
import yaml

from k8s_support import (
    OVERLAYS,
    PROJECT_IMAGES,
    REPO_ROOT,
    all_containers,
    find,
    pod_templates,
    render,
    where,
)

REQUIREMENTS = REPO_ROOT / "requirements-checkov.txt"
CHECKOV_VENV = REPO_ROOT / ".venv-checkov"
SKIP_PREFIX = "checkov.io/skip"
# check -> the overlays that may skip it (docs/kubernetes.md, "Checkov").
ALLOWED_SKIPS = {
    "CKV_K8S_43": set(OVERLAYS),  # image by digest: the images are pinned by tag until pushed
    "CKV_K8S_15": {"dev"},  # imagePullPolicy Always: dev's project image is loaded into the node, not pulled
}
CANARY = "checkov-canary"


def pinned_checkov() -> str:
    match = re.search(r"^checkov==([^\s;]+)", REQUIREMENTS.read_text(), re.MULTILINE)
    assert match, f"{REQUIREMENTS.name} does not pin checkov"
    return match.group(1)


def checkov_executable() -> str:
    executable = os.environ.get("CHECKOV") or str(CHECKOV_VENV / "bin" / "checkov")
    if not pathlib.Path(executable).is_file():
        if os.environ.get("CI"):  # CI runs `make test`, which installs it: missing there is a failure
            pytest.fail(f"checkov not found at {executable}")
        pytest.skip(f"checkov not found at {executable}: `make install` creates {CHECKOV_VENV.name} "
                    f"from {REQUIREMENTS.name} (or set CHECKOV to a checkov {pinned_checkov()} executable)")
    return executable


def canary(overlay: str) -> dict:
    """A workload with no skip annotation, an image by tag and pulled IfNotPresent: checkov must fail it."""
    doc = copy.deepcopy(find(render(overlay), "Deployment", "tlp-serving"))
    doc["metadata"].update(name=CANARY, namespace=CANARY, annotations={})
    container = doc["spec"]["template"]["spec"]["containers"][0]
    container.update(image="registry.example.com/canary:1.0", imagePullPolicy="IfNotPresent")
    return doc


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """{overlay: checkov's JSON report}. One checkov per overlay (its graph checks, such as "every pod has
    a NetworkPolicy", then see that overlay alone), all started at once."""
    executable = checkov_executable()
    env = {**os.environ, "CKV_SKIP_PACKAGE_UPDATE_CHECK": "true", "LOG_LEVEL": "WARNING"}
    running = {}
    for overlay in OVERLAYS:
        folder = tmp_path_factory.mktemp(f"checkov-{overlay}")
        (folder / f"{overlay}.yaml").write_text(yaml.safe_dump_all(render(overlay), sort_keys=False))
        (folder / f"{CANARY}.yaml").write_text(yaml.safe_dump(canary(overlay), sort_keys=False))
        # --skip-download: nothing is fetched from (or sent to) Prisma Cloud; the checks ship with checkov.
        command = [executable, "-f", f"{overlay}.yaml", "-f", f"{CANARY}.yaml", "--framework", "kubernetes",
                   "--compact", "--quiet", "--skip-download", "-o", "json"]
        running[overlay] = subprocess.Popen(command, cwd=folder, env=env, stdout=subprocess.PIPE,
                                            stderr=subprocess.PIPE, text=True)
    results = {}
    for overlay, process in running.items():
        stdout, stderr = process.communicate(timeout=300)
        try:
            report = json.loads(stdout)
        except json.JSONDecodeError:
            raise AssertionError(f"checkov on {overlay} printed no JSON (exit {process.returncode}):\n"
                                 f"{stdout[-2000:]}\n{stderr[-4000:]}") from None
        reports_ = report if isinstance(report, list) else [report]
        assert [r["check_type"] for r in reports_] == ["kubernetes"], [r.get("check_type") for r in reports_]
        results[overlay] = reports_[0]
    return results


def describe(failure: dict) -> str:
    return f"{failure['check_id']} {failure['resource']}: {failure['check_name']} ({failure['file_path']})"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_checkov_finds_nothing_unskipped_in_the_overlay(overlay, reports):
    report = reports[overlay]
    summary = report["summary"]
    assert summary["checkov_version"] == pinned_checkov()
    assert summary["parsing_errors"] == 0, summary
    # It read every document of the overlay (plus the canary, and the pods the workloads make).
    assert summary["resource_count"] >= len(render(overlay)) + 1, summary
    failed = report["results"].get("failed_checks", [])
    ours = [describe(f) for f in failed if not f["file_path"].endswith(f"/{CANARY}.yaml")]
    if ours:
        pytest.fail(f"checkov on k8s/overlays/{overlay} ({summary['passed']} passed, {summary['skipped']} "
                    f"skipped) fails:\n" + "\n".join(ours), pytrace=False)
    # The scanner has teeth, and the annotations are what keep those two checks quiet in the overlay.
    canary_checks = {f["check_id"] for f in failed if f["file_path"].endswith(f"/{CANARY}.yaml")}
    assert {"CKV_K8S_43", "CKV_K8S_15"} <= canary_checks, canary_checks


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_allowed_checks_are_skipped_each_with_a_reason(overlay):
    bad = []
    for doc in render(overlay):
        for key, value in (doc["metadata"].get("annotations") or {}).items():
            if SKIP_PREFIX not in key:
                continue
            name = f"{doc['kind']}/{doc['metadata']['name']}"
            check, sep, reason = str(value).partition("=")
            if not re.fullmatch(r"checkov\.io/skip\d+", key):
                bad.append(f"{name}: {key}: checkov documents the key as checkov.io/skip<N>")
            if overlay not in ALLOWED_SKIPS.get(check, ()):
                bad.append(f"{name}: skips {check}, which {overlay} may not skip (ALLOWED_SKIPS)")
            if not sep or not reason.strip() or "=" in reason:
                bad.append(f"{name}: {key}: write CHECK=reason, one '=' (checkov splits there)")
    assert not bad, "\n".join(bad)


def skipped(doc: dict) -> set[str]:
    return {str(v).partition("=")[0] for k, v in (doc["metadata"].get("annotations") or {}).items()
            if SKIP_PREFIX in k}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_images_pinned_by_tag_are_pulled_every_time(overlay):
    """A tag can be pushed again: Always, so every node runs the tag's current image. Only dev's project
    image, loaded into the node (kind load) rather than pulled, is used when present."""
    bad = []
    for doc, template in pod_templates(render(overlay)):
        for _, container in all_containers(template["spec"]):
            image, policy = container["image"], container.get("imagePullPolicy")
            project = image.split("@")[0].rsplit(":", 1)[0].rsplit("/", 1)[-1] in PROJECT_IMAGES
            if overlay == "dev" and project:
                if policy != "IfNotPresent" or "CKV_K8S_15" not in skipped(doc):
                    bad.append(f"{where(doc, container)}: {image} is loaded with kind load: IfNotPresent, "
                               f"and the workload skips CKV_K8S_15 (got {policy})")
            elif "@sha256:" not in image and policy != "Always":
                bad.append(f"{where(doc, container)}: {image} by tag is pulled {policy}, not Always")
    assert not bad, "\n".join(bad)
