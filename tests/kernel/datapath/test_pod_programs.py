"""The tc programs' verdicts on crafted packets, through BPF_PROG_RUN (Cilium-style).

Each case: a packet (and skb mark) in; the return code, the mark out, the verdict reason
counted and the pods-map counters out. Runs inside a scratch netns so the programs' socket
lookups see that namespace's listeners. bpf_sk_assign only works at a real tc ingress hook,
so in a test run a chosen socket shows as DROP_ASSIGN_FAILED; which listener was chosen is
told apart by which listeners exist. Real delivery is covered by tests/kernel/test_capture.py.
"""

from __future__ import annotations

import functools
import socket
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.datapath import abi, packets
from agent.datapath.abi import VerdictReason as R
from agent.datapath.prog_run import RunResult, run_tc
from agent.inpod import sockets
from agent.inpod.enrollment import pod_key_addr
from agent.netns import NetnsWorker

pytestmark = pytest.mark.kernel

TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT = 0, 2, 7
POD = "10.77.0.2"
OTHER_POD = "10.77.0.3"
REMOTE = "10.99.0.9"


@dataclass
class Bench:
    datapath: Any
    worker: NetnsWorker
    pin_dir: Path

    def run(self, program: str, packet: bytes, mark: int = 0) -> tuple[RunResult, list[R]]:
        verdicts = self.datapath.table("verdicts")
        before = {int(k.value): sum(v) for k, v in verdicts.items()}
        fd = self.datapath.program_fds[program]
        result = self.worker.call(lambda: run_tc(fd, packet, mark=mark))
        after = {int(k.value): sum(v) for k, v in verdicts.items()}
        counted = [R(k) for k in after for _ in range(after[k] - before.get(k, 0))]
        return result, counted

    def pod(self, ip: str) -> Any:
        pods = self.datapath.table("pods")
        return pods[pods.Key(addr=pod_key_addr(ip))]


@pytest.fixture(scope="module")
def bench_module() -> Iterator[Bench]:
    from agent.datapath.loader import LoadedDatapath

    tag = uuid.uuid4().hex[:6]
    netns = f"tprog-{tag}"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    pin_dir = abi.DEFAULT_PIN_DIR / f"test-{tag}"
    datapath = worker = None
    try:
        datapath = LoadedDatapath(pin_dir)
        worker = NetnsWorker(f"/run/netns/{netns}")
        subprocess.run(["ip", "-n", netns, "link", "set", "lo", "up"], check=True)
        yield Bench(datapath, worker, pin_dir)
    finally:
        if worker is not None:
            worker.close()
        if datapath is not None:
            datapath.close(unpin=True)
        subprocess.run(["ip", "netns", "del", netns], check=False)


@pytest.fixture
def bench(bench_module: Bench) -> Iterator[Bench]:
    pods = bench_module.datapath.table("pods")
    pods.clear()
    bench_module.datapath.table("capture_exclude_ports").clear()
    for ip in (POD, OTHER_POD):
        value = pods.Leaf()
        value.flags = abi.POD_CAPTURE
        pods[pods.Key(addr=pod_key_addr(ip))] = value
    yield bench_module


@pytest.fixture
def listeners(bench: Bench) -> Iterator[dict[int, socket.socket]]:
    socks = {
        port: bench.worker.call(functools.partial(sockets.listener, port, True))
        for port in (abi.PORT_OUTBOUND, abi.PORT_INBOUND)
    }
    yield socks
    for sock in socks.values():
        sock.close()


# ---- pod_egress --------------------------------------------------------------------------


def test_egress_syn_from_enrolled_pod_is_looped_back_with_deliver_mark(bench: Bench) -> None:
    result, reasons = bench.run("pod_egress", packets.tcp4(POD, 40000, REMOTE, 8080))
    assert result.retval == TC_ACT_REDIRECT
    assert result.mark == abi.DELIVER_MARK
    assert reasons == [R.REDIRECT_OUTBOUND]
    assert bench.pod(POD).outbound_captured == 1


def test_egress_non_syn_is_looped_but_not_counted_as_a_new_connection(bench: Bench) -> None:
    packet = packets.tcp4(POD, 40000, REMOTE, 8080, flags=packets.ACK)
    result, reasons = bench.run("pod_egress", packet)
    assert (result.retval, reasons) == (TC_ACT_REDIRECT, [R.REDIRECT_OUTBOUND])
    assert bench.pod(POD).outbound_captured == 0


def test_egress_agent_marked_socket_is_never_captured(bench: Bench) -> None:
    packet = packets.tcp4(POD, 40000, REMOTE, 15008)
    result, reasons = bench.run("pod_egress", packet, mark=abi.AGENT_MARK)
    assert (result.retval, reasons) == (TC_ACT_OK, [R.PASS_AGENT_MARK])
    # Only the low 12 bits identify the agent, as in Istio.
    result, reasons = bench.run("pod_egress", packet, mark=0xA000 | abi.AGENT_MARK)
    assert (result.retval, reasons) == (TC_ACT_OK, [R.PASS_AGENT_MARK])


