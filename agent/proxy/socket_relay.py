"""A relay between two plain TCP sockets on worker threads: the fast path for bytes that need
no TLS and no framing (same-node delivery, pass-through to destinations outside the mesh).

Measured on these machines, socket to socket on one node (docs/performance.md): asyncio
streams move 0.15-0.26 of direct TCP, threads doing recv_into/sendall 0.40-0.53, os.splice
through a pipe 0.44-0.58. So each direction gets a thread that splices source -> pipe ->
sink (the bytes never enter Python), or, where splice is not available, receives into one
buffer and sends it on.

- Memory is bounded: one pipe (or one buffer) per direction, and a direction hands on all it
  took before it takes more, so a stalled reader stops the writer at the sockets' buffers.
- Half-close is carried: EOF from one side is shutdown(SHUT_WR) on the other.
- A reset or any other error on either side resets both (SO_LINGER 0, then close).
- Threads are bounded: at most `limit` threaded relays at once; past it a connection gets
  the asyncio relay (agent/proxy/relay.py), so a burst never grows the thread count.
- The event loop awaits the result (the bytes each way, exactly, as a RelayResult); cut() or
  a cancelled wait (a pod's drain, the agent's shutdown) resets both sides and ends the
  threads. The relay owns both sockets from start() on and closes them, and its own fds,
  when it ends.

The sockets must never have been handed to an asyncio transport: a transport would read
from them too. The listeners this serves hand over sockets as accepted
(agent/proxy/socket_listener.py), before anything was read from them.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import errno
import fcntl
import os
import select
import socket
import threading
from typing import Protocol

import structlog

from agent.proxy.relay import (
    DRAINED,
    RelayResult,
    SocketStream,
    describe,
    linger_reset,
    relay,
)

log = structlog.get_logger("agent.proxy")

# Concurrent threaded relays (two threads each). Past it, the asyncio relay: slower, but no
# more threads. A node's agent relays this many same-node or pass-through connections at
# full speed at once; 2 CPUs cannot use more threads than that anyway.
MAX_THREADED_RELAYS = 128
# A direction's pipe: splice moves at most this much per call, and it is all a direction
# holds. The default pipe (64 KiB) costs 4x the syscalls per byte.
PIPE_SIZE = 256 * 1024
COPY_CHUNK = 256 * 1024  # a direction's buffer where splice is not used
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)  # linux/fcntl.h; Python >= 3.10 has it
SPLICE_AVAILABLE = hasattr(os, "splice")
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)


class Relaying(Protocol):
    """One relay under way, threaded or not."""

    mode: str  # "splice", "copy" (threads) or "asyncio" (past the cap)
    result: asyncio.Future[RelayResult]  # done when the relay has ended

    def cut(self, reason: str = ...) -> None: ...
    async def wait(self) -> RelayResult: ...


class _Stopped(Exception):
    """The relay was told to end (cut, cancelled, or the other direction failed)."""


class ThreadedRelay:
    """Both directions between `a` and `b`, one thread each. RelayResult.a_to_b counts the
    bytes written to b (handed to its socket), b_to_a those written to a."""

    def __init__(
        self, a: socket.socket, b: socket.socket, loop: asyncio.AbstractEventLoop, splice: bool
    ) -> None:
        self.mode = "splice" if splice else "copy"
        self._sockets = (a, b)
        self._loop = loop
        self.result: asyncio.Future[RelayResult] = loop.create_future()
        self._moved = [0, 0]
        self._error: str | None = None
        self._lock = threading.Lock()  # guards _error, _stopping, _running and the wake fd
        self._stopping = False
        self._running = 2
        for sock in self._sockets:
            sock.setblocking(False)
        # Written once to end the relay; never read, so it stays readable and wakes every
        # poll that waits on it, in both threads.
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._threads = [
            threading.Thread(target=self._direction, args=(a, b, 0, splice), daemon=True,
                             name=f"relay:{a.fileno()}>{b.fileno()}"),
            threading.Thread(target=self._direction, args=(b, a, 1, splice), daemon=True,
                             name=f"relay:{b.fileno()}>{a.fileno()}"),
        ]  # fmt: skip

    def start(self) -> None:
        for started, thread in enumerate(self._threads):
            try:
                thread.start()
            except RuntimeError:  # the process can start no more threads: a failed relay
                self._stop("cannot start a relay thread")
                for _ in range(len(self._threads) - started):
                    self._left()
                return

    def cut(self, reason: str = "reset by the agent") -> None:
        """Reset both sides and end (a policy re-check, the agent's shutdown); the result
        says why. Safe from any thread, and after the relay has ended."""
        self._stop(reason)

    async def wait(self) -> RelayResult:
        """The result once both directions are done. Cancelled (the pod's drain ran out of
        grace), it resets both sides and waits briefly for the threads to close them."""
        try:
            return await asyncio.shield(self.result)
        except asyncio.CancelledError:
            self.cut(DRAINED)
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.result), 1.0)
            raise

    # -- the threads ---------------------------------------------------------------------

    def _stop(self, reason: str) -> None:
        """End both directions, as an error: both sides are reset. The first reason stays."""
        with self._lock:
            if self._running == 0:
                return  # ended already: its result stands
            if self._error is None:
                self._error = reason
            if self._stopping:
                return
            self._stopping = True
            os.eventfd_write(self._wake, 1)

    def _direction(
        self, source: socket.socket, sink: socket.socket, index: int, splice: bool
    ) -> None:
        try:
            if splice:
                self._splice(source, sink, index)
            else:
                self._copy(source, sink, index)
            sink.shutdown(socket.SHUT_WR)  # EOF from the source: half-close carried over
        except _Stopped:
            pass
        except OSError as exc:
            self._stop(describe(exc))
        except BaseException as exc:  # a bug: still end the relay, and say so
            log.exception("threaded relay failed")
            self._stop(f"relay failed: {type(exc).__name__}: {exc}")
        finally:
            self._left()

    def _waiter(self, fd: int, event: int) -> select.poll:
        poller = select.poll()
        poller.register(fd, event)
        poller.register(self._wake, select.POLLIN)
        return poller

    def _wait(self, poller: select.poll) -> None:
        """Block until the socket is ready (or in error: the next call says which) or the
        relay is told to end."""
        for fd, _ in poller.poll():
            if fd == self._wake:
                raise _Stopped

    def _splice(self, source: socket.socket, sink: socket.socket, index: int) -> None:
        pipe_out, pipe_in = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            with contextlib.suppress(OSError):  # a smaller pipe still works
                fcntl.fcntl(pipe_in, F_SETPIPE_SZ, PIPE_SIZE)
            src, dst = source.fileno(), sink.fileno()
            readable = self._waiter(src, select.POLLIN)
            writable = self._waiter(dst, select.POLLOUT)
            while not self._stopping:
                try:
                    taken = os.splice(src, pipe_in, PIPE_SIZE, flags=_SPLICE_FLAGS)
                except BlockingIOError:
                    self._wait(readable)
                    continue
                except OSError as exc:
                    if exc.errno in (errno.EINVAL, errno.ENOSYS) and self._moved[index] == 0:
                        # This kernel or socket does not splice: copy instead.
                        self._copy(source, sink, index)
                        return
                    raise
                if taken == 0:
                    return  # EOF
                while taken:
                    try:
                        given = os.splice(pipe_out, dst, taken, flags=_SPLICE_FLAGS)
                    except BlockingIOError:
                        self._wait(writable)
                        continue
                    taken -= given
                    self._moved[index] += given
            raise _Stopped
        finally:
            os.close(pipe_out)
            os.close(pipe_in)

    def _copy(self, source: socket.socket, sink: socket.socket, index: int) -> None:
        buffer = bytearray(COPY_CHUNK)
        view = memoryview(buffer)
        readable = self._waiter(source.fileno(), select.POLLIN)
        writable = self._waiter(sink.fileno(), select.POLLOUT)
        while not self._stopping:
            try:
                taken = source.recv_into(buffer)
            except BlockingIOError:
                self._wait(readable)
                continue
            if taken == 0:
                return  # EOF
            sent = 0
            while sent < taken:
                try:
                    given = sink.send(view[sent:taken])
                except BlockingIOError:
                    self._wait(writable)
                    continue
                sent += given
                self._moved[index] += given
        raise _Stopped

    def _left(self) -> None:
        """A thread is done; the last one closes everything and hands the result over."""
        with self._lock:
            self._running -= 1
            if self._running:
                return
            error = self._error
            os.close(self._wake)
        for sock in self._sockets:
            if error is not None:  # a reset on either side, a cut: the other side is reset
                linger_reset(sock)
            sock.close()
        result = RelayResult(self._moved[0], self._moved[1], error)
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
            self._loop.call_soon_threadsafe(_resolve, self.result, result)


def _resolve(future: asyncio.Future[RelayResult], result: RelayResult) -> None:
    if not future.done():
        future.set_result(result)


class StreamRelay:
    """The asyncio relay over the two sockets, for connections past the cap."""

    mode = "asyncio"

    def __init__(self, a: SocketStream, b: SocketStream) -> None:
        self._streams = (a, b)
        self._cut: str | None = None
        self.result: asyncio.Future[RelayResult] = asyncio.ensure_future(relay(a, b))

    def cut(self, reason: str = "reset by the agent") -> None:
        if self._cut is None and not self.result.done():
            self._cut = reason
        for stream in self._streams:
            stream.reset()

    async def wait(self) -> RelayResult:
        try:
            result = await asyncio.shield(self.result)
        except asyncio.CancelledError:
            # The reset streams end the pumps; the task is not cancelled, as another may
            # wait for it (the destination pod's hold, agent/proxy/local_delivery.py).
            self.cut(DRAINED)
            raise
        # Reset streams may end the pumps without an error of their own: say why it ended.
        return dataclasses.replace(result, error=self._cut) if self._cut else result


def ended(relaying: Relaying) -> RelayResult:
    """What a relay moved, for a handler whose wait was cancelled (the relay was cut)."""
    if relaying.result.done() and not relaying.result.cancelled():
        return relaying.result.result()
    return RelayResult(0, 0, DRAINED)


class SocketRelays:
    """The agent's relays between plain sockets: threaded up to `limit` at once."""

    def __init__(self, limit: int = MAX_THREADED_RELAYS, splice: bool = SPLICE_AVAILABLE) -> None:
        self.limit = limit
        self._splice = splice
        self._threaded: set[ThreadedRelay] = set()
        self.started: collections.Counter[str] = collections.Counter()  # by mode, for /metrics

    @property
    def threaded(self) -> int:
        return len(self._threaded)

    async def start(self, a: socket.socket, b: socket.socket) -> Relaying:
        """Relay between two connected sockets, which the relay now owns (it closes them)."""
        threaded = None
        if len(self._threaded) < self.limit:
            try:
                threaded = ThreadedRelay(a, b, asyncio.get_running_loop(), self._splice)
            except OSError as exc:  # no fd for its wake-up: the asyncio relay needs none
                log.warning("threaded relay unavailable", error=str(exc))
        if threaded is None:
            relaying: Relaying = StreamRelay(*[await _stream(sock) for sock in (a, b)])
        else:
            self._threaded.add(threaded)
            threaded.result.add_done_callback(lambda _: self._threaded.discard(threaded))
            threaded.start()
            relaying = threaded
        self.started[relaying.mode] += 1
        return relaying

    async def relay(self, a: socket.socket, b: socket.socket) -> RelayResult:
        return await (await self.start(a, b)).wait()

    def close(self) -> None:
        """The agent is stopping: reset what is still relayed (the pods' drains normally
        ended it all before)."""
        for threaded in list(self._threaded):
            threaded.cut("agent shutting down")


async def _stream(sock: socket.socket) -> SocketStream:
    reader, writer = await asyncio.open_connection(sock=sock)
    return SocketStream(reader, writer)
