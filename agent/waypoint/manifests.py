"""The Kubernetes objects of one waypoint, sans-IO: `ambientctl waypoint generate|apply` and
manifests/waypoint/ are made from `waypoint_objects`.

What Istio's deployment controller makes for a Gateway of class `istio-waypoint`, done ahead
of time since there is no controller here: a ServiceAccount named after the Gateway (its
SPIFFE identity: spiffe://TD/ns/NS/sa/NAME), a ClusterRole and binding for what the
Kubernetes source reads (cluster-wide: the waypoint follows every pod and Service), one
Deployment running `ambient-agent waypoint`, the Service named after the Gateway (whose VIP
the node agents use as the waypoint's address while the Gateway has no status address), and
the Gateway itself.

The waypoint's certificate comes from the built-in CA, which must be the node agents' for them
to trust it (docs/install.md, "Waypoints"): the Deployment mounts the Secret `CA_SECRET`, of
the waypoint's own namespace, where the agent looks for its CA. A Secret's files are owned by
root, and the CA refuses a key readable by its group (what fsGroup would make it), so the
container runs as uid 0: unprivileged, every capability dropped, no privilege escalation, a
read-only root filesystem.
"""

from __future__ import annotations

from typing import Any

import yaml

from agent.config import DEFAULT_CA_DIR
from agent.sources.kube_objects import (
    MANAGED_GATEWAY_LABEL,
    MESH_CONTROLLER,
    WAYPOINT_FOR_LABEL,
    WAYPOINT_GATEWAY_CLASS,
)
from agent.state.names import dns_label_error
from agent.state.waypoint import ALLOW_ONLY_WAYPOINT, HBONE_PORT, WaypointFor

Manifest = dict[str, Any]

# The DaemonSet's image (manifests/daemonset.yaml): one image for the node agent and waypoints.
DEFAULT_IMAGE = "ghcr.io/example/ambient-agent:0.1.0"
DEFAULT_NAME = "waypoint"
# The Secret holding the built-in CA (ca-key.pem, ca-cert.pem), in the waypoint's namespace;
# the same files as the node agents' `ambient-agent-ca` in ambient-system.
CA_SECRET = "ambient-agent-ca"
GATEWAY_NAME_LABEL = "gateway.networking.k8s.io/gateway-name"
DATAPLANE_MODE_LABEL = "istio.io/dataplane-mode"
GATEWAY_API_VERSION = "gateway.networking.k8s.io/v1"
RUN_DIR = "/run/ambient-waypoint"
STATS_PORT, STATUS_PORT = 15020, 15021
METRICS_PATH = "/stats/prometheus"

# What agent/sources/kube_source.py lists and watches (resources_of), and nothing else. It
# never gets a single object, so neither verb "get" nor any write is granted.
READS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("", ("pods", "namespaces", "services")),
    ("discovery.k8s.io", ("endpointslices",)),
    ("security.istio.io", ("authorizationpolicies",)),
    ("gateway.networking.k8s.io", ("gateways", "httproutes")),
)
READ_VERBS = ("list", "watch")


def waypoint_objects(
    namespace: str,
    name: str = DEFAULT_NAME,
    waypoint_for: str = WaypointFor.SERVICE.value,
    image: str = DEFAULT_IMAGE,
    allow_only_waypoint: bool = False,
) -> list[Manifest]:
    """The waypoint Gateway `namespace/name` and what runs it, in apply order: ServiceAccount,
    ClusterRole, ClusterRoleBinding, Deployment, Service, Gateway. ValueError names the
    first bad input."""
    _check(namespace, name, waypoint_for, image)
    return [
        _service_account(namespace, name),
        _cluster_role(namespace, name),
        _cluster_role_binding(namespace, name),
        _deployment(namespace, name, image),
        _service(namespace, name),
        _gateway(namespace, name, WaypointFor(waypoint_for), allow_only_waypoint),
    ]


