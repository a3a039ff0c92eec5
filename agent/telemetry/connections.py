"""Per-connection telemetry: the proxy's knowledge (who, which path, the policy's answer)
joined with the kernel's figures (bytes, RTT, retransmissions, lifetime) by socket cookie.

Sans-IO: the proxy calls open() and done(), the ring-buffer reader hands in kernel_closed(),
a timer calls expire(); what comes out is counted into Istio's TCP series and written as one
"connection complete" access log line per connection. The byte counts are the kernel's; only
when the kernel's record does not come (no sockops attached, or the ring buffer overflowed)
are the relay's own counts used, and the log line says so (`bytes_source`).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import structlog

from agent.drain import stopped_within
from agent.telemetry.events import SocketClosed
from agent.telemetry.istio_labels import ConnectionLabels

log = structlog.get_logger("agent.access")

# How long a finished connection waits for its kernel record (the socket's FIN exchange
# normally ends within a round trip after the relay ends).
KERNEL_RECORD_WAIT = 10.0
# Kernel records of sockets nobody registered (yet): the admin server's, the HBONE tunnels'.
# A registration arriving later finds its record here; the rest are dropped after this long.
UNCLAIMED_TTL = 10.0
UNCLAIMED_MAX = 65536


@dataclass(frozen=True, slots=True)
class PolicyVerdict:
    """The L4 authorization's answer for the connection, as the access log shows it."""

    verdict: str  # "allow", "deny", or "none" (no policy applies: destination out of mesh)
    policy: str | None = None  # the deciding policy, when the kernel named one
    reason: str | None = None

    def fields(self) -> dict[str, Any]:
        return {"policy.verdict": self.verdict, "policy.name": self.policy,
                "policy.reason": self.reason}  # fmt: skip


@dataclass(frozen=True, slots=True)
class ConnectionReport:
    """What the proxy knows when it takes a connection."""

    labels: ConnectionLabels
    direction: str  # "outbound" or "inbound" (from the reporting pod's side)
    # The registered socket's peer is the client (a socket the agent accepted); else it is the
    # server (the socket the agent connected to the app for an inbound tunnel).
    peer_is_client: bool
    fields: dict[str, Any]  # access log fields known at the start (addresses, identities)


@dataclass(frozen=True, slots=True)
class Relayed:
    """The relay's own counts, used only when the kernel's record never comes."""

    client_to_server: int
    server_to_client: int


@dataclass(slots=True, eq=False)  # each is itself: hashed by identity
class TrackedConnection:
    report: ConnectionReport
    cookie: int | None
    started: float
    kernel: SocketClosed | None = None
    finished: tuple[PolicyVerdict, Relayed | None, str | None] | None = None
    finished_at: float = 0.0


@dataclass(slots=True)
class TcpSeries:
    """Istio's four TCP counters for one label set. Received is the request direction
    (client to server), sent the response direction, whichever side reports."""

    opened: int = 0
    closed: int = 0
    received_bytes: int = 0
    sent_bytes: int = 0
    live: int = 0  # open connections counted here: the series stays while any is open
    # The workloads (uids) seen at each end: pods of one deployment share a series, which
    # stays while any of them, at each end, is still known.
    source_uids: set[str] = field(default_factory=set)
    destination_uids: set[str] = field(default_factory=set)

    def outlived(self, known: set[str]) -> bool:
        return self.live == 0 and any(
            uids and uids.isdisjoint(known) for uids in (self.source_uids, self.destination_uids)
        )


@dataclass(slots=True)
class TunnelCounts:
    """HBONE connections (TLS on the wire) of one direction, as the kernel counted them."""

    closed: int = 0
    sent_bytes: int = 0
    received_bytes: int = 0
    retransmits: int = 0


