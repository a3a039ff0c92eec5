"""Services through the mesh, with agent processes in a lab (tests/support/services-topology.yaml).

A connection to a Service VIP goes to one ready endpoint, as HBONE to an endpoint on another
node, delivered by the agent itself to one on the client's node (no HBONE there); the
endpoint sees the client's own address, with both identities known; load spreads over the
endpoints; a VIP without a ready endpoint, or a port the Service does not define, is
refused and counted, never passed on; an endpoint outside the mesh gets plain TCP to its pod;
endpoint churn leaves live connections alone. The pods' DNS is answered by their agent.
Plaintext from a mesh workload's address is unauthenticated for policy. Witnesses: tcpdump on
the client's veth, the kernel's verdict counters, the agents' access logs and /metrics.
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
import yaml

from agent.datapath import abi
from agent.netns import NetnsWorker
from lab import agents, control, probes
from lab.network import LabState
from lab.topology import load_topology
from tests.support.lab_waypoint import LabWaypoint

pytestmark = pytest.mark.kernel

TOPOLOGY = Path(__file__).parents[1] / "support" / "services-topology.yaml"
APP_PORT = 8080
ECHO_HOST = "echo.default.svc.cluster.local"


@pytest.fixture(scope="module")
def lab() -> Iterator[LabState]:
    name = "sv" + os.urandom(3).hex()
    try:
        state = control.up(name, TOPOLOGY)
        with (
            probes.whoami_server(probes.pod(state, "echo-a"), APP_PORT),
            probes.whoami_server(probes.pod(state, "echo-b"), APP_PORT),
            probes.whoami_server(probes.pod(state, "legacy"), APP_PORT),
        ):
            yield state
    finally:
        control.down(name)


def vip(name: str) -> str:
    return str(load_topology(TOPOLOGY).service_vip("default", name))


def ip_of(lab: LabState, pod: str) -> str:
    return probes.pod(lab, pod).ip


def identity(pod: str) -> str:
    return f"spiffe://cluster.local/ns/default/sa/{pod}"


def call(lab: LabState, host: str, port: int = 80) -> probes.Exchange:
    return probes.talk(probes.pod(lab, "client").netns_path, host, port, "hello")


def served_by(exchange: probes.Exchange) -> str:
    """The endpoint address the whoami reply names (local=ip:port)."""
    fields = dict(part.split("=", 1) for part in exchange.reply.split(" ") if "=" in part)
    return fields["local"]


def completed(
    lab: LabState, node: str, client: str, since: int, direction: str = "outbound"
) -> dict[str, Any]:
    event = probes.wait_for_event(lab, node, 10, since, event="connection complete",
                                  src__addr=client, direction=direction)  # fmt: skip
    assert event is not None, f"no access log line on {node} for {client}"
    return event


@contextlib.contextmanager
def client_veth_capture(lab: LabState) -> Iterator[list[str]]:
    """tcpdump on the node side of the client's veth: every IP packet that is not HBONE.
    The list fills once the block has ended."""
    client = probes.pod(lab, "client")
    node = next(n for n in lab.nodes if n.name == client.node)
    argv = ["ip", "netns", "exec", node.netns, "tcpdump", "-l", "-n", "-i",
            client.node_interface, "ip and not tcp port 15008"]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    banner = ""
    while "listening on" not in banner:
        line = proc.stderr.readline()
        if not line:
            proc.kill()
            raise RuntimeError(f"tcpdump did not start: {banner.strip()}")
        banner += line
    packets: list[str] = []
    try:
        yield packets
    finally:
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=10)
        packets.extend(line for line in out.splitlines() if line.strip())


def metric(lab: LabState, node: str, name: str, **labels: str) -> float:
    return sum(
        s.value
        for s in probes.scrape(lab, node)
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


# ---- VIPs ---------------------------------------------------------------------------------


def test_a_vip_reaches_both_endpoints_with_identities_and_no_plaintext(
    lab: LabState,
) -> None:
    """echo-b, on node-2, over HBONE; echo-a, on the client's node, delivered locally: in
    neither case does a packet leave the client's pod outside HBONE."""
    endpoints = {f"{ip_of(lab, 'echo-a')}:{APP_PORT}": ("echo-a", "node-1"),
                 f"{ip_of(lab, 'echo-b')}:{APP_PORT}": ("echo-b", "node-2")}  # fmt: skip
    since = {node: len(probes.agent_events(lab, node)) for node in ("node-1", "node-2")}
    with client_veth_capture(lab) as plaintext:
        exchanges = [call(lab, vip("echo")) for _ in range(6)]
    # Spread: round robin over the two ready endpoints, one on each node.
    assert collections.Counter(served_by(e) for e in exchanges) == dict.fromkeys(endpoints, 3)
    assert plaintext == [], "packets left the client pod outside HBONE"
    for exchange in exchanges:
        # The endpoint saw the client's own address (from the agent's port, as in ztunnel).
        assert exchange.server_saw.split(":")[0] == exchange.client.split(":")[0]
        name, node = endpoints[served_by(exchange)]
        source = completed(lab, "node-1", exchange.client, since["node-1"])
        assert source["route"] == ("local" if node == "node-1" else "hbone")
        assert source["dst.vip"] == f"{vip('echo')}:80"
        assert source["dst.addr"] == served_by(exchange)
        hbone = f"{served_by(exchange).split(':')[0]}:15008" if node == "node-2" else None
        assert source["dst.hbone_addr"] == hbone
        assert source["dst.service"] == ECHO_HOST
        assert (source["src.identity"], source["dst.identity"]) == (identity("client"),
                                                                     identity(name))  # fmt: skip
        destination = completed(lab, node, exchange.client, since[node], "inbound")
        assert destination["src.identity"] == identity("client")
        assert destination["dst.service"] == ECHO_HOST
    for node, reporter in (("node-1", "source"), ("node-1", "destination"),
                           ("node-2", "destination")):  # fmt: skip
        assert metric(lab, node, "istio_tcp_connections_opened_total", reporter=reporter,
                      destination_service=ECHO_HOST, destination_service_name="echo",
                      destination_service_namespace="default",
                      connection_security_policy="mutual_tls") > 0  # fmt: skip


