"""Prometheus metrics read, at each scrape, from the kernel's own counters and the agent's
state: nothing is counted twice, and the figures are the kernel's.

Istio's TCP metrics come from the connection telemetry (agent/telemetry/connections.py),
whose byte counts are the kernel's sockops records. The same collector feeds OTLP export."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from agent.identity.manager import WorkloadCertificate
from agent.telemetry.connections import TcpSeries, TunnelCounts
from agent.telemetry.istio_labels import TCP_LABELS

# Istio's names and help texts.
ISTIO_TCP_COUNTERS = (
    ("istio_tcp_connections_opened", "Total TCP connections opened.", "opened"),
    ("istio_tcp_connections_closed", "Total TCP connections closed.", "closed"),
    ("istio_tcp_received_bytes", "Size of total bytes received during request in case of a "
     "TCP connection.", "received_bytes"),
    ("istio_tcp_sent_bytes", "Size of total bytes sent during response in case of a TCP "
     "connection.", "sent_bytes"),
)  # fmt: skip


class AgentMetricsSource(Protocol):
    """What the collector reads; the agent provides it."""

    def kernel_verdicts(self) -> dict[str, int]: ...
    def policy_decisions(self) -> list[tuple[str, str, int]]: ...  # (policy, reason, count)
    def enrolled_pods(self) -> int: ...
    def programs_loaded(self) -> int: ...
    def certificates(self) -> list[WorkloadCertificate]: ...
    def tcp_series(self) -> list[tuple[tuple[str, ...], TcpSeries]]: ...
    def telemetry_counts(self) -> dict[str, int]: ...
    def map_fill(self) -> list[tuple[str, int, int]]: ...  # (map, entries, capacity)
    def tunnels(self) -> dict[str, TunnelCounts]: ...
    def open_connections(self) -> int: ...
    def reconcile_failures(self) -> int: ...
    def hbone_refusals(self) -> dict[str, int]: ...
    def outbound_refusals(self) -> dict[str, int]: ...
    def dns_requests(self) -> dict[str, int]: ...
    def waypoint_skipped(self) -> dict[str, int]: ...
    def waypoint_bypasses(self) -> dict[tuple[str, str], int]: ...
    def local_deliveries(self) -> dict[str, int]: ...
    def data_path(self) -> dict[str, str]: ...  # agent/hbone/data_path.py's labels
    def socket_relays(self) -> dict[str, int]: ...


class AgentCollector(Collector):
    def __init__(self, source: AgentMetricsSource) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        series = self._source.tcp_series()
        for name, documentation, attribute in ISTIO_TCP_COUNTERS:
            family = CounterMetricFamily(name, documentation, labels=TCP_LABELS)
            for labels, counters in series:
                family.add_metric(labels, getattr(counters, attribute))
            yield family
        yield GaugeMetricFamily(
            "ambient_proxied_connections_open",
            "Connections of enrolled pods the agent relays now (opened, not yet closed).",
            value=self._source.open_connections(),
        )
        tunnels = self._source.tunnels()
        for name, documentation, attribute in (
            ("ambient_hbone_connections_closed", "HBONE connections closed.", "closed"),
            ("ambient_hbone_sent_bytes", "Bytes sent on HBONE connections (TLS, acknowledged "
             "by the peer), as the kernel counted them.", "sent_bytes"),
            ("ambient_hbone_received_bytes", "Bytes received on HBONE connections (TLS), as "
             "the kernel counted them.", "received_bytes"),
            ("ambient_hbone_retransmits", "TCP segments retransmitted on HBONE connections.",
             "retransmits"),
        ):  # fmt: skip
            family = CounterMetricFamily(name, documentation, labels=["direction"])
            for direction, tunnel in sorted(tunnels.items()):
                family.add_metric([direction], getattr(tunnel, attribute))
            yield family
        counts = self._source.telemetry_counts()
        events = CounterMetricFamily(
            "ambient_telemetry_ring_events",
            "Connection records the sockops program wrote to the ring buffer (sent) or lost "
            "because the buffer was full (dropped).",
            labels=["outcome"],
        )
        events.add_metric(["sent"], counts.get("events_sent", 0))
        events.add_metric(["dropped"], counts.get("events_dropped", 0))
        yield events
        yield CounterMetricFamily(
            "ambient_telemetry_untracked_connections",
            "Connections the sockops program could not track (sock_conns full).",
            value=counts.get("table_full", 0),
        )
        yield CounterMetricFamily(
            "ambient_telemetry_kernel_records_missing",
            "Connections that completed without a kernel record; counted with the relay's "
            "byte counts instead.",
            value=counts.get("kernel_records_missing", 0),
        )
        entries = GaugeMetricFamily(
            "ambient_map_entries", "Entries in the agent's eBPF maps.", labels=["map"]
        )
        capacity = GaugeMetricFamily(
            "ambient_map_capacity", "Capacity (max_entries) of the agent's eBPF maps.",
            labels=["map"],
        )  # fmt: skip
        for map_name, used, size in self._source.map_fill():
            entries.add_metric([map_name], used)
            capacity.add_metric([map_name], size)
        yield entries
        yield capacity
        verdicts = CounterMetricFamily(
            "ambient_datapath_verdicts",
            "Packets the tc programs passed, steered or dropped, by reason.",
            labels=["reason"],
        )
        for reason, count in sorted(self._source.kernel_verdicts().items()):
            verdicts.add_metric([reason], count)
        yield verdicts
        decisions = CounterMetricFamily(
            "ambient_policy_decisions",
            "L4 authorization decisions taken in the kernel, by deciding policy and reason.",
            labels=["policy", "reason"],
        )
        for policy, reason, count in self._source.policy_decisions():
            decisions.add_metric([policy, reason], count)
        yield decisions
        yield GaugeMetricFamily(
            "ambient_enrolled_pods", "Pods captured on this node.",
            value=self._source.enrolled_pods(),
        )  # fmt: skip
        yield GaugeMetricFamily(
            "ambient_programs_loaded", "eBPF programs loaded and pinned by the agent.",
            value=self._source.programs_loaded(),
        )  # fmt: skip
        yield _by_label(
            "ambient_hbone_refusals",
            "HBONE connections and requests refused, by reason (bad_request, no_alpn_h2, "
            "peer_identity, header_block_too_large, reset_flood, control_frame_flood, "
            "peer_not_reading, protocol_error).",
            ["reason"], self._source.hbone_refusals(),
        )  # fmt: skip
        yield _by_label(
            "ambient_outbound_refusals",
            "Outbound connections to a Service VIP refused before any upstream was tried, by "
            "reason (no_ready_endpoint, unknown_service_port).",
            ["reason"], self._source.outbound_refusals(),
        )  # fmt: skip
        yield _by_label(
            "ambient_dns_requests",
            "DNS queries of enrolled pods the agent took, by outcome (answered, nodata, "
            "nxdomain, forwarded, forward_failed, formerr, malformed, ...).",
            ["reason"], self._source.dns_requests(),
        )  # fmt: skip
        yield _by_label(
            "ambient_waypoint_skipped",
            "Connections bound to a waypoint that went direct, without L7, because the "
            "waypoint was not ready (no address, or no ready pod), by waypoint.",
            ["waypoint"], self._source.waypoint_skipped(),
        )  # fmt: skip
        yield _by_label(
            "ambient_waypoint_bypass",
            "Connections that reached a waypoint-bound pod without passing its waypoint (so "
            "without L7 policy): plaintext, HBONE from a peer that is not the waypoint, or a "
            "same-node connection from such a pod (local).",
            ["waypoint", "transport"], self._source.waypoint_bypasses(),
        )  # fmt: skip
        data_path = GaugeMetricFamily(
            "ambient_hbone_data_path_info",
            "The data path carrying HBONE bytes on this node: who encrypts (userspace), the "
            "TLS library, the cipher suite offered first, and whether the kernel has kTLS.",
            labels=sorted(path := self._source.data_path()),
        )
        if path:
            data_path.add_metric([path[key] for key in sorted(path)], 1)
        yield data_path
        yield _by_label(
            "ambient_local_deliveries",
            "Connections between two pods of this node delivered by the agent without HBONE, "
            "by outcome (delivered, denied, unreachable, bad_address).",
            ["outcome"], self._source.local_deliveries(),
        )  # fmt: skip
        yield _by_label(
            "ambient_socket_relays",
            "Relays between two plain sockets (same-node delivery, pass-through) started, by "
            "mode: splice or copy on threads, asyncio past the threads' cap.",
            ["mode"], self._source.socket_relays(),
        )  # fmt: skip
        yield CounterMetricFamily(
            "ambient_reconcile_failures",
            "Reconciles that failed, leaving the state not fully in force until a retry "
            "succeeds (the cause is logged, and shown by /healthz/ready meanwhile).",
            value=self._source.reconcile_failures(),
        )
        expiry = GaugeMetricFamily(
            "ambient_workload_certificate_expiry_timestamp_seconds",
            "When each workload certificate the agent holds expires (Unix time).",
            labels=["identity"],
        )
        for cert in self._source.certificates():
            expiry.add_metric([cert.identity.uri], cert.not_after.timestamp())
        yield expiry


def _by_label(
    name: str,
    documentation: str,
    labels: list[str],
    counts: Mapping[str, int] | Mapping[tuple[str, str], int],
) -> CounterMetricFamily:
    """A counter family from counts keyed by one label value, or a tuple of them."""
    family = CounterMetricFamily(name, documentation, labels=labels)
    for key, count in sorted(counts.items()):
        values: list[str] = [key] if isinstance(key, str) else list(key)
        family.add_metric(values, count)
    return family
