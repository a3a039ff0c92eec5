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
from typing import Protocol

CHUNK = 256 * 1024


class ByteStream(Protocol):
    async def read(self) -> bytes: ...
    async def write(self, data: bytes) -> None: ...
    def write_eof(self) -> None: ...
    def reset(self) -> None: ...
    def close(self) -> None: ...


class SocketStream:
    """A TCP connection as a ByteStream."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def read(self) -> bytes:
        return await self.reader.read(CHUNK)

    async def write(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    def write_eof(self) -> None:
        if self.writer.can_write_eof() and not self.writer.is_closing():
            self.writer.write_eof()

    def reset(self) -> None:
        reset(self.writer)

    def close(self) -> None:
        self.writer.close()


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST (SO_LINGER 0): what the peer of an unreachable upstream should see."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def _pump(source: ByteStream, sink: ByteStream) -> int:
    copied = 0
    while data := await source.read():
        await sink.write(data)
        copied += len(data)
    sink.write_eof()
    return copied


async def relay(a: ByteStream, b: ByteStream) -> tuple[int, int]:
    """Returns (bytes a→b, bytes b→a). A reset on either side resets the other."""
    a_to_b = asyncio.ensure_future(_pump(a, b))
    b_to_a = asyncio.ensure_future(_pump(b, a))
    try:
        await asyncio.gather(a_to_b, b_to_a)
    except (ConnectionError, OSError):
        a_to_b.cancel()
        b_to_a.cancel()
        a.reset()
        b.reset()
        raise
    finally:
        a.close()
        b.close()
    return a_to_b.result(), b_to_a.result()