@pytest.mark.parametrize(
    ("service", "port", "reason"),
    [("empty", 80, "no_ready_endpoint"), ("echo", 443, "unknown_service_port")],
)
def test_a_vip_that_cannot_be_routed_is_refused_and_counted(
    lab: LabState, service: str, port: int, reason: str
) -> None:
    before = metric(lab, "node-1", "ambient_outbound_refusals_total", reason=reason)
    since = len(probes.agent_events(lab, "node-1"))
    with client_veth_capture(lab) as plaintext:
        outcome, client = probes.try_connect(
            probes.pod(lab, "client").netns_path, vip(service), port, 5.0
        )
    assert outcome == "reset"
    assert plaintext == [], "a refused VIP connection was passed on"
    assert metric(lab, "node-1", "ambient_outbound_refusals_total", reason=reason) == before + 1
    line = completed(lab, "node-1", client, since)
    assert line["error"].startswith(f"refused: {reason}")
    assert line["dst.service"] == f"{service}.default.svc.cluster.local"


def test_an_endpoint_out_of_the_mesh_gets_plain_tcp_to_its_pod(lab: LabState) -> None:
    """Also shows that the veth witness sees plaintext when there is some."""
    since = len(probes.agent_events(lab, "node-1"))
    with client_veth_capture(lab) as plaintext:
        exchange = call(lab, vip("legacy"))
    assert served_by(exchange) == f"{ip_of(lab, 'legacy')}:{APP_PORT}"
    legacy = f"{ip_of(lab, 'legacy')}.{APP_PORT}"  # tcpdump's spelling of ip:port
    assert any(legacy in line for line in plaintext), plaintext
    assert not any(vip("legacy") in line for line in plaintext)  # the VIP never hits the wire
    line = completed(lab, "node-1", exchange.client, since)
    assert (line["route"], line["dst.addr"]) == ("passthrough", served_by(exchange))
    assert line["dst.service"] == "legacy.default.svc.cluster.local"


def write_config(lab: LabState, edit: Any) -> None:
    path = agents.lab_dir(lab.name) / "mesh.yaml"
    document = yaml.safe_load(path.read_text())
    edit(document)
    partial = path.with_suffix(".partial")
    partial.write_text(yaml.safe_dump(document, sort_keys=False))
    partial.replace(path)


def reload(lab: LabState, edit: Any) -> None:
    """Edit the lab's config as a user would and wait until node-1's agent took it."""
    since = len(probes.agent_events(lab, "node-1"))
    write_config(lab, edit)
    assert probes.wait_for_event(lab, "node-1", 10, since, event="config reloaded")


