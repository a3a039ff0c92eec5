"""An agent socket's connect: over at once when loopback finished it inside connect(),
else a wait for the socket to be writable, with errors as socket.connect() raises them."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from agent.proxy import pod


def _nonblocking() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setblocking(False)
    return sock


def test_a_loopback_connect_is_over_inside_connect() -> None:
    async def main() -> None:
        with socket.create_server(("127.0.0.1", 0)) as server, _nonblocking() as sock:
            loop = asyncio.get_running_loop()
            writers_before = len(loop._selector.get_map())  # type: ignore[attr-defined]
            waiting = asyncio.ensure_future(pod.connect_socket(sock, server.getsockname()))
            await asyncio.sleep(0)  # one turn: the task ran up to its end or its first wait
            assert waiting.done(), "a loopback connect waited for the event loop"
            await waiting
            assert len(loop._selector.get_map()) == writers_before  # type: ignore[attr-defined]
            assert sock.getpeername() == server.getsockname()

    asyncio.run(main())


def test_a_closed_port_is_refused_as_connect_raises_it() -> None:
    async def main() -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            closed = probe.getsockname()  # bound, not listening: a SYN there gets a RST
            with _nonblocking() as sock, pytest.raises(ConnectionRefusedError):
                await pod.connect_socket(sock, closed)

    asyncio.run(main())


def test_a_connect_not_over_at_once_waits_until_it_is() -> None:
    async def main() -> None:
        # A full accept queue (backlog 0 holds one, the filler) drops the SYN: the client
        # retries it a second later, once the queue has room again (an accept after 0.3 s).
        with socket.create_server(("127.0.0.1", 0), backlog=0) as server:
            filler = socket.create_connection(server.getsockname(), timeout=5)
            try:
                with _nonblocking() as sock:
                    loop = asyncio.get_running_loop()
                    accepted: list[socket.socket] = []
                    loop.call_later(0.3, lambda: accepted.append(server.accept()[0]))
                    started = time.monotonic()
                    await pod.connect_socket(sock, server.getsockname())
                    waited = time.monotonic() - started
                    assert sock.getpeername() == server.getsockname()
                    assert waited >= 0.3, f"connected after {waited:.2f}s, with the queue full"
                    for conn in accepted:
                        conn.close()
            finally:
                filler.close()

    asyncio.run(main())
