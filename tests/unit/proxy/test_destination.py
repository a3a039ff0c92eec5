"""Where an outbound connection goes (agent/proxy/destination.py): VIPs to ready endpoints."""

from __future__ import annotations

import collections

import pytest

from agent.proxy.destination import EndpointPicker, RefusalReason, Refused, Route, route
from agent.state.service import Service
from agent.state.store import MeshState
from agent.state.waypoint import Waypoint
from agent.state.workload import Protocol, Workload

VIP = "10.96.0.20"
ECHO = Service("echo", "default", "echo.default.svc.cluster.local", (VIP,), {80: 8080, 81: 8081})
KEY = ECHO.key


def endpoint(
    name: str,
    ip: str,
    *,
    healthy: bool = True,
    protocol: Protocol = Protocol.HBONE,
    ports: dict[int, int] | None = None,
) -> Workload:
    return Workload(f"uid-{name}", name, "default", "default", (ip,), protocol, "node-1",
                    services={KEY: ports or {}}, healthy=healthy)  # fmt: skip


def state(*workloads: Workload, services: tuple[Service, ...] = (ECHO,)) -> MeshState:
    return MeshState(workloads=workloads, services=services)


def routed(
    mesh: MeshState,
    dst: tuple[str, int],
    picker: EndpointPicker | None = None,
    source: Workload | None = None,
) -> Route:
    decided = route(mesh, dst, picker or EndpointPicker(), source)
    assert isinstance(decided, Route), decided
    return decided


def test_a_vip_goes_to_an_endpoints_pod_ip_and_target_port() -> None:
    a = endpoint("a", "10.240.1.3")
    decided = routed(state(a), (VIP, 80))
    assert decided == Route(("10.240.1.3", 8080), a, ECHO, by_vip=True)
    assert decided.tunnelled


def test_the_workloads_own_target_port_wins() -> None:
    """A named targetPort resolves per pod: the workload's map says where it listens."""
    a = endpoint("a", "10.240.1.3", ports={80: 9090})
    assert routed(state(a), (VIP, 80)).upstream == ("10.240.1.3", 9090)
    assert routed(state(a), (VIP, 81)).upstream == ("10.240.1.3", 8081)


def test_round_robin_spreads_evenly_over_ready_endpoints_only() -> None:
    ready = [endpoint(n, f"10.240.1.{i}") for i, n in enumerate("abc", start=3)]
    sick = endpoint("d", "10.240.1.9", healthy=False)
    mesh, picker = state(*ready, sick), EndpointPicker()
    hits = collections.Counter(routed(mesh, (VIP, 80), picker).upstream[0] for _ in range(300))
    assert hits == {"10.240.1.3": 100, "10.240.1.4": 100, "10.240.1.5": 100}


def test_each_service_port_has_its_own_turn() -> None:
    mesh, picker = state(endpoint("a", "10.240.1.3"), endpoint("b", "10.240.1.4")), EndpointPicker()
    first = routed(mesh, (VIP, 80), picker).upstream[0]
    assert routed(mesh, (VIP, 81), picker).upstream[0] == first  # 81's first turn
    assert routed(mesh, (VIP, 80), picker).upstream[0] != first


def test_churn_new_picks_avoid_a_removed_endpoint() -> None:
    a, b = endpoint("a", "10.240.1.3"), endpoint("b", "10.240.1.4")
    picker = EndpointPicker()
    routed(state(a, b), (VIP, 80), picker)
    after = state(b)
    assert {routed(after, (VIP, 80), picker).upstream[0] for _ in range(10)} == {"10.240.1.4"}


def test_an_endpoint_out_of_the_mesh_is_plain_tcp_to_its_pod() -> None:
    plain = endpoint("legacy", "10.240.2.4", protocol=Protocol.TCP)
    decided = routed(state(plain), (VIP, 80))
    assert decided.upstream == ("10.240.2.4", 8080) and not decided.tunnelled


def test_no_ready_endpoint_is_refused_not_passed_through() -> None:
    for mesh in (state(), state(endpoint("a", "10.240.1.3", healthy=False))):
        assert route(mesh, (VIP, 80), EndpointPicker()) == Refused(
            RefusalReason.NO_READY_ENDPOINT, ECHO
        )


def test_a_port_the_service_does_not_define_is_refused() -> None:
    decided = route(state(endpoint("a", "10.240.1.3")), (VIP, 443), EndpointPicker())
    assert decided == Refused(RefusalReason.UNKNOWN_SERVICE_PORT, ECHO)
    assert isinstance(decided, Refused)
    assert decided.describe(443) == "echo.default.svc.cluster.local has no port 443"
    assert RefusalReason.UNKNOWN_SERVICE_PORT.response_flags == "NR"
    assert RefusalReason.NO_READY_ENDPOINT.response_flags == "UH"


