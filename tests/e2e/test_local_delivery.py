"""Same-node delivery with agent processes in the default lab: client-a and server-a are both
on node-1, so node-1's agent hands client-a's connections to server-a's app itself, without
HBONE (agent/proxy/local_delivery.py), with the kernel still deciding the connect.

Witnesses: the agent's access log (route "local", both reporters), its /metrics (the local
deliveries, the Istio TCP series of both reporters, the kernel's PASS_HBONE count: no packet
to a 15008 listener on the node), the kernel's policy counters, and the applications' own
byte counts. The agents run with --cut-denied-connections, so a policy change also cuts a
live local connection it now denies.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from lab import control, probes
from lab.network import LabState
from tests.support import bulk
from tests.support.held import HeldConnection
from tests.support.waiting import eventually

pytestmark = pytest.mark.kernel

APP_PORT = 8080
CLIENT_A = "spiffe://cluster.local/ns/default/sa/client-a"
SERVER_A = "spiffe://cluster.local/ns/default/sa/server-a"
SAME_NODE = {"source_workload": "client-a", "destination_workload": "server-a"}
DENY_CLIENT_A = {
    "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
    "metadata": {"name": "deny-client-a", "namespace": "default"},
    "spec": {"selector": {"matchLabels": {"app": "server-a"}}, "action": "DENY",
             "rules": [{"from": [{"source": {
                 "principals": ["cluster.local/ns/default/sa/client-a"]}}]}]},
}  # fmt: skip


@pytest.fixture(scope="module")
def lab() -> Iterator[LabState]:
    name = "tl" + uuid.uuid4().hex[:6]
    try:
        state = control.up(name, None, agent_args=("--cut-denied-connections",))
        with probes.whoami_server(probes.pod(state, "server-a"), APP_PORT):
            yield state
    finally:
        control.down(name)


def completed(lab: LabState, client: str, reporter: str) -> dict[str, Any]:
    return eventually(
        lambda: probes.wait_for_event(lab, "node-1", timeout=0, event="connection complete",
                                      src__addr=client, reporter=reporter),
        f"{reporter} access log of {client}",
    )  # fmt: skip


def counters(lab: LabState) -> dict[str, float]:
    """What node-1's agent counted, for before/after deltas."""
    samples = probes.scrape(lab, "node-1")

    def total(name: str, **labels: str) -> float:
        return sum(s.value for s in samples if s.name == name
                   and all(s.labels.get(k) == v for k, v in labels.items()))  # fmt: skip

    found = {
        "delivered": total("ambient_local_deliveries_total", outcome="delivered"),
        "denied": total("ambient_local_deliveries_total", outcome="denied"),
        "unreachable": total("ambient_local_deliveries_total", outcome="unreachable"),
        "pass_hbone": total("ambient_datapath_verdicts_total", reason="PASS_HBONE"),
        "denied_by_policy": total("ambient_policy_decisions_total", policy="default/deny-client-a",
                                  reason="denied-by-policy"),
    }  # fmt: skip
    for reporter in ("source", "destination"):
        for counter in ("connections_opened", "connections_closed", "received_bytes",
                        "sent_bytes"):  # fmt: skip
            found[f"{reporter} {counter}"] = total(
                f"istio_tcp_{counter}_total", reporter=reporter, **SAME_NODE
            )
    return found


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {key: after[key] - before[key] for key in after if after[key] != before[key]}


def test_a_same_node_connection_is_delivered_without_hbone_with_exact_bytes_at_both_reporters(
    lab: LabState,
) -> None:
    request, response = 300_001, 123_457
    before = counters(lab)
    client = probes.exchange(lab, "client-a", "server-a", 9000, request, response)
    lines = {reporter: completed(lab, client, reporter) for reporter in ("source", "destination")}

    def closed_at_both() -> dict[str, float] | None:
        now = counters(lab)
        closed = [f"{reporter} connections_closed" for reporter in ("source", "destination")]
        return now if all(now[key] > before[key] for key in closed) else None

    after = eventually(closed_at_both, "the connection counted closed at both reporters")
    # No HBONE: nothing reached a 15008 listener on this node meanwhile; one local delivery.
    assert delta(before, after) == {
        "delivered": 1,
        **{f"{reporter} {counter}": value for reporter in ("source", "destination")
           for counter, value in (("connections_opened", 1), ("connections_closed", 1),
                                  ("received_bytes", request), ("sent_bytes", response))},
    }  # fmt: skip
    server_a = probes.pod(lab, "server-a").ip
    for reporter, line in lines.items():
        assert {
            k: line.get(k) for k in (
                "route", "direction", "src.identity", "dst.identity", "dst.addr", "dst.workload",
                "bytes_sent", "bytes_recv", "bytes_source", "connection_security_policy",
                "dataplane_mode", "policy.verdict", "error", "dst.hbone_addr",
            )
        } == {
            "route": "local", "direction": "outbound" if reporter == "source" else "inbound",
            "src.identity": CLIENT_A, "dst.identity": SERVER_A, "dst.addr": f"{server_a}:9000",
            "dst.workload": "server-a", "bytes_sent": request, "bytes_recv": response,
            "bytes_source": "kernel", "connection_security_policy": "mutual_tls",
            "dataplane_mode": "ambient-l4", "policy.verdict": "allow", "error": None,
            "dst.hbone_addr": None,
        }, reporter  # fmt: skip


