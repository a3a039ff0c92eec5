"""The asyncio shell around the HBONE protocol: one HTTP/2 connection, many tunnels.

HboneConnection is an asyncio.Protocol: bytes from the transport go into the sans-IO
protocol object, its events are dispatched to HboneStream objects, and whatever the protocol
wants to send is written out. An HboneStream is used one of two ways, with HTTP/2 flow control
as the backpressure either way:
- by a sink attached to it (agent/proxy/tunnel_relay.py, the agent's tunnels): events as they
  happen, DATA frames built in the sink's buffer, the window handed back (consumed) when the
  sink has passed the bytes on;
- as a ByteStream (agent/proxy/relay.py), read() / write() / write_eof() / reset() in a task
  (the tests' peers): read() hands the window back only when the caller takes the bytes, so a slow
  reader stalls the peer rather than filling our memory; write() waits for WindowOpened when
  the peer's window is full.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import ssl
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, cast

import structlog

from agent.hbone import protocol as p
from agent.hbone.wire import ErrorCode
from agent.identity.tls import TlsSession

log = structlog.get_logger("agent.hbone")

PING_INTERVAL = 10.0
NO_ERROR = int(ErrorCode.NO_ERROR)
PING_TIMEOUT = 20.0


# Bytes a peer may leave unread in our send buffer (answers to its PINGs and SETTINGS, data
# it does not take): past this it is disconnected rather than held in memory.
WRITE_BUFFER_LIMIT = 64 * 1024 * 1024
# Received but not yet relayed, over all HBONE connections of the agent. Each connection's
# share is bounded by its flow-control window (16 MiB); past the total, connections stop
# reading until relays catch up.
MEMORY_BUDGET = 256 * 1024 * 1024
# Frames below this size are joined into one write; larger ones are written as they are.
COALESCE_BELOW = 16 * 1024


class Refusals:
    """HBONE refusals by reason (malformed requests, limits, peers refused), for /metrics."""

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()

    def count(self, reason: str) -> None:
        self.counts[reason] += 1


class MemoryBudget:
    """Bytes received on HBONE connections and not yet handed on, against one limit; a
    connection that takes the total over it pauses reading until the total falls back."""

    def __init__(self, limit: int = MEMORY_BUDGET) -> None:
        self.limit = limit
        self.used = 0
        self._paused: set[HboneConnection] = set()

    def take(self, size: int, conn: HboneConnection) -> None:
        self.used += size
        if self.used > self.limit and conn not in self._paused:
            self._paused.add(conn)
            conn.pause_reading()

    def give(self, size: int) -> None:
        self.used = max(0, self.used - size)
        if self.used <= self.limit and self._paused:
            for conn in list(self._paused):
                conn.resume_reading()
            self._paused.clear()

    def forget(self, conn: HboneConnection) -> None:
        self._paused.discard(conn)


class TunnelRefused(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(f"HBONE CONNECT answered {status}")
        self.status = status


class StreamSink(Protocol):
    """Takes a stream's events as they happen, in the connection's callbacks (instead of
    read() and write() in a task): agent/proxy/tunnel_relay.py."""

    def on_data(self, data: bytes | memoryview, flow_length: int) -> None:
        """A payload (a view of what was received); flow_length goes back through
        HboneStream.consumed() once the bytes have left the agent."""

    def on_eof(self) -> None:
        """The peer half-closed."""

    def on_reset(self) -> None:
        """The stream was reset (HboneStream.reset_code, reset_error())."""

    def on_writable(self) -> None:
        """The send window opened, or the connection's write buffer drained."""