def cluster_role_name(namespace: str, name: str) -> str:
    """One ClusterRole per waypoint, so removing one waypoint leaves the others' alone. ':'
    (as in system:...) cannot occur in either part, so no two waypoints share a name."""
    return f"ambient-waypoint:{namespace}:{name}"


def to_yaml(objects: list[Manifest]) -> str:
    """A multi-document YAML stream, keys in the order the objects hold them."""
    return yaml.safe_dump_all(objects, sort_keys=False, default_flow_style=False)


def _check(namespace: str, name: str, waypoint_for: str, image: str) -> None:
    if (error := dns_label_error(namespace)) is not None:
        raise ValueError(f"namespace {namespace!r} {error}")
    # The Service is named after the Gateway: an RFC 1035 label (a letter first).
    if (error := dns_label_error(name)) is not None:
        raise ValueError(f"waypoint name {name!r} {error}")
    if not name[0].isalpha():
        raise ValueError(f"waypoint name {name!r} must start with a letter (it names a Service)")
    choices = [w.value for w in WaypointFor]
    if waypoint_for not in choices:
        raise ValueError(f"waypoint-for {waypoint_for!r} must be one of {', '.join(choices)}")
    if not image or any(c.isspace() for c in image):
        raise ValueError(f"image {image!r} must be a non-empty image reference")


def _labels(name: str) -> dict[str, str]:
    return {
        GATEWAY_NAME_LABEL: name,
        "app.kubernetes.io/component": "waypoint",
        "app.kubernetes.io/part-of": "ambient-agent",
    }


def _metadata(
    name: str, namespace: str | None, gateway: str, extra_labels: dict[str, str] | None = None
) -> Manifest:
    """`namespace` None: a cluster-scoped object. `gateway`: the waypoint it belongs to."""
    metadata: Manifest = {"name": name}
    if namespace is not None:
        metadata["namespace"] = namespace
    metadata["labels"] = {**_labels(gateway), **(extra_labels or {})}
    return metadata


def _service_account(namespace: str, name: str) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _metadata(name, namespace, name),
    }


def _cluster_role(namespace: str, name: str) -> Manifest:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": _metadata(cluster_role_name(namespace, name), None, name),
        "rules": [
            {"apiGroups": [group], "resources": list(resources), "verbs": list(READ_VERBS)}
            for group, resources in READS
        ],
    }


def _cluster_role_binding(namespace: str, name: str) -> Manifest:
    role = cluster_role_name(namespace, name)
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": _metadata(role, None, name),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace}],
    }


