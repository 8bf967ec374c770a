"""Security defaults on every workload of every overlay, and the wiring of the
distributed jobs (multi-worker training, distributed tuning)."""

from __future__ import annotations

import json
import os
import pathlib
import re
import stat
import subprocess

import pytest

from k8s_support import (
    OVERLAYS,
    PROJECT_IMAGES,
    REPO_ROOT,
    all_containers,
    env_value,
    env_var,
    find,
    labels_match,
    pod_templates,
    project_version,
    render,
    where,
)

GPU = "nvidia.com/gpu"
GPU_JOBS = ("tlp-train", "tlp-train-multiworker", "tlp-tune-chief", "tlp-tune-workers")
COMPLETION_INDEX = "metadata.annotations['batch.kubernetes.io/job-completion-index']"


def pods(overlay):
    return list(pod_templates(render(overlay)))


def containers(overlay):
    for doc, template in pods(overlay):
        for _, container in all_containers(template["spec"]):
            yield doc, template["spec"], container


def assert_none(violations, what):
    assert not violations, f"{what}:\n" + "\n".join(violations)


# --- security defaults ------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_run_as_non_root_with_the_runtime_default_seccomp_profile(overlay):
    bad = []
    for doc, template in pods(overlay):
        ctx = template["spec"].get("securityContext", {})
        if ctx.get("runAsNonRoot") is not True or not ctx.get("runAsUser"):
            bad.append(f"{where(doc)}: runAsNonRoot/runAsUser (non-zero) not set for the pod")
        if ctx.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            bad.append(f"{where(doc)}: seccompProfile is not RuntimeDefault")
    assert_none(bad, "pods")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_drops_all_capabilities_and_cannot_escalate(overlay):
    bad = []
    for doc, _, container in containers(overlay):
        ctx = container.get("securityContext", {})
        if ctx.get("allowPrivilegeEscalation") is not False:
            bad.append(f"{where(doc, container)}: allowPrivilegeEscalation is not false")
        if ctx.get("capabilities", {}).get("drop") != ["ALL"] or ctx.get("capabilities", {}).get("add"):
            bad.append(f"{where(doc, container)}: capabilities are not exactly drop [ALL]")
        if ctx.get("privileged") or ctx.get("runAsUser") == 0 or ctx.get("runAsNonRoot") is False:
            bad.append(f"{where(doc, container)}: privileged or root")
    assert_none(bad, "containers")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_has_a_read_only_root_and_a_writable_tmp(overlay):
    """Writable space only where needed: /tmp (and /dev/shm) from emptyDir, the workspace volume."""
    bad = []
    for doc, spec, container in containers(overlay):
        if container.get("securityContext", {}).get("readOnlyRootFilesystem") is not True:
            bad.append(f"{where(doc, container)}: readOnlyRootFilesystem is not true")
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        tmp = [m for m in container.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
        if not tmp or "emptyDir" not in volumes.get(tmp[0]["name"], {}):
            bad.append(f"{where(doc, container)}: no emptyDir at /tmp")
    assert_none(bad, "containers")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_has_cpu_and_memory_requests_and_limits(overlay):
    bad = []
    for doc, _, container in containers(overlay):
        resources = container.get("resources", {})
        for part in ("requests", "limits"):
            missing = {"cpu", "memory"} - set(resources.get(part, {}))
            if missing:
                bad.append(f"{where(doc, container)}: no {part} for {sorted(missing)}")
    assert_none(bad, "containers (init containers included)")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_pod_mounts_a_service_account_token_or_shares_the_hosts_namespaces(overlay):
    docs = render(overlay)
    accounts = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ServiceAccount"}
    bad = []
    for doc, template in pods(overlay):
        spec = template["spec"]
        account = spec.get("serviceAccountName", "default")
        if account not in accounts:
            bad.append(f"{where(doc)}: runs as service account {account!r}, not one the overlay creates")
        elif accounts[account].get("automountServiceAccountToken") is not False:
            bad.append(f"ServiceAccount/{account}: automountServiceAccountToken is not false")
        if spec.get("automountServiceAccountToken") is not False:
            bad.append(f"{where(doc)}: automountServiceAccountToken is not false")
        for key in ("hostNetwork", "hostPID", "hostIPC"):
            if spec.get(key):
                bad.append(f"{where(doc)}: {key}")
        bad += [f"{where(doc)}: hostPath volume {v['name']}" for v in spec.get("volumes", []) if "hostPath" in v]
    assert_none(bad, "pods")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_namespace_enforces_the_restricted_pod_security_standard(overlay):
    namespace = next(d for d in render(overlay) if d["kind"] == "Namespace")
    assert namespace["metadata"]["labels"].get("pod-security.kubernetes.io/enforce") == "restricted"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_image_is_pinned_and_the_project_image_to_the_project_version(overlay):
    version = project_version()
    bad = []
    for doc, _, container in containers(overlay):
        image = container["image"]
        name, _, tag = image.rpartition(":") if "@" not in image else (image, "", "digest")
        if not tag or "/" in tag or tag == "latest":
            bad.append(f"{where(doc, container)}: image {image} is not pinned to a version")
        elif name.rsplit("/", 1)[-1] in PROJECT_IMAGES and tag != version:
            bad.append(f"{where(doc, container)}: project image {image} is not tagged {version}")
    assert_none(bad, "images")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_project_containers_run_as_the_images_user(overlay):
    """The Dockerfiles' USER is the uid the pods run the project image as (files on the volume match)."""
    uids = set()
    for path in ("Dockerfile", "Dockerfile.gpu"):
        users = re.findall(r"^USER\s+(\d+)(?::\d+)?\s*$", (REPO_ROOT / path).read_text(), re.MULTILINE)
        assert users, f"{path} has no numeric USER"
        uids.add(int(users[-1]))
    assert len(uids) == 1, f"Dockerfile and Dockerfile.gpu run as different users: {uids}"
    for doc, template in pods(overlay):
        images = [c["image"].rsplit("/", 1)[-1].split(":")[0] for _, c in all_containers(template["spec"])]
        if set(images) & set(PROJECT_IMAGES):
            assert template["spec"]["securityContext"]["runAsUser"] in uids, where(doc)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_on_the_workspace_volume_has_the_same_fs_group(overlay):
    """One group owns the shared volume; a second fsGroup would have the kubelet re-own it back and forth."""
    groups = {}
    for doc, template in pods(overlay):
        spec = template["spec"]
        if any(v.get("persistentVolumeClaim", {}).get("claimName") == "tlp-workspace" for v in spec.get("volumes", [])):
            groups[where(doc)] = spec["securityContext"].get("fsGroup")
    assert len(groups) >= 6 and len(set(groups.values())) == 1 and None not in groups.values(), groups


# --- accelerators ------------------------------------------------------------


def test_the_gpu_overlay_puts_each_training_pod_on_one_gpu():
    docs = render("gpu")
    for name in GPU_JOBS:
        spec = find(docs, "Job", name)["spec"]["template"]["spec"]
        resources = spec["containers"][0]["resources"]
        assert resources["limits"].get(GPU) == "1" and resources["requests"].get(GPU) == "1", name
        assert spec.get("nodeSelector"), f"{name}: no node selector for the GPU nodes"
        assert any(t.get("key") == GPU for t in spec.get("tolerations", [])), f"{name}: no {GPU} toleration"
        assert spec["containers"][0]["image"].split(":")[0].endswith("transfer-learning-pipeline-gpu"), name


def test_the_dev_overlay_needs_no_gpu():
    bad = []
    for doc, spec, container in containers("dev"):
        resources = container.get("resources", {})
        if GPU in resources.get("limits", {}) or GPU in resources.get("requests", {}):
            bad.append(f"{where(doc, container)} requests a GPU")
        if spec.get("nodeSelector") or spec.get("tolerations"):
            bad.append(f"{where(doc)} has a node selector or tolerations")
        if container["image"].split(":")[0].endswith("-gpu"):
            bad.append(f"{where(doc, container)} uses the GPU image")
    assert_none(bad, "dev")


# --- multi-worker training ---------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_multi_worker_job_and_its_headless_service_agree(overlay):
    docs = render(overlay)
    job = find(docs, "Job", "tlp-train-multiworker")
    service = find(docs, "Service", "tlp-train-multiworker")
    spec = job["spec"]
    pod = spec["template"]["spec"]
    worker = pod["containers"][0]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == int(env_value(worker, "NUM_WORKERS")), (
        "completions, parallelism and NUM_WORKERS must be the same number")
    assert env_value(worker, "JOB_NAME") == job["metadata"]["name"]
    assert pod["subdomain"] == service["metadata"]["name"] == env_value(worker, "SERVICE_NAME")
    assert service["spec"]["clusterIP"] == "None" and service["spec"].get("publishNotReadyAddresses") is True
    assert labels_match(service["spec"]["selector"], spec["template"]["metadata"]["labels"])
    port = int(env_value(worker, "WORKER_PORT"))
    assert port in [p["containerPort"] for p in worker["ports"]]
    assert port in [p["port"] for p in service["spec"]["ports"]]
    assert env_var(worker, "WORKER_INDEX")["valueFrom"]["fieldRef"]["fieldPath"] == COMPLETION_INDEX


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_worker_builds_its_tf_config_from_its_completion_index(overlay, tmp_path):
    """Run the pod's real wrapper script with `sh`; a stand-in `tlp-train` records what it was given.

    Every worker gets the same TF_CONFIG cluster and its own index; only worker 0 writes the shared job folder.
    """
    job = find(render(overlay), "Job", "tlp-train-multiworker")
    worker = job["spec"]["template"]["spec"]["containers"][0]
    stand_in = tmp_path / "tlp-train"
    stand_in.write_text('#!/bin/sh\nprintf \'%s\\n\' "$TF_CONFIG" "$@" > "$RECORD"\n')
    stand_in.chmod(stand_in.stat().st_mode | stat.S_IXUSR)
    workers = int(env_value(worker, "NUM_WORKERS"))
    record = tmp_path / "record"
    env = {"PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}", "RECORD": str(record)}
    env.update({v["name"]: v["value"] for v in worker["env"] if "value" in v})
    expected_hosts = [f"tlp-train-multiworker-{i}.tlp-train-multiworker:2222" for i in range(workers)]
    for index in range(workers):
        subprocess.run(worker["command"] + worker["args"], env={**env, "WORKER_INDEX": str(index)},
                       capture_output=True, text=True, timeout=30, check=True)
        tf_config, *args = record.read_text().splitlines()
        assert json.loads(tf_config) == {"cluster": {"worker": expected_hosts},
                                         "task": {"type": "worker", "index": index}}
        if index == 0:
            assert args == worker["args"], "worker 0 must get the container's args unchanged"
        else:
            scratch = env_value(worker, "SCRATCH_JOB_DIR")
            assert scratch.startswith("/tmp/"), "other workers write to scratch space, not the shared volume"
            assert args == [f"--job-dir={scratch}" if a.startswith("--job-dir=") else a for a in worker["args"]]


# --- distributed tuning ------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_tuning_workers_reach_the_chiefs_oracle_through_the_service(overlay):
    docs = render(overlay)
    chief_job = find(docs, "Job", "tlp-tune-chief")
    chief = chief_job["spec"]["template"]["spec"]["containers"][0]
    workers_job = find(docs, "Job", "tlp-tune-workers")
    worker = workers_job["spec"]["template"]["spec"]["containers"][0]
    service = find(docs, "Service", "tlp-tune-oracle")

    assert env_value(chief, "KERASTUNER_TUNER_ID") == "chief"
    assert env_value(chief, "KERASTUNER_ORACLE_IP") == "0.0.0.0"
    port = int(env_value(chief, "KERASTUNER_ORACLE_PORT"))
    assert port in [p["containerPort"] for p in chief["ports"]]
    assert labels_match(service["spec"]["selector"], chief_job["spec"]["template"]["metadata"]["labels"])
    assert not labels_match(service["spec"]["selector"], workers_job["spec"]["template"]["metadata"]["labels"])
    assert [p["port"] for p in service["spec"]["ports"]] == [port]

    assert workers_job["spec"]["completionMode"] == "Indexed"
    assert env_value(worker, "KERASTUNER_ORACLE_IP") == service["metadata"]["name"]
    assert int(env_value(worker, "KERASTUNER_ORACLE_PORT")) == port
    names = [v["name"] for v in worker["env"]]
    assert env_value(worker, "KERASTUNER_TUNER_ID") == "tuner$(TUNER_INDEX)"
    # $(VAR) expands only variables defined earlier in the list.
    assert names.index("TUNER_INDEX") < names.index("KERASTUNER_TUNER_ID")
    assert env_var(worker, "TUNER_INDEX")["valueFrom"]["fieldRef"]["fieldPath"] == COMPLETION_INDEX
    # Chief and workers run the same search, from the same (GPU) image.
    assert chief["command"] == worker["command"] == ["tlp-train"] and chief["image"] == worker["image"]
    assert chief["args"] == worker["args"]


# --- the image ---------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.gpu"])
def test_the_dockerfile_installs_the_pinned_project_as_a_non_root_user(dockerfile):
    text = (REPO_ROOT / dockerfile).read_text()
    bases = re.findall(r"^FROM\s+(\S+)", text, re.MULTILINE)
    args = dict(re.findall(r"^ARG\s+(\w+)=(\S+)", text, re.MULTILINE))
    for base in bases:
        image = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), base)
        assert re.search(r":\d[\w.-]*$", image) or "@sha256:" in image, f"{dockerfile}: base image {image} not pinned"
    assert re.search(r"pip install .*-c constraints\.txt", text), f"{dockerfile}: not installed with -c constraints.txt"
    user = re.findall(r"^USER\s+(\S+)", text, re.MULTILINE)
    assert user and user[-1].split(":")[0] not in ("0", "root"), f"{dockerfile}: the image runs as root"
    for source in re.findall(r"^COPY\s+(?!--from)(.+)\s+\S+$", text, re.MULTILINE):
        for path in source.split():
            assert (REPO_ROOT / path).exists(), f"{dockerfile}: COPY {path}: no such file in the repository"


def test_the_docker_build_context_leaves_out_local_state():
    ignored = {line.strip().strip("/") for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()}
    assert {".git", ".venv"} <= ignored, ignored
    assert not {"pyproject.toml", "constraints.txt", "preprocessing", "trainer", "serving"} & ignored
