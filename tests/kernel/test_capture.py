"""In-pod capture on the real kernel, in a lab of network namespaces (agent in-process)."""

from __future__ import annotations

import contextlib
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.ctl import read_pods
from agent.datapath import abi, tc
from agent.netns import NetnsWorker
from lab import probes
from tests.support.inprocess_mesh import APP, Mesh, mesh_fixture, whoami_everywhere
from tests.support.waiting import eventually

pytestmark = pytest.mark.kernel


@pytest.fixture(scope="module")
def mesh() -> Iterator[Mesh]:
    yield from mesh_fixture("tc")


@pytest.fixture(scope="module")
def servers(mesh: Mesh) -> Iterator[None]:
    yield from whoami_everywhere(mesh)


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def test_outbound_tcp_reaches_15001_with_original_destination(mesh: Mesh, servers: None) -> None:
    before = mesh.verdicts()["DELIVER_OUTBOUND_LISTENER"]
    outsider = mesh.pod("outsider")
    exchange = probes.talk(mesh.pod("client-a").netns_path, outsider.ip, APP, "hi")
    captured = [e for e in mesh.events("connection captured") if e["src.addr"] == exchange.client]
    assert captured, "the agent's outbound listener never saw the connection"
    assert captured[0]["direction"] == "outbound"
    assert captured[0]["dst.addr"] == f"{outsider.ip}:{APP}"  # original destination
    # The server saw the pod's address on the agent's own connection, not the pod's socket.
    assert exchange.server_saw.split(":")[0] == mesh.pod("client-a").ip
    assert _port(exchange.server_saw) != _port(exchange.client)
    assert mesh.verdicts()["DELIVER_OUTBOUND_LISTENER"] == before + 1
    assert mesh.pod_counters("client-a")["outbound_captured"] >= 1


def test_same_node_outbound_is_captured_too(mesh: Mesh, servers: None) -> None:
    server_a = mesh.pod("server-a")
    exchange = probes.talk(mesh.pod("client-a").netns_path, server_a.ip, APP, "same node")
    captured = [e for e in mesh.events("connection captured") if e["src.addr"] == exchange.client]
    assert [e["dst.addr"] for e in captured] == [f"{server_a.ip}:{APP}"]


def test_inbound_plaintext_reaches_15006_and_app_sees_real_client(
    mesh: Mesh, servers: None
) -> None:
    server_b, outsider = mesh.pod("server-b"), mesh.pod("outsider")
    before = mesh.pod_counters("server-b")["inbound_captured"]
    exchange = probes.talk(outsider.netns_path, server_b.ip, APP, "inbound")
    captured = [
        e
        for e in mesh.events("connection captured")
        if e["src.addr"] == exchange.client and e["direction"] == "inbound"
    ]
    assert captured and captured[0]["dst.addr"] == f"{server_b.ip}:{APP}"
    # The agent connected to the app with the client's own IP (IP_TRANSPARENT).
    assert exchange.server_saw.split(":")[0] == outsider.ip
    assert _port(exchange.server_saw) != _port(exchange.client)
    assert mesh.pod_counters("server-b")["inbound_captured"] == before + 1


def test_port_15008_reaches_the_hbone_listener_which_refuses_plaintext(mesh: Mesh) -> None:
    server_b, outsider = mesh.pod("server-b"), mesh.pod("outsider")
    before = mesh.verdicts()["PASS_HBONE"]

    def plaintext() -> bytes:
        with socket.create_connection((server_b.ip, abi.PORT_HBONE), timeout=5) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            with contextlib.suppress(ConnectionResetError):
                return sock.recv(4096)
            return b""

    worker = NetnsWorker(str(outsider.netns_path))
    try:
        answer = worker.call(plaintext)  # the connect itself succeeded: a listener is there
    finally:
        worker.close()
    # The TLS listener answers plaintext with at most a TLS alert, never with HTTP.
    assert not answer.startswith(b"HTTP")
    assert answer == b"" or answer[0] == 0x15  # 0x15: TLS alert record
    assert mesh.verdicts()["PASS_HBONE"] > before


def test_agent_marked_sockets_are_never_captured(mesh: Mesh, servers: None) -> None:
    outsider = mesh.pod("outsider")
    before = mesh.verdicts()["PASS_AGENT_MARK"]

    def marked_exchange() -> tuple[str, str]:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, abi.AGENT_MARK)
            sock.settimeout(5)
            sock.connect((outsider.ip, APP))
            sock.sendall(b"marked\n")
            reply = sock.makefile("r").readline()
            local = sock.getsockname()
            return f"{local[0]}:{local[1]}", reply

    worker = NetnsWorker(str(mesh.pod("client-a").netns_path))
    try:
        client, reply = worker.call(marked_exchange)
    finally:
        worker.close()
    assert f"peer={client} " in reply  # the server saw this very socket: not proxied
    assert not [e for e in mesh.events("connection captured") if e["src.addr"] == client]
    assert mesh.verdicts()["PASS_AGENT_MARK"] > before


