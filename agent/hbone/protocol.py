"""The HBONE protocol, sans-IO: bytes in, events out; calls in, bytes to send out.

Nothing here touches a socket or a clock, so two protocol objects can be tested by handing
bytes between them. The shells (agent/hbone/connection.py) own the IO, the timers
(keepalive PING) and the TLS.

HBONE uses a small part of HTTP/2: one CONNECT per stream, then DATA both ways. This is an
HTTP/2 implementation of just that part (frames in agent/hbone/wire.py, headers with
`hpack`), written for the data path: a DATA frame's payload is handed on as a view of the
bytes received, never copied into frame objects, and sending writes a 9-byte header in front
of the caller's bytes. Everything else a peer may send is parsed and checked as RFC 9113
says, and what HBONE has no use for (PRIORITY, unknown frame types) is skipped.

Wire facts followed (Istio ztunnel): plain CONNECT (`:method CONNECT`, `:authority ip:port`,
no `:scheme`/`:path`); 200 only once the upstream is connected; 400 for a request that is not
a valid CONNECT; stream window 4 MiB, connection window 16 MiB, max frame 1 MiB; at most 100
streams per connection. HboneLimits bound what a peer can make us hold or answer (header
block size, reset, PING and SETTINGS rates), checked at each frame's header, before its
payload is taken in; past one the peer gets GOAWAY ENHANCE_YOUR_CALM.
"""

from __future__ import annotations

import functools
import ipaddress
import time
from collections.abc import Callable
from dataclasses import dataclass

import hpack

from agent.hbone import wire
from agent.hbone.wire import ErrorCode, Flag, FrameType, Setting

STREAM_WINDOW = 4 * 1024 * 1024
CONNECTION_WINDOW = 16 * 1024 * 1024
MAX_FRAME = 1024 * 1024
MAX_STREAMS = 100

HBONE_SETTINGS = {
    Setting.ENABLE_PUSH: 0,
    Setting.MAX_CONCURRENT_STREAMS: MAX_STREAMS,
    Setting.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
    Setting.MAX_FRAME_SIZE: MAX_FRAME,
}
# Window credit goes back to the peer once this share of a window has been consumed: fewer
# WINDOW_UPDATE frames than one per DATA frame, and the sender never waits on an empty window
# while we hold credit back.
_UPDATE_SHARE = 4

# Headers carried on CONNECT besides the pseudo-headers (ztunnel sends these).
FORWARDED, BAGGAGE, TRACEPARENT = "forwarded", "baggage", "traceparent"


class HboneProtocolError(Exception):
    """The peer broke HTTP/2, or a limit; a GOAWAY is queued in data_to_send(). `reason` is
    the label it is counted under."""

    def __init__(self, message: str, reason: str = "protocol_error") -> None:
        super().__init__(message)
        self.reason = reason


# ---- limits -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HboneLimits:
    """What one peer may make the agent hold or do, in the spirit of Envoy's and h2's
    defaults. A peer past one gets GOAWAY ENHANCE_YOUR_CALM and is disconnected."""

    # A header block, HEADERS and every CONTINUATION together (Envoy's max_request_headers_kb
    # is 60). Checked at each frame's header, before its payload is taken in.
    max_header_block: int = 64 * 1024
    # Streams the peer resets (rapid reset, CVE-2023-44487): a burst, then a rate per second.
    reset_burst: int = 200
    reset_rate: float = 100.0
    # PING and SETTINGS frames (each makes us answer): a burst, then a rate per second.
    control_burst: int = 100
    control_rate: float = 20.0


class _Bucket:
    """A token bucket: `burst` at once, refilled at `rate` per second of `clock`."""

    def __init__(self, burst: int, rate: float, clock: Callable[[], float]) -> None:
        self._burst, self._rate, self._clock = float(burst), rate, clock
        self._tokens, self._at = float(burst), clock()

    def take(self) -> bool:
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._at) * self._rate)
        self._at = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True


# ---- events -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TunnelRequested:
    """Server side: a well-formed CONNECT; answer with accept() or refuse()."""

    stream_id: int
    authority: str
    host: str
    port: int
    headers: dict[str, str]


@dataclass(frozen=True, slots=True)
class TunnelRefusedAutomatically:
    """Server side: a request that was not a valid CONNECT, already answered with 400."""

    stream_id: int
    status: int
    reason: str


