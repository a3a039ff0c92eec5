"""Istio's standard TCP metric labels and the dataplane mode, for one connection.

The names and their derivation follow Istio's (and ztunnel's) so existing dashboards work:
the workload name, canonical service and revision come from the workload's own fields when
its source gave them, else from the usual pod labels, else the pod name; whatever is not
known is "unknown". One label is ours: `dataplane_mode`, so a dashboard never mixes traffic
that the mesh protected with traffic that it did not (deep guide §16).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from agent.state.service import Service
from agent.state.store import MeshState
from agent.state.workload import Workload

UNKNOWN = "unknown"
DEFAULT_CLUSTER = "Kubernetes"  # Istio's default cluster id

PEER_LABELS = (
    "workload", "canonical_service", "canonical_revision", "workload_namespace", "principal",
    "app", "version", "cluster",
)  # fmt: skip
SERVICE_LABELS = ("service", "service_namespace", "service_name")
# In Istio's order: reporter, source_*, destination_service*, destination_*, the rest.
TCP_LABELS = (
    "reporter",
    *(f"source_{name}" for name in PEER_LABELS),
    *(f"destination_{name}" for name in SERVICE_LABELS),
    *(f"destination_{name}" for name in PEER_LABELS),
    "request_protocol", "response_flags", "connection_security_policy", "dataplane_mode",
)  # fmt: skip
# Istio's request metrics: the same, with the response code after the protocol.
REQUEST_LABELS = (
    *TCP_LABELS[: TCP_LABELS.index("request_protocol") + 1],
    "response_code",
    *TCP_LABELS[TCP_LABELS.index("response_flags") :],
)


class Reporter(enum.StrEnum):
    SOURCE = "source"  # the agent of the client's node, for its outbound connection
    DESTINATION = "destination"  # the agent of the server's node, for its inbound connection
    WAYPOINT = "waypoint"  # the waypoint, for the requests and connections it carried


class SecurityPolicy(enum.StrEnum):
    MUTUAL_TLS = "mutual_tls"  # carried over HBONE
    NONE = "none"  # plain TCP


class DataplaneMode(enum.StrEnum):
    """The request path's mode (deep guide §3's matrix, reduced to what a dashboard splits):
    out-of-mesh when the connection was plain TCP (an end outside the mesh, so no mTLS);
    over HBONE, ambient-waypoint when the destination has a waypoint, else ambient-l4."""

    OUT_OF_MESH = "out-of-mesh"
    AMBIENT_L4 = "ambient-l4"
    AMBIENT_WAYPOINT = "ambient-waypoint"


def dataplane_mode(
    tunnelled: bool, destination: Workload | None, via_waypoint: bool | None = None
) -> DataplaneMode:
    """tunnelled: the connection went over HBONE (so both ends are mesh workloads, even one
    this node cannot name, such as a peer known only by its verified identity);
    via_waypoint: whether it passes a waypoint, when the caller knows (the source does),
    else taken from whether the destination has one."""
    if not tunnelled:
        return DataplaneMode.OUT_OF_MESH
    if via_waypoint is None:
        via_waypoint = destination is not None and destination.waypoint is not None
    return DataplaneMode.AMBIENT_WAYPOINT if via_waypoint else DataplaneMode.AMBIENT_L4


def _first_label(workload: Workload, *keys: str) -> str | None:
    labels = workload.labels
    for key in keys:  # a loop, not a generator: this runs for both ends of every connection
        if value := labels.get(key):
            return value
    return None


def peer_labels(workload: Workload | None, principal: str | None) -> tuple[str, ...]:
    """The values of PEER_LABELS for one end of a connection."""
    if workload is None:
        return (UNKNOWN, UNKNOWN, UNKNOWN, UNKNOWN, principal or UNKNOWN, UNKNOWN, UNKNOWN,
                UNKNOWN)  # fmt: skip
    name = workload.workload_name or workload.name
    app = _first_label(workload, "app", "app.kubernetes.io/name")
    version = _first_label(workload, "version", "app.kubernetes.io/version")
    canonical = workload.canonical_name or _first_label(
        workload, "service.istio.io/canonical-name", "app.kubernetes.io/name", "app"
    )
    revision = workload.canonical_revision or _first_label(
        workload, "service.istio.io/canonical-revision", "app.kubernetes.io/version", "version"
    )
    return (
        name, canonical or name, revision or "latest", workload.namespace,
        principal or UNKNOWN, app or UNKNOWN, version or UNKNOWN,
        workload.cluster_id or DEFAULT_CLUSTER,
    )  # fmt: skip


def destination_service(state: MeshState, workload: Workload | None, port: int) -> Service | None:
    """The service through which the destination workload serves `port`: the first of its
    services whose port maps to that target port on this workload (a call to a port no
    service maps names no service)."""
    if workload is None:
        return None
    for key, own in workload.services.items():
        service = state.service(key)
        if service is None:
            continue
        if port in own.values() or port in service.ports.values() or not service.ports:
            return service
    return None


def service_labels(service: Service | None) -> tuple[str, str, str]:
    if service is None:
        return (UNKNOWN, UNKNOWN, UNKNOWN)
    return (service.hostname, service.namespace, service.name)


@dataclass(frozen=True, slots=True)
class ConnectionLabels:
    """Who talked to whom, as one connection's Istio labels, with the uids of the ends this
    node knows, so the series can be dropped once they are gone."""

    values: tuple[str, ...]  # in TCP_LABELS order
    source_uid: str | None
    destination_uid: str | None

    @property
    def dataplane_mode(self) -> str:
        return self.values[-1]

    def as_dict(self) -> dict[str, str]:
        return dict(zip(TCP_LABELS, self.values, strict=True))


def connection_labels(
    reporter: Reporter,
    source: Workload | None,
    source_principal: str | None,
    destination: Workload | None,
    destination_principal: str | None,
    service: Service | None,
    security: SecurityPolicy,
    response_flags: str = "-",
    via_waypoint: bool | None = None,
) -> ConnectionLabels:
    values = (
        reporter.value,
        *peer_labels(source, source_principal),
        *service_labels(service),
        *peer_labels(destination, destination_principal),
        "tcp", response_flags, security.value,
        dataplane_mode(security is SecurityPolicy.MUTUAL_TLS, destination, via_waypoint).value,
    )  # fmt: skip
    return ConnectionLabels(
        values, source.uid if source else None, destination.uid if destination else None
    )
