"""The relay between an app's TCP socket and an HBONE stream, run in event-loop callbacks.

relay() (agent/proxy/relay.py) pumps each direction in a task through asyncio streams: a copy
at each hop (the transport's read, the stream's buffer, the chunk, the frame) and a task
wake-up per chunk each way, which a request/response pays on every turn. Tunnelled bytes
take this path instead (docs/performance.md):

- app -> tunnel: the socket is read straight into a buffer that keeps 9 bytes of room in
  front, where the DATA frame's header is written; the frame goes to TLS as it is.
- tunnel -> app: each DATA payload (a view of what TLS decrypted) is sent to the socket from
  the callback that parsed it; what the socket does not take waits for it to be writable.

On the client side the relay starts as soon as the CONNECT is sent, not once it is answered:
what the app sends goes with it, within the stream's window, and the destination holds it
until its connect to the app is allowed (or drops it with its refusal). That is one round
trip between the agents less before the app's first byte arrives. The owner awaits the
answer and cuts the relay on a refusal; nothing from the peer reaches the app before it.

Backpressure is HTTP/2's, as with relay(): the app is read only while the stream's window
is open and the TLS connection's write buffer is below its mark; a payload's window goes
back only once the app's socket has taken all of it. So a connection holds at most one
buffer and its stream window, whoever stalls. Half-close crosses (FIN <-> END_STREAM), a
reset on either side resets the other, and cut() (a pod's drain, a policy re-check, a
cancelled wait) resets both. The relay owns the socket from start() on and closes it.
"""

from __future__ import annotations

import asyncio
import collections
import socket

from agent.hbone.connection import HboneStream
from agent.hbone.wire import FRAME_HEADER_SIZE, ErrorCode
from agent.proxy.relay import DRAINED, RelayResult, describe, reset_socket

# The most read from the app per DATA frame (less when the window or the peer's frame size
# is smaller).
CHUNK = 256 * 1024


class _Buffers:
    """Read buffers shared by every relay: a read fills one and hands the frame to TLS at
    once, so a buffer stays taken only while TLS holds a view of the frame it could not
    write yet. No allocation per connection or per read, and memory is a few buffers."""

    def __init__(self, keep: int) -> None:
        self._free: list[bytearray] = []
        self._keep = keep

    def take(self) -> bytearray:
        try:
            return self._free.pop()
        except IndexError:
            return bytearray(FRAME_HEADER_SIZE + CHUNK)

    def give(self, buffer: bytearray) -> None:
        if len(self._free) < self._keep:
            self._free.append(buffer)


_BUFFERS = _Buffers(keep=4)


