"""k8s/: every overlay renders with `kubectl kustomize`, every document validates
strictly against the Kubernetes API schemas, and every stage of the pipeline is
there to deploy, labelled so it can be applied on its own."""

from __future__ import annotations

import re

import kubernetes_validate
import pytest

from k8s_support import (
    OVERLAYS,
    OVERLAYS_DIR,
    REPO_ROOT,
    REQUIRED_OVERLAYS,
    all_containers,
    find,
    find_prefixed,
    pod_templates,
    render,
    where,
)

# The Kubernetes versions the manifests must be valid for: the oldest supported
# cluster (Indexed Jobs with backoffLimitPerIndex are GA from 1.33) and the
# newest version kubernetes-validate 1.37.0 bundles. Both schemas ship with the
# package, so validation runs offline.
KUBERNETES_VERSIONS = ("1.33", "1.37")

STAGES = ("platform", "preprocess", "train", "train-multiworker", "tune", "serving", "predict", "tensorboard")
COMPONENT = "app.kubernetes.io/component"


def test_the_dev_and_gpu_overlays_exist():
    assert set(REQUIRED_OVERLAYS) <= set(OVERLAYS), f"overlays found: {OVERLAYS}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_with_kubectl_kustomize(overlay):
    docs = render(overlay)
    assert docs, f"k8s/overlays/{overlay} rendered nothing"
    assert all({"apiVersion", "kind", "metadata"} <= doc.keys() for doc in docs)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_document_validates_strictly(overlay, version):
    """No unknown fields, no wrong types, no kind without a schema (e.g. an uninstalled CRD)."""
    errors = []
    for doc in render(overlay):
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(part) for part in exc.path)
            errors.append(f"{name}: {path}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            errors.append(f"{name}: {exc.message}")
    assert not errors, f"k8s/overlays/{overlay} against Kubernetes {version}:\n" + "\n".join(errors)


def test_strict_validation_rejects_an_unknown_field():
    """The check above has teeth: a misspelt field fails it."""
    job = find(render("dev"), "Job", "tlp-train")
    broken = {**job, "spec": {**job["spec"], "backofLimit": 3}}
    with pytest.raises(kubernetes_validate.ValidationError, match="backofLimit"):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[0], strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_stage_is_deployable(overlay):
    docs = render(overlay)
    find(docs, "PersistentVolumeClaim", "tlp-workspace")
    find(docs, "Job", "tlp-preprocess")
    find(docs, "Job", "tlp-train")
    assert find(docs, "Job", "tlp-train-multiworker")["spec"]["completionMode"] == "Indexed"
    assert find(docs, "Service", "tlp-train-multiworker")["spec"]["clusterIP"] == "None"
    find(docs, "Job", "tlp-tune-chief")
    assert find(docs, "Job", "tlp-tune-workers")["spec"]["completionMode"] == "Indexed"
    find(docs, "Service", "tlp-tune-oracle")
    for kind in ("Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy"):
        find(docs, kind, "tlp-serving")
    find_prefixed(docs, "ConfigMap", "tlp-serving-config")
    find(docs, "Deployment", "tlp-tensorboard")
    find(docs, "Service", "tlp-tensorboard")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_everything_lives_in_the_overlays_namespace(overlay):
    docs = render(overlay)
    namespaces = [doc["metadata"]["name"] for doc in docs if doc["kind"] == "Namespace"]
    assert len(namespaces) == 1, f"expected the overlay to create one Namespace, found {namespaces}"
    outside = [f"{d['kind']}/{d['metadata']['name']}" for d in docs
               if d["kind"] != "Namespace" and d["metadata"].get("namespace") != namespaces[0]]
    assert not outside, f"not in namespace {namespaces[0]}: {outside}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_is_labelled_with_its_stage(overlay):
    """`kubectl apply -k OVERLAY -l app.kubernetes.io/component=<stage>` applies one stage at a time."""
    docs = render(overlay)
    unlabelled = [f"{d['kind']}/{d['metadata']['name']}" for d in docs
                  if d["metadata"].get("labels", {}).get(COMPONENT) not in STAGES]
    assert not unlabelled, f"objects without a known {COMPONENT} label: {unlabelled}"
    assert {d["metadata"]["labels"][COMPONENT] for d in docs} == set(STAGES)
    for doc, template in pod_templates(docs):
        assert template["metadata"]["labels"].get(COMPONENT) == doc["metadata"]["labels"][COMPONENT], doc["metadata"]["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_service_selects_pods_of_a_workload(overlay):
    docs = render(overlay)
    templates = [template["metadata"].get("labels", {}) for _, template in pod_templates(docs)]
    for service in (d for d in docs if d["kind"] == "Service"):
        selector = service["spec"]["selector"]
        assert any(all(labels.get(k) == v for k, v in selector.items()) for labels in templates), (
            f"Service/{service['metadata']['name']} selects no pod template: {selector}")


def test_the_guide_names_only_stages_and_overlays_that_exist():
    """docs/kubernetes.md's commands use real overlay folders and stage labels."""
    guide = (REPO_ROOT / "docs" / "kubernetes.md").read_text()
    overlays = set(re.findall(r"k8s/overlays/([\w-]+)", guide))
    assert set(REQUIRED_OVERLAYS) <= overlays, "the guide should show how to apply the dev and gpu overlays"
    assert overlays <= {p.name for p in OVERLAYS_DIR.iterdir()}, overlays
    stages = set(re.findall(rf"{COMPONENT}=([\w-]+)", guide))
    for group in re.findall(rf"{COMPONENT} in \(([^)]*)\)", guide):
        stages |= {s.strip() for s in group.split(",")}
    assert stages, "the guide should apply the stages one at a time with -l app.kubernetes.io/component=..."
    assert stages <= set(STAGES), stages - set(STAGES)


def cpus(quantity) -> float:
    """A Kubernetes CPU quantity ("2", "500m") in cores."""
    text = str(quantity)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


def pipeline_commands(overlay):
    """(where, program, argv) for every container that runs one of the project's commands."""
    for doc, template in pod_templates(render(overlay)):
        for _, container in all_containers(template["spec"]):
            command, args = container.get("command", []), container.get("args", [])
            if command[:1] in (["tlp-train"], ["tlp-preprocess"]):
                yield where(doc, container), command[0], command[1:] + args
            elif command[:2] == ["/bin/sh", "-c"] and len(command) > 2 and 'exec tlp-train "$@"' in command[2]:
                yield where(doc, container), "tlp-train", args  # the TF_CONFIG wrapper


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_training_command_parses_with_the_trainers_own_cli(overlay):
    trainer_cli = pytest.importorskip("trainer.cli", reason="the trainer package is not importable")
    commands = [(w, argv) for w, program, argv in pipeline_commands(overlay) if program == "tlp-train"]
    assert len(commands) == 4, commands  # train, the multi-worker job, the tuning chief and workers
    for where_, argv in commands:
        try:
            config = trainer_cli.config_from_args(trainer_cli.build_parser().parse_args(argv))
        except SystemExit:
            pytest.fail(f"{where_}: tlp-train rejects {argv}")
        assert (config.data_dir, config.job_dir) == ("/workspace/data", "/workspace/job"), where_


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_preprocessing_command_parses_with_its_own_cli_and_beam(overlay):
    preprocessing_cli = pytest.importorskip("preprocessing.cli", reason="the preprocessing package is not importable")
    from apache_beam.options.pipeline_options import PipelineOptions

    commands = [(w, argv) for w, program, argv in pipeline_commands(overlay) if program == "tlp-preprocess"]
    assert len(commands) == 1, commands
    where_, argv = commands[0]
    try:
        known, beam_args = preprocessing_cli.build_parser().parse_known_args(argv)
        config = preprocessing_cli.config_from_args(known)
    except SystemExit:
        pytest.fail(f"{where_}: tlp-preprocess rejects {argv}")
    assert (config.input, config.output) == ("/workspace/images", "/workspace/data")
    beam_options = PipelineOptions(beam_args).get_all_options()
    unknown = [arg for arg in beam_args if arg.split("=", 1)[0].lstrip("-") not in beam_options]
    assert not unknown, f"{where_}: flags neither tlp-preprocess nor Beam knows: {unknown}"
    # One Beam worker process per CPU the container may use (it sees all the node's cores otherwise).
    limits = next(c for _, t in pod_templates(render(overlay)) for _, c in all_containers(t["spec"])
                  if c.get("command") == ["tlp-preprocess"])["resources"]["limits"]
    assert beam_options["direct_num_workers"] == max(1, int(cpus(limits["cpu"]))), where_


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_command_is_one_the_image_provides(overlay):
    """Console scripts from pyproject.toml, TensorBoard (a dependency), the shell, or TF Serving's server."""
    scripts = set(re.findall(r'^(tlp-[\w-]+)\s*=', (REPO_ROOT / "pyproject.toml").read_text(), re.MULTILINE))
    allowed = scripts | {"tensorboard", "/bin/sh", "/usr/bin/tensorflow_model_server"}
    for doc, template in pod_templates(render(overlay)):
        for _, container in all_containers(template["spec"]):
            assert container.get("command", [None])[0] in allowed, (where(doc, container), container.get("command"))
