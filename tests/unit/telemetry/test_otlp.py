"""OTLP export of a Prometheus collector, checked against a receiver that decodes the real
protobuf, over gRPC and over HTTP. No root, no kernel."""

from __future__ import annotations

import json
import math
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from agent.telemetry.otlp import PROTOCOLS, OtlpExport
from agent.telemetry.otlp_endpoint import OtlpError, grpc_target, http_metrics_url
from tests.support.otlp_receiver import DataPoint, OtlpReceiver

REPO_ROOT = Path(__file__).resolve().parents[3]
TCP_LABELS = (
    "reporter", "source_workload", "source_workload_namespace", "destination_workload",
    "destination_service", "connection_security_policy", "dataplane_mode",
)  # fmt: skip
CERTIFICATE = "spiffe://cluster.local/ns/shop/sa/cart"
DOCS = {
    "istio_tcp_sent_bytes": "Bytes sent on TCP connections, by connection labels.",
    "ambient_datapath_verdicts": "Packets the tc programs passed, steered or dropped.",
    "ambient_policy_decisions": "L4 authorization decisions taken in the kernel.",
    "ambient_enrolled_pods": "Pods captured on this node.",
    "ambient_workload_certificate_expiry_timestamp_seconds": "When each certificate expires.",
}
COUNTERS = {"istio_tcp_sent_bytes", "ambient_datapath_verdicts", "ambient_policy_decisions"}
Series = tuple[str, frozenset[tuple[str, str]]]


class MeshCollector(Collector):
    """Known counters and gauges, changed by the tests between exports."""

    def __init__(self) -> None:
        self.sent_bytes: dict[tuple[str, ...], int] = {
            ("source", "cart", "shop", "payments", "payments.shop.svc.cluster.local",
             "mutual_tls", "ambient-l4"): 1500,
            ("destination", "cart", "shop", "payments", "payments.shop.svc.cluster.local",
             "mutual_tls", "ambient-l4"): 1480,
            ("source", "cart", "shop", "unknown", "unknown", "none", "out-of-mesh"): 42,
        }  # fmt: skip
        self.verdicts = {"pass": 10, "drop_policy": 2}
        self.decisions: dict[tuple[str, str], int] = {}  # empty at start
        self.enrolled_pods = 3
        self.expiry = {CERTIFICATE: 1_767_225_600.5}
        self.collections = 0
        self.fail = False

    def collect(self) -> Iterator[Metric]:
        self.collections += 1
        if self.fail:
            raise RuntimeError("kernel map read failed")
        sent = CounterMetricFamily(
            "istio_tcp_sent_bytes", DOCS["istio_tcp_sent_bytes"], labels=TCP_LABELS
        )
        for labels, value in self.sent_bytes.items():
            sent.add_metric(list(labels), value)
        yield sent
        verdicts = CounterMetricFamily(
            "ambient_datapath_verdicts", DOCS["ambient_datapath_verdicts"], labels=["reason"]
        )
        for reason, count in self.verdicts.items():
            # A _created sample, which the export must leave out.
            verdicts.add_metric([reason], count, created=1_700_000_000.0)
        yield verdicts
        decisions = CounterMetricFamily(
            "ambient_policy_decisions",
            DOCS["ambient_policy_decisions"],
            labels=["policy", "reason"],
        )
        for (policy, reason), count in self.decisions.items():
            decisions.add_metric([policy, reason], count)
        yield decisions
        yield GaugeMetricFamily(
            "ambient_enrolled_pods", DOCS["ambient_enrolled_pods"], value=self.enrolled_pods
        )
        expiry = GaugeMetricFamily(
            "ambient_workload_certificate_expiry_timestamp_seconds",
            DOCS["ambient_workload_certificate_expiry_timestamp_seconds"],
            labels=["identity"],
        )
        for identity, when in self.expiry.items():
            expiry.add_metric([identity], when)
        yield expiry

    def expected(self) -> dict[Series, float]:
        """What the receiver must hold after one export, written without prometheus_client."""
        series: dict[Series, float] = {}
        for labels, value in self.sent_bytes.items():
            series["istio_tcp_sent_bytes", frozenset(zip(TCP_LABELS, labels, strict=True))] = value
        for reason, count in self.verdicts.items():
            series["ambient_datapath_verdicts", frozenset({("reason", reason)})] = count
        for (policy, reason), count in self.decisions.items():
            key = frozenset({("policy", policy), ("reason", reason)})
            series["ambient_policy_decisions", key] = count
        series["ambient_enrolled_pods", frozenset()] = self.enrolled_pods
        for identity, when in self.expiry.items():
            if math.isnan(when):
                continue  # Prometheus's "no value": nothing to export
            key = frozenset({("identity", identity)})
            series["ambient_workload_certificate_expiry_timestamp_seconds", key] = when
        return series


