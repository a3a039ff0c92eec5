"""The callback relay between an app's socket and an HBONE stream, over loopback: two agents'
relays (client side and server side) with real sockets as the apps, HBONE over TCP between
them. Byte-exact bulk both ways, half-close, resets both ways, cut, a stalled app bounded
by the window, data that arrived before the relay started; a client relay started before
its CONNECT is answered (the app's bytes held by the server until it accepts, dropped with a
refusal, the app reset)."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest

from agent.hbone import protocol as p
from agent.hbone.connection import HboneConnection, HboneStream, TunnelRefused
from agent.hbone.wire import ErrorCode
from agent.proxy.relay import DRAINED, RelayResult
from agent.proxy.tunnel_relay import CHUNK, TunnelRelay
from tests.support.hbone_pair import hbone_pair


@dataclass
class Ends:
    client_app: socket.socket  # the test plays the client app on this end
    server_app: socket.socket  # and the server app on this one
    client_relay: TunnelRelay
    server_relay: asyncio.Future[TunnelRelay]
    client: HboneConnection
    server: asyncio.Future[HboneConnection]


def _pair(buffers: int | None) -> tuple[socket.socket, socket.socket]:
    """A connected TCP pair over loopback (the relay's sockets are TCP sockets); `buffers`:
    the sockets' send and receive buffers (else the kernel's autotuning)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        one = socket.create_connection(listener.getsockname())
        other, _ = listener.accept()
    for sock in (one, other):
        sock.setblocking(False)
        if buffers is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffers)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffers)
    return one, other


@asynccontextmanager
async def tunnel(early: bytes = b"", buffers: int | None = None) -> AsyncIterator[Ends]:
    """Client app <-> relay <-> HBONE <-> relay <-> server app. `early`: what the server's
    side sends on the stream before its relay starts."""
    loop = asyncio.get_running_loop()
    server_relay: asyncio.Future[TunnelRelay] = loop.create_future()
    server_conn: asyncio.Future[HboneConnection] = loop.create_future()
    server_app, server_relay_end = _pair(buffers)
    client_app, client_relay_end = _pair(buffers)

    async def on_tunnel(stream: HboneStream, _: p.TunnelRequested, conn: HboneConnection) -> None:
        conn.accept(stream)
        if early:
            conn.send_data(stream.stream_id, early)
        relay = TunnelRelay(server_relay_end, stream, app_is_client=False)
        relay.start()
        server_conn.set_result(conn)
        server_relay.set_result(relay)

    try:
        async with hbone_pair(on_tunnel) as client:
            stream = await client.open_tunnel("10.0.0.2:80", {})
            await server_relay
            if early:
                await asyncio.sleep(0.1)  # in before the client's relay attaches
            relay = TunnelRelay(client_relay_end, stream, app_is_client=True)
            relay.start()
            yield Ends(client_app, server_app, relay, server_relay, client, server_conn)
    finally:
        client_app.close()
        server_app.close()


