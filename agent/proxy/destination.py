"""Where a captured outbound connection goes, decided on one state snapshot (sans-IO).

As ztunnel does it: a destination that is a Service's VIP:port is resolved to one of the
service's ready endpoints, on the target port for that port, and reached exactly as if the
app had dialled the endpoint's pod IP:targetPort (HBONE to its 15008 when it is in the mesh,
plain TCP from the pod otherwise). A VIP the mesh knows is never passed through as it is: a
service with no ready endpoint, or a port the service does not define, refuses the
connection with a reason. Any other destination is a pod address (or outside the mesh) and
is reached as dialled.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from agent.state.service import Service
from agent.state.store import MeshState
from agent.state.workload import Workload
from agent.telemetry.istio_labels import destination_service

Endpoint = tuple[str, int]

# A (service, port) never seen again keeps its counter; past this many the counters start
# over, so services that come and go cannot grow the picker without bound.
MAX_COUNTERS = 16384


class RefusalReason(enum.StrEnum):
    NO_READY_ENDPOINT = "no_ready_endpoint"
    UNKNOWN_SERVICE_PORT = "unknown_service_port"

    @property
    def response_flags(self) -> str:
        """Envoy's response flag for it, as Istio's metrics carry it: no healthy upstream,
        no route."""
        return "UH" if self is RefusalReason.NO_READY_ENDPOINT else "NR"


@dataclass(frozen=True, slots=True)
class Route:
    """upstream: the address to reach (an endpoint's pod IP:targetPort for a VIP, else the
    original destination); workload: the workload at that address, if known; service: the
    service the app asked for (by VIP), or that the workload serves the port for."""

    upstream: Endpoint
    workload: Workload | None
    service: Service | None
    by_vip: bool

    @property
    def tunnelled(self) -> bool:
        return self.workload is not None and self.workload.captured


@dataclass(frozen=True, slots=True)
class Refused:
    reason: RefusalReason
    service: Service

    def describe(self, port: int) -> str:
        if self.reason is RefusalReason.NO_READY_ENDPOINT:
            return f"no ready endpoint for {self.service.hostname}:{port}"
        return f"{self.service.hostname} has no port {port}"


@dataclass(frozen=True, slots=True)
class ServiceEndpoint:
    workload: Workload
    ip: str
    port: int  # the target port on this workload


def ready_endpoints(state: MeshState, service: Service, port: int) -> list[ServiceEndpoint]:
    """The service's healthy workloads with the target port for `port`, in a stable order
    (by uid) so that round robin walks them evenly."""
    endpoints = []
    for workload in sorted(state.workloads_of_service(service), key=lambda w: w.uid):
        if not workload.healthy or not workload.ips:
            continue
        # The workload's own map wins: a named targetPort resolves per pod, and a pod that
        # does not name it does not serve the port (target_port is None for a name).
        target = workload.services.get(service.key, {}).get(port) or service.target_port(port)
        if target is not None:
            endpoints.append(ServiceEndpoint(workload, workload.ips[0], target))
    return endpoints


class EndpointPicker:
    """Round robin over a service port's ready endpoints: every endpoint in turn, whatever
    joins or leaves between picks."""

    def __init__(self) -> None:
        self._next: dict[tuple[str, int], int] = {}

    def pick(
        self, service: Service, port: int, endpoints: Sequence[ServiceEndpoint]
    ) -> ServiceEndpoint:
        key = (service.key, port)
        if key not in self._next and len(self._next) >= MAX_COUNTERS:
            self._next.clear()
        turn = self._next.get(key, 0)
        self._next[key] = turn + 1
        return endpoints[turn % len(endpoints)]


def route(state: MeshState, dst: Endpoint, picker: EndpointPicker) -> Route | Refused:
    ip, port = dst
    service = state.service_by_vip(ip, port)
    if service is None:
        if (at_vip := state.service_at_vip(ip)) is not None:
            return Refused(RefusalReason.UNKNOWN_SERVICE_PORT, at_vip)
        workload = state.workload_by_ip(ip)
        return Route(dst, workload, destination_service(state, workload, port), by_vip=False)
    endpoints = ready_endpoints(state, service, port)
    if not endpoints:
        return Refused(RefusalReason.NO_READY_ENDPOINT, service)
    chosen = picker.pick(service, port, endpoints)
    return Route((chosen.ip, chosen.port), chosen.workload, service, by_vip=True)
