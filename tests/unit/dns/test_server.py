"""The asyncio shell: forwarding with its timeout and bound, UDP with original destinations
over real loopback sockets, DNS over TCP framing. A fake forwarder stands in for the pod's
nameserver."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
import sys
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import dns.flags
import dns.message
import dns.rcode
import dns.rrset
import pytest

from agent.dns.answer import Reason, Transport
from agent.dns.names import MeshNames
from agent.dns.server import (
    IP_RECVORIGDSTADDR,
    IPV6_RECVORIGDSTADDR,
    Address,
    DnsProxy,
    UdpService,
    original_destination,
)
from tests.support.waiting import until

NAMESERVER = ("10.96.0.53", 53)
LOCAL = "echo.default.svc.cluster.local"
EXTERNAL = "example.com"


class FakeUpstream:
    """Answers every query with 93.184.216.34, once `gate` (if any) is set."""

    def __init__(self, *, gate: asyncio.Event | None = None, delay: float = 0.0) -> None:
        self.calls: list[tuple[Address, Transport]] = []
        self.gate = gate
        self.delay = delay
        self.error: BaseException | None = None
        self.mangle: Callable[[bytes], bytes] = lambda wire: wire

    async def __call__(self, query: bytes, server: Address, transport: Transport) -> bytes:
        self.calls.append((server, transport))
        if self.gate is not None:
            await self.gate.wait()
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.error is not None:
            raise self.error
        q = dns.message.from_wire(query)
        response = dns.message.make_response(q)
        response.answer.append(
            dns.rrset.from_text(q.question[0].name, 60, "IN", "A", "93.184.216.34")
        )
        return self.mangle(response.to_wire())


def query(name: str) -> dns.message.Message:
    return dns.message.make_query(name, "A")


def rcode_of(wire: bytes | None) -> dns.rcode.Rcode:
    assert wire is not None
    return dns.message.from_wire(wire).rcode()


def proxy_for(
    names: MeshNames,
    upstream: FakeUpstream,
    *,
    forward_timeout: float = 2.0,
    max_in_flight: int = 256,
    tcp_idle_timeout: float = 10.0,
) -> DnsProxy:
    return DnsProxy(
        lambda: names,
        upstream,
        forward_timeout=forward_timeout,
        max_in_flight=max_in_flight,
        tcp_idle_timeout=tcp_idle_timeout,
    )


def run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(main())


# ---- handle_datagram ------------------------------------------------------------------------


def test_mesh_names_are_answered_without_forwarding(names: MeshNames) -> None:
    async def main() -> None:
        upstream = FakeUpstream()
        proxy = proxy_for(names, upstream)
        q = query(LOCAL)
        reply = await proxy.handle_datagram(q.to_wire(), "default", NAMESERVER)
        assert reply is not None
        assert dns.message.from_wire(reply).answer[0][0].to_text() == "10.96.0.10"
        assert upstream.calls == []
        assert proxy.counts[Reason.ANSWERED] == 1

    run(main)


def test_other_names_are_forwarded_to_the_server_asked(names: MeshNames) -> None:
    async def main() -> None:
        upstream = FakeUpstream()
        proxy = proxy_for(names, upstream)
        q = query(EXTERNAL)
        reply = await proxy.handle_datagram(q.to_wire(), "default", NAMESERVER)
        assert reply is not None
        response = dns.message.from_wire(reply)
        assert response.id == q.id and response.answer[0][0].to_text() == "93.184.216.34"
        assert upstream.calls == [(NAMESERVER, "udp")]
        assert proxy.counts["forwarded"] == 1
        assert proxy.in_flight == 0

    run(main)


def test_forward_timeout_is_servfail_soon(names: MeshNames) -> None:
    async def main() -> None:
        proxy = proxy_for(names, FakeUpstream(delay=30), forward_timeout=0.05)
        started = time.monotonic()
        reply = await proxy.handle_datagram(query(EXTERNAL).to_wire(), "default", NAMESERVER)
        assert time.monotonic() - started < 1
        assert rcode_of(reply) == dns.rcode.SERVFAIL
        assert proxy.counts[Reason.FORWARD_FAILED] == 1
        assert proxy.in_flight == 0

    run(main)


@pytest.mark.parametrize(
    ("error", "mangle", "reason"),
    [
        (ConnectionRefusedError(), None, Reason.FORWARD_FAILED),
        (None, lambda wire: b"\x00\x00" + wire[2:], Reason.FORWARD_FAILED),  # another id
        (None, lambda wire: wire[:2] + bytes([wire[2] & 0x7F]) + wire[3:], Reason.FORWARD_FAILED),
        (None, lambda wire: wire[:5], Reason.FORWARD_FAILED),
        (ValueError("forwarder bug"), None, Reason.ERROR),
    ],
)
def test_forward_failures_are_servfail(
    names: MeshNames,
    error: BaseException | None,
    mangle: Callable[[bytes], bytes] | None,
    reason: Reason,
) -> None:
    async def main() -> None:
        upstream = FakeUpstream()
        upstream.error = error
        if mangle is not None:
            upstream.mangle = mangle
        proxy = proxy_for(names, upstream)
        q = query(EXTERNAL)
        reply = await proxy.handle_datagram(q.to_wire(), "default", NAMESERVER)
        assert reply is not None and rcode_of(reply) == dns.rcode.SERVFAIL
        assert dns.message.from_wire(reply).id == q.id
        assert proxy.counts[reason] == 1
        assert proxy.in_flight == 0

    run(main)


def test_forwards_past_the_bound_are_servfail_at_once(names: MeshNames) -> None:
    async def main() -> None:
        gate = asyncio.Event()
        upstream = FakeUpstream(gate=gate)
        proxy = proxy_for(names, upstream, max_in_flight=2)
        wire = query(EXTERNAL).to_wire()
        pending = [
            asyncio.create_task(proxy.handle_datagram(wire, "default", NAMESERVER))
            for _ in range(2)
        ]
        while len(upstream.calls) < 2:
            await asyncio.sleep(0)
        assert proxy.in_flight == 2
        # A third waits for nothing: SERVFAIL now, and the upstream never sees it.
        reply = await proxy.handle_datagram(wire, "default", NAMESERVER)
        assert rcode_of(reply) == dns.rcode.SERVFAIL
        assert proxy.counts[Reason.OVERLOADED] == 1
        assert len(upstream.calls) == 2
        # Local answers need no slot.
        assert await proxy.handle_datagram(query(LOCAL).to_wire(), "default", NAMESERVER)
        gate.set()
        for reply in await asyncio.gather(*pending):
            assert rcode_of(reply) == dns.rcode.NOERROR
        assert proxy.in_flight == 0
        assert proxy.counts[Reason.FORWARDED] == 2

    run(main)


def test_dropped_queries_get_no_reply(names: MeshNames) -> None:
    async def main() -> None:
        proxy = proxy_for(names, FakeUpstream())
        assert await proxy.handle_datagram(b"\x01\x02", "default", NAMESERVER) is None
        response = dns.message.make_response(query(EXTERNAL)).to_wire()
        assert await proxy.handle_datagram(response, "default", NAMESERVER) is None
        assert proxy.counts[Reason.MALFORMED] == 1
        assert proxy.counts[Reason.NOT_A_QUERY] == 1

    run(main)


def test_a_failing_names_source_costs_one_query(names: MeshNames) -> None:
    def broken() -> MeshNames:
        raise RuntimeError("no snapshot")

    async def main() -> None:
        proxy = DnsProxy(broken, FakeUpstream())
        reply = await proxy.handle_datagram(query(LOCAL).to_wire(), "default", NAMESERVER)
        assert rcode_of(reply) == dns.rcode.SERVFAIL
        assert proxy.counts[Reason.ERROR] == 1

    run(main)


def test_random_datagrams_never_raise(names: MeshNames) -> None:
    async def main() -> None:
        proxy = proxy_for(names, FakeUpstream())
        rng = random.Random(5353)
        valid = query(EXTERNAL).to_wire()
        for index in range(2000):
            if index % 2:
                wire = rng.randbytes(rng.randrange(0, 64))
            else:
                mutated = bytearray(valid)
                mutated[rng.randrange(len(mutated))] = rng.randrange(256)
                wire = bytes(mutated)
            reply = await proxy.handle_datagram(wire, "default", NAMESERVER)
            assert reply is None or reply[:2] == wire[:2]
        assert sum(proxy.counts.values()) == 2000
        assert proxy.counts[Reason.ERROR] == 0

    run(main)


# ---- UDP ------------------------------------------------------------------------------------


def test_original_destination_from_control_messages() -> None:
    v4 = struct.pack("=H", socket.AF_INET) + struct.pack("!H", 53) + socket.inet_aton("10.96.0.10")
    v4 += bytes(8)
    assert original_destination([(socket.IPPROTO_IP, IP_RECVORIGDSTADDR, v4)]) == ("10.96.0.10", 53)
    v6 = (
        struct.pack("=H", socket.AF_INET6)
        + struct.pack("!HI", 5353, 0)
        + socket.inet_pton(socket.AF_INET6, "fd00::a")
        + bytes(4)
    )
    assert original_destination([(socket.IPPROTO_IPV6, IPV6_RECVORIGDSTADDR, v6)]) == (
        "fd00::a",
        5353,
    )
    assert original_destination([]) is None
    assert original_destination([(socket.IPPROTO_IP, IP_RECVORIGDSTADDR, v4[:5])]) is None
    assert original_destination([(socket.IPPROTO_IP, 8, v4)]) is None  # IP_PKTINFO, say
    assert original_destination([(socket.IPPROTO_IP, IP_RECVORIGDSTADDR, b"")]) is None


def udp_socket(orig_dst: bool) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    if orig_dst:
        sock.setsockopt(socket.IPPROTO_IP, IP_RECVORIGDSTADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    return sock


@contextlib.contextmanager
def served(
    proxy: DnsProxy,
    orig_dst: bool = True,
    reply: Callable[[Address], socket.socket] | None = None,
) -> Iterator[tuple[socket.socket, socket.socket, UdpService]]:
    """(listener, client, service): the proxy serving a loopback UDP socket, replying
    through `reply` (the listener itself unless told), all closed at the end."""
    listener, client = udp_socket(orig_dst=orig_dst), udp_socket(orig_dst=False)
    service = proxy.serve_udp(listener, lambda: "default", reply or (lambda _: listener))
    try:
        yield listener, client, service
    finally:
        service.close()
        listener.close()
        client.close()


async def receive(sock: socket.socket) -> dns.message.Message:
    loop = asyncio.get_running_loop()
    return dns.message.from_wire(await asyncio.wait_for(loop.sock_recv(sock, 65535), 2))


@pytest.mark.skipif(sys.platform != "linux", reason="IP_RECVORIGDSTADDR is Linux's")
def test_udp_replies_from_the_address_asked(names: MeshNames) -> None:
    async def main() -> None:
        upstream = FakeUpstream()
        proxy = proxy_for(names, upstream)
        listener, client = udp_socket(orig_dst=True), udp_socket(orig_dst=False)
        address = listener.getsockname()
        asked: list[Address] = []

        def reply_socket(destination: Address) -> socket.socket:
            asked.append(destination)
            return listener

        service = proxy.serve_udp(listener, lambda: "default", reply_socket)
        try:
            local = query(LOCAL)
            client.sendto(local.to_wire(), address)
            response = await receive(client)
            assert response.id == local.id and response.answer[0][0].to_text() == "10.96.0.10"

            external = query(EXTERNAL)
            client.sendto(external.to_wire(), address)
            response = await receive(client)
            assert response.id == external.id
            assert response.answer[0][0].to_text() == "93.184.216.34"
            assert upstream.calls == [(address, "udp")]
            assert asked == [address, address]

            client.sendto(b"\x00\x01junk", address)  # dropped; the next one still answered
            client.sendto(local.to_wire(), address)
            assert (await receive(client)).id == local.id
            assert proxy.counts[Reason.MALFORMED] == 1
            assert proxy.counts[Reason.ANSWERED] == 2
            assert proxy.counts[Reason.FORWARDED] == 1
        finally:
            service.close()
            for sock in (listener, client):
                sock.close()

    run(main)


def test_udp_without_original_destination_is_dropped(names: MeshNames) -> None:
    async def main() -> None:
        proxy = proxy_for(names, FakeUpstream())
        with served(proxy, orig_dst=False) as (listener, client, _service):
            client.sendto(query(LOCAL).to_wire(), listener.getsockname())
            await until(lambda: proxy.counts[Reason.NO_ORIGINAL_DESTINATION] == 1)
            assert proxy.counts[Reason.ANSWERED] == 0

    run(main)


@pytest.mark.skipif(sys.platform != "linux", reason="IP_RECVORIGDSTADDR is Linux's")
def test_udp_reply_that_cannot_be_sent_is_counted(names: MeshNames) -> None:
    async def main() -> None:
        proxy = proxy_for(names, FakeUpstream())
        closed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        closed.close()
        with served(proxy, reply=lambda _: closed) as (listener, client, _service):
            for name in (LOCAL, EXTERNAL):
                client.sendto(query(name).to_wire(), listener.getsockname())
            await until(lambda: proxy.counts[Reason.SEND_FAILED] == 2)
            assert proxy.counts[Reason.ANSWERED] == proxy.counts[Reason.FORWARDED] == 0

    run(main)


@pytest.mark.skipif(sys.platform != "linux", reason="IP_RECVORIGDSTADDR is Linux's")
def test_udp_close_cancels_pending_forwards(names: MeshNames) -> None:
    async def main() -> None:
        upstream = FakeUpstream(gate=asyncio.Event())  # never opens
        proxy = proxy_for(names, upstream)
        with served(proxy) as (listener, client, service):
            client.sendto(query(EXTERNAL).to_wire(), listener.getsockname())
            await until(lambda: service.pending == 1)
            assert proxy.in_flight == 1
            service.close()
            await until(lambda: service.pending == 0 and proxy.in_flight == 0)
            # No longer reading: a query now stays in the socket's buffer.
            client.sendto(query(LOCAL).to_wire(), listener.getsockname())
            await asyncio.sleep(0.05)
            assert proxy.counts[Reason.ANSWERED] == 0

    run(main)


@pytest.mark.skipif(sys.platform != "linux", reason="IP_RECVORIGDSTADDR is Linux's")
def test_udp_bound_on_pending_forwards(names: MeshNames) -> None:
    async def main() -> None:
        gate = asyncio.Event()
        proxy = proxy_for(names, FakeUpstream(gate=gate), max_in_flight=3)
        with served(proxy) as (listener, client, service):
            queries = [query(EXTERNAL) for _ in range(5)]
            for q in queries:
                client.sendto(q.to_wire(), listener.getsockname())
            # Two over the bound: SERVFAIL without waiting for the three pending.
            overloaded = [await receive(client), await receive(client)]
            assert {r.rcode() for r in overloaded} == {dns.rcode.SERVFAIL}
            assert service.pending == 3
            gate.set()
            answered = [await receive(client) for _ in range(3)]
            assert {r.rcode() for r in answered} == {dns.rcode.NOERROR}
            ids = {r.id for r in overloaded + answered}
            assert ids == {q.id for q in queries}
            assert proxy.counts[Reason.OVERLOADED] == 2
            assert proxy.counts[Reason.FORWARDED] == 3

    run(main)


# ---- TCP ------------------------------------------------------------------------------------


def frame(wire: bytes) -> bytes:
    return len(wire).to_bytes(2, "big") + wire


async def read_frame(reader: asyncio.StreamReader) -> dns.message.Message:
    length = int.from_bytes(await asyncio.wait_for(reader.readexactly(2), 2), "big")
    return dns.message.from_wire(await asyncio.wait_for(reader.readexactly(length), 2))


async def tcp_proxy(
    proxy: DnsProxy,
) -> tuple[asyncio.Server, asyncio.StreamReader, asyncio.StreamWriter]:
    server = await asyncio.start_server(
        lambda r, w: proxy.handle_tcp(r, w, "default", NAMESERVER), "127.0.0.1", 0
    )
    reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname()[:2])
    return server, reader, writer


def test_tcp_pipelined_queries_answered_in_order(names: MeshNames) -> None:
    async def main() -> None:
        # The first query is slow upstream; the second, local, must still come second.
        upstream = FakeUpstream(delay=0.05)
        proxy = proxy_for(names, upstream)
        server, reader, writer = await tcp_proxy(proxy)
        try:
            first, second = query(EXTERNAL), query(LOCAL)
            writer.write(frame(first.to_wire()) + frame(second.to_wire()))
            assert (await read_frame(reader)).id == first.id
            response = await read_frame(reader)
            assert response.id == second.id
            assert not response.flags & dns.flags.TC
            assert upstream.calls == [(NAMESERVER, "tcp")]

            writer.write(b"\x00\x05hello")  # a length no DNS message has
            assert await asyncio.wait_for(reader.read(), 2) == b""
            assert proxy.counts[Reason.MALFORMED] == 1
            assert proxy.counts[Reason.FORWARDED] == proxy.counts[Reason.ANSWERED] == 1
        finally:
            writer.close()
            server.close()

    run(main)


@pytest.mark.parametrize(
    ("sent", "counted"),
    [
        (b"", 0),  # the client closes between queries: no fault
        (b"\x00", 1),  # half a length
        (b"\x00\x64" + bytes(20), 1),  # 100 bytes announced, 20 sent
    ],
)
def test_tcp_short_reads_close_the_connection(names: MeshNames, sent: bytes, counted: int) -> None:
    async def main() -> None:
        proxy = proxy_for(names, FakeUpstream())
        server, reader, writer = await tcp_proxy(proxy)
        try:
            writer.write(sent)
            writer.write_eof()
            assert await asyncio.wait_for(reader.read(), 2) == b""
            assert proxy.counts[Reason.MALFORMED] == counted
        finally:
            writer.close()
            server.close()

    run(main)


def test_tcp_idle_connection_is_closed(names: MeshNames) -> None:
    async def main() -> None:
        proxy = proxy_for(names, FakeUpstream(), tcp_idle_timeout=0.05)
        server, reader, writer = await tcp_proxy(proxy)
        try:
            writer.write(frame(query(LOCAL).to_wire()))
            await read_frame(reader)
            started = time.monotonic()
            assert await asyncio.wait_for(reader.read(), 2) == b""
            assert time.monotonic() - started < 1
            assert proxy.counts[Reason.MALFORMED] == 0
        finally:
            writer.close()
            server.close()

    run(main)
