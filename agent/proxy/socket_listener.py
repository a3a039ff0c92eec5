"""A pod's listener served by handing each accepted connection to its handler as it is: a
plain socket, nothing read from it yet.

asyncio's servers wrap every accepted socket in a transport that starts reading at once, so
a handler that wants the socket itself (the threaded relay, agent/proxy/socket_relay.py)
would have to take it back from under the transport, with whatever it had buffered. Here the
handler decides first: it gives the socket to a relay as it is (`release()`), or makes
asyncio streams of it (`streams()`) for the paths that need them (HBONE, TCP DNS).
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Callable, Coroutine
from typing import Any

import structlog

from agent.proxy.relay import reset, reset_socket

log = structlog.get_logger("agent.proxy")

# Connections taken per wake-up of the listener (asyncio's servers take their backlog).
ACCEPT_BATCH = 128
# Out of fds or memory: stop accepting for this long (as asyncio's servers do), and leave
# the pending connections in the backlog rather than spin on the error.
ACCEPT_RETRY_DELAY = 1.0
_RESOURCE_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class AcceptedSocket:
    """One accepted connection, owned by its handler until it is released or streamed."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._writer: asyncio.StreamWriter | None = None
        self._released = False

    async def streams(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """The connection as asyncio streams; from now on the transport owns the socket."""
        reader, writer = await asyncio.open_connection(sock=self.sock)
        self._writer = writer
        return reader, writer

    def release(self) -> socket.socket:
        """The socket, handed to a relay that owns it (and closes it) from now on."""
        self._released = True
        return self.sock

    def reset(self) -> None:
        """Close with RST (SO_LINGER 0), through whoever owns the socket now; nothing once a
        relay owns it (the relay resets its own)."""
        if self._writer is not None:
            reset(self._writer)
        elif not self._released:
            reset_socket(self.sock)


Handler = Callable[[AcceptedSocket], Coroutine[Any, Any, None]]


class SocketListener:
    """Accepts on `listener` (non-blocking, listening) and spawns `handle` for each
    connection; close() stops accepting and closes the listener. Connections already handed
    out are their handlers' (and the pod's drain's) to end."""

    def __init__(
        self,
        listener: socket.socket,
        handle: Handler,
        spawn: Callable[[Coroutine[Any, Any, None]], object],
    ) -> None:
        self._sock = listener
        self._fd = listener.fileno()
        self._handle = handle
        self._spawn = spawn
        self._loop = asyncio.get_running_loop()
        self._retry: asyncio.TimerHandle | None = None
        self._closed = False
        self._loop.add_reader(self._fd, self._accept)

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _RESOURCE_ERRORS:
                    log.error("cannot accept connections; retrying", error=str(exc),
                              retry_in=ACCEPT_RETRY_DELAY)  # fmt: skip
                    self._loop.remove_reader(self._fd)
                    self._retry = self._loop.call_later(ACCEPT_RETRY_DELAY, self._resume)
                # Anything else (ECONNABORTED: the client gave up in the backlog) concerns
                # that one connection only.
                return
            conn.setblocking(False)
            self._spawn(self._handle(AcceptedSocket(conn)))

    def _resume(self) -> None:
        self._retry = None
        if not self._closed:
            self._loop.add_reader(self._fd, self._accept)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._retry is not None:
            self._retry.cancel()
        # Before the close, as asyncio's servers do: a closed fd's number is soon another's.
        self._loop.remove_reader(self._fd)
        self._sock.close()
