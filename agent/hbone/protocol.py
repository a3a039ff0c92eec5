"""The HBONE protocol, sans-IO: bytes in, events out; calls in, bytes to send out.

Nothing here touches a socket or a clock, so two protocol objects can be tested by handing
bytes between them. The asyncio shell (agent/hbone/connection.py) owns the IO, the timers
(keepalive PING) and the TLS.

Wire facts followed (Istio ztunnel): plain CONNECT (`:method CONNECT`, `:authority ip:port`,
no `:scheme`/`:path`); 200 only once the upstream is connected; 400 for a request that is not
a valid CONNECT; stream window 4 MiB, connection window 16 MiB, max frame 1 MiB; at most 100
streams per connection. A frame scanner ahead of h2 enforces HboneLimits (header block size,
reset, PING and SETTINGS rates) with GOAWAY ENHANCE_YOUR_CALM.
"""

from __future__ import annotations

import contextlib
import ipaddress
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

STREAM_WINDOW = 4 * 1024 * 1024
CONNECTION_WINDOW = 16 * 1024 * 1024
MAX_FRAME = 1024 * 1024
MAX_STREAMS = 100
_DEFAULT_WINDOW = 65_535

HBONE_SETTINGS = {
    h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
    h2.settings.SettingCodes.MAX_FRAME_SIZE: MAX_FRAME,
    h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_STREAMS,
    h2.settings.SettingCodes.ENABLE_PUSH: 0,
}

# Headers carried on CONNECT besides the pseudo-headers (ztunnel sends these).
FORWARDED, BAGGAGE, TRACEPARENT = "forwarded", "baggage", "traceparent"


# A stream the peer already closed or reset: acting on it is a no-op, not an error.
_STREAM_GONE = (h2.exceptions.StreamClosedError, h2.exceptions.NoSuchStreamError)


