"""The relay's contract, with in-memory byte streams: counts, half-close, reset mapping."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from agent.proxy.relay import relay


@dataclass
class MemoryStream:
    incoming: list[bytes | Exception]  # what read() returns, in order; b"" is EOF
    written: bytearray = field(default_factory=bytearray)
    eof_written: bool = False
    was_reset: bool = False
    closed: bool = False

    async def read(self) -> bytes:
        await asyncio.sleep(0)
        item = self.incoming.pop(0) if self.incoming else b""
        if isinstance(item, Exception):
            raise item
        return item

    async def write(self, data: bytes | memoryview) -> None:
        self.written += data

    def write_eof(self) -> None:
        self.eof_written = True

    def reset(self) -> None:
        self.was_reset = True

    def close(self) -> None:
        self.closed = True


def test_both_directions_with_half_close() -> None:
    a = MemoryStream([b"abc", b"de", b""])
    b = MemoryStream([b"xyz", b""])
    result = asyncio.run(relay(a, b))
    assert (result.a_to_b, result.b_to_a, result.error) == (5, 3, None)
    assert bytes(b.written) == b"abcde" and bytes(a.written) == b"xyz"
    assert a.eof_written and b.eof_written and a.closed and b.closed
    assert not a.was_reset and not b.was_reset


def test_a_reset_resets_the_other_side_and_keeps_the_counts() -> None:
    a = MemoryStream([b"12345", ConnectionResetError("peer reset")])
    b = MemoryStream([b"678", b""])
    result = asyncio.run(relay(a, b))
    assert result.error == "peer reset"
    assert result.a_to_b == 5 and result.b_to_a == 3
    assert a.was_reset and b.was_reset and a.closed and b.closed
