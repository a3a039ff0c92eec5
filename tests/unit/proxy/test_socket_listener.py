"""A pod listener that hands over accepted sockets as they are (agent/proxy/socket_listener.py):
nothing is read before the handler decides, so bytes the client sent before its handler ran
reach a relay first and in order; the handler can reset, release or stream the socket."""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Coroutine
from typing import Any

from agent.proxy.socket_listener import AcceptedSocket, SocketListener
from agent.proxy.socket_relay import SocketRelays
from tests.support.loopback import closing, open_fds, receive_outcome, tcp_pair


def listening() -> socket.socket:
    sock = socket.create_server(("127.0.0.1", 0))
    sock.setblocking(False)
    return sock


def connect_and(address: tuple[str, int], first: bytes, then: bytes) -> tuple[bytes, str]:
    """Connect, send `first` at once (before any handler runs), later `then`, half-close;
    what came back, and how it ended."""
    received = bytearray()
    try:
        # A reset can come before this thread wakes: it shows in connect(), a send, shutdown().
        with socket.create_connection(address, timeout=10) as sock:
            sock.sendall(first)
            sock.sendall(then)
            sock.shutdown(socket.SHUT_WR)
            while chunk := sock.recv(65536):
                received += chunk
    except (ConnectionResetError, BrokenPipeError):
        return bytes(received), "reset"
    except OSError as exc:  # shutdown() of a connection the peer reset meanwhile
        if exc.errno != errno.ENOTCONN:
            raise
        return bytes(received), "reset"
    return bytes(received), "eof"


def serve(handler: Any) -> Any:
    """A listener whose connections go to `handler` (as tasks), and the tasks."""
    tasks: list[asyncio.Task[None]] = []

    def spawn(coro: Coroutine[Any, Any, None]) -> object:
        task = asyncio.ensure_future(coro)
        tasks.append(task)
        return task

    sock = listening()
    return sock.getsockname(), SocketListener(sock, handler, spawn), tasks


def test_bytes_sent_before_the_handler_ran_reach_the_relay_first_and_in_order() -> None:
    far, side_b = tcp_pair()  # the relay's other side, and the app behind it
    got: list[bytes] = []

    async def handler(client: AcceptedSocket) -> None:
        await asyncio.sleep(0.2)  # the client's first bytes are in the kernel by now
        result = await SocketRelays().relay(client.release(), side_b)
        got.append(str(result).encode())

    def far_app() -> bytes:
        received = bytearray()
        while chunk := far.recv(65536):
            received += chunk
        far.sendall(b"reply")
        far.shutdown(socket.SHUT_WR)
        return bytes(received)

    async def main() -> tuple[bytes, tuple[bytes, str]]:
        address, listener, tasks = serve(handler)
        try:
            return await asyncio.gather(
                asyncio.to_thread(far_app),
                asyncio.to_thread(connect_and, address, b"first bytes, ", b"then the rest"),
            )
        finally:
            listener.close()
            await asyncio.gather(*tasks)

    with closing(far):
        at_far, (reply, how) = asyncio.run(main())
    assert at_far == b"first bytes, then the rest"
    assert (reply, how) == (b"reply", "eof")
    assert got == [b"RelayResult(a_to_b=26, b_to_a=5, error=None)"]


def test_a_handler_can_reset_the_socket_as_it_is_or_through_its_streams() -> None:
    async def reset_raw(client: AcceptedSocket) -> None:
        client.reset()

    async def reset_streams(client: AcceptedSocket) -> None:
        reader, _ = await client.streams()
        assert await reader.readexactly(5) == b"hello"
        client.reset()

    async def main(handler: Any) -> tuple[bytes, str]:
        address, listener, tasks = serve(handler)
        try:
            return await asyncio.to_thread(connect_and, address, b"hello", b"")
        finally:
            listener.close()
            await asyncio.gather(*tasks)

    assert asyncio.run(main(reset_raw)) == (b"", "reset")
    assert asyncio.run(main(reset_streams)) == (b"", "reset")


def test_release_hands_the_socket_over_and_reset_then_leaves_it_alone() -> None:
    async def main() -> str:
        app, side = tcp_pair()
        other_side, other_app = tcp_pair()
        with closing(app, other_app):
            side.setblocking(False)
            client = AcceptedSocket(side)
            assert client.release() is side
            client.reset()  # the relay owns it now: nothing happens
            assert side.fileno() != -1
            relaying = await SocketRelays().start(side, other_side)
            relaying.cut()
            await relaying.wait()
            return await asyncio.to_thread(receive_outcome, app)

    assert asyncio.run(main()) == "reset"


def test_close_stops_accepting_and_closes_the_listener() -> None:
    before = open_fds()

    async def main() -> tuple[int, str]:
        async def handler(client: AcceptedSocket) -> None:
            client.reset()

        address, listener, tasks = serve(handler)
        await asyncio.to_thread(connect_and, address, b"x", b"")
        listener.close()
        listener.close()  # twice is harmless
        await asyncio.gather(*tasks)
        try:
            socket.create_connection(address, timeout=2).close()
        except ConnectionRefusedError:
            return len(tasks), "refused"
        return len(tasks), "accepted"

    assert asyncio.run(main()) == (1, "refused")
    assert open_fds() == before