def test_a_pod_address_is_reached_as_dialled_and_names_the_service_it_serves() -> None:
    a = endpoint("a", "10.240.1.3", ports={80: 8080})
    assert routed(state(a), ("10.240.1.3", 8080)) == Route(
        ("10.240.1.3", 8080), a, ECHO, by_vip=False
    )
    assert routed(state(a), ("10.240.1.3", 22)).service is None
    outside = routed(state(a), ("192.0.2.1", 443))
    assert outside == Route(("192.0.2.1", 443), None, None, by_vip=False)


# ---- waypoints ----------------------------------------------------------------------------

WAYPOINT_VIP = "10.96.0.50"
WAYPOINT_SERVICE = Service(
    "waypoint", "default", "waypoint.default.svc.cluster.local", (WAYPOINT_VIP,), {15008: 15008}
)
WAYPOINT = Waypoint(WAYPOINT_VIP, 15008, "waypoint", "default")


def waypoint_pod(name: str, ip: str, *, healthy: bool = True) -> Workload:
    return Workload(f"uid-{name}", name, "default", "waypoint", (ip,), Protocol.TCP, "node-1",
                    services={WAYPOINT_SERVICE.key: {}}, healthy=healthy)  # fmt: skip


def bound_state(*workloads: Workload, waypoint: Waypoint = WAYPOINT) -> MeshState:
    echo = Service(ECHO.name, ECHO.namespace, ECHO.hostname, ECHO.vips, ECHO.ports, waypoint)
    return MeshState(workloads=workloads, services=(echo, WAYPOINT_SERVICE))


CLIENT = Workload("uid-client", "client", "default", "client", ("10.240.1.2",),
                  Protocol.HBONE, "node-1")  # fmt: skip


def test_a_vip_bound_to_a_waypoint_goes_to_a_waypoint_pod_with_the_vip_as_authority() -> None:
    wp_a, wp_b = waypoint_pod("wp-a", "10.240.1.9"), waypoint_pod("wp-b", "10.240.2.9")
    mesh, picker = bound_state(endpoint("a", "10.240.1.3"), wp_a, wp_b), EndpointPicker()
    first = routed(mesh, (VIP, 80), picker, CLIENT)
    assert (first.upstream, first.workload, first.waypoint) == ((VIP, 80), wp_a, WAYPOINT)
    assert first.tunnelled and first.hbone_address == ("10.240.1.9", 15008)
    assert first.service is not None and first.service.name == "echo"
    assert routed(mesh, (VIP, 80), picker, CLIENT).workload == wp_b  # waypoint pods in turn


def test_a_pod_bound_to_a_waypoint_is_reached_through_it_with_its_own_address() -> None:
    wp = waypoint_pod("wp-a", "10.240.1.9")
    target = Workload("uid-a", "a", "default", "default", ("10.240.1.3",), Protocol.HBONE,
                      "node-1", waypoint=WAYPOINT)  # fmt: skip
    decided = routed(MeshState(workloads=(target, wp), services=(WAYPOINT_SERVICE,)),
                     ("10.240.1.3", 8080), EndpointPicker(), CLIENT)  # fmt: skip
    assert (decided.upstream, decided.workload, decided.by_vip) == (("10.240.1.3", 8080), wp, False)
    assert decided.hbone_address == ("10.240.1.9", 15008)


def test_service_addressed_traffic_never_uses_a_workloads_waypoint() -> None:
    a = endpoint("a", "10.240.1.3")
    bound = Workload(a.uid, a.name, a.namespace, a.service_account, a.ips, a.protocol, a.node,
                     services=a.services, waypoint=WAYPOINT)  # fmt: skip
    decided = routed(state(bound, waypoint_pod("wp", "10.240.1.9")), (VIP, 80), None, CLIENT)
    assert (decided.workload, decided.waypoint) == (bound, None)


def test_the_waypoints_own_traffic_is_not_sent_back_to_it() -> None:
    wp = waypoint_pod("wp-a", "10.240.1.9")
    decided = routed(bound_state(endpoint("a", "10.240.1.3"), wp), (VIP, 80), None, wp)
    assert (decided.upstream, decided.waypoint, decided.skipped) == (
        ("10.240.1.3", 8080), None, None
    )  # fmt: skip


@pytest.mark.parametrize(
    "waypoint_pods, waypoint",
    [
        pytest.param((), WAYPOINT, id="no-pod-behind-it"),
        pytest.param((waypoint_pod("wp", "10.240.1.9", healthy=False),), WAYPOINT, id="pod-down"),
        pytest.param(
            (waypoint_pod("wp", "10.240.1.9"),),
            Waypoint("", name="waypoint", namespace="default"),
            id="gateway-without-address",
        ),
    ],
)
def test_a_waypoint_that_is_not_ready_is_skipped_and_says_so(
    waypoint_pods: tuple[Workload, ...], waypoint: Waypoint
) -> None:
    mesh = bound_state(endpoint("a", "10.240.1.3"), *waypoint_pods, waypoint=waypoint)
    decided = routed(mesh, (VIP, 80), None, CLIENT)
    assert (decided.upstream, decided.waypoint, decided.skipped) == (
        ("10.240.1.3", 8080), None, waypoint
    )  # fmt: skip
    assert decided.hbone_address == ("10.240.1.3", 15008)
