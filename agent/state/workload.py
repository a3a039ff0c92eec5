"""Workloads, in the shape of ztunnel's local config."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Any

from agent.state.waypoint import Waypoint

DEFAULT_TRUST_DOMAIN = "cluster.local"


class Protocol(StrEnum):
    HBONE = "HBONE"  # in the mesh: traffic is captured and tunnelled
    TCP = "TCP"  # out of the mesh: plain TCP, never captured


def _empty_mapping() -> Mapping[str, Any]:
    return MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Workload:
    uid: str
    name: str
    namespace: str
    service_account: str
    ips: tuple[str, ...]
    protocol: Protocol
    node: str
    # Where this node's agent finds the pod: the netns path and interface. In a cluster the
    # CNI plugin reports them; in a local config they are written down.
    netns: str | None = None
    interface: str = "eth0"
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    # ztunnel's shape: "namespace/hostname" -> {service port: target port on this workload}
    # (empty: the service's own target ports). Mappings have no hash, so these stay out of it.
    services: Mapping[str, Mapping[int, int]] = field(default_factory=_empty_mapping, hash=False)
    # Where traffic addressed to this pod goes first (a waypoint for workloads), if anywhere.
    waypoint: Waypoint | None = None
    # Pod labels: what AuthorizationPolicy selectors match.
    labels: Mapping[str, str] = field(default_factory=_empty_mapping, hash=False)
    # Telemetry names (ztunnel's workloadName, canonicalName, canonicalRevision, clusterId);
    # empty when the source did not say, and then derived from name and labels.
    workload_name: str = ""
    canonical_name: str = ""
    canonical_revision: str = ""
    cluster_id: str = ""
    # ztunnel's status: only a healthy (ready) workload is picked as a service's endpoint.
    # A pod addressed directly is reached whatever its status, as with Kubernetes.
    healthy: bool = True

    def __post_init__(self) -> None:
        # Read-only copies: snapshots are shared by every reader of the state store.
        services = {key: MappingProxyType(dict(ports)) for key, ports in self.services.items()}
        object.__setattr__(self, "services", MappingProxyType(services))
        object.__setattr__(self, "labels", MappingProxyType(dict(self.labels)))

    @property
    def captured(self) -> bool:
        return self.protocol is Protocol.HBONE

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"
