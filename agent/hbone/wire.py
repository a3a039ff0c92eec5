"""HTTP/2 on the wire (RFC 9113), as much of it as HBONE's CONNECT tunnels use.

Frame types, flags, error codes and setting identifiers, and functions that write one frame
as bytes. Reading frames is the protocol's job (agent/hbone/protocol.py): it needs the
connection's state to decide what a frame means.
"""

from __future__ import annotations

import enum
import struct

FRAME_HEADER_SIZE = 9
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DEFAULT_WINDOW = 65_535
DEFAULT_MAX_FRAME = 16_384
LARGEST_MAX_FRAME = 16_777_215
LARGEST_WINDOW = 2**31 - 1

_HEADER = struct.Struct(">HBBBL")  # length as 16 + 8 bits, type, flags, stream id
_U32 = struct.Struct(">L")
_SETTING = struct.Struct(">HL")
_GOAWAY = struct.Struct(">LL")


class FrameType(enum.IntEnum):
    DATA = 0x0
    HEADERS = 0x1
    PRIORITY = 0x2
    RST_STREAM = 0x3
    SETTINGS = 0x4
    PUSH_PROMISE = 0x5
    PING = 0x6
    GOAWAY = 0x7
    WINDOW_UPDATE = 0x8
    CONTINUATION = 0x9


class Flag:
    """Frame flags as plain ints: `flags & Flag.X` on an IntFlag makes an enum member, a
    cost paid on every frame."""

    END_STREAM = 0x1  # DATA, HEADERS
    ACK = 0x1  # SETTINGS, PING
    END_HEADERS = 0x4
    PADDED = 0x8
    PRIORITY = 0x20


class ErrorCode(enum.IntEnum):
    NO_ERROR = 0x0
    PROTOCOL_ERROR = 0x1
    INTERNAL_ERROR = 0x2
    FLOW_CONTROL_ERROR = 0x3
    SETTINGS_TIMEOUT = 0x4
    STREAM_CLOSED = 0x5
    FRAME_SIZE_ERROR = 0x6
    REFUSED_STREAM = 0x7
    CANCEL = 0x8
    COMPRESSION_ERROR = 0x9
    CONNECT_ERROR = 0xA
    ENHANCE_YOUR_CALM = 0xB
    INADEQUATE_SECURITY = 0xC
    HTTP_1_1_REQUIRED = 0xD


class Setting(enum.IntEnum):
    HEADER_TABLE_SIZE = 0x1
    ENABLE_PUSH = 0x2
    MAX_CONCURRENT_STREAMS = 0x3
    INITIAL_WINDOW_SIZE = 0x4
    MAX_FRAME_SIZE = 0x5
    MAX_HEADER_LIST_SIZE = 0x6


def frame_header(kind: int, flags: int, stream_id: int, length: int) -> bytes:
    return _HEADER.pack(length >> 8, length & 0xFF, kind, flags, stream_id)


def parse_frame_header(header: bytes | memoryview) -> tuple[int, int, int, int]:
    """(length, type, flags, stream id) of a 9-byte frame header; the reserved bit dropped."""
    high, low, kind, flags, stream_id = _HEADER.unpack(header)
    return high << 8 | low, kind, flags, stream_id & LARGEST_WINDOW


def data_header(stream_id: int, length: int, end_stream: bool = False) -> bytes:
    """The header of a DATA frame; its payload follows it on the wire as it is."""
    return frame_header(FrameType.DATA, Flag.END_STREAM if end_stream else 0, stream_id, length)


def write_data_header(frame: memoryview, stream_id: int) -> None:
    """A DATA frame built in place: the header written into `frame`'s first 9 bytes, the
    rest of `frame` being the payload."""
    length = len(frame) - FRAME_HEADER_SIZE
    _HEADER.pack_into(frame, 0, length >> 8, length & 0xFF, FrameType.DATA, 0, stream_id)


def headers_frames(stream_id: int, block: bytes, end_stream: bool, max_frame: int) -> bytes:
    """HEADERS, with CONTINUATION frames when the block is larger than one frame."""
    first, rest = block[:max_frame], block[max_frame:]
    flags = (Flag.END_STREAM if end_stream else 0) | (0 if rest else Flag.END_HEADERS)
    parts = [frame_header(FrameType.HEADERS, flags, stream_id, len(first)), first]
    while rest:
        chunk, rest = rest[:max_frame], rest[max_frame:]
        flags = 0 if rest else Flag.END_HEADERS
        parts += [frame_header(FrameType.CONTINUATION, flags, stream_id, len(chunk)), chunk]
    return b"".join(parts)


def settings_frame(values: dict[Setting, int]) -> bytes:
    payload = b"".join(_SETTING.pack(key, value) for key, value in values.items())
    return frame_header(FrameType.SETTINGS, 0, 0, len(payload)) + payload


def settings_ack() -> bytes:
    return frame_header(FrameType.SETTINGS, Flag.ACK, 0, 0)


def parse_settings(payload: bytes | memoryview) -> list[tuple[int, int]]:
    return [_SETTING.unpack_from(payload, at) for at in range(0, len(payload), _SETTING.size)]


def window_update(stream_id: int, increment: int) -> bytes:
    return frame_header(FrameType.WINDOW_UPDATE, 0, stream_id, 4) + _U32.pack(increment)


def rst_stream(stream_id: int, error_code: int) -> bytes:
    return frame_header(FrameType.RST_STREAM, 0, stream_id, 4) + _U32.pack(error_code)


def ping(opaque: bytes, ack: bool = False) -> bytes:
    return frame_header(FrameType.PING, Flag.ACK if ack else 0, 0, 8) + opaque


def goaway(last_stream_id: int, error_code: int) -> bytes:
    return frame_header(FrameType.GOAWAY, 0, 0, 8) + _GOAWAY.pack(last_stream_id, error_code)


def parse_u32(payload: bytes | memoryview) -> int:
    return int(_U32.unpack_from(payload)[0])


def parse_goaway(payload: bytes | memoryview) -> tuple[int, int]:
    """(last stream id, error code); debug data after them is not read."""
    last, code = _GOAWAY.unpack_from(payload)
    return last & LARGEST_WINDOW, code


def _hpack_integer(value: int, prefix_bits: int, first: int) -> bytes:
    """RFC 7541 5.1: `value` in an N-bit prefix, `first` holding the bits above it."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 128:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _hpack_string(text: str) -> bytes:
    raw = text.encode()
    return _hpack_integer(len(raw), 7, 0) + raw  # no Huffman: costs CPU, saves a few bytes


# Static table indexes (RFC 7541 appendix A) of the names HBONE sends.
_STATIC_NAMES = {":authority": 1, ":method": 2, ":status": 8}
_STATUS_200 = b"\x88"  # indexed: ":status: 200"


def encode_headers(headers: list[tuple[str, str]]) -> bytes:
    """A header block of literals "without indexing" (RFC 7541 6.2.2), and `:status 200` by
    its static index. HBONE's values differ on every stream (traceparent, forwarded), so a
    dynamic table would only cost a search per header; every decoder reads literals."""
    parts = []
    for name, value in headers:
        if name == ":status" and value == "200":
            parts.append(_STATUS_200)
            continue
        index = _STATIC_NAMES.get(name)
        if index is not None:
            parts.append(_hpack_integer(index, 4, 0) + _hpack_string(value))
        else:
            parts.append(b"\x00" + _hpack_string(name) + _hpack_string(value))
    return b"".join(parts)
