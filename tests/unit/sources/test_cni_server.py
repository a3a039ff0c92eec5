"""agent/sources/cni_server.py: the agent's end of the ambient-cni socket, on real unix sockets.

No pytest-asyncio here: each test runs its own event loop with asyncio.run, bounded by
TEST_LIMIT so that a hang fails instead of blocking."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import stat
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from agent.sources import cni_server
from agent.sources.cni_server import CniServer
from cni.protocol import MAX_MESSAGE, Answer, PodRef, Request, decode_answer

TEST_LIMIT = 5.0  # seconds for a whole test; each takes milliseconds
ADD = Request(
    "add", "c1", "/var/run/netns/cni-1", "eth0", PodRef("shop", "cart", "u1"), ("10.1.0.5",)
)


class Handler:
    """Records each request; answers with `answer`, or raises `failure` when set."""

    def __init__(self, answer: Answer | None = None) -> None:
        self.requests: list[Request] = []
        self.answer = answer if answer is not None else Answer(ok=True, enrolled=True)
        self.failure: Exception | None = None

    async def __call__(self, request: Request) -> Answer:
        self.requests.append(request)
        if self.failure is not None:
            raise self.failure
        return self.answer


def run(test: Callable[[], Coroutine[Any, Any, None]]) -> None:
    async def bounded() -> None:
        await asyncio.wait_for(test(), TEST_LIMIT)

    asyncio.run(bounded())


async def serving(path: Path, handler: Handler, body: Callable[[], Awaitable[None]]) -> None:
    server = CniServer(path, handler)
    await server.start()
    try:
        await body()
    finally:
        await server.close()


async def exchange(path: Path, data: bytes) -> bytes:
    """Send `data` and end the sending side, then read everything the server says until it
    closes the connection."""
    reader, writer = await asyncio.open_unix_connection(str(path))
    try:
        writer.write(data)
        writer.write_eof()
        await writer.drain()
        return await reader.read()
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def ask(path: Path, request: Request) -> Answer:
    return decode_answer(await exchange(path, request.encode()))


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "cni.sock"


# --- requests and answers --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_", "answer"),
    [
        (ADD, Answer(ok=True, enrolled=True)),
        (Request("del", "c1"), Answer(ok=True)),
        (Request("gc", valid=("c1",)), Answer(ok=True, released=("c2", "c3"))),
        (Request("status"), Answer(ok=False, error="programs not loaded")),
    ],
)
def test_request_reaches_the_handler_and_its_answer_the_client(
    path: Path, request_: Request, answer: Answer
) -> None:
    handler = Handler(answer)

    async def body() -> None:
        assert await ask(path, request_) == answer

    run(lambda: serving(path, handler, body))
    assert handler.requests == [request_]


def test_answer_is_one_line_then_the_connection_closes(path: Path) -> None:
    handler = Handler()

    async def body() -> None:
        reply = await exchange(path, ADD.encode())
        assert reply == Answer(ok=True, enrolled=True).encode()
        assert reply.count(b"\n") == 1 and reply.endswith(b"\n")

    run(lambda: serving(path, handler, body))


def test_one_request_per_connection_and_later_lines_are_ignored(path: Path) -> None:
    handler = Handler()

    async def body() -> None:
        reply = await exchange(path, ADD.encode() + Request("del", "c1").encode())
        assert decode_answer(reply) == Answer(ok=True, enrolled=True)

    run(lambda: serving(path, handler, body))
    assert handler.requests == [ADD]


def test_many_connections_are_each_answered(path: Path) -> None:
    handler = Handler()

    async def body() -> None:
        requests = [Request("del", f"c{i}") for i in range(20)]
        answers = await asyncio.gather(*(ask(path, r) for r in requests))
        assert all(a == Answer(ok=True, enrolled=True) for a in answers)

    run(lambda: serving(path, handler, body))
    assert sorted(r.container_id for r in handler.requests) == sorted(f"c{i}" for i in range(20))


# --- refusals --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "named"),
    [
        pytest.param(b"hello\n", "not JSON", id="not-json"),
        pytest.param(b"[]\n", "must be a JSON object", id="not-an-object"),
        pytest.param(b'{"version": 2, "op": "status"}\n', "protocol version 2", id="newer"),
        pytest.param(b'{"op": "status"}\n', "protocol version None", id="no-version"),
        pytest.param(b'{"version": 1, "op": "boot"}\n', "op 'boot'", id="unknown-op"),
        pytest.param(b'{"version": 1, "op": "add", "netns": "/n"}\n', "container_id", id="no-id"),
        pytest.param(
            b'{"version": 1, "op": "gc", "valid": "c1"}\n', "valid must be", id="wrong-type"
        ),
        pytest.param(b"", "not JSON", id="nothing-sent-before-eof"),
        pytest.param(b'{"version": 1, "op": "status"', "not JSON", id="eof-mid-line"),
    ],
)
def test_invalid_request_is_answered_with_an_error_without_the_handler(
    path: Path, data: bytes, named: str
) -> None:
    handler = Handler()

    async def body() -> None:
        answer = decode_answer(await exchange(path, data))
        assert not answer.ok and named in answer.error
        assert not answer.enrolled and answer.released == ()

    run(lambda: serving(path, handler, body))
    assert handler.requests == []


def test_request_with_an_oversized_number_is_answered_with_an_error(path: Path) -> None:
    handler = Handler()

    async def body() -> None:
        data = b'{"version":1,"op":"status","x":' + b"1" * 5000 + b"}\n"
        answer = decode_answer(await exchange(path, data))
        assert not answer.ok

    run(lambda: serving(path, handler, body))


def test_handler_failure_is_an_agent_error_and_the_server_keeps_serving(path: Path) -> None:
    handler = Handler()

    async def body() -> None:
        handler.failure = RuntimeError("enroller exploded")
        assert await ask(path, ADD) == Answer(ok=False, error="agent error: enroller exploded")
        handler.failure = None
        assert await ask(path, ADD) == Answer(ok=True, enrolled=True)

    run(lambda: serving(path, handler, body))
    assert handler.requests == [ADD, ADD]


def test_over_long_line_closes_the_connection_and_the_server_keeps_serving(path: Path) -> None:
    handler = Handler()

    async def body() -> None:
        reader, writer = await asyncio.open_unix_connection(str(path))
        reply = b""
        with contextlib.suppress(ConnectionError):
            writer.write(b"x" * (MAX_MESSAGE + 4096) + b"\n")
            await writer.drain()
            reply = await reader.read()
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
        assert reply == b""
        assert await ask(path, ADD) == Answer(ok=True, enrolled=True)

    with capture_logs() as logs:
        run(lambda: serving(path, handler, body))
    assert handler.requests == [ADD]
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["CNI connection dropped"]


def test_silent_client_is_dropped_after_the_read_timeout(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cni_server, "READ_TIMEOUT", 0.05)
    handler = Handler()

    async def body() -> None:
        reader, writer = await asyncio.open_unix_connection(str(path))
        assert await reader.read() == b""  # closed by the server, nothing said
        writer.close()
        assert await ask(path, ADD) == Answer(ok=True, enrolled=True)

    run(lambda: serving(path, handler, body))
    assert handler.requests == [ADD]


def test_client_that_hangs_up_at_once_does_not_stop_the_server(path: Path) -> None:
    handler = Handler()

    async def body() -> None:
        for _ in range(3):
            _, writer = await asyncio.open_unix_connection(str(path))
            writer.close()
        assert await ask(path, ADD) == Answer(ok=True, enrolled=True)

    run(lambda: serving(path, handler, body))
    assert handler.requests == [ADD]


# --- the socket file -------------------------------------------------------------------------


def test_socket_is_mode_0600(path: Path) -> None:
    async def body() -> None:
        mode = path.stat().st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600

    run(lambda: serving(path, Handler(), body))


def test_start_creates_the_socket_directory(tmp_path: Path) -> None:
    path = tmp_path / "run" / "ambient" / "cni.sock"

    async def body() -> None:
        assert await ask(path, Request("status")) == Answer(ok=True, enrolled=True)

    run(lambda: serving(path, Handler(), body))


def test_stale_socket_file_is_replaced(path: Path) -> None:
    # What an agent that died leaves: a socket file nobody listens on.
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()
    assert path.exists()

    async def body() -> None:
        assert await ask(path, Request("status")) == Answer(ok=True, enrolled=True)

    run(lambda: serving(path, Handler(), body))


def test_stale_regular_file_is_replaced(path: Path) -> None:
    path.write_text("left over")

    async def body() -> None:
        assert stat.S_ISSOCK(path.stat().st_mode)
        assert await ask(path, Request("status")) == Answer(ok=True, enrolled=True)

    run(lambda: serving(path, Handler(), body))


def test_close_removes_the_socket_file_and_refuses_new_connections(path: Path) -> None:
    async def main() -> None:
        server = CniServer(path, Handler())
        await server.start()
        assert path.exists()
        await server.close()
        assert not path.exists()
        with pytest.raises(OSError):
            await asyncio.open_unix_connection(str(path))
        await server.close()  # twice is fine

    run(main)


def test_close_without_start_is_fine(path: Path) -> None:
    async def main() -> None:
        await CniServer(path, Handler()).close()
        assert not path.exists()

    run(main)


def test_server_can_start_again_after_close(path: Path) -> None:
    async def main() -> None:
        server = CniServer(path, Handler())
        await server.start()
        await server.close()
        await server.start()
        try:
            assert await ask(path, Request("status")) == Answer(ok=True, enrolled=True)
        finally:
            await server.close()

    run(main)
