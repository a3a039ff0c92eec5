"""The lab and demo as a user drives them: real agent processes, the CLI, bpftool."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.datapath import abi
from agent.netns import NetnsWorker
from lab import probes
from lab.agents import lab_agent_pids, lab_pin_root
from lab.network import load_state
from tests.support import bulk

pytestmark = pytest.mark.kernel


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", *args], capture_output=True, text=True, check=check,
        timeout=300,
    )  # fmt: skip


def assert_nothing_left(name: str) -> None:
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"{name}-" not in netns
    assert not lab_pin_root(name).exists()
    assert lab_agent_pids(name) == []
    assert not Path(f"/run/ambient-lab/{name}").exists()


@pytest.fixture
def lab_name() -> Iterator[str]:
    name = "te" + uuid.uuid4().hex[:6]
    yield name
    cli("lab", "down", "--name", name, check=False)


def test_demo_shows_the_three_paths_and_a_service_with_verified_identities_and_cleans_up(
    lab_name: str,
) -> None:
    done = cli("demo", "--json", "--name", lab_name, check=False)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["ok"] is True
    (cross, same, plaintext, service, routing, l7_policy, requests, around, closed,
     denied_plaintext, denied_hbone) = result["steps"]  # fmt: skip
    for step in (cross, same):
        assert step["facts"]["source_identity_verified_by_server"] == (
            "spiffe://cluster.local/ns/default/sa/client-a"
        )
        assert step["facts"]["server_saw"].startswith("10.240.1.2:")
    assert cross["facts"]["destination_identity_verified_by_client"].endswith("/sa/server-b")
    assert same["facts"]["destination_identity_verified_by_client"].endswith("/sa/server-a")
    assert plaintext["facts"]["server_saw"].startswith("10.240.2.4:")
    # By name: the pod's resolver asked the agent, and the VIP reached both endpoints.
    facts = service["facts"]
    assert service["checks"] and all(service["checks"].values())
    assert (facts["hostname"], facts["resolved"], facts["vip"]) == (
        "echo.default.svc.cluster.local", "10.96.0.20", "10.96.0.20:80",
    )  # fmt: skip
    assert facts["dns_answers_by_the_agent"] >= 1
    assert facts["endpoints_reached"] == {"server-a": 2, "server-b": 2}
    for call in facts["connections"]:
        # server-a is on client-a's node: delivered by that agent itself, without HBONE.
        assert call["route"] == ["local" if call["endpoint"] == "server-a" else "hbone"] * 2
        assert call["dst_service"] == ["echo.default.svc.cluster.local"] * 2
        assert call["source_identity_verified_by_server"] == (
            "spiffe://cluster.local/ns/default/sa/client-a"
        )
        assert call["destination_identity_verified_by_client"].endswith(f"/sa/{call['endpoint']}")
        assert call["app_local_address"] == call["original_destination"]
    assert all(all(step["checks"].values()) for step in result["steps"])
    # The deep guide's labs 1 and 2, through the lab's waypoint.
    assert routing["facts"]["apps_saw_peer"] == ["10.240.1.4"]
    assert l7_policy["facts"]["waypoint_access_log"]["denied_by"] == "default/web-no-admin"
    codes = {row["response_code"] for row in requests["facts"]["istio_requests_total"]}
    assert {"200", "403"} <= codes and requests["facts"]["reporter"] == "waypoint"
    assert around["facts"]["bypasses_counted"] == 1
    assert closed["facts"]["client_saw"] == "timeout"
    assert denied_plaintext["facts"]["client_saw"] == "timeout"
    assert denied_plaintext["facts"]["agent_access_log"] is None  # never reached userspace
    assert denied_hbone["facts"]["agent_access_log"] == (
        "denied: denied-by-policy (default/deny-client-a)"
    )
    decisions = {(r["policy"], r["reason"]) for r in result["kernel"]["node-2"]["policy_decisions"]}
    assert ("default/deny-outsider", "denied-by-policy") in decisions
    kernel = result["kernel"]
    assert kernel["node-1"]["verdicts"]["DELIVER_OUTBOUND_LISTENER"] >= 2
    assert kernel["node-2"]["verdicts"]["DELIVER_INBOUND_LISTENER"] >= 1
    assert kernel["node-2"]["verdicts"]["PASS_HBONE"] >= 1
    # The Istio metrics the demo printed: both reporters of the cross-node calls agree. A
    # direct call to server-b:8080 is labelled with the Service that serves that port, as
    # Istio does, so one series holds step 1 and the VIP calls that went to server-b.
    echo = "echo.default.svc.cluster.local"
    series = ("node", "reporter", "source", "destination", "destination_service")
    metrics = {tuple(r[key] for key in series): r for r in result["metrics"]}
    source = metrics[("node-1", "source", "client-a", "server-b", echo)]
    destination = metrics[("node-2", "destination", "client-a", "server-b", echo)]
    for key in ("connections_opened", "connections_closed", "received_bytes", "sent_bytes"):
        assert source[key] == destination[key] > 0, key
    to_b = [c for c in facts["connections"] if c["endpoint"] == "server-b"]
    assert source["connections_opened"] == 1 + len(to_b)
    assert source["received_bytes"] == cross["facts"]["bytes_client_to_server"] + sum(
        c["bytes_client_to_server"] for c in to_b
    )
    # The Service's calls, at both reporters: the source's agent and each endpoint's.
    reporters = [
        ("node-1", "source", "server-a"), ("node-1", "source", "server-b"),
        ("node-1", "destination", "server-a"), ("node-2", "destination", "server-b"),
    ]  # fmt: skip
    for node, reporter, endpoint in reporters:
        row = metrics[(node, reporter, "client-a", endpoint, echo)]
        assert row["security"] == "mutual_tls" and row["dataplane_mode"] == "ambient-l4", row
    assert metrics[("node-2", "destination", "outsider", "server-b", echo)]["dataplane_mode"] == (
        "out-of-mesh"
    )
    assert_nothing_left(lab_name)


def _status(name: str) -> dict[str, Any]:
    status: dict[str, Any] = json.loads(cli("lab", "status", "--json", "--name", name).stdout)
    return status


def test_lab_commands_and_recovery_after_agents_are_killed(lab_name: str) -> None:
    cli("lab", "up", "--name", lab_name)
    status = _status(lab_name)
    assert status["up"] is True
    assert {n["name"] for n in status["nodes"]} == {"node-1", "node-2"}
    pods = {p["name"]: p for p in status["pods"]}
    client = pods["client-a"]
    assert (client["netns"], client["ip"], client["ambient"]) == (
        f"{lab_name}-client-a", "10.240.1.2", True,
    )  # fmt: skip
    assert pods["outsider"]["ambient"] is False
    assert all(agent["running"] for agent in status["agents"].values())

    shown = cli("lab", "exec", "--name", lab_name, "client-a", "--", "ip", "-4", "addr", "show")
    assert "10.240.1.2/24" in shown.stdout

    # The agents' maps, printed field by field by bpftool while the lab is up.
    pods_map = lab_pin_root(lab_name) / "node-1" / "maps" / "pods"
    dump = subprocess.run(
        ["bpftool", "map", "dump", "pinned", str(pods_map)], capture_output=True, text=True,
        check=True,
    ).stdout  # fmt: skip
    flags = abi.POD_CAPTURE | abi.POD_CAPTURE_DNS  # TCP and DNS capture, the default
    assert '"outbound_captured":' in dump and f'"flags": {flags}' in dump
    node_pins = str(pods_map.parents[1])
    ctl = subprocess.run(
        [sys.executable, "-m", "agent.ctl", "pods", "--json", "--pin-dir", node_pins],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert [p["ip"] for p in json.loads(ctl.stdout)[node_pins]] == [
        "10.240.1.2", "10.240.1.3",
    ]  # fmt: skip

    # A crash: agents die without unenrolling or unpinning. `lab down` still cleans up.
    for pid in lab_agent_pids(lab_name):
        os.kill(pid, signal.SIGKILL)
    assert lab_pin_root(lab_name).exists()
    cli("lab", "down", "--name", lab_name)
    assert_nothing_left(lab_name)
    cli("lab", "down", "--name", lab_name)  # idempotent
    assert _status(lab_name)["up"] is False


def test_lab_exec_names_the_unknown_target(lab_name: str) -> None:
    cli("lab", "up", "--no-agents", "--name", lab_name)
    done = cli("lab", "exec", "--name", lab_name, "nosuchpod", "--", "true", check=False)
    assert done.returncode == 1
    assert "no node or pod 'nosuchpod'" in done.stderr


# ---- with real agent processes --------------------------------------------------------------


def _agent_pids(name: str) -> dict[str, int]:
    status = _status(name)
    return {node: info["pid"] for node, info in status["agents"].items()}


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def _enrolled_ips(name: str, node: str) -> list[str]:
    pins = str(lab_pin_root(name) / node)
    out = subprocess.run(
        [sys.executable, "-m", "agent.ctl", "pods", "--json", "--pin-dir", pins],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return [p["ip"] for p in json.loads(out)[pins]]


def _wait(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _write_atomically(path: Path, text: str) -> None:
    partial = path.with_suffix(".partial")
    partial.write_text(text)
    partial.replace(path)


def test_config_changes_enroll_and_release_pods_without_restart(lab_name: str) -> None:
    cli("lab", "up", "--name", lab_name)
    config = Path(f"/run/ambient-lab/{lab_name}/mesh.yaml")
    original = config.read_text()
    mesh = yaml.safe_load(original)
    client_b = next(w for w in mesh["workloads"] if w["name"] == "client-b")
    assert "10.240.2.3" in _enrolled_ips(lab_name, "node-2")

    client_b["protocol"] = "TCP"  # take client-b out of the mesh
    _write_atomically(config, yaml.safe_dump(mesh))
    assert _wait(lambda: "10.240.2.3" not in _enrolled_ips(lab_name, "node-2"))
    qdisc = cli("lab", "exec", "--name", lab_name, "client-b", "--", "tc", "qdisc", "show")
    assert "clsact" not in qdisc.stdout

    _write_atomically(config, "workloads: [\n")  # broken: refused, last good state kept
    log = Path(f"/run/ambient-lab/{lab_name}/agent-node-2.log")
    assert _wait(lambda: '"config rejected"' in log.read_text())
    rejected = [json.loads(line) for line in log.read_text().splitlines()
                if '"config rejected"' in line][-1]  # fmt: skip
    assert "mesh.yaml:2" in json.dumps(rejected)
    assert "10.240.2.2" in _enrolled_ips(lab_name, "node-2")

    _write_atomically(config, original)  # client-b back in
    assert _wait(lambda: "10.240.2.3" in _enrolled_ips(lab_name, "node-2"))


def test_one_gib_each_way_byte_exact_through_agent_processes(lab_name: str) -> None:
    cli("lab", "up", "--name", lab_name)
    state = load_state(lab_name)
    assert state is not None
    client, server = probes.pod(state, "client-a"), probes.pod(state, "server-b")
    size = 1024 * 1024 * 1024
    server_digest = bulk.serve_once(server.netns_path, 9000, seed=2, size=size)
    client_digest = bulk.transfer(client.netns_path, server.ip, 9000, 1, size)
    assert server_digest() == bulk.expected_digest(1, size)
    assert client_digest == bulk.expected_digest(2, size)


def test_a_stalled_reader_keeps_agent_memory_bounded(lab_name: str) -> None:
    """The app in server-b accepts and never reads; client-a writes as fast as it can. The
    HTTP/2 windows must stop the writer instead of the agents buffering the difference."""
    cli("lab", "up", "--name", lab_name)
    state = load_state(lab_name)
    assert state is not None
    client, server = probes.pod(state, "client-a"), probes.pod(state, "server-b")
    pids = _agent_pids(lab_name)
    before = {node: _rss_kib(pid) for node, pid in pids.items()}

    server_worker = NetnsWorker(str(server.netns_path))
    listener = server_worker.call(lambda: socket.create_server(("0.0.0.0", 9100)))
    accepted: list[socket.socket] = []
    threading.Thread(target=lambda: accepted.append(listener.accept()[0]), daemon=True).start()

    def flood() -> int:
        sent = 0
        block = b"s" * 65536
        with socket.create_connection((server.ip, 9100), timeout=10) as sock:
            sock.settimeout(2.0)  # a send blocked this long means backpressure reached us
            deadline = time.monotonic() + 20
            with contextlib.suppress(TimeoutError):
                while time.monotonic() < deadline:
                    sent += sock.send(block)
        return sent

    client_worker = NetnsWorker(str(client.netns_path))
    try:
        sent = client_worker.call(flood)
        after = {node: _rss_kib(pid) for node, pid in pids.items()}
    finally:
        client_worker.close()
        for sock in accepted:
            sock.close()
        listener.close()
        server_worker.close()
    # In flight at most: socket buffers on 4 sockets, one 4 MiB stream window, relay chunks.
    assert sent < 48 * 1024 * 1024, f"{sent} bytes accepted with nobody reading"
    for node in pids:
        growth_mib = (after[node] - before[node]) / 1024
        assert growth_mib < 64, f"agent on {node} grew {growth_mib:.0f} MiB"
