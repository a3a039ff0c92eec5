"""The HBONE asyncio shell over loopback TCP: streams, half-close, flow-control backpressure.
TLS and identities are covered in tests/hbone/test_tls_tunnel.py."""

from __future__ import annotations

import asyncio
import hashlib
import os

import h2.errors
import pytest

from agent.hbone import protocol as p
from agent.hbone.connection import HboneConnection, HboneStream, TunnelRefused
from tests.support.hbone_pair import hbone_pair


async def echo(stream: HboneStream, request: p.TunnelRequested, conn: HboneConnection) -> None:
    conn.accept(stream)
    while data := await stream.read():
        await stream.write(data)
    stream.write_eof()
    stream.close()


def test_tunnel_round_trip_with_half_close() -> None:
    async def main() -> None:
        async with hbone_pair(echo) as client:
            stream = await client.open_tunnel("10.0.0.2:80", {"forwarded": 'for="1.2.3.4"'})
            await stream.write(b"ping")
            stream.write_eof()
            received = b""
            while chunk := await stream.read():
                received += chunk
            assert received == b"ping"
            stream.close()
            assert client.active_streams == 0

    asyncio.run(main())


def test_refusal_surfaces_as_tunnel_refused_with_status() -> None:
    async def refuse(stream: HboneStream, req: p.TunnelRequested, conn: HboneConnection) -> None:
        conn.refuse(stream, 503)

    async def main() -> None:
        async with hbone_pair(refuse) as client:
            with pytest.raises(TunnelRefused) as caught:
                await client.open_tunnel("10.0.0.2:80", {})
            assert caught.value.status == 503

    asyncio.run(main())


def test_many_streams_byte_exact_in_both_directions() -> None:
    size = 8 * 1024 * 1024

    async def one(client: HboneConnection) -> None:
        payload = os.urandom(size)
        stream = await client.open_tunnel("10.0.0.2:80", {})
        digest = hashlib.sha256()

        async def reader() -> None:
            while chunk := await stream.read():
                digest.update(chunk)

        read_task = asyncio.ensure_future(reader())
        await stream.write(payload)
        stream.write_eof()
        await read_task
        stream.close()
        assert digest.hexdigest() == hashlib.sha256(payload).hexdigest()

    async def main() -> None:
        async with hbone_pair(echo) as client:
            await asyncio.gather(*(one(client) for _ in range(4)))

    asyncio.run(main())


def test_a_stalled_reader_stalls_the_writer_at_the_window() -> None:
    """The server never reads: the client's writes stop after the stream window, instead of
    the bytes piling up in either agent's memory."""
    stalled = asyncio.Event()

    async def never_read(stream: HboneStream, r: p.TunnelRequested, c: HboneConnection) -> None:
        c.accept(stream)
        await stalled.wait()

    async def main() -> None:
        async with hbone_pair(never_read) as client:
            stream = await client.open_tunnel("10.0.0.2:80", {})
            written = 0
            chunk = b"x" * 65536
            with pytest.raises(TimeoutError):
                while True:
                    await asyncio.wait_for(stream.write(chunk), 0.5)
                    written += len(chunk)
            assert written <= p.STREAM_WINDOW
            stalled.set()

    asyncio.run(main())


def test_peer_reset_reaches_the_reader() -> None:
    async def reset(stream: HboneStream, r: p.TunnelRequested, c: HboneConnection) -> None:
        c.accept(stream)
        stream.reset()

    async def main() -> None:
        async with hbone_pair(reset) as client:
            stream = await client.open_tunnel("10.0.0.2:80", {})
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(stream.read(), 5)

    asyncio.run(main())


@pytest.mark.parametrize("end_stream", [False, True], ids=["data-then-reset", "end-then-reset"])
def test_a_no_error_reset_after_the_data_is_a_clean_end(end_stream: bool) -> None:
    """Envoy as a waypoint ends a tunnel whose upstream closed with RST_STREAM(NO_ERROR)
    right after the data, with or without END_STREAM first: the reader gets every byte,
    then EOF, even when it reads only after the reset arrived."""

    async def respond(stream: HboneStream, r: p.TunnelRequested, c: HboneConnection) -> None:
        c.accept(stream)
        await stream.write(b"the whole response")
        if end_stream:
            stream.write_eof()
        c.proto.reset_stream(stream.stream_id, h2.errors.ErrorCodes.NO_ERROR)
        c._flush()

    async def main() -> None:
        async with hbone_pair(respond) as client:
            stream = await client.open_tunnel("10.0.0.2:80", {})
            await asyncio.sleep(0.2)  # the reset is in before the first read
            assert stream.was_reset
            received = b""
            while chunk := await asyncio.wait_for(stream.read(), 5):
                received += chunk
            assert received == b"the whole response"
            stream.close()
            assert client.active_streams == 0

    asyncio.run(main())


def test_another_reset_after_the_data_is_an_abort() -> None:
    async def respond(stream: HboneStream, r: p.TunnelRequested, c: HboneConnection) -> None:
        c.accept(stream)
        await stream.write(b"partial")
        stream.reset()  # CANCEL

    async def main() -> None:
        async with hbone_pair(respond) as client:
            stream = await client.open_tunnel("10.0.0.2:80", {})
            await asyncio.sleep(0.2)
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(stream.read(), 5)

    asyncio.run(main())


def test_open_tunnel_on_a_lost_connection_fails_at_once_with_the_reason() -> None:
    async def main() -> None:
        async with hbone_pair(echo) as client:
            client.abort()
            await asyncio.wait_for(client.closed_event.wait(), 5)
            with pytest.raises(ConnectionResetError, match="is closed"):
                await asyncio.wait_for(client.open_tunnel("10.0.0.2:80", {}), 2)

    asyncio.run(main())


def test_malformed_authority_is_refused_before_sending() -> None:
    client = p.HboneClient()
    with pytest.raises(ValueError, match="not ip:port"):
        client.open_tunnel("10.0.0.2")


def test_the_connect_and_the_data_sent_in_its_turn_go_in_one_write() -> None:
    async def main() -> None:
        async with hbone_pair(echo) as client:
            transport = client._transport
            assert transport is not None
            writes: list[bytes] = []
            real_write = transport.write

            def counted(data: bytes | bytearray | memoryview) -> None:
                writes.append(bytes(data))
                real_write(data)

            transport.write = counted  # type: ignore[method-assign]
            stream = client.open_stream("10.0.0.2:80", {})
            assert writes == []  # the CONNECT waits for the end of this turn
            frame = memoryview(bytearray(9 + 5))
            frame[9:] = b"hello"
            stream.send_frame(frame)
            assert len(writes) == 1 and writes[0].endswith(b"hello")
            stream.write_eof()
            await stream.established
            received = b""
            while chunk := await stream.read():
                received += chunk
            assert received == b"hello"
            stream.close()

    asyncio.run(main())


def test_a_connect_with_nothing_after_it_goes_at_the_end_of_the_turn() -> None:
    async def main() -> None:
        async with hbone_pair(echo) as client:
            stream = client.open_stream("10.0.0.2:80", {})
            await asyncio.wait_for(stream.established, 5)
            stream.write_eof()
            assert await stream.read() == b""
            stream.close()

    asyncio.run(main())
