"""What the proxy tells the telemetry about a connection: its Istio labels and access log
fields at open, and how it ended (agent/telemetry/connections.py)."""

from __future__ import annotations

import socket
from typing import Any

import structlog

from agent.hbone import protocol as hbone
from agent.proxy.pod import Pod
from agent.proxy.relay import RelayResult
from agent.state.service import Service
from agent.state.store import MeshState
from agent.state.workload import Workload
from agent.telemetry.connections import (
    ConnectionReport,
    ConnectionTelemetry,
    PolicyVerdict,
    Relayed,
    TrackedConnection,
)
from agent.telemetry.istio_labels import (
    Reporter,
    SecurityPolicy,
    connection_labels,
    destination_service,
)

log = structlog.get_logger("agent.proxy")

Endpoint = tuple[str, int]


def address(endpoint: Endpoint) -> str:
    return hbone.format_authority(endpoint[0], endpoint[1])


def socket_endpoints(sock: socket.socket) -> tuple[Endpoint, Endpoint]:
    """(peer, local) of an accepted socket; for a captured one, local is the original
    destination."""
    peer, local = sock.getpeername(), sock.getsockname()
    return (peer[0], peer[1]), (local[0], local[1])


def captured(pod: Pod, direction: str, src: Endpoint, dst: Endpoint, mode: str) -> None:
    addresses = {"src.addr": address(src), "dst.addr": address(dst)}
    # Debug: every connection already gets its "connection complete" access log line, and a
    # second line per connection cost each side about a tenth of its CPU per connection.
    log.debug("connection captured", direction=direction, pod=pod.workload.key,
             dataplane_mode=mode, **addresses)  # fmt: skip


def connection_report(
    state: MeshState,
    reporter: Reporter,
    tunnelled: bool,
    source: tuple[str, Workload | None, str | None],
    destination: tuple[str, int, Workload | None, str | None],
    extra: dict[str, Any] | None = None,
    peer_is_client: bool = True,
    service: Service | None = None,
    response_flags: str = "-",
    via_waypoint: bool | None = None,
    route: str | None = None,
) -> ConnectionReport:
    """A connection's Istio labels and access log fields, from its two ends: source
    (address, workload, principal) and destination (address, port, workload, principal).
    service: the one the app asked for (by VIP), when the caller knows it; else the one the
    destination workload serves the port for, if any. route: the access log's, when not
    "hbone" (tunnelled) or "passthrough": "local", a same-node connection the agent
    delivered itself (agent/proxy/local_delivery.py)."""
    src_addr, src_workload, src_principal = source
    dst_addr, dst_port, dst_workload, dst_principal = destination
    if service is None:
        service = destination_service(state, dst_workload, dst_port)
    security = SecurityPolicy.MUTUAL_TLS if tunnelled else SecurityPolicy.NONE
    labels = connection_labels(reporter, src_workload, src_principal, dst_workload,
                               dst_principal, service, security, response_flags,
                               via_waypoint)  # fmt: skip
    fields = {
        "src.addr": src_addr, **_peer_fields("src", src_workload), "src.identity": src_principal,
        "dst.addr": dst_addr, **_peer_fields("dst", dst_workload), "dst.identity": dst_principal,
        "dst.service": service.hostname if service else None,
        "route": route or ("hbone" if tunnelled else "passthrough"), **(extra or {}),
    }  # fmt: skip
    direction = "outbound" if reporter is Reporter.SOURCE else "inbound"
    return ConnectionReport(labels, direction, peer_is_client, fields)


def finish(
    telemetry: ConnectionTelemetry,
    conn: TrackedConnection,
    verdict: PolicyVerdict,
    relayed: RelayResult,
) -> None:
    """A relayed connection is complete; a relay's a_to_b is always the client's bytes to
    the server (relay() takes the client's side first, TunnelRelay is told)."""
    counts = Relayed(relayed.a_to_b, relayed.b_to_a)
    telemetry.done(conn, verdict, counts, relayed.error)


def failed(what: str, exc: BaseException) -> str:
    """The reason a connection failed, never empty: a TimeoutError's text is ""."""
    text = str(exc) or type(exc).__name__
    if isinstance(exc, TimeoutError) and not str(exc):
        text = "timed out"
    cause = exc.__cause__
    if cause is not None and str(cause) and str(cause) not in text:
        text += f" ({cause})"
    return f"{what} failed: {text}"


def _peer_fields(end: str, workload: Workload | None) -> dict[str, str | None]:
    return {f"{end}.workload": workload.name if workload else None,
            f"{end}.namespace": workload.namespace if workload else None}  # fmt: skip
