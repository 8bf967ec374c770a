"""The NetworkPolicies of every overlay, evaluated on the rendered manifests.

A small evaluator of NetworkPolicy semantics (label selectors, namespace
selectors, policy types, ports, named ports, ipBlocks) answers "may pod A open
a connection to B on port P?" for the pods the overlay's workloads create. The
tests then check, for whatever workloads the overlays contain:

- every pod is selected by a policy, and the namespace denies by default;
- every address:port a pod is configured to use inside the namespace (the
  TF_CONFIG its wrapper builds, the Keras Tuner oracle, any Service named in
  an argument or environment variable) is allowed, and no pod-to-pod
  connection that nothing uses is;
- serving (gRPC and REST) and TensorBoard admit only the namespaces meant to
  reach them, DNS works everywhere, and only the pods that download weights or
  may use a bucket reach the outside, on HTTPS only.

Kubelet probes and `kubectl port-forward` do not cross NetworkPolicies and are
not modelled.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import re
import stat
import subprocess

import pytest

from k8s_support import OVERLAYS, all_containers, find, flag, pod_templates, render

NAME = "app.kubernetes.io/name"
NS_NAME = "kubernetes.io/metadata.name"  # the label the API server puts on every namespace
CLIENTS, MONITORING = "tlp-clients", "monitoring"
INTERNET_IP = "142.250.74.91"  # any address outside the cluster (a storage.googleapis.com one)


# --- the evaluator -----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """A pod (labels, namespace and its namespace's labels, named ports) or an address outside the cluster."""

    name: str
    namespace: str | None = None
    labels: tuple = ()
    namespace_labels: tuple = ()
    ports: tuple = ()  # ((name, port, protocol), ...)
    ip: str | None = None

    @property
    def is_pod(self) -> bool:
        return self.namespace is not None

    def port_named(self, name: str, protocol: str) -> int | None:
        return next((p for n, p, proto in self.ports if n == name and proto == protocol), None)


def selects(selector: dict | None, labels: dict) -> bool:
    """A LabelSelector (matchLabels and matchExpressions); {} selects everything."""
    selector = selector or {}
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        ok = {"In": key in labels and labels[key] in values,
              "NotIn": key not in labels or labels[key] not in values,
              "Exists": key in labels,
              "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True


def peer_matches(peer: dict, policy_namespace: str, other: Endpoint) -> bool:
    if "ipBlock" in peer:
        if other.is_pod:
            return False  # pod addresses are not known statically; the policies here give none
        address = ipaddress.ip_address(other.ip)
        block = peer["ipBlock"]
        return (address in ipaddress.ip_network(block["cidr"])
                and not any(address in ipaddress.ip_network(c) for c in block.get("except", [])))
    if not other.is_pod:
        return False
    if "namespaceSelector" in peer:
        if not selects(peer["namespaceSelector"], dict(other.namespace_labels)):
            return False
    elif other.namespace != policy_namespace:
        return False
    return selects(peer.get("podSelector"), dict(other.labels))


def port_matches(rule_ports: list | None, destination: Endpoint, port: int, protocol: str) -> bool:
    if not rule_ports:
        return True
    for entry in rule_ports:
        if entry.get("protocol", "TCP") != protocol:
            continue
        wanted = entry.get("port")
        if wanted is None:
            return True
        if isinstance(wanted, str):
            wanted = destination.port_named(wanted, protocol)
            if wanted is None:
                continue
        if wanted <= port <= entry.get("endPort", wanted):
            return True
    return False


def policy_types(policy: dict) -> list[str]:
    spec = policy["spec"]
    return spec.get("policyTypes") or (["Ingress"] + (["Egress"] if "egress" in spec else []))


def side_allows(policies, pod: Endpoint, direction: str, other: Endpoint, destination: Endpoint,
                port: int, protocol: str) -> bool:
    """Whether ``pod``'s own policies let this connection out (Egress) or in (Ingress)."""
    if not pod.is_pod:
        return True  # the far end's own rules are not ours to model
    applicable = [p for p in policies
                  if p["metadata"]["namespace"] == pod.namespace
                  and selects(p["spec"].get("podSelector"), dict(pod.labels))
                  and direction in policy_types(p)]
    if not applicable:
        return True  # not isolated in this direction
    rules_key, peers_key = ("egress", "to") if direction == "Egress" else ("ingress", "from")
    for policy in applicable:
        for rule in policy["spec"].get(rules_key) or []:
            peers = rule.get(peers_key) or []
            if ((not peers or any(peer_matches(peer, pod.namespace, other) for peer in peers))
                    and port_matches(rule.get("ports"), destination, port, protocol)):
                return True
    return False


def allowed(policies, source: Endpoint, destination: Endpoint, port: int, protocol: str = "TCP") -> bool:
    return (side_allows(policies, source, "Egress", destination, destination, port, protocol)
            and side_allows(policies, destination, "Ingress", source, destination, port, protocol))


# --- the overlay as endpoints ------------------------------------------------


@dataclasses.dataclass
class Cluster:
    policies: list
    pods: dict  # workload name -> Endpoint
    workloads: dict  # workload name -> (document, pod template)
    services: dict  # name -> Service
    namespace: str
    namespace_labels: tuple

    def outside_pod(self, namespace: str, **labels) -> Endpoint:
        return Endpoint(f"a pod in {namespace}", namespace, tuple(labels.items()),
                        ((NS_NAME, namespace),))

    def stranger(self) -> Endpoint:
        """A pod in the namespace that no workload of the overlay creates."""
        return Endpoint("a stranger", self.namespace, ((NAME, "stranger"),), self.namespace_labels)


INTERNET = Endpoint("the internet", ip=INTERNET_IP)
KUBE_DNS = Endpoint("kube-dns", "kube-system", (("k8s-app", "kube-dns"),), ((NS_NAME, "kube-system"),))


def cluster(overlay: str) -> Cluster:
    docs = render(overlay)
    namespace_doc = next(d for d in docs if d["kind"] == "Namespace")
    namespace = namespace_doc["metadata"]["name"]
    ns_labels = tuple({**namespace_doc["metadata"].get("labels", {}), NS_NAME: namespace}.items())
    pods, workloads = {}, {}
    for doc, template in pod_templates(docs):
        ports = tuple((p.get("name"), p["containerPort"], p.get("protocol", "TCP"))
                      for _, c in all_containers(template["spec"]) for p in c.get("ports", []))
        name = doc["metadata"]["name"]
        pods[name] = Endpoint(name, doc["metadata"]["namespace"],
                              tuple(template["metadata"].get("labels", {}).items()), ns_labels, ports)
        workloads[name] = (doc, template)
    return Cluster([d for d in docs if d["kind"] == "NetworkPolicy"], pods, workloads,
                   {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}, namespace, ns_labels)


# --- what the pods are configured to connect to -----------------------------

HOST_PORT = re.compile(r"(?<![\w.-])([a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9-]+)*):(\d{2,5})\b")


def resolve(c: Cluster, host: str, port: int) -> list[tuple[str, int]]:
    """(workload, container port) that ``host:port`` reaches inside the namespace; [] if it names none."""
    first, _, rest = host.partition(".")
    in_namespace = rest in ("", c.namespace, f"{c.namespace}.svc", f"{c.namespace}.svc.cluster.local")
    if first in c.services and in_namespace:
        service = c.services[first]
        for service_port in service["spec"]["ports"]:
            if service_port["port"] != port:
                continue
            target, protocol = service_port.get("targetPort", port), service_port.get("protocol", "TCP")
            found = []
            for name, pod in c.pods.items():
                if selects({"matchLabels": service["spec"]["selector"]}, dict(pod.labels)):
                    number = pod.port_named(target, protocol) if isinstance(target, str) else target
                    if number is not None:
                        found.append((name, number))
            return found
        return []
    # <hostname>.<subdomain>: a pod of an Indexed Job behind its headless Service
    subdomain, _, rest = rest.partition(".")
    if subdomain in c.services and rest in ("", c.namespace, f"{c.namespace}.svc", f"{c.namespace}.svc.cluster.local"):
        for name, (doc, template) in c.workloads.items():
            if (template["spec"].get("subdomain") == subdomain
                    and re.fullmatch(re.escape(name) + r"-\d+", first)):
                return [(name, port)]
    return []


def tf_config_hosts(container: dict, tmp_path) -> list[str]:
    """Run the container's TF_CONFIG wrapper (as worker 0) with a stand-in trainer; the cluster's host:port list."""
    record = tmp_path / "tf_config"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    stand_in = bin_dir / "tlp-train"
    stand_in.write_text('#!/bin/sh\nprintf \'%s\' "$TF_CONFIG" > "$RECORD"\n')
    stand_in.chmod(stand_in.stat().st_mode | stat.S_IXUSR)
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "RECORD": str(record)}
    for var in container.get("env", []):
        env[var["name"]] = var.get("value", "0")  # fieldRef values (the completion index): worker 0
    subprocess.run(container["command"] + container.get("args", []), env=env, capture_output=True,
                   text=True, timeout=30, check=True)
    cluster_spec = json.loads(record.read_text())["cluster"]
    return [address for addresses in cluster_spec.values() for address in addresses]


def connections_used(c: Cluster, tmp_path) -> set[tuple[str, str, int, str]]:
    """(source workload, destination workload, port, how it is configured) for every in-namespace address a pod uses."""
    used = set()

    def add(source, host, port, why):
        for destination, number in resolve(c, host, int(port)):
            used.add((source, destination, number, why))

    for source, (_, template) in c.workloads.items():
        for _, container in all_containers(template["spec"]):
            env = {v["name"]: v.get("value") for v in container.get("env", [])}
            texts = [v for v in env.values() if v] + container.get("args", [])
            for text in texts:
                for host, port in HOST_PORT.findall(text):
                    add(source, host, port, f"'{text}'")
            for key, value in env.items():  # FOO_IP / FOO_HOST with FOO_PORT
                prefix = re.sub(r"_(IP|HOST|ADDRESS)$", "", key)
                if prefix != key and value and env.get(f"{prefix}_PORT", "").isdigit():
                    add(source, value, env[f"{prefix}_PORT"], f"{key}={value}, {prefix}_PORT={env[prefix + '_PORT']}")
            if any("TF_CONFIG" in part for part in container.get("command", [])):
                for address in tf_config_hosts(container, tmp_path):
                    host, _, port = address.rpartition(":")
                    add(source, host, port, f"TF_CONFIG {address}")
    return used


# --- tests -------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_is_selected_by_a_network_policy_for_ingress_and_egress(overlay):
    c = cluster(overlay)
    assert c.pods, f"{overlay}: no workloads rendered"
    bad = []
    for name, pod in c.pods.items():
        selecting = [p for p in c.policies if p["metadata"]["namespace"] == pod.namespace
                     and selects(p["spec"].get("podSelector"), dict(pod.labels))]
        for direction in ("Ingress", "Egress"):
            if not any(direction in policy_types(p) for p in selecting):
                bad.append(f"{name}: no NetworkPolicy isolates it for {direction}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_namespace_denies_by_default_and_allows_only_dns(overlay):
    """A pod the overlay does not describe gets nothing in or out but DNS."""
    c = cluster(overlay)
    stranger = c.stranger()
    assert allowed(c.policies, stranger, KUBE_DNS, 53, "UDP") and allowed(c.policies, stranger, KUBE_DNS, 53, "TCP")
    reached = [f"{stranger.name} -> {d.name}:{p}" for d in [*c.pods.values(), INTERNET]
               for p in (53, 80, 443, 2222, 8000, 8500, 8501, 6006) if allowed(c.policies, stranger, d, p)]
    reached += [f"{s.name} -> {stranger.name}:{p}"
                for s in [*c.pods.values(), c.outside_pod(CLIENTS), c.outside_pod(MONITORING)]
                for p in (80, 443, 8080) if allowed(c.policies, s, stranger, p)]
    assert not reached, "the default deny lets through:\n" + "\n".join(reached)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_resolves_names_with_the_cluster_dns(overlay):
    c = cluster(overlay)
    bad = [f"{name} -> kube-dns:53/{proto}" for name, pod in c.pods.items() for proto in ("UDP", "TCP")
           if not allowed(c.policies, pod, KUBE_DNS, 53, proto)]
    assert not bad, "DNS blocked:\n" + "\n".join(bad)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_connection_a_pod_is_configured_to_make_is_allowed(overlay, tmp_path):
    c = cluster(overlay)
    used = connections_used(c, tmp_path)
    how = {why for *_, why in used}
    # The discovery finds what it must (its own teeth): the multi-worker TF_CONFIG and the oracle.
    assert any(w.startswith("TF_CONFIG ") for w in how), used
    assert any(w.startswith("KERASTUNER_ORACLE_IP=") for w in how), used
    blocked = [f"{s} -> {d}:{p} ({why})" for s, d, p, why in sorted(used)
               if not allowed(c.policies, c.pods[s], c.pods[d], p)]
    assert not blocked, f"{overlay}: NetworkPolicies block connections the pods are configured to make:\n" + "\n".join(blocked)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_pod_to_pod_connection_is_allowed_that_nothing_uses(overlay, tmp_path):
    """Least privilege inside the namespace: on every port a pod declares, only its configured peers get in."""
    c = cluster(overlay)
    used = {(s, d, p) for s, d, p, _ in connections_used(c, tmp_path)}
    extra = [f"{s} -> {d}:{port}"
             for s, source in c.pods.items() for d, destination in c.pods.items()
             for _, port, proto in destination.ports
             if allowed(c.policies, source, destination, port, proto) and (s, d, port) not in used]
    assert not extra, f"{overlay}: allowed but used by nothing:\n" + "\n".join(extra)


def serving_and_tensorboard_ports(overlay):
    docs = render(overlay)
    serving = find(docs, "Deployment", "tlp-serving")["spec"]["template"]["spec"]["containers"][0]
    tensorboard = find(docs, "Deployment", "tlp-tensorboard")["spec"]["template"]["spec"]["containers"][0]
    grpc, rest, board = int(flag(serving, "port")), int(flag(serving, "rest_api_port")), int(flag(tensorboard, "port"))
    assert (grpc, rest, board) == (8500, 8501, 6006)
    assert {grpc, rest} <= {p["containerPort"] for p in serving["ports"]}
    assert board in {p["containerPort"] for p in tensorboard["ports"]}
    return grpc, rest, board


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_the_clients_and_monitoring_namespaces_reach_in_and_only_where_meant(overlay):
    """Serving: gRPC and REST from the clients' namespace, REST (metrics) from monitoring; TensorBoard's UI
    from the clients' namespace. Nothing else, from any other namespace, on any port a pod declares."""
    c = cluster(overlay)
    grpc, rest, board = serving_and_tensorboard_ports(overlay)
    expected = {(CLIENTS, "tlp-serving", grpc), (CLIENTS, "tlp-serving", rest), (MONITORING, "tlp-serving", rest),
                (CLIENTS, "tlp-tensorboard", board)}
    got = {(namespace, name, port)
           for namespace in (CLIENTS, MONITORING, "default", "kube-system")
           for name, pod in c.pods.items() for _, port, proto in pod.ports
           if allowed(c.policies, c.outside_pod(namespace, app="client"), pod, port, proto)}
    assert got == expected, f"missing: {sorted(expected - got)}; not meant: {sorted(got - expected)}"


def reaches_outside_for(template: dict) -> list[str]:
    """Why a pod needs HTTPS to the outside: ImageNet weights to download, or a bucket."""
    reasons = []
    for _, container in all_containers(template["spec"]):
        for text in container.get("args", []) + [v.get("value") or "" for v in container.get("env", [])]:
            if text == "--weights=imagenet" or "gs://" in text or "s3://" in text:
                reasons.append(text)
    return reasons


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_https_leaves_the_cluster_and_only_from_pods_that_need_it(overlay):
    c = cluster(overlay)
    bad = []
    for name, pod in c.pods.items():
        doc, template = c.workloads[name]
        for port in (22, 80, 8080, 9000):
            if allowed(c.policies, pod, INTERNET, port):
                bad.append(f"{name} reaches the outside on port {port}")
        needs = reaches_outside_for(template)
        https = allowed(c.policies, pod, INTERNET, 443)
        if needs and not https:
            bad.append(f"{name} needs HTTPS to the outside ({needs[0]}) but may not")
        # The read-only pods that take requests (serving, TensorBoard: service account tlp-serving)
        # read the volume; a bucket for them is an overlay's patch (docs/kubernetes.md).
        if template["spec"].get("serviceAccountName") == "tlp-serving" and https:
            bad.append(f"{name} (service account tlp-serving) reaches the outside")
    assert any(reaches_outside_for(t) for _, t in c.workloads.values())
    assert not bad, "\n".join(bad)


def test_the_evaluator_has_teeth():
    """Without the default deny a stranger reaches everything; without the chief's policy the workers are refused."""
    c = cluster("dev")
    without_deny = [p for p in c.policies if p["spec"].get("podSelector")]
    assert allowed(without_deny, c.stranger(), INTERNET, 80)
    workers, chief = c.pods["tlp-tune-workers"], c.pods["tlp-tune-chief"]
    assert allowed(c.policies, workers, chief, 8000)
    assert not allowed(c.policies, workers, chief, 8001)
    assert not allowed(c.policies, chief, workers, 8000)
    without_chief = [p for p in c.policies if p["metadata"]["name"] != "tlp-tune-chief"]
    assert not allowed(without_chief, workers, chief, 8000)
    # Named ports and namespace + pod selectors (both must match), as the API defines them.
    policy = {"metadata": {"name": "t", "namespace": c.namespace},
              "spec": {"podSelector": {}, "policyTypes": ["Ingress"],
                       "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {NS_NAME: CLIENTS}},
                                              "podSelector": {"matchExpressions": [
                                                  {"key": "app", "operator": "In", "values": ["client"]}]}}],
                                    "ports": [{"port": "oracle"}]}]}}
    assert allowed([policy], c.outside_pod(CLIENTS, app="client"), chief, 8000)
    assert not allowed([policy], c.outside_pod(CLIENTS, app="other"), chief, 8000)
    assert not allowed([policy], c.outside_pod(MONITORING, app="client"), chief, 8000)
    assert not allowed([policy], c.outside_pod(CLIENTS, app="client"), workers, 8000)  # no port named oracle