def test_the_app_sees_the_clients_address_and_bulk_is_byte_exact_both_ways(lab: LabState) -> None:
    exchange = probes.talk(probes.pod(lab, "client-a").netns_path, probes.pod(lab, "server-a").ip,
                           APP_PORT, "hello")  # fmt: skip
    assert exchange.reply.endswith("echo=hello")
    assert exchange.server_saw.split(":")[0] == probes.pod(lab, "client-a").ip
    size = 64 * 1024 * 1024
    server_a = probes.pod(lab, "server-a")
    server_digest = bulk.serve_once(server_a.netns_path, 9001, seed=2, size=size)
    client_digest = bulk.transfer(probes.pod(lab, "client-a").netns_path, server_a.ip, 9001,
                                  1, size)  # fmt: skip
    assert server_digest() == bulk.expected_digest(1, size)
    assert client_digest == bulk.expected_digest(2, size)
    line = eventually(
        lambda: probes.wait_for_event(lab, "node-1", timeout=0, event="connection complete",
                                      reporter="destination", dst__addr=f"{server_a.ip}:9001"),
        "the bulk connection's destination access log",
    )  # fmt: skip
    assert (line["route"], line["bytes_sent"], line["bytes_recv"]) == ("local", size, size)


def test_a_same_node_app_that_does_not_answer_is_a_reset_recorded_at_both_reporters(
    lab: LabState,
) -> None:
    """What a 503 is on the HBONE path: nothing listens on server-a:9."""
    before = counters(lab)
    client_a, server_a = probes.pod(lab, "client-a"), probes.pod(lab, "server-a")
    outcome, client = probes.try_connect(client_a.netns_path, server_a.ip, 9, 5.0)
    assert outcome == "reset"
    for reporter in ("source", "destination"):
        line = completed(lab, client, reporter)
        assert line["route"] == "local", reporter
        assert line["error"].startswith("upstream connect failed: "), reporter
    after = counters(lab)
    assert after["unreachable"] - before["unreachable"] == 1
    assert after["delivered"] == before["delivered"]


def test_an_l4_deny_refuses_a_same_node_connection_counted_at_both_reporters_and_cuts_a_live_one(
    lab: LabState,
) -> None:
    held = HeldConnection(
        probes.pod(lab, "client-a").netns_path, probes.pod(lab, "server-a").ip, APP_PORT
    )
    try:
        assert held.exchange() == "reply"
        before = counters(lab)
        probes.apply_policies(lab, [DENY_CLIENT_A], ("node-1",))
        # --cut-denied-connections: the kernel re-decides the live local connection: denied.
        assert eventually(lambda: held.exchange() == "reset" or None, "the live one cut")
        client_a, server_a = probes.pod(lab, "client-a"), probes.pod(lab, "server-a")
        outcome, client = probes.try_connect(client_a.netns_path, server_a.ip, APP_PORT, 5.0)
        assert outcome == "reset"  # refused as a 401 tunnel is: the source app sees a reset
        for reporter in ("source", "destination"):
            line = completed(lab, client, reporter)
            fields = ("route", "policy.verdict", "policy.name", "error")
            assert {k: line.get(k) for k in fields} == {
                "route": "local", "policy.verdict": "deny", "policy.name": "default/deny-client-a",
                "error": "denied: denied-by-policy (default/deny-client-a)",
            }, reporter  # fmt: skip
            cut = completed(lab, held.address, reporter)
            assert cut["error"] == "connection cut by a policy change", reporter
        after = counters(lab)
        assert after["denied"] - before["denied"] == 1
        assert after["delivered"] == before["delivered"]
        assert after["denied_by_policy"] - before["denied_by_policy"] >= 1  # the kernel's count
        for reporter in ("source", "destination"):  # the refused one and the cut one
            assert after[f"{reporter} connections_closed"] - before[
                f"{reporter} connections_closed"] == 2, reporter  # fmt: skip
        assert after["pass_hbone"] == before["pass_hbone"]
    finally:
        held.close()
        probes.apply_policies(lab, [], ("node-1",))
    exchange = probes.talk(probes.pod(lab, "client-a").netns_path, probes.pod(lab, "server-a").ip,
                           APP_PORT, "again")  # fmt: skip
    assert exchange.reply.endswith("echo=again")
