"""Copy bytes both ways between two streams, with half-close carried across."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct

CHUNK = 256 * 1024


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int:
    copied = 0
    while data := await reader.read(CHUNK):
        writer.write(data)
        # drain() waits while the peer's buffer is full: a slow reader slows the sender
        # instead of growing our memory.
        await writer.drain()
        copied += len(data)
    if writer.can_write_eof() and not writer.is_closing():
        writer.write_eof()  # FIN travels on; the other direction keeps flowing
    return copied


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST (SO_LINGER 0), so the peer sees what an unreachable peer looks like."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def relay(
    a_reader: asyncio.StreamReader,
    a_writer: asyncio.StreamWriter,
    b_reader: asyncio.StreamReader,
    b_writer: asyncio.StreamWriter,
) -> tuple[int, int]:
    """Returns (bytes a→b, bytes b→a). A reset on either side resets the other."""
    a_to_b = asyncio.ensure_future(_pump(a_reader, b_writer))
    b_to_a = asyncio.ensure_future(_pump(b_reader, a_writer))
    try:
        await asyncio.gather(a_to_b, b_to_a)
    except (ConnectionError, OSError):
        a_to_b.cancel()
        b_to_a.cancel()
        reset(a_writer)
        reset(b_writer)
        raise
    finally:
        for writer in (a_writer, b_writer):
            writer.close()
    return a_to_b.result(), b_to_a.result()
