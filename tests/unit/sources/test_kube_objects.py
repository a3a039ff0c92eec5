"""Kubernetes objects -> mesh state (agent/sources/kube_objects.py): the translation rules.

Objects are written as the API returns them in JSON; each table names the rule it checks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from agent.sources.authorization_policy import parse_policies
from agent.sources.kube_objects import (
    Kind,
    KubeObjects,
    mesh_state_from,
    object_key,
)
from agent.state.service import NAMED_TARGET_PORT
from agent.state.store import MeshState
from agent.state.waypoint import Waypoint
from agent.state.workload import Protocol, Workload

CLUSTER = "Kubernetes"
TRUST_DOMAIN = "cluster.local"
AMBIENT = {"istio.io/dataplane-mode": "ambient"}


def namespace(name: str = "shop", labels: Mapping[str, str] | None = None) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": dict(AMBIENT if labels is None else labels)}}


def pod(
    name: str = "reviews-v1-7d4b9c8f6-x2x9k",
    namespace: str = "shop",
    *,
    labels: Mapping[str, str] | None = None,
    annotations: Mapping[str, str] | None = None,
    owners: Sequence[Mapping[str, Any]] = (),
    phase: str = "Running",
    ips: Sequence[str] = ("10.244.1.12",),
    pod_ip: str | None = None,
    host_network: bool = False,
    service_account: str | None = "bookinfo-reviews",
    uid: str | None = "uid-reviews-1",
    created: str = "2025-05-12T09:14:03Z",
    ports: Mapping[str, int] | None = None,
    ready: bool | None = True,
    deleting: bool = False,
) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "creationTimestamp": created,
        "labels": dict({"app": "reviews"} if labels is None else labels),
    }
    if uid is not None:
        metadata["uid"] = uid
    if annotations:
        metadata["annotations"] = dict(annotations)
    if deleting:
        metadata["deletionTimestamp"] = "2025-05-12T10:00:00Z"
    if owners:
        metadata["ownerReferences"] = [dict(owner) for owner in owners]
    container_ports = {"http": 9080} if ports is None else ports
    spec: dict[str, Any] = {
        "nodeName": "node-1",
        "containers": [
            {
                "name": "app",
                "ports": [
                    {"name": n, "containerPort": p, "protocol": "TCP"}
                    for n, p in container_ports.items()
                ],
            }
        ],
    }
    if service_account is not None:
        spec["serviceAccountName"] = service_account
    if host_network:
        spec["hostNetwork"] = True
    status: dict[str, Any] = {"phase": phase, "podIPs": [{"ip": ip} for ip in ips]}
    if pod_ip is not None:
        status["podIP"] = pod_ip
    if ready is not None:
        status["conditions"] = [
            {"type": "PodScheduled", "status": "True"},
            {"type": "Ready", "status": "True" if ready else "False"},
        ]
    return {"metadata": metadata, "spec": spec, "status": status}


def service(
    name: str = "reviews",
    namespace: str = "shop",
    *,
    selector: Mapping[str, str] | None = None,
    ports: Sequence[Mapping[str, Any]] = ({"name": "http", "port": 9080, "targetPort": "http"},),
    cluster_ips: Sequence[str] = ("10.96.87.201",),
    type_: str = "ClusterIP",
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "type": type_,
        "ports": [{"protocol": "TCP", **port} for port in ports],
        "clusterIPs": list(cluster_ips),
    }
    if cluster_ips:
        spec["clusterIP"] = cluster_ips[0]
    selected = {"app": name} if selector is None else selector
    if selected:
        spec["selector"] = dict(selected)
    return {"metadata": {"name": name, "namespace": namespace}, "spec": spec}


def gateway(
    name: str = "waypoint",
    namespace: str = "shop",
    cls: str = "istio-waypoint",
    waypoint_for: str | None = "all",
    address: str | None = "10.96.0.50",
) -> Any:
    written: dict[str, Any] = {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"gatewayClassName": cls, "listeners": [{"name": "mesh", "port": 15008}]},
    }
    if waypoint_for is not None:
        written["metadata"]["labels"] = {"istio.io/waypoint-for": waypoint_for}
    if address is not None:
        written["status"] = {"addresses": [{"type": "IPAddress", "value": address}]}
    return written


def owner(kind: str, name: str, *, controller: bool = True) -> dict[str, Any]:
    return {"apiVersion": "apps/v1", "kind": kind, "name": name, "controller": controller}


def objects(**kinds: Sequence[Mapping[str, Any]]) -> KubeObjects:
    """KubeObjects from lists, by Kind value (namespaces defaults to one ambient "shop")."""
    kube = KubeObjects()
    kinds.setdefault("namespaces", [namespace()])
    for kind_name, items in kinds.items():
        kube.replace_all(Kind(kind_name), items)
    return kube


def state_of(**kinds: Sequence[Mapping[str, Any]]) -> MeshState:
    return mesh_state_from(objects(**kinds), CLUSTER, TRUST_DOMAIN)


def only_workload(**kinds: Sequence[Mapping[str, Any]]) -> Workload:
    (workload,) = state_of(**kinds).workloads
    return workload


# --- which pods are workloads ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("written", "ips"),
    [
        pytest.param(pod(), ("10.244.1.12",), id="running"),
        pytest.param(pod(phase="Pending"), ("10.244.1.12",), id="pending-with-address"),
        pytest.param(pod(phase="Pending", ips=()), None, id="pending-without-address"),
        pytest.param(pod(phase="Succeeded"), None, id="succeeded"),
        pytest.param(pod(phase="Failed"), None, id="failed"),
        pytest.param(pod(phase="Unknown"), None, id="unknown-phase"),
        pytest.param(pod(host_network=True), None, id="host-network"),
        pytest.param(pod(ips=()), None, id="running-without-address"),
        pytest.param(
            pod(ips=("10.244.1.12", "fd00:10:244:1::0c")),
            ("10.244.1.12", "fd00:10:244:1::c"),
            id="dual-stack-canonical",
        ),
        pytest.param(pod(ips=(), pod_ip="10.244.1.30"), ("10.244.1.30",), id="podIP-fallback"),
        pytest.param(pod(ips=("garbage", "10.244.1.31")), ("10.244.1.31",), id="bad-address"),
    ],
)
def test_which_pods_are_workloads(written: dict[str, Any], ips: tuple[str, ...] | None) -> None:
    state = state_of(pods=[written])
    assert tuple(w.ips for w in state.workloads) == (() if ips is None else (ips,))


@pytest.mark.parametrize(
    ("namespace_labels", "pod_labels", "phase", "protocol"),
    [
        pytest.param(AMBIENT, {}, "Running", Protocol.HBONE, id="ambient-namespace"),
        pytest.param(AMBIENT, {}, "Pending", Protocol.HBONE, id="ambient-pending-with-ip"),
        pytest.param(
            AMBIENT, {"istio.io/dataplane-mode": "none"}, "Running", Protocol.TCP, id="opted-out"
        ),
        pytest.param({}, {}, "Running", Protocol.TCP, id="plain-namespace"),
        pytest.param(
            {"istio.io/dataplane-mode": "none"}, {}, "Running", Protocol.TCP, id="namespace-none"
        ),
        pytest.param(None, {}, "Running", Protocol.TCP, id="namespace-unknown"),
    ],
)
def test_protocol_follows_ambient_enrollment(
    namespace_labels: Mapping[str, str] | None,
    pod_labels: Mapping[str, str],
    phase: str,
    protocol: Protocol,
) -> None:
    namespaces = [] if namespace_labels is None else [namespace("shop", namespace_labels)]
    workload = only_workload(namespaces=namespaces, pods=[pod(labels=pod_labels, phase=phase)])
    assert workload.protocol is protocol


def test_workload_fields() -> None:
    workload = only_workload(pods=[pod(labels={"app": "reviews", "version": "v1"})])
    assert workload == Workload(
        uid="uid-reviews-1",
        name="reviews-v1-7d4b9c8f6-x2x9k",
        namespace="shop",
        service_account="bookinfo-reviews",
        ips=("10.244.1.12",),
        protocol=Protocol.HBONE,
        node="node-1",
        netns=None,  # the CNI plugin tells where the pods of this node are
        trust_domain=TRUST_DOMAIN,
        services={},
        waypoint=None,
        labels={"app": "reviews", "version": "v1"},
        workload_name="reviews-v1-7d4b9c8f6-x2x9k",
        canonical_name="reviews",
        canonical_revision="v1",
        cluster_id=CLUSTER,
    )


def test_defaults_for_what_the_pod_leaves_out() -> None:
    workload = only_workload(pods=[pod(uid=None, service_account=None, labels={})])
    assert workload.uid == "Kubernetes//Pod/shop/reviews-v1-7d4b9c8f6-x2x9k"
    assert workload.service_account == "default"
    assert (workload.canonical_name, workload.canonical_revision) == (workload.name, "latest")


@pytest.mark.parametrize(
    ("owners", "labels", "workload_name"),
    [
        pytest.param(
            [owner("ReplicaSet", "reviews-v1-7d4b9c8f6")],
            {"pod-template-hash": "7d4b9c8f6"},
            "reviews-v1",
            id="deployment",
        ),
        pytest.param([owner("ReplicaSet", "reviews-v1")], {}, "reviews-v1", id="bare-replicaset"),
        pytest.param(
            [owner("ReplicaSet", "reviews-v1-other")],
            {"pod-template-hash": "7d4b9c8f6"},
            "reviews-v1-other",
            id="hash-not-the-suffix",
        ),
        pytest.param([owner("Job", "db-migrate-28735200")], {}, "db-migrate", id="cronjob"),
        pytest.param([owner("Job", "db-migrate")], {}, "db-migrate", id="job"),
        pytest.param([owner("StatefulSet", "postgres")], {}, "postgres", id="statefulset"),
        pytest.param([owner("DaemonSet", "node-agent")], {}, "node-agent", id="daemonset"),
        pytest.param([], {}, "reviews-v1-7d4b9c8f6-x2x9k", id="no-owner"),
        pytest.param(
            [owner("Thing", "first", controller=False), owner("StatefulSet", "db")],
            {},
            "db",
            id="the-controller-owner",
        ),
        pytest.param([owner("Thing", "first", controller=False)], {}, "first", id="no-controller"),
    ],
)
def test_workload_name_from_the_owner(
    owners: list[dict[str, Any]], labels: dict[str, str], workload_name: str
) -> None:
    workload = only_workload(pods=[pod(owners=owners, labels=labels)])
    assert workload.workload_name == workload_name
    assert workload.canonical_name == workload_name  # no app labels: the workload name


@pytest.mark.parametrize(
    ("labels", "name", "revision"),
    [
        pytest.param(
            {
                "service.istio.io/canonical-name": "reviews-canonical",
                "app.kubernetes.io/name": "reviews-k8s",
                "app": "reviews",
                "service.istio.io/canonical-revision": "r7",
                "app.kubernetes.io/version": "1.2",
                "version": "v1",
            },
            "reviews-canonical",
            "r7",
            id="istio-labels-first",
        ),
        pytest.param(
            {"app.kubernetes.io/name": "reviews-k8s", "app": "reviews", "version": "v1"},
            "reviews-k8s",
            "v1",
            id="kubernetes-recommended-labels",
        ),
        pytest.param({"app": "reviews"}, "reviews", "latest", id="app-only"),
    ],
)
def test_canonical_name_and_revision(labels: dict[str, str], name: str, revision: str) -> None:
    workload = only_workload(pods=[pod(labels=labels)])
    assert (workload.canonical_name, workload.canonical_revision) == (name, revision)


# --- waypoints ------------------------------------------------------------------------------

USE = "istio.io/use-waypoint"
USE_NAMESPACE = "istio.io/use-waypoint-namespace"
SHOP_WAYPOINT = Waypoint("10.96.0.50", 15008, "waypoint", "shop")


@pytest.mark.parametrize(
    ("namespace_labels", "pod_labels", "pod_annotations", "gateways", "waypoint"),
    [
        pytest.param({}, {USE: "waypoint"}, {}, [gateway()], SHOP_WAYPOINT, id="pod-label"),
        pytest.param({}, {}, {USE: "waypoint"}, [gateway()], SHOP_WAYPOINT, id="pod-annotation"),
        pytest.param({USE: "waypoint"}, {}, {}, [gateway()], SHOP_WAYPOINT, id="namespace-label"),
        pytest.param(
            {USE: "waypoint"},
            {USE: "reviews-wp"},
            {},
            [gateway(), gateway("reviews-wp")],
            Waypoint("10.96.0.50", 15008, "reviews-wp", "shop"),
            id="pod-over-namespace",
        ),
        pytest.param({USE: "waypoint"}, {USE: "none"}, {}, [gateway()], None, id="pod-opts-out"),
        pytest.param({}, {USE: "waypoint"}, {}, [], None, id="no-such-gateway"),
        pytest.param(
            {}, {USE: "waypoint"}, {}, [gateway(cls="istio")], None, id="not-a-waypoint-class"
        ),
        pytest.param(
            {},
            {USE: "shared", USE_NAMESPACE: "istio-system"},
            {},
            [gateway("shared", "istio-system")],
            Waypoint("10.96.0.50", 15008, "shared", "istio-system"),
            id="other-namespace",
        ),
        pytest.param(
            {},
            {USE: "waypoint", "gateway.istio.io/managed": "istio.io-mesh-controller"},
            {},
            [gateway()],
            None,
            id="the-waypoint-itself",
        ),
        pytest.param({}, {}, {}, [gateway()], None, id="nobody-asks"),
        pytest.param(
            {},
            {USE: "waypoint"},
            {},
            [gateway(waypoint_for=None)],
            None,
            id="a-service-waypoint-takes-no-pod-traffic",
        ),
        pytest.param(
            {},
            {USE: "waypoint"},
            {},
            [gateway(waypoint_for="service")],
            None,
            id="waypoint-for-service",
        ),
        pytest.param(
            {},
            {USE: "waypoint"},
            {},
            [gateway(waypoint_for="workload")],
            SHOP_WAYPOINT,
            id="waypoint-for-workload",
        ),
        pytest.param(
            {},
            {USE: "waypoint"},
            {},
            [gateway(address=None)],
            Waypoint("", 15008, "waypoint", "shop"),
            id="not-ready-no-address",
        ),
    ],
)
def test_waypoint(
    namespace_labels: dict[str, str],
    pod_labels: dict[str, str],
    pod_annotations: dict[str, str],
    gateways: list[dict[str, Any]],
    waypoint: Waypoint | None,
) -> None:
    workload = only_workload(
        namespaces=[namespace("shop", {**AMBIENT, **namespace_labels})],
        pods=[pod(labels=pod_labels, annotations=pod_annotations)],
        gateways=gateways,
    )
    assert workload.waypoint == waypoint


@pytest.mark.parametrize(
    ("namespace_labels", "service_labels", "gateways", "waypoint"),
    [
        pytest.param(
            {},
            {USE: "waypoint"},
            [gateway(waypoint_for=None)],
            SHOP_WAYPOINT,
            id="service-label-default-waypoint-for",
        ),
        pytest.param({USE: "waypoint"}, {}, [gateway()], SHOP_WAYPOINT, id="namespace-label"),
        pytest.param({USE: "waypoint"}, {USE: "none"}, [gateway()], None, id="service-opts-out"),
        pytest.param(
            {},
            {USE: "waypoint"},
            [gateway(waypoint_for="workload")],
            None,
            id="a-workload-waypoint-takes-no-service-traffic",
        ),
        pytest.param(
            {}, {USE: "waypoint"}, [gateway(waypoint_for="none")], None, id="waypoint-for-none"
        ),
    ],
)
def test_service_waypoint(
    namespace_labels: dict[str, str],
    service_labels: dict[str, str],
    gateways: list[dict[str, Any]],
    waypoint: Waypoint | None,
) -> None:
    written = service()
    written["metadata"]["labels"] = service_labels
    state = state_of(
        namespaces=[namespace("shop", {**AMBIENT, **namespace_labels})],
        services=[written],
        gateways=gateways,
    )
    (translated,) = state.services
    assert translated.waypoint == waypoint


def test_a_waypoint_without_status_address_takes_its_services_vip() -> None:
    waypoint_service = service("waypoint", selector={"gateway.networking.k8s.io/gateway-name":
                               "waypoint"}, cluster_ips=("10.96.0.77",))  # fmt: skip
    bound = service()
    bound["metadata"]["labels"] = {USE: "waypoint"}
    state = state_of(services=[waypoint_service, bound], gateways=[gateway(address=None)])
    reviews = state.service(REVIEWS_KEY)
    assert reviews is not None and reviews.waypoint == Waypoint(
        "10.96.0.77", 15008, "waypoint", "shop"
    )


# --- services -------------------------------------------------------------------------------

REVIEWS_KEY = "shop/reviews.shop.svc.cluster.local"


@pytest.mark.parametrize(
    ("written", "pod_labels", "pod_ports", "services"),
    [
        pytest.param(
            service(), {"app": "reviews"}, {"http": 9080}, {REVIEWS_KEY: {9080: 9080}},
            id="named-target-port",
        ),
        pytest.param(
            service(ports=[{"name": "http", "port": 80, "targetPort": "http"}]),
            {"app": "reviews"},
            {"http": 9080},
            {REVIEWS_KEY: {80: 9080}},
            id="named-target-port-other-number",
        ),
        pytest.param(
            service(), {"app": "reviews"}, {"grpc": 9090}, {REVIEWS_KEY: {}},
            id="named-port-the-pod-lacks",
        ),
        pytest.param(
            service(ports=[{"port": 80, "targetPort": 8080}]),
            {"app": "reviews"},
            {},
            {REVIEWS_KEY: {80: 8080}},
            id="numeric-target-port",
        ),
        pytest.param(
            service(ports=[{"port": 80}]), {"app": "reviews"}, {}, {REVIEWS_KEY: {80: 80}},
            id="no-target-port",
        ),
        pytest.param(
            service(ports=[{"port": 53, "protocol": "UDP"}, {"port": 9153}]),
            {"app": "reviews"},
            {},
            {REVIEWS_KEY: {9153: 9153}},
            id="tcp-ports-only",
        ),
        pytest.param(
            service(selector={"app": "reviews", "version": "v2"}),
            {"app": "reviews", "version": "v1"},
            {},
            {},
            id="selector-mismatch",
        ),
        pytest.param(service(selector={}), {"app": "reviews"}, {}, {}, id="no-selector"),
        pytest.param(
            service(namespace="other"), {"app": "reviews"}, {"http": 9080}, {},
            id="other-namespace",
        ),
    ],
)  # fmt: skip
def test_services_a_pod_backs(
    written: dict[str, Any],
    pod_labels: dict[str, str],
    pod_ports: dict[str, int],
    services: dict[str, dict[int, int]],
) -> None:
    workload = only_workload(pods=[pod(labels=pod_labels, ports=pod_ports)], services=[written])
    assert {key: dict(ports) for key, ports in workload.services.items()} == services


def test_service_fields() -> None:
    state = state_of(
        services=[
            service(
                cluster_ips=("10.96.87.201", "fd00:10:96::0c9"),
                ports=[
                    {"name": "http", "port": 9080, "targetPort": "http"},
                    {"name": "admin", "port": 15000},
                ],
            )
        ],
        pods=[pod(ports={"http": 8080})],
    )
    (reviews,) = state.services
    assert (reviews.name, reviews.namespace, reviews.hostname) == (
        "reviews",
        "shop",
        "reviews.shop.svc.cluster.local",
    )
    assert reviews.vips == ("10.96.87.201", "fd00:10:96::c9")
    # A named target port is each backing pod's to resolve (its own map says 8080).
    assert dict(reviews.ports) == {9080: NAMED_TARGET_PORT, 15000: 15000}
    (workload,) = state.workloads
    assert dict(workload.services[REVIEWS_KEY]) == {9080: 8080, 15000: 15000}
    assert state.service_by_vip("10.96.87.201", 9080) is reviews
    assert state.workloads_of_service(reviews) == state.workloads


@pytest.mark.parametrize(
    ("written", "vips", "ports"),
    [
        pytest.param(service(cluster_ips=("None",)), (), {9080: NAMED_TARGET_PORT}, id="headless"),
        pytest.param(
            service(), ("10.96.87.201",), {9080: NAMED_TARGET_PORT}, id="unresolved-named-port"
        ),
    ],
)
def test_service_without_backing_pods(
    written: dict[str, Any], vips: tuple[str, ...], ports: dict[int, int]
) -> None:
    (translated,) = state_of(services=[written]).services
    assert translated.vips == vips and dict(translated.ports) == ports


def test_external_name_services_are_left_out() -> None:
    written = service("db", selector={}, cluster_ips=(), type_="ExternalName")
    written["spec"]["externalName"] = "db.example.com"
    assert state_of(services=[written]).services == ()


def endpoint_slice(
    service_name: str, addresses: Sequence[str], ports: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    return {
        "metadata": {
            "name": f"{service_name}-x7k2p",
            "namespace": "shop",
            "labels": {"kubernetes.io/service-name": service_name},
        },
        "addressType": "IPv4",
        "endpoints": [{"addresses": [ip], "conditions": {"ready": True}} for ip in addresses],
        "ports": [dict(port) for port in ports],
    }


def test_selectorless_service_gets_its_workloads_from_endpoint_slices() -> None:
    legacy = service(
        "legacy", selector={}, ports=[{"name": "tcp", "port": 5432, "targetPort": 15432}]
    )
    slices = [
        endpoint_slice(
            "legacy",
            ["10.244.1.12", "192.168.50.7"],  # a pod, and an address that is no pod's
            [{"name": "tcp", "port": 15432, "protocol": "TCP"}],
        ),
        # A selector service's slice: its membership comes from the selector, not from here.
        endpoint_slice("reviews", ["10.244.1.12"], [{"name": "http", "port": 1234}]),
    ]
    state = state_of(
        pods=[pod(labels={"app": "reviews"})],
        services=[legacy, service()],
        endpointslices=slices,
    )
    workload, external = state.workloads
    assert {key: dict(ports) for key, ports in workload.services.items()} == {
        "shop/legacy.shop.svc.cluster.local": {5432: 15432},
        REVIEWS_KEY: {9080: 9080},
    }
    # The address that is no pod's backs the service from outside the mesh, as istiod's
    # workload from the slice does: the VIP reaches it as plain TCP.
    assert (external.ips, external.protocol, external.name, external.node) == (
        ("192.168.50.7",), Protocol.TCP, "legacy", ""
    )  # fmt: skip
    assert {k: dict(v) for k, v in external.services.items()} == {
        "shop/legacy.shop.svc.cluster.local": {5432: 15432}
    }
    assert state.workload_by_ip("192.168.50.7") is external


# --- newest pod first -----------------------------------------------------------------------


def test_two_pods_with_one_address_the_newest_wins_lookups() -> None:
    old = pod("reviews-old", created="2025-05-12T09:00:00Z", uid="old")
    new = pod("reviews-new", created="2025-05-12T10:00:00Z", uid="new")
    state = state_of(pods=[old, new])
    found = state.workload_by_ip("10.244.1.12")
    assert found is not None and found.name == "reviews-new"
    assert len(state.workloads) == 2


# --- namespaces and policies ----------------------------------------------------------------


def test_namespaces_with_their_labels() -> None:
    state = state_of(namespaces=[namespace("shop"), namespace("default", {})])
    assert [(n.name, dict(n.labels)) for n in state.namespaces] == [
        ("default", {}),
        ("shop", AMBIENT),
    ]


def authorization_policy(name: str, spec: dict[str, Any], **metadata: Any) -> dict[str, Any]:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": "shop", **metadata},
        "spec": spec,
    }


def test_authorization_policies_pass_through_in_the_shape_the_policy_parser_reads() -> None:
    allow = authorization_policy(
        "productpage-viewer",
        {
            "selector": {"matchLabels": {"app": "productpage"}},
            "action": "ALLOW",
            "rules": [{"from": [{"source": {"namespaces": ["istio-system"]}}]}],
        },
        uid="7e8f9a0b",
        resourceVersion="48150",
        generation=1,
        annotations={
            "istio.io/dry-run": "true",
            "kubectl.kubernetes.io/last-applied-configuration": "{...}",
            "team": "shop",
        },
        managedFields=[{"manager": "kubectl"}],
    )
    # As a list item of a custom resource may come: no apiVersion or kind of its own.
    deny = {
        "metadata": {"name": "deny-legacy", "namespace": "shop"},
        "spec": {"action": "DENY", "rules": [{"to": [{"operation": {"ports": ["5432"]}}]}]},
    }
    for_waypoint = authorization_policy(
        "reviews-get-only",
        {"targetRefs": [{"kind": "Service", "group": "", "name": "reviews"}], "action": "ALLOW"},
    )
    state = state_of(authorizationpolicies=[allow, deny, for_waypoint])
    assert state.policies == parse_policies(
        [
            {
                "apiVersion": "security.istio.io/v1",
                "kind": "AuthorizationPolicy",
                "metadata": {
                    "name": "deny-legacy",
                    "namespace": "shop",
                },
                "spec": deny["spec"],
            },
            {
                "apiVersion": "security.istio.io/v1",
                "kind": "AuthorizationPolicy",
                "metadata": {
                    "name": "productpage-viewer",
                    "namespace": "shop",
                    "annotations": {"istio.io/dry-run": "true"},
                },
                "spec": allow["spec"],
            },
        ]
    )
    assert [(p.key, p.dry_run) for p in state.policies] == [
        ("shop/deny-legacy", False),
        ("shop/productpage-viewer", True),
    ]


def test_a_policy_that_does_not_parse_keeps_the_set_in_force() -> None:
    """Dropping the broken policy alone could lift a DENY: the whole set stays as it was."""
    deny = authorization_policy(
        "deny-legacy", {"action": "DENY", "rules": [{"to": [{"operation": {"ports": ["5432"]}}]}]}
    )
    broken = authorization_policy(
        "broken", {"action": "DENY", "rules": [{"from": [{"source": {"ipBlocks": ["x"]}}]}]}
    )
    in_force = state_of(authorizationpolicies=[deny]).policies
    objects = KubeObjects()
    for obj in (deny, broken):
        objects.apply(Kind.AUTHORIZATION_POLICIES, "ADDED", obj)
    state = mesh_state_from(objects, "Kubernetes", "cluster.local", in_force)
    assert state.policies == in_force


# --- KubeObjects ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("event_type", "obj", "changed", "names"),
    [
        pytest.param("ADDED", pod("new"), True, ["new", "reviews-v1-7d4b9c8f6-x2x9k"], id="added"),
        pytest.param(
            "MODIFIED", pod(labels={"app": "x"}), True, ["reviews-v1-7d4b9c8f6-x2x9k"],
            id="modified",
        ),
        pytest.param("MODIFIED", pod(), False, ["reviews-v1-7d4b9c8f6-x2x9k"], id="same-again"),
        pytest.param("DELETED", pod(), True, [], id="deleted"),
        pytest.param(
            "DELETED", pod("never-seen"), False, ["reviews-v1-7d4b9c8f6-x2x9k"],
            id="deleted-unknown",
        ),
        pytest.param(
            "BOOKMARK", {"metadata": {"resourceVersion": "9"}}, False,
            ["reviews-v1-7d4b9c8f6-x2x9k"], id="bookmark",
        ),
    ],
)  # fmt: skip
def test_watch_events(
    event_type: str, obj: dict[str, Any], changed: bool, names: list[str]
) -> None:
    kube = objects(pods=[pod()])
    assert kube.apply(Kind.PODS, event_type, obj) is changed
    assert sorted(o["metadata"]["name"] for o in kube.pods.values()) == names


def test_a_list_replaces_the_kind_and_says_whether_anything_changed() -> None:
    kube = objects(pods=[pod("a"), pod("b")])
    assert kube.replace_all(Kind.PODS, [pod("a"), pod("b")]) is False
    assert kube.replace_all(Kind.PODS, [pod("b")]) is True
    assert list(kube.pods) == ["shop/b"]
    assert kube.counts()["pods"] == 1 and kube.counts()["namespaces"] == 1


def test_what_is_large_and_never_read_is_not_kept() -> None:
    written = pod(annotations={"kubectl.kubernetes.io/last-applied-configuration": "{...}"})
    written["metadata"]["managedFields"] = [{"manager": "kubelet", "fieldsV1": {}}]
    kube = KubeObjects()
    kube.apply(Kind.PODS, "ADDED", written)
    (kept,) = kube.pods.values()
    assert "managedFields" not in kept["metadata"]
    assert kept["metadata"]["annotations"] == {}
    assert "managedFields" in written["metadata"]  # the caller's object is left alone


def test_object_keys() -> None:
    assert object_key(pod()) == "shop/reviews-v1-7d4b9c8f6-x2x9k"
    assert object_key(namespace("shop")) == "shop"


def test_snapshot_is_not_changed_by_later_events() -> None:
    kube = objects(pods=[pod()])
    snapshot = kube.snapshot()
    kube.apply(Kind.PODS, "DELETED", pod())
    assert len(snapshot.pods) == 1 and not kube.pods


# --- health ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ready", "deleting", "healthy"),
    [
        pytest.param(True, False, True, id="ready"),
        pytest.param(False, False, False, id="not-ready"),
        pytest.param(None, False, False, id="no-conditions-yet"),
        pytest.param(True, True, False, id="terminating"),
    ],
)
def test_health_is_the_pods_ready_condition(
    ready: bool | None, deleting: bool, healthy: bool
) -> None:
    assert only_workload(pods=[pod(ready=ready, deleting=deleting)]).healthy is healthy


def test_a_not_ready_endpoint_backs_no_selectorless_service() -> None:
    legacy = service(
        "legacy", selector={}, ports=[{"name": "tcp", "port": 5432, "targetPort": 15432}]
    )
    slice_ = endpoint_slice("legacy", ["10.244.1.12"], [{"name": "tcp", "port": 15432}])
    slice_["endpoints"][0]["conditions"] = {"ready": False}
    state = state_of(pods=[pod()], services=[legacy], endpointslices=[slice_])
    (workload,) = state.workloads
    assert "shop/legacy.shop.svc.cluster.local" not in workload.services


# --- what waypoints carry out: routes, targetRefs policies, protocols, allow-only ----------


def test_http_routes_targetref_policies_protocols_and_allow_only_waypoint() -> None:
    bound = service(ports=({"name": "http-web", "port": 9080, "targetPort": 9080},
                           {"name": "grpc", "port": 9090, "appProtocol": "kubernetes.io/h2c"},
                           {"name": "db", "port": 5432}))  # fmt: skip
    bound["metadata"]["labels"] = {USE: "waypoint"}
    closed = gateway()
    closed["metadata"]["annotations"] = {"ambient.istio.io/allow-only-waypoint": "true"}
    route = {
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": "reviews", "namespace": "shop", "uid": "r1",
                     "creationTimestamp": "2025-05-12T09:14:03Z"},
        "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "reviews"}],
                 "rules": [{"backendRefs": [{"name": "reviews", "port": 9080}]}]},
    }  # fmt: skip
    broken = {**route, "metadata": {"name": "broken", "namespace": "shop"},
              "spec": {"parentRefs": [{"name": "reviews", "kind": "Service", "group": ""}],
                       "rules": [{"filters": [{"type": "URLRewrite"}]}]}}  # fmt: skip
    l7 = {
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "no-admin", "namespace": "shop"},
        "spec": {"targetRefs": [{"group": "", "kind": "Service", "name": "reviews"}],
                 "action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/admin"]}}]}]},
    }  # fmt: skip
    state = state_of(
        pods=[pod(ports={"http": 9080})],
        services=[bound],
        gateways=[closed],
        httproutes=[route, broken],
        authorizationpolicies=[l7],
    )
    # The broken route is left out (logged); the good one is there, with its age.
    assert [(r.key, r.created) for r in state.routes] == [("shop/reviews", "2025-05-12T09:14:03Z")]
    assert [p.key for p in state.waypoint_policies] == ["shop/no-admin"]
    reviews = state.service(REVIEWS_KEY)
    assert reviews is not None
    assert [reviews.declares_http(port) for port in (9080, 9090, 5432)] == [True, True, False]
    assert reviews.waypoint is not None and reviews.waypoint.allow_only
    # The option's L4 ALLOW guards exactly the pod behind the bound Service.
    (guard,) = state.policies
    assert guard.workload_uids == ("uid-reviews-1",)