class TunnelRelay:
    """`sock` (connected, never given to an asyncio transport) <-> `stream` (established).
    app_is_client: the app's side is the connection's client (outbound); RelayResult.a_to_b
    counts the client's bytes to the server either way."""

    def __init__(self, sock: socket.socket, stream: HboneStream, app_is_client: bool) -> None:
        self._loop = asyncio.get_running_loop()
        self._sock = sock
        self._fd = sock.fileno()
        self._stream = stream
        self._app_is_client = app_is_client
        self._to_tunnel = 0
        self._to_app = 0
        # Payloads (the rest of each) the app's socket has not taken yet, with their windows.
        self._pending: collections.deque[tuple[memoryview, int]] = collections.deque()
        self._reading = False
        self._writing = False
        self._app_eof = False  # the app's FIN read (END_STREAM sent)
        self._peer_eof = False  # END_STREAM received (or the peer's reset with NO_ERROR)
        self._app_shut = False  # our FIN to the app sent
        self.result: asyncio.Future[RelayResult] = self._loop.create_future()

    def start(self) -> None:
        self._sock.setblocking(False)
        self._stream.attach(self)
        self._want_read()
        if self._reading:
            # What the app sent while the tunnel was set up goes now, not a loop turn later.
            self._read_app()

    async def wait(self) -> RelayResult:
        """The result once both directions are done; a cancelled wait cuts the relay."""
        try:
            return await asyncio.shield(self.result)
        except asyncio.CancelledError:
            self.cut(DRAINED)
            raise

    def cut(self, reason: str = "cut") -> None:
        self._end(reason)

    # -- app -> tunnel -------------------------------------------------------------------------

    def _want_read(self) -> None:
        if not self._reading and not self._app_eof and not self.result.done():
            self._reading = True
            self._loop.add_reader(self._fd, self._read_app)

    def _stop_read(self) -> None:
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self._fd)

    def _read_app(self) -> None:
        stream = self._stream
        if stream.was_reset:
            self._read_after_reset()
            return
        room = min(stream.frame_room(), CHUNK)
        if room <= 0:
            self._stop_read()  # until on_writable
            return
        buffer = _BUFFERS.take()
        frame = memoryview(buffer)
        try:
            got = self._sock.recv_into(frame[FRAME_HEADER_SIZE : FRAME_HEADER_SIZE + room])
        except (BlockingIOError, InterruptedError):
            _BUFFERS.give(buffer)
            return
        except OSError as exc:
            _BUFFERS.give(buffer)
            self._end(describe(exc))
            return
        if got == 0:
            _BUFFERS.give(buffer)
            self._app_eof = True
            self._stop_read()
            stream.write_eof()
            self._done_if_finished()
            return
        self._to_tunnel += got
        if not stream.send_frame(frame[: FRAME_HEADER_SIZE + got]):
            _BUFFERS.give(buffer)  # else TLS holds a view of the frame: the buffer is its own

    def _read_after_reset(self) -> None:
        """The peer ended the stream (with NO_ERROR: its data is complete). The app may still
        close its side cleanly; anything it sends now has nowhere to go."""
        try:
            got = self._sock.recv_into(bytearray(1))
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._end(describe(exc))
            return
        if got:
            self._end(str(self._stream.reset_error()))
            return
        self._app_eof = True
        self._stop_read()
        self._done_if_finished()

    # -- tunnel -> app (StreamSink) ------------------------------------------------------------

    def on_data(self, data: bytes | memoryview, flow_length: int) -> None:
        if self.result.done():
            self._stream.consumed(flow_length)
            return
        view = memoryview(data)
        if not self._pending:
            try:
                sent = self._sock.send(view) if view else 0
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self._stream.consumed(flow_length)
                self._end(describe(exc))
                return
            self._to_app += sent
            if sent == len(view):
                self._stream.consumed(flow_length)
                return
            view = view[sent:]
        self._pending.append((view, flow_length))
        if not self._writing:
            self._writing = True
            self._loop.add_writer(self._fd, self._write_app)

    def _write_app(self) -> None:
        while self._pending:
            view, flow_length = self._pending[0]
            try:
                sent = self._sock.send(view)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._end(describe(exc))
                return
            self._to_app += sent
            if sent < len(view):
                self._pending[0] = (view[sent:], flow_length)
                return
            self._pending.popleft()
            self._stream.consumed(flow_length)
        self._writing = False
        self._loop.remove_writer(self._fd)
        if self._peer_eof:
            self._shut_app()

    def on_eof(self) -> None:
        self._peer_eof = True
        if not self._pending and not self.result.done():
            self._shut_app()

    def on_reset(self) -> None:
        if self._stream.reset_code == ErrorCode.NO_ERROR and self._stream.answered:
            # What the peer sent before a NO_ERROR reset is complete (HboneStream.read); a
            # reset instead of an answer is a refusal, whatever its code.
            self.on_eof()
            self._want_read()  # to see the app's close, or data that cannot go anywhere
        else:
            self._end(str(self._stream.reset_error()), reset_stream=False)

    def on_writable(self) -> None:
        self._want_read()

    def _shut_app(self) -> None:
        if self._app_shut:
            return
        self._app_shut = True
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            self._end(describe(exc))
            return
        self._done_if_finished()

    # -- the end -------------------------------------------------------------------------------

    def _done_if_finished(self) -> None:
        if self._app_eof and self._app_shut and not self.result.done():
            self._stop_read()
            self._sock.close()
            self._stream.close()
            self._finish(None)

    def _end(self, error: str, reset_stream: bool = True) -> None:
        """Both sides reset: the stream (unless the peer reset it) and the app's socket."""
        if self.result.done():
            return
        self._stop_read()
        if self._writing:
            self._writing = False
            self._loop.remove_writer(self._fd)
        # Nobody will take these now: their windows go back.
        while self._pending:
            self._stream.consumed(self._pending.popleft()[1])
        if reset_stream:
            self._stream.reset()
        reset_socket(self._sock)
        self._stream.close()
        self._finish(error)

    def _finish(self, error: str | None) -> None:
        if self._app_is_client:
            self.result.set_result(RelayResult(self._to_tunnel, self._to_app, error))
        else:
            self.result.set_result(RelayResult(self._to_app, self._to_tunnel, error))
