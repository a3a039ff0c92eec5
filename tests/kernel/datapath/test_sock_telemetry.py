"""The sockops program on its own: loaded, attached to a cgroup this test process enters,
and fed real loopback TCP connections whose payload sizes are known.

The kernel's own counters count sequence space (our SYN, both FINs); the program must report
payload only, whatever way the connection ends."""

from __future__ import annotations

import socket
import struct
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pytest

from agent.datapath import abi
from agent.telemetry.events import EVENT_SIZE, SocketClosed, decode, socket_cookie

if TYPE_CHECKING:
    from agent.datapath.loader import LoadedDatapath

pytestmark = pytest.mark.kernel


@dataclass
class Probe:
    records: list[bytes]
    datapath: LoadedDatapath

    def closed(self, cookie: int, timeout: float = 5.0) -> SocketClosed:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.datapath.consume_rings()
            for raw in self.records:
                event = decode(raw)
                if event.cookie == cookie:
                    return event
            time.sleep(0.01)
        raise AssertionError(f"no close record for socket {cookie}")


@pytest.fixture(scope="module")
def probe() -> Iterator[Probe]:
    from agent.datapath.cgroup import AgentCgroup
    from agent.datapath.loader import LoadedDatapath

    tag = uuid.uuid4().hex[:6]
    datapath = LoadedDatapath(abi.DEFAULT_PIN_DIR / f"test-{tag}")
    cgroup = AgentCgroup(f"test-{tag}")
    records: list[bytes] = []
    try:
        cgroup.enter()
        datapath.attach_cgroup(cgroup.fd)
        datapath.open_telemetry_ring(records.append)
        yield Probe(records, datapath)
    finally:
        datapath.detach_cgroup(cgroup.fd)
        cgroup.leave()
        datapath.close()


def _pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    client.settimeout(10)  # a regression fails the test instead of hanging it
    server.settimeout(10)
    return client, server


def _drain(sock: socket.socket) -> int:
    total = 0
    while chunk := sock.recv(65536):
        total += len(chunk)
    return total


def test_record_layout_matches_the_c_struct(probe: Probe) -> None:
    client, server = _pair()
    cookie = socket_cookie(client)
    client.close()
    server.close()
    probe.closed(cookie)
    assert all(len(raw) == EVENT_SIZE for raw in probe.records)


@pytest.mark.parametrize("request_size, response_size", [(0, 0), (1, 0), (12345, 777),
                                                         (3_000_000, 1)])  # fmt: skip
def test_payload_is_exact_when_both_sides_close_with_fin(
    probe: Probe, request_size: int, response_size: int
) -> None:
    client, server = _pair()
    cookies = socket_cookie(client), socket_cookie(server)
    got: list[int] = []

    def serve() -> None:
        got.append(_drain(server))
        server.sendall(b"r" * response_size)
        server.close()

    thread = threading.Thread(target=serve)
    thread.start()
    client.sendall(b"q" * request_size)
    client.shutdown(socket.SHUT_WR)
    assert _drain(client) == response_size
    client.close()
    thread.join()
    assert got == [request_size]
    active, passive = (probe.closed(c) for c in cookies)
    assert (active.bytes_sent, active.bytes_received) == (request_size, response_size)
    assert (passive.bytes_received, passive.bytes_sent) == (request_size, response_size)
    assert (active.passive, passive.passive) == (False, True)
    assert active.local == passive.remote and active.remote == passive.local
    # Even loopback retransmits now and then on a busy machine (tail loss probes): the
    # counts above are exact all the same, so only the lifetime is checked here.
    assert active.duration_ns > 0


def test_payload_is_exact_when_the_peer_resets(probe: Probe) -> None:
    client, server = _pair()
    cookie = socket_cookie(client)
    client.sendall(b"q" * 1000)
    assert server.recv(1000, socket.MSG_WAITALL) == b"q" * 1000
    server.sendall(b"r" * 10)
    assert client.recv(10, socket.MSG_WAITALL) == b"r" * 10
    # SO_LINGER 0: close() sends RST instead of FIN.
    server.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    server.close()
    with pytest.raises(ConnectionResetError):
        client.recv(1)
    client.close()
    record = probe.closed(cookie)
    assert (record.bytes_sent, record.bytes_received) == (1000, 10)


def test_server_closing_first_is_exact_too(probe: Probe) -> None:
    """The path through FIN_WAIT2 -> TIME_WAIT, where the kernel reports FIN_WAIT2 -> CLOSE."""
    client, server = _pair()
    cookies = socket_cookie(client), socket_cookie(server)
    server.sendall(b"r" * 4321)
    server.shutdown(socket.SHUT_WR)
    assert _drain(client) == 4321
    client.sendall(b"q" * 99)
    client.close()
    assert _drain(server) == 99
    server.close()
    client_record, server_record = (probe.closed(c) for c in cookies)
    assert (client_record.bytes_sent, client_record.bytes_received) == (99, 4321)
    assert (server_record.bytes_sent, server_record.bytes_received) == (4321, 99)


def test_live_connections_are_in_sock_conns_until_closed(probe: Probe) -> None:
    client, server = _pair()
    cookie = socket_cookie(client)
    table = probe.datapath.table("sock_conns")
    assert any(int(key.value) == cookie for key in table)
    client.close()
    server.close()
    probe.closed(cookie)
    assert not any(int(key.value) == cookie for key in table)


def test_stats_count_sent_records_and_no_drops(probe: Probe) -> None:
    stats = {
        abi.TelemetryStat(int(k.value)): sum(v)
        for k, v in probe.datapath.table("telemetry_stats").items()
    }
    assert stats[abi.TelemetryStat.EVENTS_SENT] > 0
    assert stats[abi.TelemetryStat.EVENTS_DROPPED] == 0
    assert stats[abi.TelemetryStat.TABLE_FULL] == 0
