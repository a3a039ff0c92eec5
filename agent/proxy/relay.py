"""Copy bytes both ways between two byte streams (TCP sockets or HBONE tunnels).

Half-close travels across (FIN <-> END_STREAM), and a reset on one side resets the other
(RST <-> RST_STREAM). Each direction writes, then waits for the write to drain before it
reads more, so memory per connection stays bounded by one chunk plus the buffers' limits.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from dataclasses import dataclass
from typing import Protocol

CHUNK = 256 * 1024


class ByteStream(Protocol):
    async def read(self) -> bytes | memoryview: ...
    async def write(self, data: bytes | memoryview) -> None: ...
    def write_eof(self) -> None: ...
    def reset(self) -> None: ...
    def close(self) -> None: ...


class SocketStream:
    """A TCP connection as a ByteStream."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def read(self) -> bytes:
        return await self.reader.read(CHUNK)

    async def write(self, data: bytes | memoryview) -> None:
        self.writer.write(data)
        await self.writer.drain()

    def write_eof(self) -> None:
        if self.writer.can_write_eof() and not self.writer.is_closing():
            self.writer.write_eof()

    def reset(self) -> None:
        reset(self.writer)

    def close(self) -> None:
        self.writer.close()


_LINGER_RESET = struct.pack("ii", 1, 0)
# Why a relay whose wait was cancelled (its pod draining) ended.
DRAINED = "relay cancelled (drain)"


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST (SO_LINGER 0): what the peer of an unreachable upstream should see."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        linger_reset(sock)
    writer.transport.abort()


def linger_reset(sock: socket.socket) -> None:
    """Make the socket's close send RST (SO_LINGER 0); a socket already gone is left be."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)


def reset_socket(sock: socket.socket) -> None:
    """Close the socket with RST."""
    linger_reset(sock)
    sock.close()


def describe(exc: BaseException) -> str:
    """An error's text for a relay's result, never empty."""
    return str(exc) or type(exc).__name__


@dataclass(frozen=True, slots=True)
class RelayResult:
    a_to_b: int  # bytes, also those moved before an error
    b_to_a: int
    error: str | None  # why it ended early: a reset or socket error on either side


async def relay(a: ByteStream, b: ByteStream) -> RelayResult:
    """Copy both ways until both directions are done. A reset on either side resets the
    other, and is reported in the result rather than raised."""
    moved = [0, 0]

    async def pump(source: ByteStream, sink: ByteStream, direction: int) -> None:
        while data := await source.read():
            await sink.write(data)
            moved[direction] += len(data)
        sink.write_eof()

    a_to_b = asyncio.ensure_future(pump(a, b, 0))
    b_to_a = asyncio.ensure_future(pump(b, a, 1))
    error = None
    try:
        await asyncio.gather(a_to_b, b_to_a)
    except (ConnectionError, OSError) as exc:
        a_to_b.cancel()
        b_to_a.cancel()
        a.reset()
        b.reset()
        error = describe(exc)
    finally:
        a.close()
        b.close()
    return RelayResult(moved[0], moved[1], error)
