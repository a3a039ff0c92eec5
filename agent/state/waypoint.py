"""Waypoints, as the state names them: where L7 traffic of a Service or workload goes."""

from __future__ import annotations

import enum
from dataclasses import dataclass

HBONE_PORT = 15008
# The waypoint Gateway's annotation (ours; Istio's nearest is istiod's
# PILOT_AUTO_ALLOW_WAYPOINT_POLICY): "true" adds an L4 ALLOW for the waypoint's identity to
# every workload it serves, so that traffic around the waypoint is denied in the kernel.
ALLOW_ONLY_WAYPOINT = "ambient.istio.io/allow-only-waypoint"


class WaypointFor(enum.StrEnum):
    """A waypoint Gateway's `istio.io/waypoint-for`: which traffic it takes."""

    SERVICE = "service"  # Istio's default: traffic addressed to a Service's VIP
    WORKLOAD = "workload"  # traffic addressed to a pod's own address
    ALL = "all"
    NONE = "none"

    @property
    def takes_services(self) -> bool:
        return self in (WaypointFor.SERVICE, WaypointFor.ALL)

    @property
    def takes_workloads(self) -> bool:
        return self in (WaypointFor.WORKLOAD, WaypointFor.ALL)


@dataclass(frozen=True, slots=True)
class Waypoint:
    """ztunnel's GatewayAddress: the waypoint's address (its Service's VIP, or a pod's IP)
    and HBONE port, with the Gateway's name when the source knows it. An empty address is a
    waypoint that is bound but not ready (a Gateway without a status address): traffic goes
    direct, without L7, and the agent says so."""

    address: str
    hbone_port: int = HBONE_PORT
    name: str = ""
    namespace: str = ""
    # The Gateway's ALLOW_ONLY_WAYPOINT: off by default, as in Istio.
    allow_only: bool = False

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}" if self.name else self.address