async def read_all(sock: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    received = bytearray()
    while chunk := await loop.sock_recv(sock, 1 << 20):
        received += chunk
    return bytes(received)


async def results(ends: Ends) -> tuple[RelayResult, RelayResult]:
    server = await ends.server_relay
    return await asyncio.wait_for(asyncio.gather(ends.client_relay.wait(), server.wait()), 10)


def test_bulk_both_ways_byte_exact_with_half_close() -> None:
    """8 MiB up, then (after the client's FIN reached the server app) 8 MiB down: every byte
    in order, FIN carried each way, counts exact at both relays."""
    up, down = os.urandom(8 << 20), os.urandom(8 << 20)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        async with tunnel() as ends:

            async def client_app() -> bytes:
                await loop.sock_sendall(ends.client_app, up)
                ends.client_app.shutdown(socket.SHUT_WR)
                return await read_all(ends.client_app)

            async def server_app() -> bytes:
                received = await read_all(ends.server_app)  # ends at the client's FIN
                await loop.sock_sendall(ends.server_app, down)
                ends.server_app.shutdown(socket.SHUT_WR)
                return received

            got_down, got_up = await asyncio.wait_for(
                asyncio.gather(client_app(), server_app()), 30
            )
            assert got_up == up and got_down == down
            at_client, at_server = await results(ends)
            assert at_client == RelayResult(len(up), len(down), None)
            assert at_server == RelayResult(len(up), len(down), None)
            assert ends.client.active_streams == 0

    asyncio.run(run())


def test_a_large_write_goes_as_frames_of_the_reads_not_copies() -> None:
    """Between our agents (1 MiB frames), what one read of the app took is one DATA frame."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with tunnel() as ends:
            sent: list[int] = []
            original = ends.client.proto.send_data_frame

            def spy(stream_id: int, frame: memoryview) -> None:
                sent.append(len(frame))
                original(stream_id, frame)

            ends.client.proto.send_data_frame = spy  # type: ignore[method-assign]
            payload = os.urandom(4 << 20)
            await loop.sock_sendall(ends.client_app, payload)
            ends.client_app.shutdown(socket.SHUT_WR)
            assert await asyncio.wait_for(read_all(ends.server_app), 10) == payload
            assert sum(sent) - 9 * len(sent) == len(payload)
            assert max(sent) <= 9 + CHUNK and len(sent) < len(payload) // 16384

    asyncio.run(main())


def test_a_stalled_server_app_stalls_the_client_app_at_the_window() -> None:
    """The server app reads nothing: the client app's writes stop once the stream window
    is full (the apps' sockets hold little here); no agent holds more than the window, and
    the client's relay stops reading its app."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with tunnel(buffers=65536) as ends:
            written, chunk = 0, b"x" * 65536
            with pytest.raises(TimeoutError):
                while True:
                    await asyncio.wait_for(loop.sock_sendall(ends.client_app, chunk), 0.5)
                    written += len(chunk)
            server = await ends.server
            assert server._unconsumed <= p.STREAM_WINDOW
            assert ends.client.proto.sendable(1) == 0 and not ends.client_relay._reading
            # The window, the four app sockets' buffers (64 KiB each, doubled by the kernel).
            assert p.STREAM_WINDOW <= written <= p.STREAM_WINDOW + 1024 * 1024
            (await ends.server_relay).cut()

    asyncio.run(main())


def test_the_server_app_reset_resets_the_client_app() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with tunnel() as ends:
            await loop.sock_sendall(ends.client_app, b"hello")
            assert await asyncio.wait_for(loop.sock_recv(ends.server_app, 5), 5) == b"hello"
            ends.server_app.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            ends.server_app.close()
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(read_all(ends.client_app), 5)
            at_client, at_server = await results(ends)
            assert at_client.error and at_server.error
            assert at_client.a_to_b == at_server.a_to_b == 5

    asyncio.run(main())


def test_cut_resets_both_apps() -> None:
    async def main() -> None:
        async with tunnel() as ends:
            ends.client_relay.cut("policy")
            for app in (ends.client_app, ends.server_app):
                with pytest.raises(ConnectionResetError):
                    await asyncio.wait_for(read_all(app), 5)
            at_client, at_server = await results(ends)
            assert at_client.error == "policy" and at_server.error

    asyncio.run(main())


def test_a_cancelled_wait_cuts_the_relay() -> None:
    async def main() -> None:
        async with tunnel() as ends:
            waiting = asyncio.ensure_future(ends.client_relay.wait())
            await asyncio.sleep(0.05)
            waiting.cancel()
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(read_all(ends.server_app), 5)
            assert ends.client_relay.result.result().error == DRAINED

    asyncio.run(main())


def test_a_no_error_reset_after_the_data_ends_the_client_app_cleanly() -> None:
    """Envoy ends a tunnel whose upstream closed with RST_STREAM(NO_ERROR) after the data:
    the client app gets every byte, then FIN, and closing its side is a clean end."""

    async def main() -> None:
        async with tunnel() as ends:
            server = await ends.server
            server_relay = await ends.server_relay
            stream_id = 1
            server.send_data(stream_id, b"the whole response")
            server.proto.reset_stream(stream_id, ErrorCode.NO_ERROR)
            server._flush()
            server_relay.cut("test")  # the server's relay is out of the picture
            assert await asyncio.wait_for(read_all(ends.client_app), 5) == b"the whole response"
            ends.client_app.shutdown(socket.SHUT_WR)
            result = await asyncio.wait_for(ends.client_relay.wait(), 5)
            assert result == RelayResult(0, len(b"the whole response"), None)

    asyncio.run(main())


def test_what_arrived_before_the_relay_started_is_delivered_first() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with tunnel(early=b"early ") as ends:
            await loop.sock_sendall(ends.server_app, b"late")
            ends.server_app.shutdown(socket.SHUT_WR)
            assert await asyncio.wait_for(read_all(ends.client_app), 5) == b"early late"

    asyncio.run(main())


@dataclass
class Unanswered:
    """A client relay started on a CONNECT the server has not answered yet."""

    client_app: socket.socket
    client_relay: TunnelRelay
    stream: HboneStream  # the client's
    server: HboneConnection
    server_stream: HboneStream
    server_relay_end: socket.socket  # for the server's relay, once it accepts
    server_app: socket.socket


@asynccontextmanager
async def unanswered() -> AsyncIterator[Unanswered]:
    loop = asyncio.get_running_loop()
    requested: asyncio.Future[tuple[HboneStream, HboneConnection]] = loop.create_future()
    server_app, server_relay_end = _pair(None)
    client_app, client_relay_end = _pair(None)

    async def on_tunnel(stream: HboneStream, _: p.TunnelRequested, conn: HboneConnection) -> None:
        requested.set_result((stream, conn))  # the test answers

    try:
        async with hbone_pair(on_tunnel) as client:
            stream = client.open_stream("10.0.0.2:80", {})
            relay = TunnelRelay(client_relay_end, stream, app_is_client=True)
            relay.start()
            server_stream, server_conn = await asyncio.wait_for(requested, 5)
            yield Unanswered(client_app, relay, stream, server_conn, server_stream,
                             server_relay_end, server_app)  # fmt: skip
    finally:
        for sock in (client_app, server_app, server_relay_end):
            sock.close()


async def refused(ends: Unanswered) -> str:
    """What the agent's outbound does when the answer is not 200: cut the relay."""
    try:
        await asyncio.wait_for(ends.stream.established, 5)
    except (TunnelRefused, ConnectionResetError) as exc:
        ends.client_relay.cut(str(exc))
        return str(exc)
    raise AssertionError("the CONNECT was answered 200")


def test_what_the_app_sends_before_the_answer_waits_at_the_server_until_it_accepts() -> None:
    """The client's relay sends the app's bytes (and FIN) before the CONNECT is answered; the
    server's stream holds them, in order, and its relay delivers them once it accepts."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with unanswered() as ends:
            await loop.sock_sendall(ends.client_app, b"sent before the answer")
            ends.client_app.shutdown(socket.SHUT_WR)
            await asyncio.sleep(0.1)
            assert not ends.stream.answered
            assert ends.server.proto.sendable(ends.server_stream.stream_id) > 0  # open, held
            ends.server.accept(ends.server_stream)
            server_relay = TunnelRelay(ends.server_relay_end, ends.server_stream, False)
            server_relay.start()
            await asyncio.wait_for(ends.stream.established, 5)
            got = await asyncio.wait_for(read_all(ends.server_app), 5)
            assert got == b"sent before the answer"
            await loop.sock_sendall(ends.server_app, b"answer")
            ends.server_app.shutdown(socket.SHUT_WR)
            assert await asyncio.wait_for(read_all(ends.client_app), 5) == b"answer"
            result = await asyncio.wait_for(ends.client_relay.wait(), 5)
            assert result == RelayResult(len(got), len(b"answer"), None)

    asyncio.run(main())


def test_a_refused_connect_resets_the_app_and_drops_what_it_sent_early() -> None:
    """A 401 after the app sent: the client app is reset (never a FIN), and the server gives
    the stream's bytes back to its windows and budget without delivering them."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with unanswered() as ends:
            await loop.sock_sendall(ends.client_app, b"x" * 100_000)
            await asyncio.sleep(0.1)
            ends.server.refuse(ends.server_stream, 401)
            assert await refused(ends) == "HBONE CONNECT answered 401"
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(read_all(ends.client_app), 5)
            result = await asyncio.wait_for(ends.client_relay.wait(), 5)
            assert result.error == "HBONE CONNECT answered 401"
            assert ends.server.active_streams == 0
            assert ends.server._unconsumed == 0

    asyncio.run(main())


def test_a_no_error_reset_instead_of_an_answer_is_a_refusal_not_an_end() -> None:
    """RST_STREAM(NO_ERROR) ends an answered tunnel cleanly; before the answer, the client
    app is reset as for any refusal."""

    async def main() -> None:
        async with unanswered() as ends:
            ends.server.proto.reset_stream(ends.server_stream.stream_id, ErrorCode.NO_ERROR)
            ends.server._flush()
            assert "reset" in await refused(ends)
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(read_all(ends.client_app), 5)

    asyncio.run(main())