@contextlib.contextmanager
def restored_config(lab: LabState) -> Iterator[None]:
    """The lab's config put back as it was at the start, after the block."""
    original = yaml.safe_load((agents.lab_dir(lab.name) / "mesh.yaml").read_text())

    def put_back(document: dict[str, Any]) -> None:
        document.clear()
        document.update(original)

    try:
        yield
    finally:
        reload(lab, put_back)


def set_status(lab: LabState, pod: str, status: str) -> None:
    def edit(document: dict[str, Any]) -> None:
        for workload in document["workloads"]:
            if workload["name"] == pod:
                workload["status"] = status

    reload(lab, edit)


class Held:
    """A connection to the echo VIP kept open, echoing on demand."""

    def __init__(self, lab: LabState) -> None:
        self._worker = NetnsWorker(str(probes.pod(lab, "client").netns_path))
        self._sock = self._worker.call(
            lambda: socket.create_connection((vip("echo"), 80), timeout=5)
        )
        self._lines = self._sock.makefile("r")

    def echo(self, text: str) -> str:
        self._sock.sendall(text.encode() + b"\n")
        return self._lines.readline()

    def close(self) -> None:
        self._sock.close()
        self._worker.close()


def test_endpoint_churn_keeps_live_connections_and_new_ones_avoid_the_gone_one(
    lab: LabState,
) -> None:
    held = Held(lab)
    try:
        first = held.echo("before")
        endpoint = first.split("local=")[1].split()[0]
        pod = "echo-a" if endpoint.startswith(ip_of(lab, "echo-a")) else "echo-b"
        other = "echo-b" if pod == "echo-a" else "echo-a"
        set_status(lab, pod, "Unhealthy")
        try:
            assert f"local={endpoint}" in held.echo("after")  # the live one goes on
            served = {served_by(call(lab, vip("echo"))) for _ in range(4)}
            assert served == {f"{ip_of(lab, other)}:{APP_PORT}"}
        finally:
            set_status(lab, pod, "Healthy")
        served = {served_by(call(lab, vip("echo"))) for _ in range(4)}
        assert len(served) == 2  # back in turn
    finally:
        held.close()


def test_a_service_added_to_the_config_is_routed_and_named_without_a_restart(
    lab: LabState,
) -> None:
    added_vip, hostname = "10.96.0.30", "echo2.default.svc.cluster.local"

    def add(document: dict[str, Any]) -> None:
        document["services"].append({"name": "echo2", "namespace": "default",
                                     "hostname": hostname, "vips": [added_vip],
                                     "ports": {80: APP_PORT}})  # fmt: skip
        for workload in document["workloads"]:
            if workload["name"] == "echo-b":
                workload["services"][f"default/{hostname}"] = {80: APP_PORT}

    with restored_config(lab):
        reload(lab, add)
        (rrset,) = ask(lab, dns.message.make_query(hostname, "A")).answer
        assert [r.address for r in rrset] == [added_vip]
        assert served_by(call(lab, added_vip)) == f"{ip_of(lab, 'echo-b')}:{APP_PORT}"
    reply = ask(lab, dns.message.make_query(hostname, "A"))
    assert reply.rcode() == dns.rcode.NXDOMAIN  # and gone again


# ---- DNS ----------------------------------------------------------------------------------


def nameserver() -> str:
    return str(load_topology(TOPOLOGY).dns_ip)


def ask(lab: LabState, query: dns.message.Message | bytes, tcp: bool = False) -> Any:
    """A DNS exchange from inside the client pod, to the pod's nameserver address."""

    def inside() -> Any:
        if isinstance(query, bytes):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.settimeout(1.0)
                sock.sendto(query, (nameserver(), 53))
                try:
                    return sock.recv(65535)
                except TimeoutError:
                    return None
        send = dns.query.tcp if tcp else dns.query.udp
        return send(query, nameserver(), timeout=3)

    worker = NetnsWorker(str(probes.pod(lab, "client").netns_path))
    try:
        return worker.call(inside)
    finally:
        worker.close()


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_the_agent_answers_mesh_names_and_nxdomain(lab: LabState, tcp: bool) -> None:
    for name in (ECHO_HOST, "echo.default"):
        reply = ask(lab, dns.message.make_query(name, "A"), tcp)
        assert reply.rcode() == dns.rcode.NOERROR
        (rrset,) = reply.answer
        assert [r.address for r in rrset] == [vip("echo")]
    reply = ask(lab, dns.message.make_query("nothere.default.svc.cluster.local", "A"), tcp)
    assert reply.rcode() == dns.rcode.NXDOMAIN and not reply.answer


