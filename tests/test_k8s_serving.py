"""The TF Serving deployment agrees with serving/config/: the config files it
mounts are the project's, the model name and base path match the volume and
the probes, the ports match the Service, and the metrics path is the one
Prometheus scrapes. Plus the autoscaler, disruption budget and network policy."""

from __future__ import annotations

import re

import pytest
from google.protobuf import text_format

from k8s_support import (
    K8S,
    OVERLAYS,
    REPO_ROOT,
    find,
    find_prefixed,
    flag,
    labels_match,
    render,
)

CONFIG_FILES = ("models.config", "batching.config", "monitoring.config")
PROJECT_CONFIG = REPO_ROOT / "serving" / "config"
K8S_CONFIG = K8S / "base" / "serving"
MODEL_NAME = "classifier"
MODEL_BASE_PATH = "/models/classifier"
GRPC_PORT, REST_PORT = 8500, 8501
CLIENTS_NAMESPACE = "tlp-clients"


def serving(overlay):
    docs = render(overlay)
    deployment = find(docs, "Deployment", "tlp-serving")
    pod = deployment["spec"]["template"]
    container = next(c for c in pod["spec"]["containers"] if c["name"] == "tensorflow-serving")
    return docs, deployment, pod, container


def mounted_file(pod, container, path, docs):
    """The content of the ConfigMap key mounted at ``path`` in ``container``."""
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    for mount in container["volumeMounts"]:
        prefix = mount["mountPath"].rstrip("/") + "/"
        if path.startswith(prefix) and "configMap" in volumes[mount["name"]]:
            config_map = find(docs, "ConfigMap", volumes[mount["name"]]["configMap"]["name"])
            key = path[len(prefix):]
            assert key in config_map["data"], f"{path}: no key {key!r} in ConfigMap {config_map['metadata']['name']}"
            return config_map["data"][key]
    raise AssertionError(f"{path} is not in a ConfigMap mounted in the serving container")


def model_config(text):
    from tensorflow_serving.config import model_server_config_pb2

    return text_format.Parse(text, model_server_config_pb2.ModelServerConfig())


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_the_k8s_copy_of_each_serving_config_file_is_identical_to_serving_config(name):
    """kustomize reads no file outside k8s/: k8s/base/serving/ keeps copies of serving/config/*."""
    source = PROJECT_CONFIG / name
    assert source.is_file(), f"serving/config/{name} is missing (the copy in k8s/base/serving/ has nothing to match)"
    assert (K8S_CONFIG / name).read_bytes() == source.read_bytes(), (
        f"k8s/base/serving/{name} differs from serving/config/{name}: cp serving/config/{name} k8s/base/serving/")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_server_reads_the_three_config_files_from_the_configmap(overlay):
    docs, _, pod, container = serving(overlay)
    assert find_prefixed(docs, "ConfigMap", "tlp-serving-config")
    for option, name in (("model_config_file", "models.config"), ("batching_parameters_file", "batching.config"),
                         ("monitoring_config_file", "monitoring.config")):
        path = flag(container, option)
        assert path and path.endswith("/" + name), f"--{option} should name {name}, got {path}"
        assert mounted_file(pod, container, path, docs) == (K8S_CONFIG / name).read_text()
    assert flag(container, "enable_batching") == "true"
    from serving import protos

    batching = mounted_file(pod, container, flag(container, "batching_parameters_file"), docs)
    assert protos.parse_text(batching, protos.BatchingParameters()).max_batch_size.value > 0


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_model_name_and_base_path_match_the_volume_and_the_probes(overlay):
    docs, _, pod, container = serving(overlay)
    config = model_config(mounted_file(pod, container, flag(container, "model_config_file"), docs))
    models = {m.name: m for m in config.model_config_list.config}
    assert list(models) == [MODEL_NAME]
    model = models[MODEL_NAME]
    assert model.base_path == MODEL_BASE_PATH
    assert model.model_platform in ("", "tensorflow")
    if model.version_labels:
        # Labels name versions given at start-up, before they are loaded.
        assert flag(container, "allow_version_labels_for_unavailable_models") == "true"
    # The base path is where the trainer's job/export/ is mounted, read-only.
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert model.base_path in mounts, f"nothing mounted at {model.base_path}"
    export = mounts[model.base_path]
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert export.get("readOnly") is True
    assert export.get("subPath") == "job/export"
    claim = volumes[export["name"]]["persistentVolumeClaim"]["claimName"]
    train = find(docs, "Job", "tlp-train")["spec"]["template"]["spec"]
    train_mount = next(m for m in train["containers"][0]["volumeMounts"] if m["name"] == "workspace")
    assert next(v for v in train["volumes"] if v["name"] == "workspace")["persistentVolumeClaim"]["claimName"] == claim
    assert f"{train_mount['mountPath']}/{export['subPath']}" == "/workspace/job/export"
    # Readiness and startup need the model loaded (its metadata), liveness the model known (its status).
    for probe in ("startupProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["path"] == f"/v1/models/{MODEL_NAME}/metadata", probe
    assert container["livenessProbe"]["httpGet"]["path"] == f"/v1/models/{MODEL_NAME}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_grpc_and_rest_ports_match_the_flags_the_probes_and_the_service(overlay):
    docs, _, pod, container = serving(overlay)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": GRPC_PORT, "http": REST_PORT}
    assert flag(container, "port") == str(GRPC_PORT)
    assert flag(container, "rest_api_port") == str(REST_PORT)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] in ("http", REST_PORT), probe
    service = find(docs, "Service", "tlp-serving")
    assert labels_match(service["spec"]["selector"], pod["metadata"]["labels"])
    by_port = {p["port"]: p["targetPort"] for p in service["spec"]["ports"]}
    assert set(by_port) == {GRPC_PORT, REST_PORT}
    for port, target in by_port.items():
        assert ports.get(target, target) == port, f"Service port {port} goes to {target}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_prometheus_scrapes_the_path_monitoring_config_enables_on_the_rest_port(overlay):
    docs, _, pod, container = serving(overlay)
    from serving import protos

    text = mounted_file(pod, container, flag(container, "monitoring_config_file"), docs)
    prometheus = protos.parse_text(text, protos.MonitoringConfig()).prometheus_config
    assert prometheus.enable, "monitoring.config does not enable the Prometheus endpoint"
    path = prometheus.path or "/monitoring/prometheus/metrics"  # TF Serving's default path
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == path
    assert annotations["prometheus.io/port"] == str(REST_PORT)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_server_is_the_pinned_official_tf_serving_release(overlay):
    """The newest TF Serving release that exists (2.20.0; there is no 2.21.0 image), whatever the client pins."""
    from serving import TF_SERVING_IMAGE

    _, _, _, container = serving(overlay)
    assert container["image"] in (TF_SERVING_IMAGE, f"{TF_SERVING_IMAGE}-gpu")