class HboneStream:
    def __init__(self, connection: HboneConnection, stream_id: int) -> None:
        self._conn = connection
        self.stream_id = stream_id
        self._chunks: collections.deque[tuple[bytes | memoryview, int]] = collections.deque()
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._peer_eof = False
        self._reset_code: int | None = None
        self._reset_cause: BaseException | None = None
        self._sink: StreamSink | None = None
        self.established: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # -- driven by the connection ----------------------------------------------------------

    def _on_data(self, data: bytes | memoryview, flow_length: int) -> None:
        if self._sink is not None:
            self._sink.on_data(data, flow_length)
            return
        self._chunks.append((data, flow_length))
        self._readable.set()

    def _on_peer_eof(self) -> None:
        self._peer_eof = True
        self._readable.set()
        if self._sink is not None:
            self._sink.on_eof()

    def _on_reset(self, code: int, cause: BaseException | None = None) -> None:
        self._reset_code = code
        self._reset_cause = cause
        self._readable.set()
        self._writable.set()
        if not self.established.done():
            self.established.set_exception(self.reset_error())
            # Whoever awaits it still gets the error; nobody awaiting is no error to log
            # ("Future exception was never retrieved").
            self.established.exception()
        if self._sink is not None:
            self._sink.on_reset()

    def reset_error(self) -> ConnectionResetError:
        if self._reset_cause is not None:
            # Say why: "unknown CA" helps an operator; "stream reset (10)" does not.
            error = ConnectionResetError(f"HBONE connection lost: {self._reset_cause}")
            error.__cause__ = self._reset_cause
            return error
        return ConnectionResetError(f"HBONE stream reset ({self._reset_code})")

    def _on_window(self) -> None:
        self._writable.set()
        if self._sink is not None:
            self._sink.on_writable()

    @property
    def was_reset(self) -> bool:
        return self._reset_code is not None

    @property
    def answered(self) -> bool:
        """The CONNECT was answered 200 (by the peer, or by us on the server side)."""
        done = self.established
        return done.done() and not done.cancelled() and done.exception() is None

    @property
    def reset_code(self) -> int | None:
        return self._reset_code

    # -- used by a sink (agent/proxy/tunnel_relay.py) ----------------------------------------

    def attach(self, sink: StreamSink) -> None:
        """From now on the stream's events go to `sink` as they happen; what arrived before
        is handed to it first, in order."""
        self._sink = sink
        while self._chunks:
            sink.on_data(*self._chunks.popleft())
        if self._peer_eof:
            sink.on_eof()
        if self._reset_code is not None:
            sink.on_reset()

    def frame_room(self) -> int:
        """The largest DATA payload send_frame() takes now: 0 while the window is shut or
        the connection's write buffer is above its mark (on_writable says when to retry)."""
        conn = self._conn
        if conn.closed or not conn.writable:
            return 0
        return min(conn.proto.sendable(self.stream_id), conn.proto.peer_max_frame)

    def send_frame(self, frame: memoryview) -> bool:
        """Send one DATA frame built in the caller's buffer (9 bytes of room, then at most
        frame_room() bytes). True when the connection kept a view of the buffer to write
        later: the buffer must then not be reused."""
        return self._conn.send_data_frame(self.stream_id, frame)

    def consumed(self, flow_length: int) -> None:
        """A payload handed to a sink has left the agent: its window goes back."""
        self._conn.consumed(self.stream_id, flow_length)

    # -- used by the relay -----------------------------------------------------------------

    async def read(self) -> bytes | memoryview:
        """The next chunk (a view of what the connection received); b"" once the peer
        half-closed. ConnectionResetError on reset."""
        while not self._chunks:
            # What the peer sent before END_STREAM, or before a RST_STREAM(NO_ERROR), is
            # complete: Envoy ends a tunnel whose upstream closed with NO_ERROR, after the
            # data and sometimes without END_STREAM (seen with 1.40 as a waypoint), and a
            # reset after END_STREAM takes nothing back. Any other reset is an abort.
            if self._peer_eof or self._reset_code == NO_ERROR:
                return b""
            if self._reset_code is not None:
                raise self.reset_error()
            self._readable.clear()
            await self._readable.wait()
        data, flow_length = self._chunks.popleft()
        self._conn.consumed(self.stream_id, flow_length)
        return data

    async def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            if self._reset_code is not None:
                raise self.reset_error()
            if self._conn.closed:
                raise ConnectionResetError("HBONE connection closed")
            # Copy only what the flow-control window lets through now, not the whole rest.
            window = self._conn.proto.sendable(self.stream_id)
            if window > 0:
                taken = self._conn.send_data(self.stream_id, view[:window])
                view = view[taken:]
            if view:
                self._writable.clear()
                await self._writable.wait()
        await self._conn.drain()

    def write_eof(self) -> None:
        self._conn.end_stream(self.stream_id)

    def reset(self) -> None:
        self._conn.reset_stream(self.stream_id)

    def close(self) -> None:
        self._conn.stream_finished(self)


