"""The waypoint's Istio metrics from Envoy's access log lines (agent/waypoint/request_telemetry.py):
labels named from the mesh state, the policy that denied a request, a bounded series count."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client.core import Metric
from structlog.testing import capture_logs

from agent.state.service import Service
from agent.state.store import MeshState
from agent.state.waypoint import Waypoint
from agent.state.workload import Protocol, Workload
from agent.telemetry.istio_labels import REQUEST_LABELS, TCP_LABELS
from agent.waypoint import request_telemetry
from agent.waypoint.request_telemetry import RequestTelemetry

WAYPOINT = Waypoint("10.96.0.50", 15008, "waypoint", "default")
ECHO = Service(
    "echo",
    "default",
    "echo.default.svc.cluster.local",
    ("10.96.0.20",),
    {80: 8080, 9000: 9000},
    WAYPOINT,
)
CLIENT = Workload(
    "uid-c",
    "client",
    "default",
    "client",
    ("10.240.1.2",),
    Protocol.HBONE,
    "n1",
    labels={"app": "client"},
)
SERVER = Workload(
    "uid-s",
    "echo-v2",
    "default",
    "echo",
    ("10.240.2.2",),
    Protocol.HBONE,
    "n2",
    services={ECHO.key: {}},
    labels={"app": "echo", "version": "v2"},
)
STATE = MeshState(workloads=(CLIENT, SERVER), services=(ECHO,))
PEER = "spiffe://cluster.local/ns/default/sa/client"


def http_line(status: str = "200", details: str = "via_upstream", **extra: Any) -> dict[str, Any]:
    return {
        "kind": "http",
        "client": "10.240.1.2:41000",
        "destination": "10.96.0.20:80",
        "peer": PEER,
        "upstream_pod": "10.240.2.2:8080",
        "method": "GET",
        "path": "/v2",
        "status": status,
        "details": details,
        "bytes_received": "0",
        "bytes_sent": "120",
        "duration_ms": "3",
        "flags": "-",
        **extra,
    }


def collect(telemetry: RequestTelemetry) -> dict[str, Metric]:
    return {family.name: family for family in telemetry.collect()}


def test_requests_are_counted_with_istio_labels_and_the_status() -> None:
    telemetry = RequestTelemetry(lambda: STATE)
    telemetry.record(http_line())
    telemetry.record(http_line())
    denied = "rbac_access_denied_matched_policy[ns[default]-policy[deny]-rule[0]]"
    telemetry.record(http_line("403", denied, upstream_pod="-"))
    found = collect(telemetry)
    requests = found["istio_requests"]
    by_code = {s.labels["response_code"]: s for s in requests.samples}
    assert by_code["200"].value == 2 and by_code["403"].value == 1
    ok = by_code["200"].labels
    assert list(ok) == list(REQUEST_LABELS)
    assert (ok["reporter"], ok["request_protocol"], ok["dataplane_mode"]) == (
        "waypoint",
        "http",
        "ambient-waypoint",
    )
    assert (ok["source_workload"], ok["source_principal"], ok["source_app"]) == (
        "client",
        PEER,
        "client",
    )
    assert (ok["destination_workload"], ok["destination_version"]) == ("echo-v2", "v2")
    assert ok["destination_principal"] == "spiffe://cluster.local/ns/default/sa/echo"
    assert ok["destination_service"] == "echo.default.svc.cluster.local"
    assert ok["connection_security_policy"] == "mutual_tls"
    # A denied request never reached a pod, yet names the service it asked for.
    refused = by_code["403"].labels
    assert (refused["destination_workload"], refused["destination_service"]) == (
        "unknown",
        "echo.default.svc.cluster.local",
    )
    duration = found["istio_request_duration_milliseconds"]
    counts = [
        s
        for s in duration.samples
        if s.name.endswith("_count") and s.labels["response_code"] == "200"
    ]
    assert counts[0].value == 2
    sizes = [
        s
        for s in found["istio_response_bytes"].samples
        if s.name.endswith("_sum") and s.labels["response_code"] == "200"
    ]
    assert sizes[0].value == 240


def test_tcp_connections_through_the_waypoint_are_counted() -> None:
    telemetry = RequestTelemetry(lambda: STATE)
    telemetry.record(
        {
            "kind": "tcp",
            "client": "10.240.1.2:41000",
            "destination": "10.96.0.20:9000",
            "peer": PEER,
            "upstream_pod": "10.240.2.2:9000",
            "bytes_received": "10",
            "bytes_sent": "20",
            "flags": "-",
        }
    )
    found = collect(telemetry)
    (opened,) = found["istio_tcp_connections_opened"].samples
    assert list(opened.labels) == list(TCP_LABELS) and opened.value == 1
    assert opened.labels["reporter"] == "waypoint"
    (sent,) = found["istio_tcp_sent_bytes"].samples
    assert sent.value == 20


def test_the_series_kept_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(request_telemetry, "MAX_SERIES", 3)
    telemetry = RequestTelemetry(lambda: STATE)
    for code in range(200, 210):
        telemetry.record(http_line(str(code)))
    assert len(collect(telemetry)["istio_requests"].samples) == 3
    assert telemetry.dropped_series == 7


def test_a_dry_run_denial_is_named_and_decides_nothing() -> None:
    telemetry = RequestTelemetry(lambda: STATE)
    shadow = {"dry_run": "ns[default]-policy[trial]-rule[0]", "dry_run_result": "denied"}
    with capture_logs() as logged:
        telemetry.record(http_line(**shadow))
    (line,) = [e for e in logged if e["event"] == "request"]
    assert (line["status"], line["dry_run_denied_by"]) == ("200", "default/trial")
    assert "denied_by" not in line