def test_malformed_queries_get_formerr_or_are_dropped_and_counted(lab: LabState) -> None:
    before = metric(lab, "node-1", "ambient_dns_requests_total", reason="malformed")
    garbage = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xff\xff\xff"
    reply = ask(lab, garbage)
    assert reply is not None and reply[:2] == b"\x12\x34"
    assert dns.rcode.from_flags(int.from_bytes(reply[2:4], "big"), 0) == dns.rcode.FORMERR
    assert ask(lab, b"\x00\x01\x02") is None  # shorter than a header: nothing to answer
    assert metric(lab, "node-1", "ambient_dns_requests_total", reason="malformed") == before + 1
    # The agent is unharmed.
    reply = ask(lab, dns.message.make_query(ECHO_HOST, "A"))
    assert reply.rcode() == dns.rcode.NOERROR


@contextlib.contextmanager
def nameserver_in(lab: LabState, pod: str, answers: dict[str, str]) -> Iterator[None]:
    """A small real nameserver (UDP and TCP, port 53) in an out-of-mesh pod: A records for
    `answers`, REFUSED for the rest."""
    worker = NetnsWorker(str(probes.pod(lab, pod).netns_path))
    udp = worker.call(lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    tcp = worker.call(lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))
    stop = threading.Event()

    def reply(wire: bytes) -> bytes:
        query = dns.message.from_wire(wire)
        response = dns.message.make_response(query)
        name = query.question[0].name.to_text()
        if name in answers:
            response.answer.append(dns.rrset.from_text(name, 30, "IN", "A", answers[name]))
        else:
            response.set_rcode(dns.rcode.REFUSED)
        return response.to_wire()

    def serve_udp() -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                wire, client = udp.recvfrom(65535)
                udp.sendto(reply(wire), client)

    def serve_tcp() -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                conn, _ = tcp.accept()
                with conn, conn.makefile("rb") as stream:
                    length = int.from_bytes(stream.read(2), "big")
                    answer = reply(stream.read(length))
                    conn.sendall(len(answer).to_bytes(2, "big") + answer)

    for sock in (udp, tcp):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("0.0.0.0", 53))
        sock.settimeout(0.2)
    tcp.listen(8)
    threads = [threading.Thread(target=serve, daemon=True) for serve in (serve_udp, serve_tcp)]
    for thread in threads:
        thread.start()
    try:
        yield
    finally:
        stop.set()
        for thread in threads:
            thread.join(5)
        udp.close()
        tcp.close()
        worker.close()


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_names_the_mesh_does_not_own_are_forwarded_to_the_nameserver_asked(
    lab: LabState, tcp: bool
) -> None:
    """The query is captured like any other to port 53, and the agent asks the nameserver
    the pod asked, from inside the pod, and hands back its answer."""
    server = ip_of(lab, "legacy")
    before = metric(lab, "node-1", "ambient_dns_requests_total", reason="forwarded")
    with nameserver_in(lab, "legacy", {"app.example.test.": "192.0.2.7"}):

        def inside() -> Any:
            query = dns.message.make_query("app.example.test", "A")
            send = dns.query.tcp if tcp else dns.query.udp
            return send(query, server, timeout=3)

        worker = NetnsWorker(str(probes.pod(lab, "client").netns_path))
        try:
            reply = worker.call(inside)
        finally:
            worker.close()
    (rrset,) = reply.answer
    assert [r.address for r in rrset] == ["192.0.2.7"]
    assert metric(lab, "node-1", "ambient_dns_requests_total", reason="forwarded") == before + 1


def test_dns_capture_off_leaves_the_pods_dns_alone(lab: LabState) -> None:
    """--dns-capture=false: the query goes to the pod's nameserver (none in the lab: it
    times out) and the kernel counts it as not captured."""

    def restart(*args: str) -> None:
        agents.stop_agent(lab, "node-1")
        agents.restart_agent(lab, "node-1", args)

    def redirected() -> float:
        return metric(lab, "node-1", "ambient_datapath_verdicts_total",
                      reason=abi.VerdictReason.REDIRECT_DNS.name)  # fmt: skip

    restart("--dns-capture=false")
    try:
        before = redirected()
        with pytest.raises(dns.exception.Timeout):
            ask(lab, dns.message.make_query(ECHO_HOST, "A"))
        assert redirected() == before
        assert call(lab, vip("echo")).reply  # Services still work, addressed by VIP
    finally:
        restart()
    assert ask(lab, dns.message.make_query(ECHO_HOST, "A")).rcode() == dns.rcode.NOERROR


