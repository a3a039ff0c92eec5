"""Connections around a waypoint (agent/proxy/waypoint_bypass.py): which ones count."""

from __future__ import annotations

import dataclasses

from structlog.testing import capture_logs

from agent.identity.spiffe import SpiffeId
from agent.proxy.waypoint_bypass import WaypointBypasses, guarding_waypoint
from agent.state.service import Service
from agent.state.store import MeshState
from agent.state.waypoint import Waypoint
from agent.state.workload import Protocol, Workload

WAYPOINT = Waypoint("10.96.0.50", 15008, "waypoint", "default")
WAYPOINT_SERVICE = Service("waypoint", "default", "waypoint.default.svc.cluster.local",
                           ("10.96.0.50",), {15008: 15008})  # fmt: skip
ECHO = Service("echo", "default", "echo.default.svc.cluster.local", ("10.96.0.20",), {80: 8080},
               WAYPOINT)  # fmt: skip
WAYPOINT_POD = Workload("uid-wp", "wp", "default", "waypoint", ("10.240.1.9",), Protocol.TCP,
                        "node-1", services={WAYPOINT_SERVICE.key: {}})  # fmt: skip
ECHO_POD = Workload("uid-echo", "echo-a", "default", "echo", ("10.240.1.3",), Protocol.HBONE,
                    "node-1", services={ECHO.key: {}})  # fmt: skip
CLIENT = SpiffeId("cluster.local", "default", "client")
STATE = MeshState(workloads=(WAYPOINT_POD, ECHO_POD), services=(ECHO, WAYPOINT_SERVICE))


def test_a_pod_is_guarded_by_its_own_waypoint_else_its_services() -> None:
    assert guarding_waypoint(STATE, ECHO_POD) == WAYPOINT
    own = Waypoint("10.240.1.9", name="own", namespace="default")
    bound = dataclasses.replace(ECHO_POD, waypoint=own)
    assert guarding_waypoint(STATE, bound) == own
    assert guarding_waypoint(STATE, WAYPOINT_POD) is None


def test_plaintext_and_hbone_from_others_count_the_waypoints_own_does_not() -> None:
    bypasses = WaypointBypasses()
    bypasses.check(STATE, ECHO_POD, None, "plaintext", "10.240.2.4:5000")
    bypasses.check(STATE, ECHO_POD, CLIENT, "hbone", "10.240.1.2:5000")
    bypasses.check(STATE, ECHO_POD, SpiffeId("cluster.local", "default", "waypoint"), "hbone",
                   "10.240.1.9:5000")  # fmt: skip
    bypasses.check(STATE, WAYPOINT_POD, CLIENT, "hbone", "10.240.1.2:5000")  # not guarded
    assert bypasses.counts == {("default/waypoint", "plaintext"): 1,
                               ("default/waypoint", "hbone"): 1}  # fmt: skip


def test_a_stream_of_bypasses_is_counted_each_and_logged_at_most_every_interval() -> None:
    now = [0.0]
    bypasses = WaypointBypasses(clock=lambda: now[0])
    with capture_logs() as logged:
        for second in range(25):  # 4 a second for 25 s
            now[0] = float(second)
            for _ in range(4):
                bypasses.check(STATE, ECHO_POD, None, "plaintext", "10.240.2.4:5000")
    assert bypasses.counts == {("default/waypoint", "plaintext"): 100}
    # At 0 s, 10 s and 20 s; each line says how many went unlogged before it.
    assert [line["more_not_logged"] for line in logged] == [0, 39, 39]