def _headers(raw: Iterable[tuple[bytes | str, bytes | str]] | None) -> dict[str, str]:
    return {
        (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
        for k, v in raw or ()
    }


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


# Frame types and flags (RFC 9113 section 6) the scanner looks at.
_FRAME_HEADER = 9
_HEADERS, _RST_STREAM, _SETTINGS, _PING, _CONTINUATION = 0x1, 0x3, 0x4, 0x6, 0x9
_FLAG_ACK, _FLAG_END_HEADERS = 0x1, 0x4
_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class _FrameScanner:
    """Reads only frame headers, ahead of h2, so a limit trips before h2 buffers or acts on
    what a frame carries. Payload bytes are skipped, never copied."""

    def __init__(self, server_side: bool, limits: HboneLimits, clock: Callable[[], float]):
        self._limits = limits
        # Rapid reset is a client's attack: it opens streams and resets them, making the server
        # start work each time. A server can reset only streams the client opened, so on the
        # client side resets are bounded by our own streams; and servers (Envoy among them)
        # routinely end a finished stream with RST_STREAM(NO_ERROR).
        self._resets_limited = server_side
        self._skip = len(_PREFACE) if server_side else 0  # the client's preface comes first
        self._header = bytearray()
        self._payload_left = 0
        self._block: int | None = None  # bytes of the header block in progress
        self._resets = _Bucket(limits.reset_burst, limits.reset_rate, clock)
        self._control = _Bucket(limits.control_burst, limits.control_rate, clock)

    def scan(self, data: bytes) -> None:
        view, at = memoryview(data), 0
        if self._skip:
            taken = min(self._skip, len(view))
            self._skip -= taken
            at = taken
        while at < len(view):
            if self._payload_left:
                taken = min(self._payload_left, len(view) - at)
                self._payload_left -= taken
                at += taken
                continue
            need = _FRAME_HEADER - len(self._header)
            self._header += view[at : at + need]
            at += min(need, len(view) - at)
            if len(self._header) == _FRAME_HEADER:
                self._frame(bytes(self._header))
                self._header.clear()

    def _frame(self, header: bytes) -> None:
        length = int.from_bytes(header[:3], "big")
        kind, flags = header[3], header[4]
        self._payload_left = length
        if kind in (_HEADERS, _CONTINUATION):
            self._block = length + (self._block or 0 if kind == _CONTINUATION else 0)
            if self._block > self._limits.max_header_block:
                raise HboneProtocolError(
                    f"header block over {self._limits.max_header_block} bytes",
                    "header_block_too_large",
                )
            if flags & _FLAG_END_HEADERS:
                self._block = None
        elif kind == _RST_STREAM and self._resets_limited and not self._resets.take():
            raise HboneProtocolError("streams reset faster than allowed", "reset_flood")
        elif kind in (_PING, _SETTINGS) and not flags & _FLAG_ACK and not self._control.take():
            raise HboneProtocolError("PING or SETTINGS frames faster than allowed",
                                     "control_frame_flood")  # fmt: skip


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
    data: bytes
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


def format_authority(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# ---- protocol -----------------------------------------------------------------------------


class _HboneProtocol:
    def __init__(
        self,
        client_side: bool,
        limits: HboneLimits | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._scanner = _FrameScanner(not client_side, limits or HboneLimits(), clock)
        config = h2.config.H2Configuration(client_side=client_side, header_encoding="utf-8")
        self._conn = h2.connection.H2Connection(config=config)
        self._conn.local_settings = h2.settings.Settings(
            client=client_side, initial_values=HBONE_SETTINGS
        )
        # h2 derives this from the settings at construction, before ours replaced them.
        self._conn.max_inbound_frame_size = MAX_FRAME
        self._conn.initiate_connection()
        self._conn.increment_flow_control_window(CONNECTION_WINDOW - _DEFAULT_WINDOW)

    def data_to_send(self) -> bytes:
        return bytes(self._conn.data_to_send())

    def receive_data(self, data: bytes) -> list[Event]:
        try:
            self._scanner.scan(data)
        except HboneProtocolError:
            self._conn.close_connection(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
            raise
        try:
            h2_events = self._conn.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            raise HboneProtocolError(str(exc) or type(exc).__name__) from exc
        events: list[Event] = []
        for event in h2_events:
            events.extend(self._translate(event))
        return events

    def _translate(self, event: h2.events.Event) -> list[Event]:
        if isinstance(event, h2.events.DataReceived):
            assert event.stream_id is not None and event.data is not None
            out: list[Event] = []
            flow_length = event.flow_controlled_length or 0
            if event.data or flow_length:  # END_STREAM often rides on an empty DATA frame
                out.append(Data(event.stream_id, bytes(event.data), flow_length))
            if event.stream_ended is not None:
                out.append(PeerHalfClosed(event.stream_id))
            return out
        if isinstance(event, h2.events.StreamEnded):
            # Reported with the DATA or HEADERS frame that carried END_STREAM already.
            return []
        if isinstance(event, h2.events.StreamReset):
            assert event.stream_id is not None
            return [StreamReset(event.stream_id, int(event.error_code or 0))]
        if isinstance(event, h2.events.WindowUpdated):
            return [WindowOpened(event.stream_id or 0)]
        if isinstance(event, h2.events.RemoteSettingsChanged):
            return [WindowOpened(0)]  # a new initial window resizes every stream's window
        if isinstance(event, h2.events.PingAckReceived):
            return [PingAcknowledged(bytes(event.ping_data or b""))]
        if isinstance(event, h2.events.ConnectionTerminated):
            return [ConnectionClosed(int(event.error_code or 0), event.last_stream_id or 0)]
        return []

    # -- sending ---------------------------------------------------------------------------

    def sendable(self, stream_id: int) -> int:
        """How many bytes send_data() would take now (flow-control window, both levels)."""
        try:
            return int(self._conn.local_flow_control_window(stream_id))
        except _STREAM_GONE:
            return 0

    def send_data(self, stream_id: int, data: bytes) -> int:
        """Queue as much of data as the windows allow, in frames of at most the peer's max
        frame size; returns how many bytes were taken. Send the rest after WindowOpened."""
        taken = 0
        window = self.sendable(stream_id)
        frame = int(self._conn.max_outbound_frame_size)
        while taken < len(data) and window > 0:
            size = min(len(data) - taken, window, frame)
            self._conn.send_data(stream_id, data[taken : taken + size])
            taken += size
            window -= size
        return taken

    def end_stream(self, stream_id: int) -> None:
        """Our half-close (TCP FIN from our side)."""
        with contextlib.suppress(*_STREAM_GONE):
            self._conn.end_stream(stream_id)

    def reset_stream(self, stream_id: int, error_code: int = h2.errors.ErrorCodes.CANCEL) -> None:
        with contextlib.suppress(*_STREAM_GONE):
            self._conn.reset_stream(stream_id, error_code)

    def consumed(self, stream_id: int, flow_length: int) -> None:
        """The application used flow_length bytes of a Data event: open the window again.
        Called only once the bytes have left the agent, so a slow reader stalls the sender
        instead of growing our buffers."""
        if flow_length <= 0:
            return
        try:
            self._conn.acknowledge_received_data(flow_length, stream_id)
        except _STREAM_GONE:
            # The stream is gone; the connection window still needs the bytes back.
            self._conn.increment_flow_control_window(flow_length)

    def ping(self, opaque: bytes) -> None:
        self._conn.ping(opaque)

    def close(self, error_code: int = h2.errors.ErrorCodes.NO_ERROR) -> None:
        self._conn.close_connection(error_code)

    @property
    def open_streams(self) -> int:
        return int(self._conn.open_outbound_streams + self._conn.open_inbound_streams)


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

    def _translate(self, event: h2.events.Event) -> list[Event]:
        if isinstance(event, h2.events.RequestReceived):
            assert event.stream_id is not None
            return [self._request(event.stream_id, _headers(event.headers))]
        if isinstance(event, h2.events.TrailersReceived):
            assert event.stream_id is not None
            self.reset_stream(event.stream_id, h2.errors.ErrorCodes.PROTOCOL_ERROR)
            return [StreamReset(event.stream_id, h2.errors.ErrorCodes.PROTOCOL_ERROR)]
        return super()._translate(event)

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
        self._conn.send_headers(stream_id, [(":status", "200")])

    def refuse(self, stream_id: int, status: int) -> None:
        """400 bad request, 401 denied by policy, 503 upstream unreachable."""
        with contextlib.suppress(*_STREAM_GONE):
            self._conn.send_headers(stream_id, [(":status", str(status))], end_stream=True)


class HboneClient(_HboneProtocol):
    def __init__(self) -> None:
        super().__init__(client_side=True)

    def can_open_stream(self) -> bool:
        limit = min(MAX_STREAMS, int(self._conn.remote_settings.max_concurrent_streams))
        return int(self._conn.open_outbound_streams) < limit

    def open_tunnel(self, authority: str, headers: dict[str, str] | None = None) -> int:
        """ValueError for an authority that is not ip:port, before anything is sent."""
        parse_authority(authority)
        stream_id = int(self._conn.get_next_available_stream_id())
        request = [(":method", "CONNECT"), (":authority", authority)]
        request += [(k.lower(), v) for k, v in (headers or {}).items()]
        self._conn.send_headers(stream_id, request)
        return stream_id

    def _translate(self, event: h2.events.Event) -> list[Event]:
        if isinstance(event, h2.events.ResponseReceived):
            assert event.stream_id is not None
            status = int(_headers(event.headers).get(":status", "0"))
            if status == 200:
                return [TunnelEstablished(event.stream_id)]
            if event.stream_ended is None:
                self.reset_stream(event.stream_id)
            return [TunnelRejected(event.stream_id, status)]
        return super()._translate(event)