# ---- identity only from mTLS --------------------------------------------------------------


def test_plaintext_from_a_mesh_workloads_address_is_not_its_principal(lab: LabState) -> None:
    """An ALLOW for client's principal on echo-a admits client's HBONE, and denies a
    plaintext connection from client's own address (sent uncaptured, as a stale or spoofed
    address would arrive)."""
    policy = {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
              "metadata": {"name": "only-client", "namespace": "default"},
              "spec": {"selector": {"matchLabels": {"app": "echo"}}, "action": "ALLOW",
                       "rules": [{"from": [{"source": {
                           "principals": ["cluster.local/ns/default/sa/client"]}}]}]}}  # fmt: skip
    probes.apply_policies(lab, [policy], ("node-1", "node-2"))
    try:
        echo_a = ip_of(lab, "echo-a")
        assert served_by(call(lab, echo_a, APP_PORT)) == f"{echo_a}:{APP_PORT}"

        def plaintext() -> str:
            with socket.socket() as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, abi.AGENT_MARK)
                sock.settimeout(2.0)
                try:
                    sock.connect((echo_a, APP_PORT))
                except TimeoutError:
                    return "timeout"
                return "connected"

        def denied() -> float:
            return metric(lab, "node-1", "ambient_datapath_verdicts_total",
                          reason=abi.VerdictReason.DROP_POLICY_DENIED.name)  # fmt: skip

        before = denied()
        worker = NetnsWorker(str(probes.pod(lab, "client").netns_path))
        try:
            assert worker.call(plaintext) == "timeout"
        finally:
            worker.close()
        assert denied() > before  # its SYN was dropped by echo-a's pod_ingress
    finally:
        probes.apply_policies(lab, [], ("node-1", "node-2"))


# ---- waypoints: how the node agents route to one (the lab's waypoint process, which
# follows the config as the agents do) ------------------------------------------------------


def bind_to_waypoint(document: dict[str, Any]) -> None:
    """echo bound to the lab's waypoint (for services) and echo-b too (for workloads)."""
    vip = str(load_topology(TOPOLOGY).waypoint_vip("default", "waypoint"))
    waypoint = {"destination": vip, "name": "waypoint", "namespace": "default"}
    for service in document["services"]:
        if service["name"] == "echo":
            service["waypoint"] = waypoint
    for workload in document["workloads"]:
        if workload["name"] == "echo-b":
            workload["waypoint"] = waypoint


def serves_echo(dump: dict[str, Any]) -> bool:
    return [s["service"] for s in dump["services"]] == [f"default/{ECHO_HOST}"] and dump[
        "workloads"
    ] == ["default/echo-b"]


@pytest.fixture
def waypoint(lab: LabState) -> Iterator[LabWaypoint]:
    """The bindings in the lab's config, taken by the agents and the waypoint (without a
    restart), undone after."""
    with restored_config(lab):
        envoy = LabWaypoint(lab, "default/waypoint")
        reload(lab, bind_to_waypoint)
        envoy.wait_in_force(serves_echo)
        yield envoy


def through_envoy(waypoint: LabWaypoint, count: int) -> list[tuple[str, str]]:
    deadline = time.monotonic() + 5  # Envoy writes its access log every 100 ms
    while len(tunnels := waypoint.tunnels()) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    return [(t.authority, t.peer) for t in tunnels]


def test_a_vip_bound_to_a_waypoint_goes_through_it_with_the_vip_as_authority(
    lab: LabState, waypoint: LabWaypoint
) -> None:
    since = len(probes.agent_events(lab, "node-1"))
    exchanges = [call(lab, vip("echo")) for _ in range(4)]
    # Envoy relayed them (the apps saw it come from the waypoint pod, over HBONE from there),
    # balancing over both endpoints; it saw the VIP as authority and the original client.
    assert {e.server_saw.split(":")[0] for e in exchanges} == {ip_of(lab, "waypoint")}
    assert {served_by(e) for e in exchanges} == {f"{ip_of(lab, p)}:{APP_PORT}"
                                                 for p in ("echo-a", "echo-b")}  # fmt: skip
    assert through_envoy(waypoint, 4) == [(f"{vip('echo')}:80", identity("client"))] * 4
    line = completed(lab, "node-1", exchanges[0].client, since)
    assert (line["route"], line["dst.waypoint"]) == ("hbone", "default/waypoint")
    assert line["dst.hbone_addr"] == f"{ip_of(lab, 'waypoint')}:15008"
    assert line["dst.identity"] == identity("waypoint")  # checked by the client's agent
    assert (line["dst.service"], line["dataplane_mode"]) == (ECHO_HOST, "ambient-waypoint")
    # The endpoint's agent took HBONE from the waypoint and verified its identity.
    from_waypoint = {"direction": "inbound", "src__identity": identity("waypoint")}
    inbound = probes.wait_for_event(
        lab, "node-1", 5, since, event="connection complete", **from_waypoint
    )
    assert inbound is not None and inbound["dst.workload"] == "echo-a"