TunnelHandler = Callable[[HboneStream, p.TunnelRequested, "HboneConnection"], Awaitable[None]]


class HboneConnection(asyncio.Protocol):
    """One HBONE connection, client or server side."""

    def __init__(
        self,
        proto: p.HboneClient | p.HboneServer,
        on_tunnel: TunnelHandler | None = None,
        spawn: Callable[[Any], object] = asyncio.ensure_future,
        verify_peer: Callable[[TlsSession | None], object] | None = None,
        on_closed: Callable[[HboneConnection], None] | None = None,
        refusals: Refusals | None = None,
        budget: MemoryBudget | None = None,
    ) -> None:
        self.proto = proto
        self._refusals = refusals or Refusals()
        self._budget = budget or MemoryBudget()
        self._unconsumed = 0  # this connection's part of the budget
        self._on_tunnel = on_tunnel
        self._verify_peer = verify_peer
        self._on_closed = on_closed
        self.peer_identity: object = None
        self._spawn = spawn
        self._streams: dict[int, HboneStream] = {}
        self._transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self._ready = self._loop.create_future()
        self._flush_due = False  # a _flush_soon() is scheduled
        self.closed_event = asyncio.Event()
        self._drained = asyncio.Event()
        self._drained.set()
        self._pinger: asyncio.Task[None] | None = None
        self._ping_acked: asyncio.Event = asyncio.Event()
        self.goaway = False
        self.idle_since: float | None = None
        self.close_reason: BaseException | None = None

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's do not subclass asyncio.Transport, hence no isinstance).
        self._transport = cast(asyncio.Transport, transport)
        if self._verify_peer is not None:
            # Right after the TLS handshake, before a single HTTP/2 byte is processed.
            try:
                self.peer_identity = self._verify_peer(self.ssl_object())
            except Exception as exc:
                reason = getattr(exc, "reason", "peer_refused")
                self._refusals.count(reason)
                log.warning("hbone peer refused", peer=self.peer, reason=reason, error=str(exc))
                self._fail_ready(exc)
                self._transport.abort()
                return
        self._flush()
        self._pinger = asyncio.ensure_future(self._keepalive())
        self._ready.set_result(None)
        self._mark_idle()

    def data_received(self, data: bytes) -> None:
        try:
            events = self.proto.receive_data(data)
        except p.HboneProtocolError as exc:
            self._refusals.count(exc.reason)
            log.warning("hbone connection refused", reason=exc.reason, error=str(exc),
                        peer=self.peer)  # fmt: skip
            self._flush()  # the GOAWAY
            self.abort()
            return
        for event in events:
            self._dispatch(event)
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.close_reason = exc
        if exc is not None:
            log.warning("hbone connection lost", peer=self.peer, error=str(exc) or repr(exc))
        for stream in list(self._streams.values()):
            stream._on_reset(ErrorCode.CONNECT_ERROR, exc)
        self._streams.clear()
        self._budget.give(self._unconsumed)
        self._unconsumed = 0
        self._budget.forget(self)
        if self._pinger is not None:
            self._pinger.cancel()
        self._drained.set()
        self.closed_event.set()
        if self._on_closed is not None:
            self._on_closed(self)
        self._fail_ready(exc or ConnectionResetError("closed"))

    def _fail_ready(self, exc: BaseException) -> None:
        if not self._ready.done():
            self._ready.set_exception(exc)
            # ready() raises it for whoever awaits; nobody awaiting (a refused server-side
            # connection) is no error, so asyncio must not log it as one.
            self._ready.exception()

    def pause_writing(self) -> None:
        self._drained.clear()

    def resume_writing(self) -> None:
        self._drained.set()
        for stream in list(self._streams.values()):
            stream._on_window()

    # -- dispatch --------------------------------------------------------------------------

    def _dispatch(self, event: p.Event) -> None:
        if isinstance(event, p.TunnelRequested):
            assert self._on_tunnel is not None
            self._spawn(self._on_tunnel(self._new_stream(event.stream_id), event, self))
            return
        if isinstance(event, p.TunnelRefusedAutomatically):
            self._refusals.count("bad_request")
            log.info("hbone request refused", status=event.status, reason=event.reason,
                     peer=self.peer)  # fmt: skip
            return
        if isinstance(event, p.PingAcknowledged):
            self._ping_acked.set()
            return
        if isinstance(event, p.ConnectionClosed):
            self.goaway = True
            return
        if isinstance(event, p.WindowOpened) and event.stream_id == 0:
            for each in self._streams.values():
                each._on_window()
            return
        stream = self._streams.get(event.stream_id)
        if stream is None:
            if isinstance(event, p.Data):  # late data: the connection window still needs it
                self.proto.consumed(event.stream_id, event.flow_length)
            return
        if isinstance(event, p.TunnelEstablished):
            if not stream.established.done():
                stream.established.set_result(None)
        elif isinstance(event, p.TunnelRejected):
            if not stream.established.done():
                stream.established.set_exception(TunnelRefused(event.status))
                stream.established.exception()  # as in HboneStream._on_reset
            self.stream_finished(stream)
        elif isinstance(event, p.Data):
            self._unconsumed += event.flow_length
            self._budget.take(event.flow_length, self)
            stream._on_data(event.data, event.flow_length)
        elif isinstance(event, p.PeerHalfClosed):
            stream._on_peer_eof()
        elif isinstance(event, p.StreamReset):
            stream._on_reset(event.error_code)
            # After NO_ERROR what arrived is the peer's complete data: its reader still gets
            # it (and gives the windows and the budget back as it reads).
            self._forget_stream(stream.stream_id, keep_unread=event.error_code == NO_ERROR)
        elif isinstance(event, p.WindowOpened):
            stream._on_window()

    def _new_stream(self, stream_id: int) -> HboneStream:
        stream = HboneStream(self, stream_id)
        self._streams[stream_id] = stream
        self.idle_since = None
        return stream

    def _mark_idle(self) -> None:
        if not self._streams:
            self.idle_since = self._loop.time()

    # -- calls from streams and owners -----------------------------------------------------

    def socket(self) -> Any:
        """The connection's socket (for its kernel cookie), once connected."""
        return self._transport.get_extra_info("socket") if self._transport else None

    @property
    def peer(self) -> str:
        peer = self._transport.get_extra_info("peername") if self._transport else None
        return f"{peer[0]}:{peer[1]}" if peer else "?"

    @property
    def closed(self) -> bool:
        return self.closed_event.is_set() or self._transport is None or self._transport.is_closing()

    @property
    def active_streams(self) -> int:
        return len(self._streams)

    def ssl_object(self) -> TlsSession | None:
        if self._transport is None:
            return None
        obj = self._transport.get_extra_info("ssl_object")
        return obj if isinstance(obj, ssl.SSLObject | ssl.SSLSocket) else None

    async def ready(self) -> None:
        await self._ready

    def _flush(self) -> None:
        pieces = self.proto.take_output()
        if pieces and self._transport is not None and not self._transport.is_closing():
            # Small frames (settings, window updates, headers) go out joined; a DATA frame
            # goes as it is, without a copy: one write, one TLS record run, each.
            small: list[bytes | memoryview] = []
            for piece in pieces:
                if len(piece) < COALESCE_BELOW:
                    small.append(piece)
                    continue
                if small:
                    self._transport.write(b"".join(small))
                    small = []
                self._transport.write(piece)
            if small:
                self._transport.write(b"".join(small))
            if self._transport.get_write_buffer_size() > WRITE_BUFFER_LIMIT:
                self._refusals.count("peer_not_reading")
                log.warning("hbone peer reads nothing we send, closing", peer=self.peer,
                            buffered=self._transport.get_write_buffer_size())  # fmt: skip
                self._transport.abort()

    def _flush_soon(self) -> None:
        """Flush at the end of this loop turn: HEADERS go in one write with what the same
        turn sends after them (a new tunnel's CONNECT with the app's first bytes, when they
        are already there), a write and a TLS record less, and one wake-up less of the
        peer. Any earlier flush takes them too."""
        if not self._flush_due:
            self._flush_due = True
            self._loop.call_soon(self._flush_now)

    def _flush_now(self) -> None:
        self._flush_due = False
        self._flush()

    def pause_reading(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.resume_reading()

    async def drain(self) -> None:
        """Wait while the transport's buffer is above its high-water mark."""
        await self._drained.wait()

    @property
    def writable(self) -> bool:
        """The transport's write buffer is below its high-water mark."""
        return self._drained.is_set()

    def send_data(self, stream_id: int, data: bytes | memoryview) -> int:
        taken = self.proto.send_data(stream_id, data)
        self._flush()
        return taken

    def send_data_frame(self, stream_id: int, frame: memoryview) -> bool:
        """One DATA frame built in place; True when the transport still holds (a view of)
        what was written."""
        self.proto.send_data_frame(stream_id, frame)
        self._flush()
        return self._transport is not None and self._transport.get_write_buffer_size() > 0

    def consumed(self, stream_id: int, flow_length: int) -> None:
        self.proto.consumed(stream_id, flow_length)
        given = min(flow_length, self._unconsumed)
        self._unconsumed -= given
        self._budget.give(given)
        self._flush()

    def end_stream(self, stream_id: int) -> None:
        self.proto.end_stream(stream_id)
        self._flush()

    def reset_stream(self, stream_id: int) -> None:
        self.proto.reset_stream(stream_id)
        self._flush()
        self._forget_stream(stream_id)

    def stream_finished(self, stream: HboneStream) -> None:
        """The owner is done with the stream (both directions over or abandoned)."""
        self._forget_stream(stream.stream_id)
        self._drain(stream)

    def _forget_stream(self, stream_id: int, keep_unread: bool = False) -> None:
        stream = self._streams.pop(stream_id, None)
        if stream is None:
            return
        if not keep_unread:
            self._drain(stream)
        self._mark_idle()

    def _drain(self, stream: HboneStream) -> None:
        """What the stream received and nobody will read: the windows and the budget get
        it back."""
        while stream._chunks:
            _, flow_length = stream._chunks.popleft()
            self.consumed(stream.stream_id, flow_length)

    # server side
    def accept(self, stream: HboneStream) -> None:
        assert isinstance(self.proto, p.HboneServer)
        self.proto.accept(stream.stream_id)
        if not stream.established.done():
            stream.established.set_result(None)  # answered: as a client's on its 200
        self._flush_soon()

    def refuse(self, stream: HboneStream, status: int) -> None:
        assert isinstance(self.proto, p.HboneServer)
        self.proto.refuse(stream.stream_id, status)
        self._flush()
        self.stream_finished(stream)

    # client side
    def can_open_stream(self) -> bool:
        return (
            isinstance(self.proto, p.HboneClient)
            and not self.closed
            and not self.goaway
            and self.proto.can_open_stream()
        )

    def open_stream(self, authority: str, headers: dict[str, str]) -> HboneStream:
        """CONNECT sent; the answer comes as `stream.established` (TunnelRefused for other
        than 200). DATA may go at once, within the window: the peer holds it until it
        answers, and drops it with a refusal."""
        assert isinstance(self.proto, p.HboneClient)
        if self.closed:
            reason = f": {self.close_reason}" if self.close_reason else ""
            raise ConnectionResetError(f"HBONE connection to {self.peer} is closed{reason}")
        stream = self._new_stream(self.proto.open_tunnel(authority, headers))
        self._flush_soon()
        return stream

    async def open_tunnel(self, authority: str, headers: dict[str, str]) -> HboneStream:
        """CONNECT; returns once the peer answered 200. TunnelRefused for other answers."""
        stream = self.open_stream(authority, headers)
        await stream.established
        return stream

    async def _keepalive(self) -> None:
        """PING every 10 s; a peer that answers none for 20 s is dropped."""
        with contextlib.suppress(asyncio.CancelledError):
            while not self.closed:
                await asyncio.sleep(PING_INTERVAL)
                self._ping_acked.clear()
                self.proto.ping(os.urandom(8))
                self._flush()
                try:
                    await asyncio.wait_for(self._ping_acked.wait(), PING_TIMEOUT)
                except TimeoutError:
                    log.warning("hbone peer missed keepalive, closing", peer=self.peer)
                    self.abort()
                    return

    def close(self) -> None:
        """GOAWAY, then close once written."""
        if self._transport is not None and not self._transport.is_closing():
            self.proto.close()
            self._flush()
            self._transport.close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()
