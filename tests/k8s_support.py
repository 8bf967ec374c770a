"""Rendering and reading the Kubernetes manifests under k8s/ (used by tests/test_k8s_*.py).

Each overlay is rendered once per test session with the real ``kubectl kustomize``.
"""

from __future__ import annotations

import functools
import pathlib
import re
import shutil
import subprocess

import pytest
import yaml

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
K8S = REPO_ROOT / "k8s"
OVERLAYS_DIR = K8S / "overlays"
# Overlays found on disk; the tests also insist these two exist.
OVERLAYS = sorted(p.name for p in OVERLAYS_DIR.iterdir() if (p / "kustomization.yaml").is_file())
REQUIRED_OVERLAYS = ("dev", "gpu")

PROJECT_IMAGES = ("transfer-learning-pipeline", "transfer-learning-pipeline-gpu")
POD_TEMPLATE_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job")


def _pyproject() -> str:
    # Read with a regular expression: tomllib is Python 3.11+, the project supports 3.10.
    return (REPO_ROOT / "pyproject.toml").read_text()


def project_version() -> str:
    match = re.search(r'^version\s*=\s*"([^"]+)"', _pyproject(), re.MULTILINE)
    assert match, "pyproject.toml has no version"
    return match.group(1)


def pinned_dependency(name: str) -> str:
    """The exact version pyproject.toml pins ``name`` to (``"name==X"`` or ``"name[extra]==X"``)."""
    match = re.search(rf'"{re.escape(name)}(?:\[[^\]]*\])?==([^";\s]+)"', _pyproject())
    assert match, f"{name} is not pinned in pyproject.toml"
    return match.group(1)


def require_kubectl() -> str:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the manifests are rendered with `kubectl kustomize` "
                    "(install kubectl >= 1.27 to run the Kubernetes tests)")
    return kubectl


@functools.lru_cache(maxsize=None)
def _render(path: str) -> tuple[dict, ...]:
    kubectl = require_kubectl()
    result = subprocess.run([kubectl, "kustomize", path], capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise AssertionError(f"`kubectl kustomize {path}` failed:\n{result.stderr}")
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def render(overlay: str) -> list[dict]:
    """The documents ``kubectl kustomize k8s/overlays/<overlay>`` prints (cached for the session)."""
    return list(_render(str(OVERLAYS_DIR / overlay)))


def find(docs: list[dict], kind: str, name: str) -> dict:
    for doc in docs:
        if doc["kind"] == kind and doc["metadata"]["name"] == name:
            return doc
    raise AssertionError(f"no {kind} named {name!r} in the rendered overlay")


def find_prefixed(docs: list[dict], kind: str, prefix: str) -> dict:
    """A generated object (ConfigMap names carry a content hash suffix)."""
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].startswith(prefix + "-")]
    assert len(matches) == 1, f"expected one {kind} named {prefix}-<hash>, found {len(matches)}"
    return matches[0]


def pod_templates(docs: list[dict]):
    """(document, pod template) for every workload that creates pods."""
    for doc in docs:
        if doc["kind"] in POD_TEMPLATE_KINDS:
            yield doc, doc["spec"]["template"]
        elif doc["kind"] == "CronJob":
            yield doc, doc["spec"]["jobTemplate"]["spec"]["template"]


def all_containers(pod_spec: dict):
    """Init containers and containers, each as (kind, container)."""
    for container in pod_spec.get("initContainers", []):
        yield "initContainer", container
    for container in pod_spec.get("containers", []):
        yield "container", container


def where(doc: dict, container: dict | None = None) -> str:
    name = f"{doc['kind']}/{doc['metadata']['name']}"
    return f"{name} container {container['name']}" if container else name


def env_value(container: dict, name: str) -> str | None:
    for var in container.get("env", []):
        if var["name"] == name:
            return var.get("value")
    return None


def env_var(container: dict, name: str) -> dict:
    for var in container.get("env", []):
        if var["name"] == name:
            return var
    raise AssertionError(f"container {container['name']} has no env var {name}")


def flag(container: dict, name: str) -> str | None:
    """The value of ``--name=value`` in the container's args (None when absent)."""
    for arg in container.get("args", []):
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
    return None


def labels_match(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(key) == value for key, value in selector.items())
