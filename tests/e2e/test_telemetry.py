"""Kernel-counted telemetry, end to end: agent processes in a lab, connections of exactly
known size, and what /metrics, the access log and an OTLP receiver then say.

The byte counts come from the sockops program's close records, so equality with the
application's byte counts (at both reporters) is the claim under test. The OTLP receiver
decodes real OTLP protobuf (tests/support/otlp_receiver.py), inside each node's netns,
where the node's agent exports over gRPC."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from agent.ctl import read_connections, read_pods
from agent.telemetry.istio_labels import TCP_LABELS
from lab import agents, probes
from lab.network import LabState, load_state

pytestmark = pytest.mark.kernel

T = TypeVar("T")
OTLP_GRPC_PORT = 4317
CLIENT_A = "spiffe://cluster.local/ns/default/sa/client-a"
SERVER_B = "spiffe://cluster.local/ns/default/sa/server-b"


class Lab:
    def __init__(self, state: LabState, otlp_out: dict[str, Path]) -> None:
        self.state = state
        self.otlp_out = otlp_out

    @property
    def name(self) -> str:
        return self.state.name


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    name = "tt" + uuid.uuid4().hex[:6]
    receivers: list[subprocess.Popen[str]] = []
    try:
        subprocess.run(
            [sys.executable, "-m", "agent", "lab", "up", "--name", name,
             f"--agent-arg=--otlp-endpoint=http://127.0.0.1:{OTLP_GRPC_PORT}",
             "--agent-arg=--otlp-interval=0.5"],
            check=True, capture_output=True, timeout=300,
        )  # fmt: skip
        state = load_state(name)
        assert state is not None
        out: dict[str, Path] = {}
        for node in state.nodes:
            out[node.name] = tmp_path_factory.mktemp("otlp") / f"{node.name}.jsonl"
            receiver = subprocess.Popen(
                ["nsenter", f"--net={node.netns_path}", "--", sys.executable, "-m",
                 "tests.support.otlp_receiver", "--grpc-port", str(OTLP_GRPC_PORT),
                 "--http-port", "0", "--out", str(out[node.name])],
                stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[2],
            )  # fmt: skip
            receivers.append(receiver)
            assert receiver.stdout is not None
            assert receiver.stdout.readline().startswith("ready"), "OTLP receiver did not start"
        yield Lab(state, out)
    finally:
        for receiver in receivers:
            receiver.terminate()
            receiver.wait(timeout=10)
        subprocess.run([sys.executable, "-m", "agent", "lab", "down", "--name", name],
                       check=False, capture_output=True)  # fmt: skip


def _eventually(probe: Callable[[], T | None], what: str, timeout: float = 10.0) -> T:
    deadline = time.monotonic() + timeout
    while (found := probe()) is None or found is False:
        assert time.monotonic() < deadline, f"not seen in {timeout:.0f}s: {what}"
        time.sleep(0.1)
    return found


def istio_tcp(lab: Lab, node: str, **match: str) -> dict[str, float]:
    """The four istio_tcp counters of the one series on `node` matching `match`."""
    found: dict[str, float] = {}
    series: set[tuple[tuple[str, str], ...]] = set()
    for sample in probes.scrape(lab.state, node):
        wanted = all(sample.labels.get(k) == v for k, v in match.items())
        if wanted and sample.name.startswith("istio_tcp_") and sample.name.endswith("_total"):
            found[sample.name] = sample.value
            series.add(tuple(sorted(sample.labels.items())))
    assert len(series) <= 1, f"{len(series)} series match {match} on {node}"
    return found


def completed(lab: Lab, node: str, client: str) -> dict[str, Any]:
    return _eventually(
        lambda: probes.wait_for_event(lab.state, node, timeout=0, event="connection complete",
                                      src__addr=client),
        f"access log of {client} on {node}",
    )  # fmt: skip


def test_hbone_bytes_are_the_applications_at_both_reporters(lab: Lab) -> None:
    request, response = 300_001, 123_457
    where = {"source_workload": "client-a", "destination_workload": "server-b"}
    before = {r: istio_tcp(lab, n, reporter=r, **where)
              for n, r in (("node-1", "source"), ("node-2", "destination"))}  # fmt: skip
    client = probes.exchange(lab.state, "client-a", "server-b", 9000, request, response)
    for node, reporter in (("node-1", "source"), ("node-2", "destination")):
        completed(lab, node, client)
        after = istio_tcp(lab, node, reporter=reporter, **where)
        delta = {k: v - before[reporter].get(k, 0) for k, v in after.items()}
        assert delta == {
            "istio_tcp_connections_opened_total": 1,
            "istio_tcp_connections_closed_total": 1,
            "istio_tcp_received_bytes_total": request,
            "istio_tcp_sent_bytes_total": response,
        }, f"{reporter} reporter on {node}"
    labels = next(
        s.labels for s in probes.scrape(lab.state, "node-2")
        if s.name == "istio_tcp_sent_bytes_total" and s.labels["reporter"] == "destination"
        and s.labels["source_workload"] == "client-a"
    )  # fmt: skip
    assert set(labels) == set(TCP_LABELS)
    assert {
        k: labels[k] for k in (
            "source_workload_namespace", "source_principal", "source_app", "source_cluster",
            "destination_principal", "destination_canonical_service", "request_protocol",
            "response_flags", "connection_security_policy", "dataplane_mode",
        )
    } == {
        "source_workload_namespace": "default", "source_principal": CLIENT_A,
        "source_app": "client-a", "source_cluster": "Kubernetes",
        "destination_principal": SERVER_B, "destination_canonical_service": "server-b",
        "request_protocol": "tcp", "response_flags": "-",
        "connection_security_policy": "mutual_tls", "dataplane_mode": "ambient-l4",
    }  # fmt: skip


def test_access_log_has_every_field_with_the_kernels_bytes(lab: Lab) -> None:
    client = probes.exchange(lab.state, "client-a", "server-b", 9001, 4096, 77)
    for node, direction in (("node-1", "outbound"), ("node-2", "inbound")):
        line = completed(lab, node, client)
        assert {
            k: line[k] for k in (
                "src.addr", "src.workload", "src.namespace", "src.identity", "dst.addr",
                "dst.workload", "direction", "bytes_sent", "bytes_recv", "bytes_source",
                "dataplane_mode", "connection_security_policy", "policy.verdict",
            )
        } == {
            "src.addr": client, "src.workload": "client-a", "src.namespace": "default",
            "src.identity": CLIENT_A, "dst.addr": f"{probes.pod(lab.state, 'server-b').ip}:9001",
            "dst.workload": "server-b", "direction": direction, "bytes_sent": 4096,
            "bytes_recv": 77, "bytes_source": "kernel", "dataplane_mode": "ambient-l4",
            "connection_security_policy": "mutual_tls", "policy.verdict": "allow",
        }, node  # fmt: skip
        assert line["duration_ms"] > 0 and line["rtt_us"] > 0
        assert isinstance(line["retransmits"], int)  # a busy machine may retransmit
        assert "dst.service" in line
    outbound = completed(lab, "node-1", client)
    assert outbound["dst.hbone_addr"] == f"{probes.pod(lab.state, 'server-b').ip}:15008"


def test_out_of_mesh_paths_are_labelled_out_of_mesh(lab: Lab) -> None:
    # An out-of-mesh client to an enrolled server: only the destination reports.
    inbound = {"reporter": "destination", "source_workload": "outsider",
               "destination_workload": "server-a"}  # fmt: skip
    before = istio_tcp(lab, "node-1", **inbound)
    client = probes.exchange(lab.state, "outsider", "server-a", 9002, 1000, 2000)
    completed(lab, "node-1", client)
    after = istio_tcp(lab, "node-1", **inbound, connection_security_policy="none",
                      dataplane_mode="out-of-mesh", source_principal="unknown")  # fmt: skip
    assert after["istio_tcp_received_bytes_total"] - before.get(
        "istio_tcp_received_bytes_total", 0) == 1000  # fmt: skip
    assert after["istio_tcp_sent_bytes_total"] - before.get("istio_tcp_sent_bytes_total", 0) == 2000
    # An enrolled client to an out-of-mesh server: only the source reports.
    outbound = {"reporter": "source", "source_workload": "client-b",
                "destination_workload": "outsider"}  # fmt: skip
    before = istio_tcp(lab, "node-2", **outbound)
    client = probes.exchange(lab.state, "client-b", "outsider", 9003, 333, 444)
    assert completed(lab, "node-2", client)["policy.verdict"] == "none"
    after = istio_tcp(lab, "node-2", **outbound, connection_security_policy="none",
                      dataplane_mode="out-of-mesh")  # fmt: skip
    assert after["istio_tcp_received_bytes_total"] - before.get(
        "istio_tcp_received_bytes_total", 0) == 333  # fmt: skip
    assert after["istio_tcp_sent_bytes_total"] - before.get("istio_tcp_sent_bytes_total", 0) == 444


def test_otlp_receiver_gets_the_same_values_as_metrics(lab: Lab) -> None:
    probes.exchange(lab.state, "client-a", "server-b", 9004, 5000, 6000)
    for node in ("node-1", "node-2"):

        def settled(node: str = node) -> dict[Any, float] | None:
            prometheus = {
                (s.name.removesuffix("_total"), tuple(sorted(s.labels.items()))): s.value
                for s in probes.scrape(lab.state, node) if s.name.startswith("istio_tcp_")
            }  # fmt: skip
            exported = _latest_points(lab.otlp_out[node])
            istio = {k: v for k, v in exported.items() if k[0].startswith("istio_tcp_")}
            return istio if istio and istio == prometheus else None

        matched = _eventually(settled, f"OTLP export from {node} equal to its /metrics")
        assert sum(v for k, v in matched.items() if k[0] == "istio_tcp_connections_closed") >= 1


def _latest_points(path: Path) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The last exported value of every (metric, attributes) the receiver decoded."""
    latest: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    if not path.exists():
        return latest
    for line in path.read_text().splitlines():
        point = json.loads(line)
        assert point["kind"] == "sum" or not point["name"].startswith("istio_tcp_")
        if point["name"].startswith("istio_tcp_"):
            assert point["monotonic"] and point["temporality"] == "cumulative"
        latest[(point["name"], tuple(sorted(point["attributes"].items())))] = point["value"]
    return latest


