"""The threaded relay between plain sockets (agent/proxy/socket_relay.py), over loopback TCP:
app_a <-> [relay side a | relay | relay side b] <-> app_b. Splice and copy on threads, and
the asyncio relay that takes over past the threads' cap:
bytes exact each way, half-close, resets, a stalled reader, the threads' cap, cut and
cancellation, and no fd left behind."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import pytest

from agent.drain import Drain
from agent.proxy.relay import RelayResult, reset_socket
from agent.proxy.socket_relay import SPLICE_AVAILABLE, SocketRelays
from tests.support.loopback import closing, open_fds, receive_outcome, tcp_pair

T = TypeVar("T")
# Threads splicing, threads copying, and the asyncio relay past the cap (here 0).
MODES = ["splice", "copy", "asyncio"] if SPLICE_AVAILABLE else ["copy", "asyncio"]


def relays(mode: str) -> SocketRelays:
    return SocketRelays(limit=0 if mode == "asyncio" else 128, splice=mode == "splice")


def apps(
    buffer: int | None = None,
) -> tuple[socket.socket, socket.socket, socket.socket, socket.socket]:
    """app_a, relay side a, relay side b, app_b."""
    app_a, side_a = tcp_pair(buffer)
    side_b, app_b = tcp_pair(buffer)
    return app_a, side_a, side_b, app_b


def payload(size: int, seed: int) -> bytes:
    block = hashlib.sha256(bytes([seed])).digest() * (65536 // 32)
    return (block * (size // len(block) + 1))[:size]


def send_and_receive(sock: socket.socket, data: bytes) -> bytes:
    """Send `data` then half-close, while receiving to EOF; what was received."""
    received = bytearray()

    def send() -> None:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)

    sender = threading.Thread(target=send)
    sender.start()
    while chunk := sock.recv(1 << 20):
        received += chunk
    sender.join()
    return bytes(received)


def run(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(main(), 60)

    return asyncio.run(bounded())


@pytest.mark.parametrize("mode", MODES)
def test_bulk_both_ways_is_byte_exact_and_counted_exactly(mode: str) -> None:
    size_a, size_b = 24 * 1024 * 1024 + 7, 16 * 1024 * 1024 + 3
    to_b, to_a = payload(size_a, 1), payload(size_b, 2)
    app_a, side_a, side_b, app_b = apps()

    async def main() -> tuple[bytes, bytes, RelayResult]:
        relaying = await relays(mode).start(side_a, side_b)
        assert relaying.mode == mode
        got_a, got_b, result = await asyncio.gather(
            asyncio.to_thread(send_and_receive, app_a, to_b),
            asyncio.to_thread(send_and_receive, app_b, to_a),
            relaying.wait(),
        )
        return got_a, got_b, result

    with closing(app_a, app_b):
        got_a, got_b, result = run(main)
    assert got_b == to_b and got_a == to_a
    assert result == RelayResult(size_a, size_b, None)
    assert side_a.fileno() == -1 and side_b.fileno() == -1  # the relay closed its sockets


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("first", ["a", "b"])
def test_half_close_is_carried_each_way(mode: str, first: str) -> None:
    """One app sends and half-closes; the other reads to EOF, then answers after it, and
    half-closes in turn: each EOF reaches the other side, and nothing is reset."""
    app_a, side_a, side_b, app_b = apps()
    opener, answerer = (app_a, app_b) if first == "a" else (app_b, app_a)

    def open_then_read() -> bytes:
        opener.sendall(b"request")
        opener.shutdown(socket.SHUT_WR)
        reply = bytearray()
        while chunk := opener.recv(65536):
            reply += chunk
        return bytes(reply)

    def answer_after_eof() -> bytes:
        request = bytearray()
        while chunk := answerer.recv(65536):
            request += chunk
        answerer.sendall(b"the answer, after your EOF")  # the half-closed side still reads
        answerer.shutdown(socket.SHUT_WR)
        return bytes(request)

    async def main() -> tuple[bytes, bytes, RelayResult]:
        relaying = await relays(mode).start(side_a, side_b)
        return await asyncio.gather(
            asyncio.to_thread(open_then_read), asyncio.to_thread(answer_after_eof), relaying.wait()
        )

    with closing(app_a, app_b):
        reply, request, result = run(main)
    assert (request, reply) == (b"request", b"the answer, after your EOF")
    forward, back = len(b"request"), len(reply)
    assert result == RelayResult(*((forward, back) if first == "a" else (back, forward)), None)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("resetting", ["a", "b"])
def test_a_reset_on_either_side_resets_the_other_and_keeps_the_counts(
    mode: str, resetting: str
) -> None:
    app_a, side_a, side_b, app_b = apps()
    resetter, other = (app_a, app_b) if resetting == "a" else (app_b, app_a)

    def send_then_reset() -> None:
        resetter.sendall(b"x" * 1000)
        time.sleep(0.2)  # the bytes reach the other app before the reset does
        reset_socket(resetter)

    def read_1000_then_wait() -> str:
        got = b""
        while len(got) < 1000:
            got += other.recv(1000 - len(got))
        return receive_outcome(other)

    async def main() -> tuple[None, str, RelayResult]:
        relaying = await relays(mode).start(side_a, side_b)
        return await asyncio.gather(
            asyncio.to_thread(send_then_reset), asyncio.to_thread(read_1000_then_wait),
            relaying.wait(),
        )  # fmt: skip

    with closing(other):
        _, outcome, result = run(main)
    assert outcome == "reset"
    assert result.error is not None and "reset" in result.error.lower()
    assert (result.a_to_b, result.b_to_a) == ((1000, 0) if resetting == "a" else (0, 1000))


@pytest.mark.parametrize("mode", MODES)
def test_a_stalled_reader_stops_the_writer_at_the_socket_buffers(mode: str) -> None:
    """app_b never reads. What app_a manages to send is bounded by the four sockets'
    buffers (fixed at 256 KiB here, which the kernel doubles) plus the relay's one pipe or
    buffer: far less than what it tries to send."""
    app_a, side_a, side_b, app_b = apps(buffer=256 * 1024)
    attempted = 256 * 1024 * 1024

    def flood() -> int:
        app_a.setblocking(False)
        block = memoryview(bytes(1 << 20))
        sent, last_progress = 0, time.monotonic()
        while sent < attempted and time.monotonic() - last_progress < 1.0:
            try:
                sent += app_a.send(block)
                last_progress = time.monotonic()
            except BlockingIOError:
                time.sleep(0.01)
        return sent

    async def main() -> tuple[int, RelayResult]:
        relaying = await relays(mode).start(side_a, side_b)
        sent = await asyncio.to_thread(flood)
        relaying.cut("test over")
        return sent, await relaying.wait()

    with closing(app_a, app_b):
        sent, result = run(main)
    assert sent < 8 * 1024 * 1024, f"{sent} bytes accepted from a writer whose reader stalled"
    assert result.a_to_b <= sent
    assert result.error == "test over"


def test_past_the_cap_connections_get_the_asyncio_relay() -> None:
    first, second = apps(), apps()

    async def main() -> tuple[list[str], list[tuple[bytes, bytes, RelayResult]], int]:
        relays = SocketRelays(limit=1)
        started = [await relays.start(pair[1], pair[2]) for pair in (first, second)]
        busy = relays.threaded
        results = []
        for (app_a, _, _, app_b), relaying in zip((first, second), started, strict=True):
            results.append(await asyncio.gather(
                asyncio.to_thread(send_and_receive, app_a, b"ping" * 1000),
                asyncio.to_thread(send_and_receive, app_b, b"pong" * 3000),
                relaying.wait(),
            ))  # fmt: skip
        return [r.mode for r in started], results, busy

    with closing(first[0], first[3], second[0], second[3]):
        modes, results, busy = run(main)
    assert modes[0] in ("splice", "copy") and modes[1] == "asyncio"
    assert busy == 1
    for got_a, got_b, result in results:
        assert (got_b, got_a) == (b"ping" * 1000, b"pong" * 3000)
        assert result == RelayResult(4000, 12000, None)


@pytest.mark.parametrize("mode", MODES)
def test_cut_resets_both_sides(mode: str) -> None:
    app_a, side_a, side_b, app_b = apps()

    async def main() -> tuple[str, str, RelayResult]:
        relaying = await relays(mode).start(side_a, side_b)
        outcomes = asyncio.gather(
            asyncio.to_thread(receive_outcome, app_a), asyncio.to_thread(receive_outcome, app_b)
        )
        await asyncio.sleep(0.1)
        relaying.cut("cut by a policy change")
        relaying.cut("a second cut changes nothing")
        a, b = await outcomes
        return a, b, await relaying.wait()

    with closing(app_a, app_b):
        a, b, result = run(main)
    assert (a, b) == ("reset", "reset")
    assert result == RelayResult(0, 0, "cut by a policy change")


@pytest.mark.parametrize("mode", MODES)
def test_the_pods_drain_ends_a_relay_with_resets(mode: str) -> None:
    """The pod's connections drain (unenrolling, the agent's shutdown): past its grace, the
    handler awaiting the relay is cancelled, and both sides are reset."""
    app_a, side_a, side_b, app_b = apps()

    async def main() -> tuple[int, str, str, int]:
        agent_relays = relays(mode)
        drain = Drain("pod connections")
        drain.spawn(agent_relays.relay(side_a, side_b))
        outcomes = asyncio.gather(
            asyncio.to_thread(receive_outcome, app_a), asyncio.to_thread(receive_outcome, app_b)
        )
        await asyncio.sleep(0.1)
        cancelled = await drain.close(grace=0.1)
        a, b = await outcomes
        return cancelled, a, b, agent_relays.threaded

    with closing(app_a, app_b):
        cancelled, a, b, still = run(main)
    assert cancelled == 1
    assert (a, b) == ("reset", "reset")
    assert still == 0
    assert side_a.fileno() == -1 and side_b.fileno() == -1


def test_the_agents_shutdown_cuts_what_is_left() -> None:
    app_a, side_a, side_b, app_b = apps()

    async def main() -> tuple[RelayResult, int]:
        relays = SocketRelays()
        relaying = await relays.start(side_a, side_b)
        await asyncio.sleep(0.05)
        relays.close()
        return await relaying.wait(), relays.threaded

    with closing(app_a, app_b):
        result, still = run(main)
        assert receive_outcome(app_a) == receive_outcome(app_b) == "reset"
    assert result.error == "agent shutting down" and still == 0


@pytest.mark.parametrize("mode", MODES)
def test_no_fd_is_left_behind(mode: str) -> None:
    before = open_fds()

    async def one(how: str) -> None:
        app_a, side_a, side_b, app_b = apps()
        with closing(app_a, app_b):
            relaying = await relays(mode).start(side_a, side_b)
            if how == "eof":
                await asyncio.gather(
                    asyncio.to_thread(send_and_receive, app_a, b"a" * 100_000),
                    asyncio.to_thread(send_and_receive, app_b, b"b" * 100_000),
                )
            elif how == "reset":
                reset_socket(app_a)
            else:
                relaying.cut()
            await relaying.wait()

    async def main() -> None:
        for how in ("eof", "reset", "cut") * 3:
            await one(how)

    run(main)
    assert open_fds() == before
