"""The HBONE protocol, sans-IO: bytes in, events out; calls in, bytes to send out.

Nothing here touches a socket or a clock, so two protocol objects can be tested by handing
bytes between them. The asyncio shell (agent/hbone/connection.py) owns the IO, the timers
(keepalive PING) and the TLS.

Wire facts followed (Istio ztunnel): plain CONNECT (`:method CONNECT`, `:authority ip:port`,
no `:scheme`/`:path`); 200 only once the upstream is connected; 400 for a request that is not
a valid CONNECT; stream window 4 MiB, connection window 16 MiB, max frame 1 MiB; at most 100
streams per connection.
"""

from __future__ import annotations

import contextlib
import ipaddress
from collections.abc import Iterable
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
    """The peer broke HTTP/2; a GOAWAY is queued in data_to_send()."""


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
    def __init__(self, client_side: bool) -> None:
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
    def __init__(self) -> None:
        super().__init__(client_side=False)

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