def test_a_waypoint_reaches_an_endpoint_outside_the_mesh_as_plain_tcp(
    lab: LabState, waypoint: LabWaypoint
) -> None:
    """legacy (its pod out of the mesh) bound to the waypoint too: the waypoint takes the
    client's HBONE and dials the pod as it is, as ztunnel would."""
    vip_address = str(load_topology(TOPOLOGY).waypoint_vip("default", "waypoint"))

    def bind_legacy(document: dict[str, Any]) -> None:
        for service in document["services"]:
            if service["name"] == "legacy":
                service["waypoint"] = {"destination": vip_address, "name": "waypoint",
                                       "namespace": "default"}  # fmt: skip

    reload(lab, bind_legacy)
    waypoint.wait_in_force(lambda dump: len(dump["services"]) == 2)
    exchange = call(lab, vip("legacy"))
    assert served_by(exchange) == f"{ip_of(lab, 'legacy')}:{APP_PORT}"
    assert exchange.server_saw.split(":")[0] == ip_of(lab, "waypoint")
    assert through_envoy(waypoint, 1) == [(f"{vip('legacy')}:80", identity("client"))]


def test_a_pod_bound_to_a_waypoint_is_reached_through_it_with_its_own_address(
    lab: LabState, waypoint: LabWaypoint
) -> None:
    echo_b = f"{ip_of(lab, 'echo-b')}:{APP_PORT}"
    exchange = call(lab, ip_of(lab, "echo-b"), APP_PORT)
    assert served_by(exchange) == echo_b
    assert exchange.server_saw.split(":")[0] == ip_of(lab, "waypoint")
    assert through_envoy(waypoint, 1) == [(echo_b, identity("client"))]


def test_a_waypoint_that_is_not_ready_is_skipped_logged_and_counted(
    lab: LabState, waypoint: LabWaypoint
) -> None:
    set_status(lab, "waypoint", "Unhealthy")
    skipped = {"waypoint": "default/waypoint"}
    before = metric(lab, "node-1", "ambient_waypoint_skipped_total", **skipped)
    since = len(probes.agent_events(lab, "node-1"))
    exchange = call(lab, vip("echo"))
    assert exchange.server_saw.split(":")[0] == ip_of(lab, "client")  # direct, to an endpoint
    assert metric(lab, "node-1", "ambient_waypoint_skipped_total", **skipped) == before + 1
    event = "waypoint not ready: connection goes direct, without L7"
    warned = probes.wait_for_event(
        lab, "node-1", 5, since, waypoint="default/waypoint", event=event
    )
    assert warned is not None
    assert waypoint.tunnels() == []


def test_connections_around_a_bound_waypoint_are_counted_as_bypasses(
    lab: LabState, waypoint: LabWaypoint
) -> None:
    """Deep guide lab 2: echo's pods reached directly (pod-addressed from a mesh pod, here on
    the same node so delivered locally; plaintext from outside the mesh) never see the
    waypoint: each is counted where it lands."""

    def bypasses(node: str, transport: str) -> float:
        return metric(lab, node, "ambient_waypoint_bypass_total", waypoint="default/waypoint",
                      transport=transport)  # fmt: skip

    local, plaintext = bypasses("node-1", "local"), bypasses("node-2", "plaintext")
    call(lab, ip_of(lab, "echo-a"), APP_PORT)  # a pod address: service waypoints skip it
    probes.talk(probes.pod(lab, "legacy").netns_path, ip_of(lab, "echo-b"), APP_PORT, "hi")
    assert waypoint.tunnels() == []
    assert bypasses("node-1", "local") == local + 1
    assert bypasses("node-2", "plaintext") == plaintext + 1