def test_egress_from_address_not_in_pods_map_passes(bench: Bench) -> None:
    result, reasons = bench.run("pod_egress", packets.tcp4("10.77.0.200", 1, REMOTE, 80))
    assert (result.retval, reasons) == (TC_ACT_OK, [R.PASS_NOT_ENROLLED])


def test_egress_to_excluded_port_passes(bench: Bench) -> None:
    excluded = bench.datapath.table("capture_exclude_ports")
    excluded[excluded.Key(port=5432)] = excluded.Leaf()
    result, reasons = bench.run("pod_egress", packets.tcp4(POD, 40000, REMOTE, 5432))
    assert (result.retval, reasons) == (TC_ACT_OK, [R.PASS_EXCLUDED_PORT])
    result, reasons = bench.run("pod_egress", packets.tcp4(POD, 40000, REMOTE, 5433))
    assert reasons == [R.REDIRECT_OUTBOUND]


@pytest.mark.parametrize(
    "packet",
    [packets.udp4(POD, 5353, REMOTE, 53), packets.arp()],
    ids=["udp", "arp"],
)
def test_egress_non_tcp_passes(bench: Bench, packet: bytes) -> None:
    result, reasons = bench.run("pod_egress", packet)
    assert (result.retval, reasons) == (TC_ACT_OK, [R.PASS_NOT_TCP4])


def test_egress_truncated_tcp_is_dropped(bench: Bench) -> None:
    result, reasons = bench.run("pod_egress", packets.truncated_tcp4(POD, REMOTE))
    assert (result.retval, reasons) == (TC_ACT_SHOT, [R.DROP_MALFORMED])


# ---- pod_ingress: packets looped by pod_egress (DELIVER_MARK) -----------------------------


def test_looped_syn_without_agent_listener_fails_closed(bench: Bench) -> None:
    packet = packets.tcp4(POD, 40000, REMOTE, 8080)
    result, reasons = bench.run("pod_ingress", packet, mark=abi.DELIVER_MARK)
    assert (result.retval, reasons) == (TC_ACT_SHOT, [R.DROP_NO_LISTENER])


def test_looped_syn_is_given_to_outbound_listener(
    bench: Bench, listeners: dict[int, socket.socket]
) -> None:
    packet = packets.tcp4(POD, 40000, REMOTE, 8080)
    _, reasons = bench.run("pod_ingress", packet, mark=abi.DELIVER_MARK)
    assert reasons == [R.DROP_ASSIGN_FAILED]  # found and chosen; see module docstring
    listeners.pop(abi.PORT_OUTBOUND).close()
    _, reasons = bench.run("pod_ingress", packet, mark=abi.DELIVER_MARK)
    assert reasons == [R.DROP_NO_LISTENER]  # 15006 alone does not serve outbound


def test_looped_syn_to_port_the_pod_listens_on_still_goes_to_agent(
    bench: Bench, listeners: dict[int, socket.socket]
) -> None:
    """A pod app listening on 0.0.0.0:8080 must not receive the pod's own outbound SYN to
    some-remote:8080: listeners match by port, so the program skips them for connections."""
    app = bench.worker.call(lambda: sockets.listener(8080, False))
    try:
        listeners.pop(abi.PORT_OUTBOUND).close()
        _, reasons = bench.run(
            "pod_ingress", packets.tcp4(POD, 40000, REMOTE, 8080), abi.DELIVER_MARK
        )
        assert reasons == [R.DROP_NO_LISTENER]
    finally:
        app.close()


# ---- pod_ingress: genuine inbound ---------------------------------------------------------


def test_inbound_syn_to_app_port_goes_to_inbound_listener(
    bench: Bench, listeners: dict[int, socket.socket]
) -> None:
    _, reasons = bench.run("pod_ingress", packets.tcp4(REMOTE, 50000, POD, 8080))
    assert reasons == [R.DROP_ASSIGN_FAILED]  # chosen; see module docstring
    assert bench.pod(POD).inbound_captured == 0  # counted only once really delivered
    listeners.pop(abi.PORT_INBOUND).close()
    _, reasons = bench.run("pod_ingress", packets.tcp4(REMOTE, 50000, POD, 8080))
    assert reasons == [R.DROP_NO_LISTENER]


def test_inbound_to_hbone_port_passes_to_the_stack(bench: Bench) -> None:
    result, reasons = bench.run("pod_ingress", packets.tcp4(REMOTE, 50000, POD, abi.PORT_HBONE))
    assert (result.retval, reasons) == (TC_ACT_OK, [R.PASS_HBONE])