def test_the_docs_name_the_same_tf_serving_image():
    from serving import TF_SERVING_IMAGE

    for doc in ("serving/config/README.md", "docs/kubernetes.md", "README.md"):
        text = (REPO_ROOT / doc).read_text()
        tags = set(re.findall(r"tensorflow/serving:([0-9][0-9.]*[0-9])", text))
        assert tags <= {TF_SERVING_IMAGE.split(":")[1]}, (doc, tags)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_autoscaler_and_disruption_budget_cover_the_serving_pods(overlay):
    docs, deployment, pod, container = serving(overlay)
    hpa = find(docs, "HorizontalPodAutoscaler", "tlp-serving")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "tlp-serving")
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    assert any(m["type"] == "Resource" and m["resource"]["name"] == "cpu" for m in hpa["spec"]["metrics"])
    assert "replicas" not in deployment["spec"], "the autoscaler owns the replica count"
    pdb = find(docs, "PodDisruptionBudget", "tlp-serving")
    assert labels_match(pdb["spec"]["selector"]["matchLabels"], pod["metadata"]["labels"])
    # A budget that allows no eviction at the minimum size would block node drains.
    if "minAvailable" in pdb["spec"]:
        assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_network_policy_admits_only_the_clients_namespace_to_the_model(overlay):
    docs, _, pod, _ = serving(overlay)
    policy = find(docs, "NetworkPolicy", "tlp-serving")["spec"]
    assert labels_match(policy["podSelector"]["matchLabels"], pod["metadata"]["labels"])
    assert "Ingress" in policy["policyTypes"]
    admitted = {}
    for rule in policy["ingress"]:
        assert rule.get("from") and rule.get("ports"), f"a rule admitting every source or port: {rule}"
        ports = {p["port"] for p in rule["ports"]}
        for peer in rule["from"]:
            assert set(peer) == {"namespaceSelector"}, f"only namespaces are admitted, not {peer}"
            namespace = peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
            admitted.setdefault(namespace, set()).update(ports)
    assert admitted.pop(CLIENTS_NAMESPACE) == {GRPC_PORT, REST_PORT}
    # Anyone else (the metrics scraper) reaches the REST port only, never gRPC predictions.
    assert all(ports == {REST_PORT} for ports in admitted.values()), admitted