@dataclass(frozen=True, slots=True)
class TunnelEstablished:
    """Client side: 200 to our CONNECT; bytes may flow."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class TunnelRejected:
    """Client side: any other status to our CONNECT; the stream is over."""

    stream_id: int
    status: int


@dataclass(frozen=True, slots=True)
class Data:
    stream_id: int
    data: bytes | memoryview  # may be a view of the bytes given to receive_data()
    flow_length: int  # what to hand back to consumed() once the bytes have been used


@dataclass(frozen=True, slots=True)
class PeerHalfClosed:
    """END_STREAM from the peer: its direction is done (TCP FIN)."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamReset:
    stream_id: int
    error_code: int


@dataclass(frozen=True, slots=True)
class WindowOpened:
    """More can be sent: on stream_id, or on every stream when stream_id is 0."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class PingAcknowledged:
    opaque: bytes


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """GOAWAY from the peer: no new streams; existing ones up to last_stream_id may finish."""

    error_code: int
    last_stream_id: int


Event = (
    TunnelRequested | TunnelRefusedAutomatically | TunnelEstablished | TunnelRejected | Data
    | PeerHalfClosed | StreamReset | WindowOpened | PingAcknowledged | ConnectionClosed
)  # fmt: skip


def parse_authority(authority: str) -> tuple[str, int]:
    """`ip:port` or `[ipv6]:port`, the only authorities HBONE uses. ValueError otherwise."""
    # Once per CONNECT at each end, and ipaddress is slow: the answers for addresses are
    # kept (a peer's long strings are not: they would make the cache its memory).
    if len(authority) <= _CACHED_AUTHORITY_LEN:
        return _parse_authority_cached(authority)
    return _parse_authority(authority)


_CACHED_AUTHORITY_LEN = 64  # "[" + the longest IPv6 text + "]:65535" fits


def _parse_authority(authority: str) -> tuple[str, int]:
    host, sep, port_text = authority.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ValueError(f"authority {authority!r} is not ip:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    address = ipaddress.ip_address(host)  # ValueError for names: HBONE targets addresses
    port = int(port_text)
    if not 0 < port < 65536:
        raise ValueError(f"authority {authority!r} has port {port} out of range")
    return str(address), port


_parse_authority_cached = functools.lru_cache(maxsize=4096)(_parse_authority)


def format_authority(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# ---- protocol -----------------------------------------------------------------------------


class _Stream:
    """One CONNECT tunnel's state: its windows both ways and which halves are closed."""

    __slots__ = (
        "answered",
        "local_closed",
        "recv_pending",
        "recv_window",
        "remote_closed",
        "send_window",
    )

    def __init__(self, send_window: int) -> None:
        self.send_window = send_window  # what the peer lets us send
        self.recv_window = STREAM_WINDOW  # what we let the peer send
        self.recv_pending = 0  # consumed, not yet given back with WINDOW_UPDATE
        self.local_closed = False  # we sent END_STREAM
        self.remote_closed = False  # the peer sent END_STREAM
        self.answered = False  # client side: the response HEADERS arrived