def received(points: list[DataPoint]) -> dict[Series, float]:
    series: dict[Series, float] = {}
    for point in points:
        key = (point["name"], frozenset(point["attributes"].items()))
        assert key not in series, f"series exported twice in one export: {key}"
        series[key] = point["value"]
    return series


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    receiver = OtlpReceiver()
    receiver.start()
    yield receiver
    receiver.stop()


@pytest.fixture
def exports() -> Iterator[list[OtlpExport]]:
    """OtlpExports a test made, shut down whatever the test did."""
    made: list[OtlpExport] = []
    yield made
    for export in made:
        export.shutdown(timeout=2)


def endpoint_for(receiver: OtlpReceiver, protocol: str) -> str:
    return receiver.grpc_endpoint if protocol == "grpc" else receiver.http_endpoint


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_flush_delivers_the_collectors_values(
    protocol: str, receiver: OtlpReceiver, exports: list[OtlpExport]
) -> None:
    collector = MeshCollector()
    export = OtlpExport(
        collector, endpoint_for(receiver, protocol), protocol, interval=3600,
        resource={"k8s.node.name": "node-1"},
    )  # fmt: skip
    exports.append(export)
    export.start()
    assert collector.collections == 1  # the families, to create the instruments

    assert export.flush() is True
    points = receiver.points()
    assert received(points) == collector.expected()
    assert collector.collections == 2, "one collection per export, not one per instrument"
    assert receiver.requests("grpc" if protocol == "grpc" else "http") == 1
    for point in points:
        assert point["description"] == DOCS[point["name"]]
        assert point["resource"]["service.name"] == "ambient-agent"
        assert point["resource"]["k8s.node.name"] == "node-1"
        if point["name"] in COUNTERS:
            assert (point["kind"], point["monotonic"], point["temporality"]) == (
                "sum", True, "cumulative",
            )  # fmt: skip
        else:
            assert point["kind"] == "gauge"
    first = received(points)

    # Counters grow, a new connection's series and the first policy decision appear (the
    # family that was empty at start has an instrument), gauges move, and a series the
    # collector dropped (its pods are gone) is no longer exported.
    labels, *_, dropped = collector.sent_bytes
    del collector.sent_bytes[dropped]
    collector.sent_bytes[labels] += 9000
    collector.sent_bytes["destination", "web", "front", "cart", "cart.shop.svc.cluster.local",
                         "mutual_tls", "ambient-waypoint"] = 7  # fmt: skip
    collector.verdicts["pass"] += 5
    collector.decisions["shop/allow-cart", "allow"] = 4
    collector.enrolled_pods = 2
    collector.expiry["spiffe://cluster.local/ns/shop/sa/gone"] = math.nan
    receiver.clear()
    assert export.flush() is True
    second = received(receiver.points())
    assert second == collector.expected()
    assert collector.collections == 3
    assert ("istio_tcp_sent_bytes", frozenset(zip(TCP_LABELS, dropped, strict=True))) in first
    for key, value in first.items():
        if key[0] in COUNTERS and key in second:
            assert second[key] >= value, f"cumulative counter went down: {key}"
    assert second["istio_tcp_sent_bytes", frozenset(zip(TCP_LABELS, labels, strict=True))] == (
        first["istio_tcp_sent_bytes", frozenset(zip(TCP_LABELS, labels, strict=True))] + 9000
    )


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_periodic_export_runs_on_its_own(
    protocol: str, receiver: OtlpReceiver, exports: list[OtlpExport]
) -> None:
    collector = MeshCollector()
    export = OtlpExport(collector, endpoint_for(receiver, protocol), protocol, interval=0.2)
    exports.append(export)
    export.start()
    deadline = time.monotonic() + 5
    while receiver.requests("grpc" if protocol == "grpc" else "http") < 2:
        assert time.monotonic() < deadline, "no periodic export within 5 s"
        time.sleep(0.05)
    export.shutdown()
    # Each request is one whole cycle: whichever came last holds every series once.
    assert set(received(receiver.points()[-len(collector.expected()) :])) == set(
        collector.expected()
    )


def test_shutdown_exports_one_last_time(receiver: OtlpReceiver) -> None:
    collector = MeshCollector()
    export = OtlpExport(collector, receiver.http_endpoint, "http/protobuf", interval=3600)
    export.start()
    export.shutdown(timeout=5)
    assert received(receiver.points()) == collector.expected()
    export.shutdown()  # idempotent
    assert export.flush() is False
    with pytest.raises(OtlpError, match="shut down"):
        export.start()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_receiver_down_never_raises(protocol: str, exports: list[OtlpExport]) -> None:
    collector = MeshCollector()
    # interval bounds the exporter's retries: a short one keeps the test short.
    export = OtlpExport(collector, f"http://127.0.0.1:{free_port()}", protocol, interval=0.5)
    exports.append(export)
    export.start()
    started = time.monotonic()
    assert export.flush(timeout=2) is False
    assert time.monotonic() - started < 5
    export.shutdown(timeout=2)
    export.shutdown(timeout=2)


