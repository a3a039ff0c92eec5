"""Where a captured outbound connection goes, decided on one state snapshot (sans-IO).

As ztunnel does it: a destination that is a Service's VIP:port is resolved to one of the
service's ready endpoints, on the target port for that port, and reached exactly as if the
app had dialled the endpoint's pod IP:targetPort (HBONE to its 15008 when it is in the mesh,
plain TCP from the pod otherwise). A VIP the mesh knows is never passed through as it is: a
service with no ready endpoint, or a port the service does not define, refuses the
connection with a reason. Any other destination is a pod address (or outside the mesh) and
is reached as dialled.

Waypoints, as ztunnel routes to them: a VIP whose Service is bound to a waypoint goes over
HBONE to one of the waypoint's pods with `:authority` VIP:port (service-addressed traffic
never uses a workload's waypoint); a pod address whose workload is bound to one goes there
with `:authority` podIP:port. The waypoint's own traffic is never sent back to it. A bound
waypoint that is not ready (no address, or no ready pod behind it) is skipped: the
connection goes direct, without L7, and the route says so (`skipped`) so it is logged and
counted.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from agent.state.service import Service, ServiceEndpoint
from agent.state.store import MeshState
from agent.state.waypoint import HBONE_PORT, Waypoint
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
    """upstream: the address to reach, the HBONE `:authority` (an endpoint's pod
    IP:targetPort for a VIP, else the original destination; VIP:port through a waypoint);
    workload: the workload the connection is handed to (the endpoint, or the waypoint pod),
    if known; service: the service the app asked for (by VIP), or that the workload serves
    the port for; waypoint: the one the connection goes through; skipped: a bound waypoint
    passed by because it is not ready."""

    upstream: Endpoint
    workload: Workload | None
    service: Service | None
    by_vip: bool
    waypoint: Waypoint | None = None
    skipped: Waypoint | None = None

    @property
    def tunnelled(self) -> bool:
        return self.workload is not None and (self.workload.captured or self.waypoint is not None)

    @property
    def hbone_address(self) -> Endpoint:
        """Where the tunnel is dialled: the waypoint pod's HBONE port, or the endpoint's."""
        assert self.workload is not None and self.workload.ips
        port = self.waypoint.hbone_port if self.waypoint is not None else HBONE_PORT
        return (self.workload.ips[0], port)


@dataclass(frozen=True, slots=True)
class Refused:
    reason: RefusalReason
    service: Service

    def describe(self, port: int) -> str:
        if self.reason is RefusalReason.NO_READY_ENDPOINT:
            return f"no ready endpoint for {self.service.hostname}:{port}"
        return f"{self.service.hostname} has no port {port}"


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


class _NotReady:
    """A bound waypoint with nowhere to send traffic."""


_NOT_READY = _NotReady()


def route(
    state: MeshState, dst: Endpoint, picker: EndpointPicker, source: Workload | None = None
) -> Route | Refused:
    """Where a connection from `source` to `dst` goes (see the module docstring)."""
    ip, port = dst
    service = state.service_by_vip(ip, port)
    skipped: Waypoint | None = None
    if service is None:
        if (at_vip := state.service_at_vip(ip)) is not None:
            return Refused(RefusalReason.UNKNOWN_SERVICE_PORT, at_vip)
        workload = state.workload_by_ip(ip)
        served = destination_service(state, workload, port)
        if workload is not None and workload.captured and workload.waypoint is not None:
            via = _waypoint_pod(state, workload.waypoint, source, picker)
            if isinstance(via, Workload):
                return Route(dst, via, served, False, waypoint=workload.waypoint)
            if via is _NOT_READY:
                skipped = workload.waypoint
        return Route(dst, workload, served, by_vip=False, skipped=skipped)
    if service.waypoint is not None:
        via = _waypoint_pod(state, service.waypoint, source, picker)
        if isinstance(via, Workload):
            return Route(dst, via, service, True, waypoint=service.waypoint)
        if via is _NOT_READY:
            skipped = service.waypoint
    endpoints = state.ready_endpoints(service, port)
    if not endpoints:
        return Refused(RefusalReason.NO_READY_ENDPOINT, service)
    chosen = picker.pick(service, port, endpoints)
    return Route((chosen.ip, chosen.port), chosen.workload, service, True, skipped=skipped)


def _waypoint_pod(
    state: MeshState, waypoint: Waypoint, source: Workload | None, picker: EndpointPicker
) -> Workload | _NotReady | None:
    """The waypoint pod to tunnel through: one of the ready pods of the waypoint's Service
    (taken in turn), or the pod at its address. None when the source is the waypoint itself
    (its traffic goes on direct, as it must); _NOT_READY when there is none to use."""
    if not waypoint.address:
        return _NOT_READY
    if source is not None and any(w.uid == source.uid for w in state.waypoint_workloads(waypoint)):
        return None
    waypoint_service = state.service_at_vip(waypoint.address)
    if waypoint_service is None:
        pod = state.workload_by_ip(waypoint.address)
        return pod if pod is not None and pod.healthy else _NOT_READY
    endpoints = state.ready_endpoints(waypoint_service, waypoint.hbone_port)
    if not endpoints:
        return _NOT_READY
    return picker.pick(waypoint_service, waypoint.hbone_port, endpoints).workload