@pytest.mark.parametrize("port", [abi.PORT_OUTBOUND, abi.PORT_INBOUND])
def test_inbound_straight_to_capture_ports_is_dropped(bench: Bench, port: int) -> None:
    result, reasons = bench.run("pod_ingress", packets.tcp4(REMOTE, 50000, POD, port))
    assert (result.retval, reasons) == (TC_ACT_SHOT, [R.DROP_AGENT_PORT])


def test_inbound_non_syn_without_socket_is_left_to_the_stack(bench: Bench) -> None:
    packet = packets.tcp4(REMOTE, 50000, POD, 8080, flags=packets.ACK)
    result, reasons = bench.run("pod_ingress", packet)
    assert (result.retval, reasons) == (TC_ACT_OK, [R.PASS_INBOUND_OTHER])


def test_inbound_to_address_not_enrolled_passes(
    bench: Bench, listeners: dict[int, socket.socket]
) -> None:
    result, reasons = bench.run("pod_ingress", packets.tcp4(REMOTE, 50000, "10.77.0.250", 80))
    assert (result.retval, reasons) == (TC_ACT_OK, [R.PASS_NOT_ENROLLED])


def test_inbound_non_tcp_passes(bench: Bench) -> None:
    result, reasons = bench.run("pod_ingress", packets.udp4(REMOTE, 53, POD, 5353))
    assert (result.retval, reasons) == (TC_ACT_OK, [R.PASS_NOT_TCP4])


# ---- DNS capture (POD_CAPTURE_DNS) --------------------------------------------------------

NAMESERVER = "10.96.0.10"


def _capture_dns(bench: Bench, ip: str = POD) -> None:
    pods = bench.datapath.table("pods")
    value = pods[pods.Key(addr=pod_key_addr(ip))]
    value.flags = abi.POD_CAPTURE | abi.POD_CAPTURE_DNS
    pods[pods.Key(addr=pod_key_addr(ip))] = value


def test_egress_dns_query_of_a_dns_captured_pod_is_looped_back(bench: Bench) -> None:
    _capture_dns(bench)
    result, reasons = bench.run("pod_egress", packets.udp4(POD, 40000, NAMESERVER, 53))
    assert (result.retval, result.mark, reasons) == (
        TC_ACT_REDIRECT, abi.DELIVER_MARK, [R.REDIRECT_DNS]
    )  # fmt: skip
    # Other UDP, the agent's own forward upstream and pods without DNS capture pass.
    for packet, mark, reason in (
        (packets.udp4(POD, 40000, NAMESERVER, 5353), 0, R.PASS_NOT_TCP4),
        (packets.udp4(POD, 40000, NAMESERVER, 53), abi.AGENT_MARK, R.PASS_AGENT_MARK),
        (packets.udp4(OTHER_POD, 40000, NAMESERVER, 53), 0, R.PASS_NOT_TCP4),
    ):
        result, reasons = bench.run("pod_egress", packet, mark=mark)
        assert (result.retval, reasons) == (TC_ACT_OK, [reason])


def test_looped_dns_query_goes_to_the_agents_dns_socket_or_is_dropped(bench: Bench) -> None:
    _capture_dns(bench)
    packet = packets.udp4(POD, 40000, NAMESERVER, 53)
    result, reasons = bench.run("pod_ingress", packet, mark=abi.DELIVER_MARK)
    # Fails closed: a query never leaves for the nameserver while the agent is not there.
    assert (result.retval, reasons) == (TC_ACT_SHOT, [R.DROP_NO_DNS_LISTENER])
    sock = bench.worker.call(lambda: sockets.dns_listener(abi.PORT_DNS))
    try:
        _, reasons = bench.run("pod_ingress", packet, mark=abi.DELIVER_MARK)
        assert reasons == [R.DROP_ASSIGN_FAILED]  # found and chosen; see module docstring
    finally:
        sock.close()
    # A genuine datagram to port 53 (not looped) is not the pod's query: it passes.
    result, reasons = bench.run("pod_ingress", packet)
    assert (result.retval, reasons) == (TC_ACT_OK, [R.PASS_NOT_TCP4])


# ---- pins ---------------------------------------------------------------------------------


def test_pinned_maps_dump_field_by_field_with_bpftool(bench: Bench) -> None:
    import json

    out = subprocess.run(
        ["bpftool", "-j", "map", "dump", "pinned", str(bench.pin_dir / "maps" / "pods")],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    entries = json.loads(out)
    assert len(entries) == 2
    assert set(entries[0]["formatted"]["value"]) == {
        "flags", "reserved", "outbound_captured", "inbound_captured",
    }  # fmt: skip
    for prog in abi.PROGRAMS:
        subprocess.run(
            ["bpftool", "prog", "show", "pinned", str(bench.pin_dir / "progs" / prog)],
            check=True, capture_output=True,
        )  # fmt: skip