def test_a_denied_tunnel_is_logged_with_the_policy_at_both_ends(lab: Lab) -> None:
    policy = {
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "deny-client-a", "namespace": "default"},
        "spec": {"selector": {"matchLabels": {"app": "server-b"}}, "action": "DENY",
                 "rules": [{"from": [{"source": {"principals": [
                     "cluster.local/ns/default/sa/client-a"]}}]}]},
    }  # fmt: skip
    probes.apply_policies(lab.state, [policy], ("node-2",))
    try:
        server = probes.pod(lab.state, "server-b")
        with probes.whoami_server(server, 9005):
            outcome, client = probes.try_connect(
                probes.pod(lab.state, "client-a").netns_path, server.ip, 9005, timeout=5
            )
        assert outcome == "reset"
        destination = completed(lab, "node-2", client)
        assert (destination["policy.verdict"], destination["policy.name"]) == (
            "deny", "default/deny-client-a")  # fmt: skip
        assert destination["bytes_sent"] == destination["bytes_recv"] == 0
        assert completed(lab, "node-1", client)["policy.verdict"] == "deny"
        decisions = [
            s.value for s in probes.scrape(lab.state, "node-2")
            if s.name == "ambient_policy_decisions_total"
            and s.labels == {"policy": "default/deny-client-a", "reason": "denied-by-policy"}
        ]  # fmt: skip
        assert decisions == [1]
    finally:
        probes.apply_policies(lab.state, [], ("node-2",))


