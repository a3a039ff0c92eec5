"""Services, in the shape of ztunnel's local config."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from agent.state.waypoint import Waypoint
from agent.state.workload import Workload

NAMED_TARGET_PORT = 0  # no port's number: resolved per workload
# appProtocol values (and port-name prefixes, Istio's convention) that mean HTTP.
HTTP_PROTOCOLS = frozenset({"http", "http2", "grpc", "grpc-web", "kubernetes.io/h2c"})


def _no_ports() -> Mapping[int, Any]:
    return MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Service:
    name: str
    namespace: str
    # The name clients use, and the second half of the "namespace/hostname" key by which a
    # workload's `services` mapping says it backs this service.
    hostname: str
    # Bare IP addresses: ztunnel's "network/ip" form is reduced to the IP when parsed.
    vips: tuple[str, ...] = ()
    # Service port -> target port on the backing workloads; NAMED_TARGET_PORT where the
    # target is a port name, which each workload resolves itself (its `services` map).
    # Read-only, because snapshots are shared by every reader; left out of the hash since a
    # mapping has none.
    ports: Mapping[int, int] = field(default_factory=_no_ports, hash=False)
    # Where traffic addressed to the VIP goes first (a waypoint for services), if anywhere.
    waypoint: Waypoint | None = None
    # Service port -> its declared application protocol (Kubernetes `appProtocol`, or what a
    # port name like "http-web" says), lower case; a port not in it is undeclared.
    app_protocols: Mapping[int, str] = field(default_factory=_no_ports, hash=False)

    def __post_init__(self) -> None:
        # Copy so that the caller's dict, if it keeps one, cannot change a published service.
        object.__setattr__(self, "ports", MappingProxyType(dict(self.ports)))
        object.__setattr__(self, "app_protocols", MappingProxyType(dict(self.app_protocols)))

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.hostname}"

    def declares_http(self, port: int) -> bool:
        """Whether `port` is declared to speak HTTP (so a waypoint parses it)."""
        return self.app_protocols.get(port, "") in HTTP_PROTOCOLS

    def target_port(self, port: int) -> int | None:
        """The number every backing workload serves `port` on; None when the service has no
        such port or its target is a name (then only the workload's own map can say)."""
        target = self.ports.get(port)
        return None if target == NAMED_TARGET_PORT else target


@dataclass(frozen=True, slots=True)
class ServiceEndpoint:
    """A ready workload of a service, at the target port it serves one service port on."""

    workload: Workload
    ip: str
    port: int
