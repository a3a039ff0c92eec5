"""The asyncio shell around answer(): the UDP and TCP sides of the DNS proxy, forwarding,
and the counts by reason.

The pod's queries reach sockets inside its network namespace that the caller opened (and
the caller's forwarder sends from there too); this module never enters a namespace. What it
owns is the IO: reading each datagram with the address the pod sent it to, replying from
that address, TCP framing, the forward timeout and the bound on pending forwards.

Queries answered locally are answered synchronously, in the callback that read them: no
task, no await, so a flood of them costs what parsing costs. Only forwards wait, and those
are bounded by `max_in_flight`: past it a query gets SERVFAIL at once rather than a place in
a queue that would grow with the flood.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import socket
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from agent.dns.answer import (
    HEADER_SIZE,
    TCP_MAX_MESSAGE,
    Decision,
    Drop,
    Reason,
    Reply,
    Transport,
    answer,
    servfail,
)
from agent.dns.names import MeshNames

log = structlog.get_logger("agent.dns")

Address = tuple[str, int]
# Sends one query to `server` (the address the pod asked) and returns the response. The
# caller's: it sends from inside the pod's network namespace.
Forwarder = Callable[[bytes, Address, Transport], Awaitable[bytes]]

# Linux's values (in.h, in6.h); Python's socket module has no names for them. The option to
# enable and the control message type are the same number.
IP_RECVORIGDSTADDR = 20
IPV6_RECVORIGDSTADDR = 74
_SOCKADDR_IN6_SIZE = 28  # the larger of sockaddr_in (16) and sockaddr_in6
_ANCILLARY_SPACE = socket.CMSG_SPACE(_SOCKADDR_IN6_SIZE)
_MAX_DATAGRAM = 65535
# Datagrams read per wakeup: enough to drain a burst, few enough that one busy pod's socket
# does not keep the loop from everything else.
_DATAGRAMS_PER_WAKEUP = 64

FORWARD_TIMEOUT = 2.0
MAX_IN_FLIGHT = 256
TCP_IDLE_TIMEOUT = 10.0


def original_destination(ancdata: list[tuple[int, int, bytes]]) -> Address | None:
    """The address a datagram was sent to, from its IP(V6)_ORIGDSTADDR control message."""
    for level, kind, data in ancdata:
        # sockaddr_in / sockaddr_in6: family in host order, then the port in network order.
        family = int.from_bytes(data[0:2], sys.byteorder) if len(data) >= 2 else -1
        port = int.from_bytes(data[2:4], "big")
        ipv4 = (level, kind, family) == (socket.IPPROTO_IP, IP_RECVORIGDSTADDR, socket.AF_INET)
        if ipv4 and len(data) >= 8:
            return socket.inet_ntop(socket.AF_INET, data[4:8]), port
        ipv6 = (level, kind, family) == (socket.IPPROTO_IPV6, IPV6_RECVORIGDSTADDR, socket.AF_INET6)
        if ipv6 and len(data) >= 24:  # after family, port and flowinfo
            return socket.inet_ntop(socket.AF_INET6, data[8:24]), port
    return None


class DnsProxy:
    """Answers mesh names, forwards the rest, and counts every query once in `counts`."""

    def __init__(
        self,
        names: Callable[[], MeshNames],
        forward: Forwarder,
        *,
        forward_timeout: float = FORWARD_TIMEOUT,
        max_in_flight: int = MAX_IN_FLIGHT,
        tcp_idle_timeout: float = TCP_IDLE_TIMEOUT,
        counts: collections.Counter[str] | None = None,
    ) -> None:
        """counts: where to count, when several proxies (one per pod) share one tally."""
        self._names = names
        self._forward = forward
        self._forward_timeout = forward_timeout
        self._max_in_flight = max_in_flight
        self._tcp_idle_timeout = tcp_idle_timeout
        # Every reason present from the start, so /metrics shows a zero rather than nothing.
        self.counts: collections.Counter[str] = (
            counts if counts is not None else collections.Counter()
        )
        for reason in Reason:  # present from the start: /metrics shows a zero, not nothing
            self.counts.setdefault(reason, 0)
        self._in_flight = 0

    @property
    def in_flight(self) -> int:
        """Forwards sent and not yet answered or given up."""
        return self._in_flight

    def count(self, reason: Reason) -> None:
        self.counts[reason] += 1

    async def handle_datagram(
        self, wire: bytes, pod_namespace: str, server: Address
    ) -> bytes | None:
        """The reply to one UDP query sent to `server`, or None to send nothing."""
        reply, reason = await self._resolve(wire, pod_namespace, server, "udp")
        self.count(reason)
        return reply

    def serve_udp(
        self,
        sock: socket.socket,
        pod_namespace: Callable[[], str],
        reply_socket: Callable[[Address], socket.socket],
    ) -> UdpService:
        """Answer the datagrams arriving on `sock`, which must have IP_RECVORIGDSTADDR (or
        its IPv6 twin) enabled. Each reply goes out through `reply_socket(destination)`, a
        socket bound to the address the client asked, so that the reply comes from there."""
        return UdpService(self, sock, pod_namespace, reply_socket)

    async def handle_tcp(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        pod_namespace: str,
        server: Address,
    ) -> None:
        """DNS over TCP (RFC 7766) on one connection: length-prefixed queries, answered in
        order, until the client closes, idles past the timeout or breaks the framing."""
        try:
            while (query := await self._read_tcp_query(reader)) is not None:
                reply, reason = await self._resolve(query, pod_namespace, server, "tcp")
                if reply is not None:
                    try:
                        writer.write(len(reply).to_bytes(2, "big") + reply)
                        await writer.drain()
                    except OSError:  # ConnectionError included
                        self.count(Reason.SEND_FAILED)
                        return
                self.count(reason)
        except OSError as error:
            log.debug("dns tcp connection failed", error=str(error))
        except Exception:
            log.exception("dns tcp connection failed")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _read_tcp_query(self, reader: asyncio.StreamReader) -> bytes | None:
        """The next query on a TCP connection, or None when the connection should close."""
        try:
            prefix = await asyncio.wait_for(reader.readexactly(2), self._tcp_idle_timeout)
        except TimeoutError:
            return None
        except asyncio.IncompleteReadError as error:
            if error.partial:  # half a length prefix; an EOF between queries is just the end
                self.count(Reason.MALFORMED)
            return None
        length = int.from_bytes(prefix, "big")
        if length < HEADER_SIZE:
            self.count(Reason.MALFORMED)
            return None
        try:
            return await asyncio.wait_for(reader.readexactly(length), self._tcp_idle_timeout)
        except (TimeoutError, asyncio.IncompleteReadError):
            self.count(Reason.MALFORMED)
            return None

    # ---- the parts both transports share -------------------------------------------------

    async def _resolve(
        self, wire: bytes, pod_namespace: str, server: Address, transport: Transport
    ) -> tuple[bytes | None, Reason]:
        decision = self._decide(wire, pod_namespace, transport)
        if isinstance(decision, Reply):
            return decision.wire, decision.reason
        if isinstance(decision, Drop):
            return None, decision.reason
        if not self._admit():
            return servfail(wire), Reason.OVERLOADED
        try:
            return await self._forwarded(decision.wire, server, transport)
        finally:
            self._release()

    def _decide(self, wire: bytes, pod_namespace: str, transport: Transport) -> Decision:
        try:
            return answer(wire, self._names(), pod_namespace, transport=transport)
        except Exception:
            # answer() takes any bytes; reaching here is a bug, which must cost one query
            # and not the listener.
            log.exception("dns answer failed", size=len(wire))
            reply = servfail(wire)
            return Drop(Reason.ERROR) if reply is None else Reply(reply, Reason.ERROR)

    def _admit(self) -> bool:
        """Take a forward slot, if one is free; whoever takes it calls _release once."""
        if self._in_flight >= self._max_in_flight:
            return False
        self._in_flight += 1
        return True

    def _release(self) -> None:
        self._in_flight -= 1

    async def _forwarded(
        self, query: bytes, server: Address, transport: Transport
    ) -> tuple[bytes | None, Reason]:
        try:
            response = await asyncio.wait_for(
                self._forward(query, server, transport), self._forward_timeout
            )
        except (TimeoutError, OSError) as error:
            log.debug("dns forward failed", server=server, transport=transport, error=repr(error))
            return servfail(query), Reason.FORWARD_FAILED
        except Exception:
            log.exception("dns forwarder raised", server=server, transport=transport)
            return servfail(query), Reason.ERROR
        if not _answers(response, query):
            log.debug("dns forward answered nonsense", server=server, size=len(response))
            return servfail(query), Reason.FORWARD_FAILED
        return response, Reason.FORWARDED


def _answers(response: bytes, query: bytes) -> bool:
    """Whether `response` can be relayed as the answer to `query`: a response (QR set) with
    the query's id, of a size TCP can frame. Anything more is the client's to judge."""
    return (
        HEADER_SIZE <= len(response) <= TCP_MAX_MESSAGE
        and response[:2] == query[:2]
        and bool(response[2] & 0x80)
    )


class UdpService:
    """One UDP socket served by a DnsProxy, until close(). The socket stays the caller's."""

    def __init__(
        self,
        proxy: DnsProxy,
        sock: socket.socket,
        pod_namespace: Callable[[], str],
        reply_socket: Callable[[Address], socket.socket],
    ) -> None:
        self._proxy = proxy
        self._sock = sock
        self._pod_namespace = pod_namespace
        self._reply_socket = reply_socket
        self._loop = asyncio.get_running_loop()
        self._forwards: set[asyncio.Task[None]] = set()
        self._closed = False
        sock.setblocking(False)  # the reader drains until EAGAIN
        self._fd = sock.fileno()
        self._loop.add_reader(self._fd, self._on_readable)

    @property
    def pending(self) -> int:
        """Forwards under way for this socket."""
        return len(self._forwards)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._loop.remove_reader(self._fd)
        for task in self._forwards:
            task.cancel()

    def _on_readable(self) -> None:
        for _ in range(_DATAGRAMS_PER_WAKEUP):
            try:
                wire, ancdata, _flags, client = self._sock.recvmsg(_MAX_DATAGRAM, _ANCILLARY_SPACE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                # E.g. ECONNREFUSED left by an ICMP error for an earlier reply: that one
                # datagram's business, not the socket's.
                log.debug("dns udp receive failed", error=str(error))
                continue
            try:
                self._on_datagram(wire, ancdata, client)
            except Exception:
                log.exception("dns datagram failed", size=len(wire))
                self._proxy.count(Reason.ERROR)

    def _on_datagram(self, wire: bytes, ancdata: list[tuple[int, int, bytes]], client: Any) -> None:
        proxy = self._proxy
        destination = original_destination(ancdata)
        if destination is None:
            proxy.count(Reason.NO_ORIGINAL_DESTINATION)
            return
        decision = proxy._decide(wire, self._pod_namespace(), "udp")
        if isinstance(decision, Drop):
            proxy.count(decision.reason)
        elif isinstance(decision, Reply):
            self._send(decision.wire, decision.reason, client, destination)
        elif not proxy._admit():
            self._send(servfail(wire), Reason.OVERLOADED, client, destination)
        else:
            task = self._loop.create_task(self._forward(decision.wire, client, destination))
            self._forwards.add(task)
            # A done callback rather than `finally`: a task cancelled before it first runs
            # never enters its body, and its slot must still come back.
            task.add_done_callback(self._forward_done)

    def _forward_done(self, task: asyncio.Task[None]) -> None:
        self._forwards.discard(task)
        self._proxy._release()

    async def _forward(self, query: bytes, client: Any, destination: Address) -> None:
        reply, reason = await self._proxy._forwarded(query, destination, "udp")
        self._send(reply, reason, client, destination)

    def _send(self, reply: bytes | None, reason: Reason, client: Any, destination: Address) -> None:
        """Send `reply` from `destination` to `client`; count the query under `reason`, or
        under send_failed when the reply does not go out."""
        if reply is not None:
            try:
                self._reply_socket(destination).sendto(reply, client)
            except OSError as error:  # BlockingIOError included: a full buffer drops it
                log.debug("dns reply not sent", client=client, error=str(error))
                reason = Reason.SEND_FAILED
            except Exception:
                log.exception("dns reply not sent", client=client)
                reason = Reason.SEND_FAILED
        self._proxy.count(reason)
