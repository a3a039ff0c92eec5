"""Connections that reach a waypoint-bound destination without passing its waypoint.

The deep guide's §20 (and lab 2): L7 policy lives at the waypoint, so a connection that goes
around it (plaintext from outside the mesh, a pod-addressed call to a Service's pod, HBONE
from a source that ignores the binding) is never judged at L7. ztunnel lets such traffic in
unless an L4 policy admits only the waypoint's service account; this agent lets it in too,
and makes it visible: each one is counted at the destination, and logged: the first of each
waypoint and transport at once, then at most one line per LOG_INTERVAL saying how many more
there were, so that a stream of them (or a peer making one on purpose) cannot flood the log
or slow every connection with a line of its own.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable

import structlog

from agent.identity.spiffe import SpiffeId
from agent.proxy.pod import identity_of
from agent.state.store import MeshState
from agent.state.waypoint import Waypoint
from agent.state.workload import Workload

log = structlog.get_logger("agent.proxy")

LOG_INTERVAL = 10.0  # seconds between two log lines of one (waypoint, transport)


def guarding_waypoint(state: MeshState, destination: Workload) -> Waypoint | None:
    """The waypoint traffic to `destination` should come through: its own, else the first
    of its Services'."""
    if destination.waypoint is not None:
        return destination.waypoint
    for key in destination.services:
        service = state.service(key)
        if service is not None and service.waypoint is not None:
            return service.waypoint
    return None


def waypoint_identities(state: MeshState, waypoint: Waypoint) -> set[SpiffeId]:
    return {identity_of(pod) for pod in state.waypoint_workloads(waypoint)}


class WaypointBypasses:
    """Counts, by (waypoint, transport), for /metrics."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.counts: collections.Counter[tuple[str, str]] = collections.Counter()
        self._clock = clock
        # Per (waypoint, transport): when it was last logged, and how many since.
        self._logged_at: dict[tuple[str, str], float] = {}
        self._unlogged: collections.Counter[tuple[str, str]] = collections.Counter()

    def check(
        self,
        state: MeshState,
        destination: Workload,
        peer: SpiffeId | None,
        transport: str,
        client: str,
    ) -> None:
        """Note the connection if it went around the destination's waypoint: plaintext, or
        HBONE from a peer that is not one of the waypoint's pods."""
        waypoint = guarding_waypoint(state, destination)
        if waypoint is None:
            return
        if peer is not None and peer in waypoint_identities(state, waypoint):
            return
        key = (waypoint.key, transport)
        self.counts[key] += 1
        now = self._clock()
        last = self._logged_at.get(key)
        if last is not None and now - last < LOG_INTERVAL:
            self._unlogged[key] += 1
            return
        self._logged_at[key] = now
        log.warning(
            "waypoint bypassed: connection reached its destination without L7",
            waypoint=waypoint.key,
            transport=transport,
            pod=destination.key,
            peer=peer.uri if peer is not None else None,
            more_not_logged=self._unlogged.pop(key, 0),
            **{"src.addr": client},
        )