def _exchange_from_port(netns: Path, port: int, host: str, dport: int) -> tuple[str, int]:
    """One HTTP request to a whoami server from a socket bound to `port` (the server answers
    and closes first); the reply and the segments the kernel had to retransmit to connect."""

    def inside() -> tuple[str, int]:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("0.0.0.0", port))
            sock.settimeout(5)
            sock.connect((host, dport))
            info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
            sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
            reply = b""
            while chunk := sock.recv(4096):  # to the server's end: the client closes last
                reply += chunk
            return reply.decode(), int.from_bytes(info[TCP_INFO_TOTAL_RETRANS], "little")

    worker = NetnsWorker(str(netns))
    try:
        return worker.call(inside)
    finally:
        worker.close()


# struct tcp_info: tcpi_total_retrans is the u32 at offset 100.
TCP_INFO_TOTAL_RETRANS = slice(100, 104)


def _time_wait_sockets(netns: Path, local_port: int, peer_port: int) -> int:
    out = subprocess.run(
        ["nsenter", f"--net={netns}", "ss", "-Htn", "state", "time-wait",
         f"( sport = :{local_port} and dport = :{peer_port} )"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return len(out.splitlines())


@pytest.mark.parametrize("direction", ["outbound", "inbound"])
def test_a_new_connection_on_the_4_tuple_of_an_agent_socket_in_time_wait_connects_at_once(
    mesh: Mesh, servers: None, direction: str
) -> None:
    """The server closes first, so the agent's socket facing the client is left in TIME_WAIT;
    a client that picks the same port again (as Linux's connect() may) is connected on its
    first SYN, through pod_lookup. The kernel used to drop that SYN and every retransmission
    of it until TIME_WAIT ended, a minute later."""
    client, server = (
        (mesh.pod("client-a"), mesh.pod("outsider"))
        if direction == "outbound"
        else (mesh.pod("outsider"), mesh.pod("server-b"))
    )
    agent_side = client if direction == "outbound" else server  # the pod holding TIME_WAIT
    port = 41234 if direction == "outbound" else 41235
    reason = "DELIVER_OUTBOUND_REOPEN" if direction == "outbound" else "DELIVER_INBOUND_REOPEN"
    reply, _ = _exchange_from_port(client.netns_path, port, server.ip, APP)
    assert "peer=" in reply

    eventually(lambda: _time_wait_sockets(agent_side.netns_path, APP, port) or None,
               "the agent's socket in TIME_WAIT")  # fmt: skip
    before = mesh.verdicts()
    reply, retransmitted = _exchange_from_port(client.netns_path, port, server.ip, APP)
    after = mesh.verdicts()
    assert "peer=" in reply, reply
    assert retransmitted == 0  # the first SYN was answered
    assert after[reason] == before[reason] + 1
    assert after["REOPEN_LISTENER"] == before["REOPEN_LISTENER"] + 1


def _footprint(netns: str) -> dict[str, str]:
    def run(*argv: str) -> str:
        return subprocess.run(
            ["ip", "netns", "exec", netns, *argv], capture_output=True, text=True, check=True
        ).stdout

    return {
        "qdisc": run("tc", "qdisc", "show", "dev", "eth0"),
        "rules": run("ip", "rule", "show"),
        "table": run("ip", "route", "show", "table", "all"),
        "sysctl": run(
            "sysctl",
            "net.ipv4.conf.eth0.accept_local",
            "net.ipv4.conf.eth0.rp_filter",
            "net.ipv4.conf.all.rp_filter",
        ),
        "sockets": run("ss", "-Hltn"),
    }


def test_out_of_mesh_pod_is_untouched(mesh: Mesh) -> None:
    footprint = _footprint(mesh.pod("outsider").netns)
    assert "clsact" not in footprint["qdisc"]
    assert "0x111" not in footprint["rules"]
    assert "table 133" not in footprint["table"]
    assert ":15001" not in footprint["sockets"]


def test_unenroll_leaves_no_trace_and_restores_direct_connectivity(
    mesh: Mesh, servers: None
) -> None:
    client_b = mesh.pod("client-b")
    enrolled = _footprint(client_b.netns)
    assert "clsact" in enrolled["qdisc"] and "0x111" in enrolled["rules"]
    mesh.unenroll("client-b")
    try:
        after = _footprint(client_b.netns)
        assert "clsact" not in after["qdisc"]
        assert "0x111" not in after["rules"] and "table 133" not in after["table"]
        assert ":1500" not in after["sockets"]
        assert after["sysctl"] == _footprint(mesh.pod("outsider").netns)["sysctl"]
        assert client_b.ip not in [p["ip"] for p in read_pods(mesh.datapath.pin_dir)]
        outsider = mesh.pod("outsider")
        exchange = probes.talk(client_b.netns_path, outsider.ip, APP, "direct")
        assert exchange.server_saw == exchange.client  # no agent in between any more
    finally:
        mesh.enroll("client-b")
    exchange = probes.talk(client_b.netns_path, mesh.pod("outsider").ip, APP, "captured again")
    assert exchange.server_saw != exchange.client


def test_enroll_is_idempotent(mesh: Mesh) -> None:
    mesh.enroll("client-a")
    mesh.enroll("client-a")
    worker = NetnsWorker(str(mesh.pod("client-a").netns_path))
    try:
        attached = tc.attached_programs(worker, "eth0")
    finally:
        worker.close()
    assert attached == {"ingress": ["ambient_pod_ingress"], "egress": ["ambient_pod_egress"]}
    rules = _footprint(mesh.pod("client-a").netns)["rules"]
    assert rules.count("0x111") == 1