def test_failing_collector_never_raises(receiver: OtlpReceiver, exports: list[OtlpExport]) -> None:
    collector = MeshCollector()
    export = OtlpExport(collector, receiver.grpc_endpoint, interval=3600)
    exports.append(export)
    export.start()
    collector.fail = True
    export.flush()
    assert collector.collections == 2, "one failed read per cycle, not one per instrument"
    assert received(receiver.points()) == {}
    collector.fail = False
    assert export.flush() is True
    assert received(receiver.points()) == collector.expected()


def test_flush_before_start_is_a_no_op() -> None:
    export = OtlpExport(MeshCollector(), "http://127.0.0.1:4318", "http/protobuf")
    assert export.flush() is False
    export.shutdown()


@pytest.mark.parametrize(
    ("endpoint", "protocol", "message"),
    [
        (
            "foo",
            "http/protobuf",
            "OTLP endpoint 'foo' must be http://host:port or https://host:port",
        ),
        ("collector:4318", "http/protobuf", "must be http://host:port or https://host:port"),
        ("ftp://collector:4318", "http/protobuf", "must be http://host:port or https://host:port"),
        ("http://collector:99999", "http/protobuf", "must be http://host:port"),
        ("http://:4318", "http/protobuf", "must be http://host:port"),
        ("foo", "grpc", "OTLP endpoint 'foo' must be host:port, http://host:port"),
        ("collector", "grpc", "must be host:port"),
        ("collector:otlp", "grpc", "must be host:port"),
        ("http://collector:4317/v1/metrics", "grpc", "must be host:port"),
        ("unix:///run/otel.sock", "grpc", "must be host:port"),
    ],
)
def test_bad_endpoint_is_refused_up_front(endpoint: str, protocol: str, message: str) -> None:
    with pytest.raises(OtlpError, match=re.escape(message)):
        OtlpExport(MeshCollector(), endpoint, protocol)


def test_bad_protocol_lists_the_accepted_ones() -> None:
    with pytest.raises(OtlpError) as raised:
        OtlpExport(MeshCollector(), "http://127.0.0.1:4318", "http/json")
    assert str(raised.value) == "unknown OTLP protocol 'http/json': use one of grpc, http/protobuf"


@pytest.mark.parametrize("interval", [0, -1, float("inf"), float("nan")])
def test_bad_interval_is_refused(interval: float) -> None:
    with pytest.raises(OtlpError, match="interval"):
        OtlpExport(MeshCollector(), "collector:4317", interval=interval)


def test_endpoint_forms() -> None:
    assert http_metrics_url("http://collector:4318") == "http://collector:4318/v1/metrics"
    assert http_metrics_url("https://collector:4318/") == "https://collector:4318/v1/metrics"
    assert http_metrics_url("https://otel.example") == "https://otel.example/v1/metrics"
    assert http_metrics_url("http://gw:80/otlp/v1/metrics") == "http://gw:80/otlp/v1/metrics"
    assert grpc_target("collector:4317") == ("collector:4317", False)  # TLS, as the spec says
    assert grpc_target("https://collector:4317") == ("collector:4317", False)
    assert grpc_target("http://collector:4317") == ("collector:4317", True)
    assert grpc_target("[::1]:4317") == ("[::1]:4317", False)
    assert OtlpExport(MeshCollector(), "http://127.0.0.1:4318", "http/protobuf").endpoint == (
        "http://127.0.0.1:4318/v1/metrics"
    )


def read_ready_line(process: subprocess.Popen[str], timeout: float) -> str:
    assert process.stdout is not None
    readable, _, _ = select.select([process.stdout], [], [], timeout)
    assert readable, f"receiver printed nothing in {timeout} s"
    return process.stdout.readline().strip()


def test_standalone_receiver_writes_json_lines(tmp_path: Path) -> None:
    out = tmp_path / "points.jsonl"
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.support.otlp_receiver",
         "--grpc-port", "0", "--http-port", "0", "--out", str(out)],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )  # fmt: skip
    try:
        ready = read_ready_line(process, timeout=10)
        words = dict(word.split("=", 1) for word in ready.split()[1:])
        assert ready.startswith("ready ") and set(words) == {"grpc", "http"}, ready
        collector = MeshCollector()
        for endpoint, protocol in (
            (f"http://127.0.0.1:{words['http']}", "http/protobuf"),
            (f"http://127.0.0.1:{words['grpc']}", "grpc"),
        ):
            export = OtlpExport(collector, endpoint, protocol, interval=3600)
            export.start()
            try:
                assert export.flush() is True
            finally:
                export.shutdown(timeout=2)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    points: list[dict[str, Any]] = [json.loads(line) for line in out.read_text().splitlines()]
    for transport in ("http", "grpc"):
        mine = [point for point in points if point["transport"] == transport]
        # flush and shutdown each exported every series once.
        assert received(mine[: len(mine) // 2]) == collector.expected()
        assert received(mine[len(mine) // 2 :]) == collector.expected()
        assert all(point["resource"]["service.name"] == "ambient-agent" for point in mine)