class ConnectionTelemetry:
    def __init__(
        self,
        kernel_records: bool,
        clock: Callable[[], float] = time.monotonic,
        write_log: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        """kernel_records: whether sockops reports this agent's sockets; without it every
        connection completes on done() with the relay's counts."""
        self.kernel_records = kernel_records
        self._clock = clock
        self._write_log = write_log or _access_log
        self._by_cookie: dict[int, TrackedConnection] = {}
        self._waiting: set[TrackedConnection] = set()  # done, kernel record not in yet
        self._unclaimed: OrderedDict[int, tuple[float, SocketClosed]] = OrderedDict()
        self._series: dict[tuple[str, ...], TcpSeries] = {}
        self._tunnel_sockets: dict[int, str] = {}  # cookie -> direction
        self._tunnels: dict[str, TunnelCounts] = {}
        self._lock = threading.Lock()  # series() is read from the OTLP exporter's thread
        self.kernel_records_missing = 0  # completed on the relay's counts instead

    # -- the proxy's side ------------------------------------------------------------------

    def open(self, cookie: int | None, report: ConnectionReport) -> TrackedConnection:
        conn = TrackedConnection(report, cookie if self.kernel_records else None, self._clock())
        with self._lock:
            series = self._series_for(report.labels)
            series.opened += 1
            series.live += 1
        if conn.cookie is not None:
            claimed = self._unclaimed.pop(conn.cookie, None)
            if claimed is not None:
                conn.kernel = claimed[1]
            else:
                self._by_cookie[conn.cookie] = conn
        return conn

    def done(
        self,
        conn: TrackedConnection,
        verdict: PolicyVerdict,
        relayed: Relayed | None = None,
        error: str | None = None,
    ) -> None:
        if conn.finished is not None:
            return
        conn.finished = (verdict, relayed, error)
        conn.finished_at = self._clock()
        if conn.kernel is not None or conn.cookie is None:
            self._complete(conn)
        else:
            self._waiting.add(conn)

    def track_tunnel(self, cookie: int, direction: str) -> None:
        """An HBONE connection's socket ("outbound": dialled, "inbound": accepted on 15008)."""
        if not self.kernel_records:
            return
        claimed = self._unclaimed.pop(cookie, None)
        if claimed is not None:
            self._count_tunnel(direction, claimed[1])
        else:
            self._tunnel_sockets[cookie] = direction

    def tunnels(self) -> dict[str, TunnelCounts]:
        with self._lock:
            return {d: TunnelCounts(c.closed, c.sent_bytes, c.received_bytes, c.retransmits)
                    for d, c in self._tunnels.items()}  # fmt: skip

    def _count_tunnel(self, direction: str, event: SocketClosed) -> None:
        with self._lock:
            counts = self._tunnels.setdefault(direction, TunnelCounts())
            counts.closed += 1
            counts.sent_bytes += event.bytes_sent
            counts.received_bytes += event.bytes_received
            counts.retransmits += event.retransmits

    # -- the kernel's side -----------------------------------------------------------------

    def kernel_closed(self, events: Iterable[SocketClosed]) -> None:
        now = self._clock()
        for event in events:
            conn = self._by_cookie.pop(event.cookie, None)
            tunnel = self._tunnel_sockets.pop(event.cookie, None) if conn is None else None
            if tunnel is not None:
                self._count_tunnel(tunnel, event)
                continue
            if conn is None:
                self._unclaimed[event.cookie] = (now, event)
                if len(self._unclaimed) > UNCLAIMED_MAX:
                    self._unclaimed.popitem(last=False)
                continue
            conn.kernel = event
            if conn.finished is not None:
                self._waiting.discard(conn)
                self._complete(conn)

    async def expire_every(self, seconds: float, stop: asyncio.Event) -> None:
        """expire() every `seconds` until `stop` is set: the agent's telemetry task."""
        while not await stopped_within(stop, seconds):
            self.expire()

    def expire(self, everything: bool = False) -> None:
        """Complete connections whose kernel record is overdue (with everything: all that
        wait, at shutdown); drop old unclaimed records."""
        now = self._clock()
        wait = -1.0 if everything else KERNEL_RECORD_WAIT
        for conn in [c for c in self._waiting if now - c.finished_at > wait]:
            self._waiting.discard(conn)
            if conn.cookie is not None:
                self._by_cookie.pop(conn.cookie, None)
            self.kernel_records_missing += 1
            self._complete(conn)
        while self._unclaimed:
            cookie, (seen, _) = next(iter(self._unclaimed.items()))
            if now - seen <= UNCLAIMED_TTL:
                break
            del self._unclaimed[cookie]

    # -- series ----------------------------------------------------------------------------

    def series(self) -> list[tuple[tuple[str, ...], TcpSeries]]:
        """A copy of every series, safe to read from another thread."""
        with self._lock:
            return [
                (labels, TcpSeries(s.opened, s.closed, s.received_bytes, s.sent_bytes, s.live))
                for labels, s in self._series.items()
            ]

    def forget_workloads(self, known: set[str]) -> int:
        """Remove the series of workloads no longer known (bounded cardinality), except while
        one of their connections is still open. Returns how many went."""
        with self._lock:
            gone = [labels for labels, s in self._series.items() if s.outlived(known)]
            for labels in gone:
                del self._series[labels]
        return len(gone)

    @property
    def open_connections(self) -> int:
        with self._lock:
            return sum(s.live for s in self._series.values())

    def _series_for(self, labels: ConnectionLabels) -> TcpSeries:
        series = self._series.get(labels.values)
        if series is None:
            series = self._series[labels.values] = TcpSeries()
        if labels.source_uid:
            series.source_uids.add(labels.source_uid)
        if labels.destination_uid:
            series.destination_uids.add(labels.destination_uid)
        return series

    def _complete(self, conn: TrackedConnection) -> None:
        assert conn.finished is not None
        verdict, relayed, error = conn.finished
        report, kernel = conn.report, conn.kernel
        extra: dict[str, Any] = {}
        if kernel is not None:
            if report.peer_is_client:
                request, response = kernel.bytes_received, kernel.bytes_sent
            else:
                request, response = kernel.bytes_sent, kernel.bytes_received
            duration_ms = kernel.duration_ns / 1e6
            extra = {"rtt_us": kernel.srtt_us, "retransmits": kernel.retransmits,
                     "bytes_source": "kernel"}  # fmt: skip
        else:
            request = relayed.client_to_server if relayed else 0
            response = relayed.server_to_client if relayed else 0
            duration_ms = (conn.finished_at - conn.started) * 1000
            extra = {"bytes_source": "proxy"}
        with self._lock:
            series = self._series_for(report.labels)
            series.closed += 1
            series.live -= 1
            series.received_bytes += request
            series.sent_bytes += response
        labels = report.labels.as_dict()
        self._write_log({
            "direction": report.direction,
            "reporter": labels["reporter"],
            **report.fields,
            "bytes_sent": request,
            "bytes_recv": response,
            "duration_ms": round(duration_ms, 3),
            **extra,
            "connection_security_policy": labels["connection_security_policy"],
            "dataplane_mode": report.labels.dataplane_mode,
            **verdict.fields(),
            "error": error,
        })  # fmt: skip


def _access_log(fields: dict[str, Any]) -> None:
    log.info("connection complete", **fields)