class _HboneProtocol:
    def __init__(
        self,
        client_side: bool,
        limits: HboneLimits | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client_side = client_side
        self._limits = limits or HboneLimits()
        # Rapid reset is a client's attack: it opens streams and resets them, making the server
        # start work each time. A server can reset only streams the client opened, so on the
        # client side resets are bounded by our own streams; and servers (Envoy among them)
        # routinely end a finished stream with RST_STREAM(NO_ERROR).
        self._resets: _Bucket | None = None
        if not client_side:
            self._resets = _Bucket(self._limits.reset_burst, self._limits.reset_rate, clock)
        self._control = _Bucket(self._limits.control_burst, self._limits.control_rate, clock)
        self._decoder = hpack.Decoder()
        self._decoder.max_header_list_size = self._limits.max_header_block
        self._out: list[bytes | memoryview] = []
        self._streams: dict[int, _Stream] = {}
        self._highest_peer_stream = 0  # peer-opened ids up to here are open or closed
        self._next_stream = 1  # our next stream id (clients open odd ids)
        self._failed = False
        # What the peer said in its SETTINGS (RFC 9113 defaults until then).
        self._peer_initial_window = wire.DEFAULT_WINDOW
        self._peer_max_frame = wire.DEFAULT_MAX_FRAME
        self._peer_max_streams = MAX_STREAMS
        self._send_window = wire.DEFAULT_WINDOW  # connection level, ours to spend
        self._recv_window = CONNECTION_WINDOW  # connection level, the peer's to spend
        self._recv_pending = 0
        # Receiving: the server first reads the client's preface, then frames. A frame's
        # header is parsed as soon as its 9 bytes are in; an unpadded DATA payload is handed
        # on as it arrives (_data_left, _data_stream, _data_end); other payloads are
        # collected whole (bounded by MAX_FRAME) or skipped (_skip_left).
        self._preface_left = 0 if client_side else len(wire.PREFACE)
        self._settings_seen = False
        self._pending = bytearray()
        self._frame: tuple[int, int, int, int] | None = None  # length, type, flags, stream
        self._data_left = 0
        self._data_stream = 0
        self._data_end = False
        self._skip_left = 0
        self._block = bytearray()  # a header block waiting for its CONTINUATION frames
        self._block_stream = 0
        self._block_flags = 0
        # The client's preface, then each side's SETTINGS and its connection window.
        self._out += [wire.PREFACE] if client_side else []
        self._out += [
            wire.settings_frame(HBONE_SETTINGS),
            wire.window_update(0, CONNECTION_WINDOW - wire.DEFAULT_WINDOW),
        ]

    def data_to_send(self) -> bytes:
        if not self._out:
            return b""
        data = b"".join(self._out)
        self._out.clear()
        return data

    def take_output(self) -> list[bytes | memoryview]:
        """What data_to_send() would join, as the pieces queued: a DATA frame built in place
        (send_data_frame) is one piece, to be written without a copy."""
        out, self._out = self._out, []
        return out

    # -- receiving ---------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[Event]:
        """Events for `data`. A Data event's bytes may be a view of `data`: the caller must
        not change `data` afterwards. HboneProtocolError when the peer broke the protocol or
        a limit (the GOAWAY saying why is queued)."""
        if self._failed:
            return []
        events: list[Event] = []
        view, at, end = memoryview(data), 0, len(data)
        if self._preface_left:
            taken = min(self._preface_left, end)
            offset = len(wire.PREFACE) - self._preface_left
            if view[:taken] != wire.PREFACE[offset : offset + taken]:
                self._fail(ErrorCode.PROTOCOL_ERROR, "not an HTTP/2 client preface")
            self._preface_left -= taken
            at = taken
        while at < end:
            if self._data_left:
                taken = min(self._data_left, end - at)
                self._data_left -= taken
                self._data_chunk(view[at : at + taken], events)
                at += taken
                continue
            if self._skip_left:
                taken = min(self._skip_left, end - at)
                self._skip_left -= taken
                at += taken
                continue
            if self._frame is None:
                need = wire.FRAME_HEADER_SIZE - len(self._pending)
                if not self._pending and end - at >= need:
                    header: bytes | memoryview = view[at : at + need]
                    at += need
                else:
                    self._pending += view[at : at + need]
                    at += min(need, end - at)
                    if len(self._pending) < wire.FRAME_HEADER_SIZE:
                        break
                    header = bytes(self._pending)
                    self._pending.clear()
                self._frame_header(*wire.parse_frame_header(header), events)
                continue
            length = self._frame[0]
            need = length - len(self._pending)
            if not self._pending and end - at >= need:
                payload: bytes | memoryview = view[at : at + need]
                at += need
            else:
                self._pending += view[at : at + need]
                at += min(need, end - at)
                if len(self._pending) < length:
                    break
                payload = bytes(self._pending)
                self._pending.clear()
            _, kind, flags, stream_id = self._frame
            self._frame = None
            self._frame_payload(kind, flags, stream_id, payload, events)
        return events

    def _fail(self, code: int, message: str, reason: str = "protocol_error") -> None:
        """A connection error: GOAWAY with `code`, then nothing more is read."""
        self._failed = True
        self._out.append(wire.goaway(self._highest_peer_stream, code))
        raise HboneProtocolError(message, reason)

    def _frame_header(
        self, length: int, kind: int, flags: int, stream_id: int, events: list[Event]
    ) -> None:
        """Checks that need only the header, so a limit trips before a payload is taken in;
        then either a DATA payload streams, or the payload is collected or skipped."""
        if length > MAX_FRAME:
            self._fail(ErrorCode.FRAME_SIZE_ERROR, f"frame of {length} bytes over {MAX_FRAME}")
        if not self._settings_seen:
            if kind != FrameType.SETTINGS or flags & Flag.ACK:
                self._fail(ErrorCode.PROTOCOL_ERROR, "the first frame is not SETTINGS")
            self._settings_seen = True
        if self._block_stream and (
            kind != FrameType.CONTINUATION or stream_id != self._block_stream
        ):
            self._fail(ErrorCode.PROTOCOL_ERROR, "a header block interrupted")
        if kind in (FrameType.HEADERS, FrameType.CONTINUATION):
            if len(self._block) + length > self._limits.max_header_block:
                self._fail(
                    ErrorCode.ENHANCE_YOUR_CALM,
                    f"header block over {self._limits.max_header_block} bytes",
                    "header_block_too_large",
                )
        elif kind == FrameType.RST_STREAM:
            if self._resets is not None and not self._resets.take():
                self._fail(
                    ErrorCode.ENHANCE_YOUR_CALM, "streams reset faster than allowed", "reset_flood"
                )
        elif (
            kind in (FrameType.PING, FrameType.SETTINGS)
            and not flags & Flag.ACK
            and not self._control.take()
        ):
            self._fail(
                ErrorCode.ENHANCE_YOUR_CALM,
                "PING or SETTINGS frames faster than allowed",
                "control_frame_flood",
            )
        expected = _FIXED_LENGTHS.get(kind)
        if expected is not None and length != expected:
            self._fail(ErrorCode.FRAME_SIZE_ERROR, f"{FrameType(kind).name} of {length} bytes")
        if kind == FrameType.DATA:
            self._data_header(length, flags, stream_id, events)
        elif kind in _KNOWN_TYPES:
            self._frame = (length, kind, flags, stream_id)
            if length == 0:
                self._frame = None
                self._frame_payload(kind, flags, stream_id, b"", events)
        else:
            self._skip_left = length  # unknown frame types are ignored (RFC 9113 5.5)

    # DATA

    def _data_header(self, length: int, flags: int, stream_id: int, events: list[Event]) -> None:
        if stream_id == 0:
            self._fail(ErrorCode.PROTOCOL_ERROR, "DATA on stream 0")
        if self._is_idle(stream_id):
            self._fail(ErrorCode.PROTOCOL_ERROR, f"DATA on stream {stream_id}, never opened")
        if length > self._recv_window:
            self._fail(ErrorCode.FLOW_CONTROL_ERROR, "DATA past the connection window")
        self._recv_window -= length
        stream = self._streams.get(stream_id)
        if stream is not None:
            if stream.remote_closed:
                self._give_back(length)
                self._reset(stream_id, ErrorCode.STREAM_CLOSED, events)
                stream = None
            elif length > stream.recv_window:
                self._fail(ErrorCode.FLOW_CONTROL_ERROR, f"DATA past stream {stream_id}'s window")
            else:
                stream.recv_window -= length
        if stream is None:
            # A stream already closed or reset: its bytes go unused, the window comes back.
            self._give_back(length)
            self._skip_left = length
            return
        if flags & Flag.PADDED:
            self._frame = (length, FrameType.DATA, flags, stream_id)  # collected whole
            if length == 0:
                self._fail(ErrorCode.FRAME_SIZE_ERROR, "padded DATA without a pad length")
            return
        self._data_left, self._data_stream = length, stream_id
        self._data_end = bool(flags & Flag.END_STREAM)
        if length == 0:
            self._data_chunk(memoryview(b""), events)

    def _data_chunk(self, chunk: memoryview, events: list[Event]) -> None:
        """Part of an unpadded DATA payload, handed on as it arrives."""
        stream = self._streams.get(self._data_stream)
        if stream is None:  # reset while its frame was arriving
            self._give_back(len(chunk))
        elif chunk:
            events.append(Data(self._data_stream, chunk, len(chunk)))
        if not self._data_left and self._data_end and stream is not None:
            self._remote_end(self._data_stream, stream, events)

    def _padded_data(
        self, flags: int, stream_id: int, payload: memoryview | bytes, events: list[Event]
    ) -> None:
        pad = payload[0]
        if pad >= len(payload):
            self._fail(ErrorCode.PROTOCOL_ERROR, "DATA padding longer than the frame")
        stream = self._streams.get(stream_id)
        if stream is None:
            self._give_back(len(payload))
            return
        events.append(Data(stream_id, payload[1 : len(payload) - pad], len(payload)))
        if flags & Flag.END_STREAM:
            self._remote_end(stream_id, stream, events)

    def _remote_end(self, stream_id: int, stream: _Stream, events: list[Event]) -> None:
        stream.remote_closed = True
        events.append(PeerHalfClosed(stream_id))
        if stream.local_closed:
            del self._streams[stream_id]

    # other frames, once their payload is in

    def _frame_payload(
        self,
        kind: int,
        flags: int,
        stream_id: int,
        payload: memoryview | bytes,
        events: list[Event],
    ) -> None:
        if kind == FrameType.DATA:
            self._padded_data(flags, stream_id, payload, events)
        elif kind == FrameType.HEADERS:
            self._headers_frame(flags, stream_id, payload, events)
        elif kind == FrameType.CONTINUATION:
            if not self._block_stream:
                self._fail(ErrorCode.PROTOCOL_ERROR, "CONTINUATION without HEADERS")
            self._block += payload
            if flags & Flag.END_HEADERS:
                self._header_block_done(events)
        elif kind == FrameType.SETTINGS:
            self._settings(flags, stream_id, payload, events)
        elif kind == FrameType.WINDOW_UPDATE:
            self._window_update(stream_id, wire.parse_u32(payload) & wire.LARGEST_WINDOW, events)
        elif kind == FrameType.RST_STREAM:
            if stream_id == 0 or self._is_idle(stream_id):
                self._fail(ErrorCode.PROTOCOL_ERROR, f"RST_STREAM on stream {stream_id}")
            if self._streams.pop(stream_id, None) is not None:
                events.append(StreamReset(stream_id, wire.parse_u32(payload)))
        elif kind == FrameType.PING:
            if stream_id != 0:
                self._fail(ErrorCode.PROTOCOL_ERROR, "PING on a stream")
            if flags & Flag.ACK:
                events.append(PingAcknowledged(bytes(payload)))
            else:
                self._out.append(wire.ping(bytes(payload), ack=True))
        elif kind == FrameType.GOAWAY:
            if stream_id != 0 or len(payload) < 8:
                self._fail(ErrorCode.PROTOCOL_ERROR, "malformed GOAWAY")
            last, code = wire.parse_goaway(payload)
            events.append(ConnectionClosed(code, last))
        elif kind == FrameType.PUSH_PROMISE:
            self._fail(ErrorCode.PROTOCOL_ERROR, "PUSH_PROMISE, and push is off")
        # PRIORITY: advice HBONE has no use for.

    def _settings(
        self, flags: int, stream_id: int, payload: memoryview | bytes, events: list[Event]
    ) -> None:
        if stream_id != 0:
            self._fail(ErrorCode.PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & Flag.ACK:
            if payload:
                self._fail(ErrorCode.FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            return
        if len(payload) % 6:
            self._fail(ErrorCode.FRAME_SIZE_ERROR, f"SETTINGS of {len(payload)} bytes")
        for key, value in wire.parse_settings(payload):
            if key == Setting.INITIAL_WINDOW_SIZE:
                if value > wire.LARGEST_WINDOW:
                    self._fail(ErrorCode.FLOW_CONTROL_ERROR, f"initial window {value}")
                delta, self._peer_initial_window = value - self._peer_initial_window, value
                for stream in self._streams.values():
                    stream.send_window += delta  # may go negative (RFC 9113 6.9.2)
                events.append(WindowOpened(0))
            elif key == Setting.MAX_FRAME_SIZE:
                if not wire.DEFAULT_MAX_FRAME <= value <= wire.LARGEST_MAX_FRAME:
                    self._fail(ErrorCode.PROTOCOL_ERROR, f"max frame size {value}")
                self._peer_max_frame = value
            elif key == Setting.MAX_CONCURRENT_STREAMS:
                self._peer_max_streams = value
            # HEADER_TABLE_SIZE: our encoder uses no dynamic table, any size suits it.
            elif key == Setting.ENABLE_PUSH and value > 1:
                self._fail(ErrorCode.PROTOCOL_ERROR, f"enable push {value}")
        self._out.append(wire.settings_ack())

    def _window_update(self, stream_id: int, increment: int, events: list[Event]) -> None:
        if stream_id == 0:
            if increment == 0:
                self._fail(ErrorCode.PROTOCOL_ERROR, "connection WINDOW_UPDATE of 0")
            self._send_window += increment
            if self._send_window > wire.LARGEST_WINDOW:
                self._fail(ErrorCode.FLOW_CONTROL_ERROR, "connection window past 2^31-1")
            events.append(WindowOpened(0))
            return
        if self._is_idle(stream_id):
            self._fail(
                ErrorCode.PROTOCOL_ERROR, f"WINDOW_UPDATE on stream {stream_id}, never opened"
            )
        stream = self._streams.get(stream_id)
        if stream is None:
            return  # closed: late credit
        stream.send_window += increment
        if increment == 0 or stream.send_window > wire.LARGEST_WINDOW:
            self._reset(
                stream_id,
                ErrorCode.PROTOCOL_ERROR if increment == 0 else ErrorCode.FLOW_CONTROL_ERROR,
                events,
            )
            return
        events.append(WindowOpened(stream_id))

    # HEADERS

    def _headers_frame(
        self, flags: int, stream_id: int, payload: memoryview | bytes, events: list[Event]
    ) -> None:
        if stream_id == 0:
            self._fail(ErrorCode.PROTOCOL_ERROR, "HEADERS on stream 0")
        start, end = 0, len(payload)
        if flags & Flag.PADDED:
            if not payload:
                self._fail(ErrorCode.FRAME_SIZE_ERROR, "padded HEADERS without a pad length")
            start, end = 1, end - payload[0]
        if flags & Flag.PRIORITY:
            start += 5
        if start > end:
            self._fail(ErrorCode.PROTOCOL_ERROR, "HEADERS padding longer than the frame")
        self._block = bytearray(payload[start:end])
        self._block_stream, self._block_flags = stream_id, flags
        if flags & Flag.END_HEADERS:
            self._header_block_done(events)

    def _header_block_done(self, events: list[Event]) -> None:
        stream_id, end_stream = self._block_stream, bool(self._block_flags & Flag.END_STREAM)
        block, self._block = bytes(self._block), bytearray()
        self._block_stream = self._block_flags = 0
        try:
            # Always decoded, even for a stream about to be refused: the peer's encoder and
            # our decoder share a table.
            raw = self._decoder.decode(block, raw=True)
        except hpack.HPACKError as exc:
            self._fail(ErrorCode.COMPRESSION_ERROR, f"header block: {exc}")
        headers: dict[str, str] = {}
        for name, value in raw:
            key = bytes(name).decode("utf-8", "replace")
            if key != key.lower():
                self._reset(stream_id, ErrorCode.PROTOCOL_ERROR, events)
                return
            headers[key] = bytes(value).decode("utf-8", "replace")
        self._headers(stream_id, headers, end_stream, events)

    def _headers(
        self, stream_id: int, headers: dict[str, str], end_stream: bool, events: list[Event]
    ) -> None:
        raise NotImplementedError

    def _is_idle(self, stream_id: int) -> bool:
        """Never opened, by either side (frames other than HEADERS on it are errors)."""
        if (stream_id % 2 == 1) == self._client_side:
            return stream_id >= self._next_stream  # one of ours
        return stream_id > self._highest_peer_stream

    # -- sending -----------------------------------------------------------------------------

    def sendable(self, stream_id: int) -> int:
        """How many bytes send_data() would take now (flow-control window, both levels)."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.local_closed:
            return 0
        return max(0, min(self._send_window, stream.send_window))

    def send_data(self, stream_id: int, data: bytes | memoryview) -> int:
        """Queue as much of data as the windows allow, in frames of at most the peer's max
        frame size; returns how many bytes were taken. Send the rest after WindowOpened. The
        bytes are copied into the frames (send_data_frame is the way without a copy)."""
        stream = self._streams.get(stream_id)
        window = self.sendable(stream_id)
        if stream is None or window <= 0:
            return 0
        view = memoryview(data)
        taken, total = 0, min(len(view), window)
        while taken < total:
            size = min(total - taken, self._peer_max_frame)
            # One piece per frame: the shell writes it as one TLS record.
            header = wire.data_header(stream_id, size)
            self._out.append(b"".join((header, view[taken : taken + size])))
            taken += size
        self._send_window -= taken
        stream.send_window -= taken
        return taken

    @property
    def peer_max_frame(self) -> int:
        return self._peer_max_frame

    def send_data_frame(self, stream_id: int, frame: memoryview) -> None:
        """Queue one DATA frame built in the caller's buffer: `frame` is 9 bytes of room for
        the header, then a payload of at most sendable() and peer_max_frame bytes. The
        header is written into the room; the buffer must not change until it is sent."""
        length = len(frame) - wire.FRAME_HEADER_SIZE
        stream = self._streams.get(stream_id)
        if stream is None or not 0 < length <= min(self.sendable(stream_id), self._peer_max_frame):
            raise ValueError(f"a DATA frame of {length} bytes does not fit stream {stream_id}")
        wire.write_data_header(frame, stream_id)
        self._out.append(frame)
        self._send_window -= length
        stream.send_window -= length

    def end_stream(self, stream_id: int) -> None:
        """Our half-close (TCP FIN from our side)."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.local_closed:
            return
        self._out.append(wire.data_header(stream_id, 0, end_stream=True))
        self._local_end(stream_id, stream)

    def _local_end(self, stream_id: int, stream: _Stream) -> None:
        stream.local_closed = True
        if stream.remote_closed:
            del self._streams[stream_id]

    def reset_stream(self, stream_id: int, error_code: int = ErrorCode.CANCEL) -> None:
        if self._streams.pop(stream_id, None) is not None:
            self._out.append(wire.rst_stream(stream_id, error_code))

    def _reset(self, stream_id: int, error_code: int, events: list[Event]) -> None:
        """A stream error found in what the peer sent: RST_STREAM, and the stream is over."""
        self._out.append(wire.rst_stream(stream_id, error_code))
        if self._streams.pop(stream_id, None) is not None:
            events.append(StreamReset(stream_id, error_code))

    def consumed(self, stream_id: int, flow_length: int) -> None:
        """The application used flow_length bytes of a Data event: open the window again.
        Called only once the bytes have left the agent, so a slow reader stalls the sender
        instead of growing our buffers."""
        if flow_length <= 0:
            return
        self._give_back(flow_length)
        stream = self._streams.get(stream_id)
        if stream is None or stream.remote_closed:
            return  # the peer sends no more on it: its window needs nothing back
        stream.recv_pending += flow_length
        if stream.recv_pending >= STREAM_WINDOW // _UPDATE_SHARE:
            self._out.append(wire.window_update(stream_id, stream.recv_pending))
            stream.recv_window += stream.recv_pending
            stream.recv_pending = 0

    def _give_back(self, length: int) -> None:
        """Connection-level credit for bytes received and done with."""
        self._recv_pending += length
        if self._recv_pending >= CONNECTION_WINDOW // _UPDATE_SHARE:
            self._out.append(wire.window_update(0, self._recv_pending))
            self._recv_window += self._recv_pending
            self._recv_pending = 0

    def _send_headers(
        self, stream_id: int, headers: list[tuple[str, str]], end_stream: bool = False
    ) -> None:
        block = wire.encode_headers(headers)
        self._out.append(wire.headers_frames(stream_id, block, end_stream, self._peer_max_frame))

    def ping(self, opaque: bytes) -> None:
        self._out.append(wire.ping(opaque))

    def close(self, error_code: int = ErrorCode.NO_ERROR) -> None:
        self._out.append(wire.goaway(self._highest_peer_stream, error_code))

    @property
    def open_streams(self) -> int:
        return len(self._streams)


# Frame types whose payload has one size (RFC 9113 section 6).
_FIXED_LENGTHS: dict[int, int] = {
    FrameType.PRIORITY: 5,
    FrameType.RST_STREAM: 4,
    FrameType.PING: 8,
    FrameType.WINDOW_UPDATE: 4,
}
_KNOWN_TYPES = frozenset(FrameType)


class HboneServer(_HboneProtocol):
    def __init__(
        self,
        limits: HboneLimits | None = None,
        clock: Callable[[], float] = time.monotonic,
        refused_ports: frozenset[int] = frozenset(),
    ) -> None:
        super().__init__(client_side=False, limits=limits, clock=clock)
        # The agent's own ports: a tunnel there would reach the agent, not an app.
        self._refused_ports = refused_ports

    def _headers(
        self, stream_id: int, headers: dict[str, str], end_stream: bool, events: list[Event]
    ) -> None:
        if stream_id % 2 == 0:
            self._fail(ErrorCode.PROTOCOL_ERROR, f"HEADERS on server stream {stream_id}")
        if stream_id in self._streams:
            # Trailers: a CONNECT tunnel has none.
            self._reset(stream_id, ErrorCode.PROTOCOL_ERROR, events)
            return
        if stream_id <= self._highest_peer_stream:
            self._out.append(wire.rst_stream(stream_id, ErrorCode.STREAM_CLOSED))
            return
        self._highest_peer_stream = stream_id
        if len(self._streams) >= MAX_STREAMS:
            self._out.append(wire.rst_stream(stream_id, ErrorCode.REFUSED_STREAM))
            return
        self._streams[stream_id] = _Stream(self._peer_initial_window)
        events.append(self._request(stream_id, headers))
        if end_stream and stream_id in self._streams:
            self._remote_end(stream_id, self._streams[stream_id], events)

    def _request(self, stream_id: int, headers: dict[str, str]) -> Event:
        method = headers.get(":method", "")
        reason = None
        if method != "CONNECT":
            reason = f"method {method!r} is not CONNECT"
        elif ":path" in headers or ":scheme" in headers or ":protocol" in headers:
            reason = "CONNECT with :path, :scheme or :protocol is not HBONE"
        else:
            try:
                host, port = parse_authority(headers.get(":authority", ""))
                if port in self._refused_ports:
                    reason = f"port {port} is the agent's own"
            except ValueError as exc:
                reason = str(exc)
        if reason is not None:
            self.refuse(stream_id, 400)
            return TunnelRefusedAutomatically(stream_id, 400, reason)
        plain = {k: v for k, v in headers.items() if not k.startswith(":")}
        return TunnelRequested(stream_id, headers[":authority"], host, port, plain)

    def accept(self, stream_id: int) -> None:
        """200: only once the upstream connection exists."""
        if stream_id in self._streams:
            self._send_headers(stream_id, [(":status", "200")])

    def refuse(self, stream_id: int, status: int) -> None:
        """400 bad request, 401 denied by policy, 503 upstream unreachable."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.local_closed:
            return
        self._send_headers(stream_id, [(":status", str(status))], end_stream=True)
        self._local_end(stream_id, stream)


class HboneClient(_HboneProtocol):
    def __init__(self) -> None:
        super().__init__(client_side=True)

    def can_open_stream(self) -> bool:
        limit = min(MAX_STREAMS, self._peer_max_streams)
        return len(self._streams) < limit and self._next_stream < wire.LARGEST_WINDOW

    def open_tunnel(self, authority: str, headers: dict[str, str] | None = None) -> int:
        """ValueError for an authority that is not ip:port, before anything is sent."""
        parse_authority(authority)
        stream_id, self._next_stream = self._next_stream, self._next_stream + 2
        self._streams[stream_id] = _Stream(self._peer_initial_window)
        request = [(":method", "CONNECT"), (":authority", authority)]
        request += [(k.lower(), v) for k, v in (headers or {}).items()]
        self._send_headers(stream_id, request)
        return stream_id

    def _headers(
        self, stream_id: int, headers: dict[str, str], end_stream: bool, events: list[Event]
    ) -> None:
        if stream_id % 2 == 0 or self._is_idle(stream_id):
            self._fail(ErrorCode.PROTOCOL_ERROR, f"HEADERS on stream {stream_id}, not ours")
        stream = self._streams.get(stream_id)
        if stream is None:
            return  # a stream we already reset
        if stream.answered:
            # Trailers: they only end the stream.
            if end_stream:
                self._remote_end(stream_id, stream, events)
            else:
                self._reset(stream_id, ErrorCode.PROTOCOL_ERROR, events)
            return
        status_text = headers.get(":status", "")
        status = int(status_text) if status_text.isdigit() else 0
        if 100 <= status < 200 and not end_stream:
            return  # informational: the answer is still to come
        stream.answered = True
        if status == 200:
            events.append(TunnelEstablished(stream_id))
            if end_stream:
                self._remote_end(stream_id, stream, events)
            return
        events.append(TunnelRejected(stream_id, status))
        # The tunnel is over either way: close our half too, so its slot is free again.
        if end_stream:
            stream.remote_closed = True
            self.end_stream(stream_id)
        else:
            self.reset_stream(stream_id)