def _deployment(namespace: str, name: str, image: str) -> Manifest:
    pod_labels = {
        GATEWAY_NAME_LABEL: name,
        # Never captured by a node agent: its traffic is HBONE already.
        DATAPLANE_MODE_LABEL: "none",
        # Istio's mark of a waypoint's pod: the sources never bind it to a waypoint itself.
        MANAGED_GATEWAY_LABEL: MESH_CONTROLLER,
        "app": name,
        "app.kubernetes.io/component": "waypoint",
        "app.kubernetes.io/part-of": "ambient-agent",
    }
    container: Manifest = {
        "name": "waypoint",
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        # Not the image's entrypoint: that one links kernel headers for BCC, which a waypoint
        # does not load.
        "command": ["ambient-agent"],
        "args": [
            "waypoint",
            "--gateway",
            f"{namespace}/{name}",
            "--kubernetes",
            "--ca-dir",
            str(DEFAULT_CA_DIR),
            "--log-format",
            "json",
        ],
        "ports": [
            {"name": "mesh", "containerPort": HBONE_PORT, "protocol": "TCP"},
            {"name": "http-metrics", "containerPort": STATS_PORT, "protocol": "TCP"},
            {"name": "status-port", "containerPort": STATUS_PORT, "protocol": "TCP"},
        ],
        # Ready only while Envoy is live with a config it accepted and the certificate is
        # written: the node agents send traffic only to ready waypoint pods.
        "readinessProbe": {
            "httpGet": {"path": "/healthz/ready", "port": STATUS_PORT},
            "initialDelaySeconds": 1,
            "periodSeconds": 5,
            "timeoutSeconds": 3,
            "failureThreshold": 3,
        },
        # Alive while the process answers HTTP (its event loop runs). Not readiness's URL: an
        # API server that is slow to list must not get the waypoint restarted. Envoy dying
        # too often ends the process by itself.
        "livenessProbe": {
            "httpGet": {"path": "/metrics", "port": STATS_PORT},
            "initialDelaySeconds": 10,
            "periodSeconds": 10,
            "timeoutSeconds": 5,
            "failureThreshold": 6,
        },
        # Istio's waypoint defaults.
        "resources": {
            "requests": {"cpu": "100m", "memory": "128Mi"},
            "limits": {"cpu": "2", "memory": "1Gi"},
        },
        # Root, only to read the CA Secret's key (mode 0400, owned by root); nothing else.
        "securityContext": {
            "runAsUser": 0,
            "runAsGroup": 0,
            "privileged": False,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [
            {"name": "ca", "mountPath": str(DEFAULT_CA_DIR), "readOnly": True},
            # Envoy's bootstrap, xDS and SDS files (its key among them) and admin socket.
            {"name": "run", "mountPath": RUN_DIR},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(name, namespace, name),
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {GATEWAY_NAME_LABEL: name}},
            # A new pod is ready before the old one goes: never no waypoint at all.
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
            },
            "template": {
                "metadata": {
                    "labels": pod_labels,
                    "annotations": {
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(STATS_PORT),
                        "prometheus.io/path": METRICS_PATH,
                    },
                },
                "spec": {
                    # Its identity toward the API server and, as Istio's, in the mesh.
                    "serviceAccountName": name,
                    "automountServiceAccountToken": True,
                    "enableServiceLinks": False,
                    "nodeSelector": {"kubernetes.io/os": "linux"},
                    # The process drains (5 s) and stops Envoy (drain time 5 s).
                    "terminationGracePeriodSeconds": 30,
                    "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
                    "containers": [container],
                    "volumes": [
                        {"name": "ca", "secret": {"secretName": CA_SECRET, "defaultMode": 0o400}},
                        # In memory: the waypoint's private key never reaches the node's disk.
                        {"name": "run", "emptyDir": {"medium": "Memory", "sizeLimit": "64Mi"}},
                        {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}},
                    ],
                },
            },
        },
    }


def _service(namespace: str, name: str) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(name, namespace, name, {MANAGED_GATEWAY_LABEL: MESH_CONTROLLER}),
        "spec": {
            "type": "ClusterIP",
            "selector": {GATEWAY_NAME_LABEL: name},
            # As Istio's deployment controller makes them: status-port first, then one port
            # per listener with the listener's protocol, lower-cased, as appProtocol.
            "ports": [
                {
                    "name": "status-port",
                    "port": STATUS_PORT,
                    "targetPort": STATUS_PORT,
                    "protocol": "TCP",
                    "appProtocol": "tcp",
                },
                {
                    "name": "mesh",
                    "port": HBONE_PORT,
                    "targetPort": HBONE_PORT,
                    "protocol": "TCP",
                    "appProtocol": "hbone",
                },
            ],
        },
    }


def _gateway(namespace: str, name: str, waypoint_for: WaypointFor, allow_only: bool) -> Manifest:
    metadata = _metadata(name, namespace, name, {WAYPOINT_FOR_LABEL: waypoint_for.value})
    if allow_only:
        metadata["annotations"] = {ALLOW_ONLY_WAYPOINT: "true"}
    return {
        "apiVersion": GATEWAY_API_VERSION,
        "kind": "Gateway",
        "metadata": metadata,
        "spec": {
            "gatewayClassName": WAYPOINT_GATEWAY_CLASS,
            "listeners": [{"name": "mesh", "port": HBONE_PORT, "protocol": "HBONE"}],
        },
    }