def test_series_of_a_removed_workload_are_dropped(lab: Lab) -> None:
    probes.exchange(lab.state, "client-b", "server-b", 9006, 10, 10)
    _eventually(lambda: istio_tcp(lab, "node-2", source_workload="client-b",
                                  destination_workload="server-b", reporter="source")
                or None, "client-b's series")  # fmt: skip
    config = agents.lab_dir(lab.name) / "mesh.yaml"
    original = config.read_text()
    document = yaml.safe_load(original)
    document["workloads"] = [w for w in document["workloads"] if w["name"] != "client-b"]
    try:
        _replace(config, yaml.safe_dump(document, sort_keys=False))
        _eventually(lambda: not any(s.labels.get("source_workload") == "client-b"
                                    for s in probes.scrape(lab.state, "node-2")),
                    "client-b's series removed")  # fmt: skip
        # The other series stay.
        assert istio_tcp(lab, "node-2", source_workload="client-a", reporter="destination")
    finally:
        _replace(config, original)
        _eventually(lambda: "10.240.2.3" in _enrolled(lab, "node-2"), "client-b enrolled again")


def _replace(path: Path, text: str) -> None:
    partial = path.with_suffix(".partial")
    partial.write_text(text)
    partial.replace(path)


def _enrolled(lab: Lab, node: str) -> list[str]:
    return [str(p["ip"]) for p in read_pods(agents.lab_pin_root(lab.name) / node)]


def test_health_metrics_report_the_ring_and_the_maps(lab: Lab) -> None:
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for s in probes.scrape(lab.state, "node-1")}  # fmt: skip
    assert samples[("ambient_telemetry_ring_events_total", (("outcome", "dropped"),))] == 0
    assert samples[("ambient_telemetry_ring_events_total", (("outcome", "sent"),))] > 0
    assert samples[("ambient_telemetry_untracked_connections_total", ())] == 0
    assert samples[("ambient_proxied_connections_open", ())] == 0  # every exchange ended
    assert samples[("ambient_map_entries", (("map", "pods"),))] == 2
    assert samples[("ambient_map_capacity", (("map", "sock_conns"),))] == 65536


def test_the_kernel_tracks_the_pooled_hbone_sockets_while_they_live(lab: Lab) -> None:
    probes.exchange(lab.state, "client-a", "server-b", 9007, 1, 1)
    dialled = read_connections(agents.lab_pin_root(lab.name) / "node-1")["open"]
    accepted = read_connections(agents.lab_pin_root(lab.name) / "node-2")["open"]
    server_b = probes.pod(lab.state, "server-b").ip
    assert any(c["remote"] == f"{server_b}:15008" and not c["accepted"] for c in dialled)
    assert any(c["local"] == f"{server_b}:15008" and c["accepted"] for c in accepted)
