"""Istio's request and TCP metrics of the waypoint (`reporter="waypoint"`), from Envoy's
access log lines (agent/waypoint/envoy_config.py defines their fields).

Envoy knows addresses, the client's verified principal and the endpoint it picked; the mesh
state turns them into Istio's labels (workload, namespace, service, canonical names), the
same derivation the node agents use (agent/telemetry/istio_labels.py). Each line is also
relayed as the waypoint's JSON access log, with those names and, for a request RBAC denied,
the policy that denied it.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import structlog
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric

from agent.admin.metrics import ISTIO_TCP_COUNTERS
from agent.identity.spiffe import SpiffeId
from agent.state.service import Service
from agent.state.store import MeshState
from agent.state.workload import Workload
from agent.telemetry.istio_labels import (
    REQUEST_LABELS,
    TCP_LABELS,
    Reporter,
    SecurityPolicy,
    connection_labels,
    destination_service,
)
from agent.waypoint.rbac import denying_policy, policy_key

log = structlog.get_logger("waypoint.access")
S = TypeVar("S")

# Istio's buckets.
DURATION_BUCKETS = (
    0.5,
    1,
    5,
    10,
    25,
    50,
    100,
    250,
    500,
    1000,
    2500,
    5000,
    10000,
    30000,
    60000,
    300000,
    600000,
    1800000,
    3600000,
)
BYTES_BUCKETS = (1, 10, 100, 1000, 10000, 100000, 1000000, 10000000, 100000000, 1000000000)
# Label sets kept at most; beyond it new ones are counted as dropped, not stored, so a
# stream of distinct peers cannot grow the process without bound.
MAX_SERIES = 10_000


@dataclass(slots=True)
class _Histogram:
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0

    def observe(self, value: float) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.buckets) + 1)
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value

    def family_values(self) -> tuple[list[tuple[str, float]], float]:
        cumulative = 0
        out: list[tuple[str, float]] = []
        counts = self.counts or [0] * (len(self.buckets) + 1)
        for bound, count in zip((*self.buckets, float("inf")), counts, strict=True):
            cumulative += count
            out.append(("+Inf" if bound == float("inf") else f"{bound:g}", cumulative))
        return out, self.total


@dataclass(slots=True)
class _RequestSeries:
    requests: int = 0
    duration: _Histogram = field(default_factory=lambda: _Histogram(DURATION_BUCKETS))
    request_bytes: _Histogram = field(default_factory=lambda: _Histogram(BYTES_BUCKETS))
    response_bytes: _Histogram = field(default_factory=lambda: _Histogram(BYTES_BUCKETS))


@dataclass(slots=True)
class _TcpSeries:
    opened: int = 0
    closed: int = 0
    received_bytes: int = 0
    sent_bytes: int = 0


def _ip(address: object) -> str:
    """The IP of "ip:port" or "[v6]:port" as Envoy writes addresses."""
    text = str(address or "")
    host = text.rpartition(":")[0] if text.count(":") == 1 or text.startswith("[") else text
    return host.strip("[]")


def _port(address: object) -> int:
    tail = str(address or "").rpartition(":")[2]
    return int(tail) if tail.isdigit() else 0


def _uri(workload: Workload | None) -> str | None:
    if workload is None:
        return None
    return SpiffeId(workload.trust_domain, workload.namespace, workload.service_account).uri


def _int(value: object) -> int:
    try:
        return int(str(value))
    except ValueError:
        return 0


class RequestTelemetry:
    def __init__(self, state: Callable[[], MeshState]) -> None:
        self._state = state
        self._requests: dict[tuple[str, ...], _RequestSeries] = {}
        self._tcp: dict[tuple[str, ...], _TcpSeries] = {}
        self.dropped_series = 0
        self.lines = 0
        # Per HTTP chain, the ALLOW policies in force (envoy_config.Resources): a request none
        # of them allowed is denied with no policy to name; the log names the ones it missed.
        self.allow_policies: dict[str, tuple[str, ...]] = {}

    def record(self, line: dict[str, Any]) -> None:
        """One access log line: counted, and relayed as the waypoint's access log."""
        self.lines += 1
        kind = line.get("kind")
        if kind == "tunnel":
            log.info("tunnel", **line)
            return
        state = self._state()
        source = state.workload_by_ip(_ip(line.get("client")))
        destination = state.workload_by_ip(_ip(line.get("upstream_pod")))
        service = self._service(state, line, destination)
        peer = str(line.get("peer") or "") or None
        labels = connection_labels(
            Reporter.WAYPOINT,
            source,
            peer,
            destination,
            _uri(destination),
            service,
            SecurityPolicy.MUTUAL_TLS,
            str(line.get("flags") or "-"),
            via_waypoint=True,
        )
        names = {
            "src.workload": source.name if source else None,
            "src.namespace": source.namespace if source else None,
            "dst.workload": destination.name if destination else None,
            "dst.namespace": destination.namespace if destination else None,
            "dst.service": service.hostname if service else None,
        }
        if kind == "http":
            denied_by = denying_policy(str(line.get("details") or ""))
            if denied_by == "":
                missed = ", ".join(self.allow_policies.get(str(line.get("chain")), ()))
                denied_by = "no ALLOW policy matched" + (f" ({missed})" if missed else "")
            if denied_by is not None:
                names["denied_by"] = denied_by
            # A dry-run policy that would have denied: named, never deciding.
            if line.get("dry_run_result") == "denied":
                names["dry_run_denied_by"] = policy_key(str(line.get("dry_run") or ""))
            status = str(line.get("status") or "0")
            # Istio's request labels: the TCP ones with the protocol "http" and the status.
            values = (
                *labels.values[: REQUEST_LABELS.index("request_protocol")],
                "http",
                status,
                *labels.values[TCP_LABELS.index("response_flags") :],
            )
            series = self._series(self._requests, values, _RequestSeries)
            if series is not None:
                series.requests += 1
                series.duration.observe(float(_int(line.get("duration_ms"))))
                series.request_bytes.observe(float(_int(line.get("bytes_received"))))
                series.response_bytes.observe(float(_int(line.get("bytes_sent"))))
            log.info("request", **line, **names)
        elif kind == "tcp":
            tcp = self._series(self._tcp, labels.values, _TcpSeries)
            if tcp is not None:
                # The line is written at close: the connection opened and closed.
                tcp.opened += 1
                tcp.closed += 1
                tcp.received_bytes += _int(line.get("bytes_received"))
                tcp.sent_bytes += _int(line.get("bytes_sent"))
            log.info("connection", **line, **names)

    def _service(
        self, state: MeshState, line: dict[str, Any], destination: Workload | None
    ) -> Service | None:
        """The service the client asked for: the one at the VIP it connected to, else the
        one the destination pod serves that port for (pod-addressed traffic)."""
        asked = line.get("destination")
        service = state.service_by_vip(_ip(asked), _port(asked))
        return service or destination_service(state, destination, _port(line.get("upstream_pod")))

    def _series(
        self, table: dict[tuple[str, ...], S], key: tuple[str, ...], make: Callable[[], S]
    ) -> S | None:
        series = table.get(key)
        if series is None:
            if len(self._requests) + len(self._tcp) >= MAX_SERIES:
                self.dropped_series += 1
                return None
            series = table[key] = make()
        return series

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "istio_requests_total",
            "Total requests handled by an Istio proxy.",
            labels=REQUEST_LABELS,
        )
        histograms = [
            (
                HistogramMetricFamily(
                    "istio_request_duration_milliseconds",
                    "Duration of requests.",
                    labels=REQUEST_LABELS,
                ),
                "duration",
            ),
            (
                HistogramMetricFamily(
                    "istio_request_bytes", "Size of request bodies.", labels=REQUEST_LABELS
                ),
                "request_bytes",
            ),
            (
                HistogramMetricFamily(
                    "istio_response_bytes", "Size of response bodies.", labels=REQUEST_LABELS
                ),
                "response_bytes",
            ),
        ]
        for labels, series in self._requests.items():
            requests.add_metric(labels, series.requests)
            for family, attribute in histograms:
                buckets, total = getattr(series, attribute).family_values()
                family.add_metric(labels, buckets, total)
        yield requests
        for family, _ in histograms:
            yield family
        for name, documentation, attribute in ISTIO_TCP_COUNTERS:
            counter = CounterMetricFamily(name, documentation, labels=TCP_LABELS)
            for labels, tcp_series in self._tcp.items():
                counter.add_metric(labels, getattr(tcp_series, attribute))
            yield counter
