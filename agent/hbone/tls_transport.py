"""An asyncio transport for HBONE's TLS: OpenSSL reads and writes the socket itself.

asyncio's own TLS (`ssl=` on create_connection/create_server) runs OpenSSL over memory BIOs:
every byte is copied into a BIO, decrypted out of it, and joined again in Python, with several
Python calls per 16 KiB record. Here the socket is a non-blocking `ssl.SSLSocket` watched by
the event loop: a readable socket is drained record by record into one buffer that goes to the
protocol in a single call, and a write is encrypted straight onto the socket. On this 2-vCPU
machine that was most of the agents' CPU per byte after the HTTP/2 framing
(docs/performance.md).

The protocol sees the usual asyncio.Protocol calls: connection_made after the handshake,
data_received, pause_writing/resume_writing around a write buffer past HIGH_WATER, and
connection_lost once. `get_extra_info("ssl_object")` is the SSLSocket, for the peer's
certificate.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import socket
import ssl
from collections.abc import Callable
from typing import Any

# One readable event takes at most this much (then lets other callbacks run).
READ_BATCH = 256 * 1024
HIGH_WATER = 1024 * 1024
LOW_WATER = 256 * 1024
# After close(), how long the peer has to finish (its FIN) while we discard what it sends.
CLOSE_LINGER = 5.0

ProtocolFactory = Callable[[], asyncio.Protocol]


class TlsTransport(asyncio.Transport):
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: ssl.SSLSocket,
        protocol: asyncio.Protocol,
        peername: Any = None,
    ) -> None:
        super().__init__()
        self._loop = loop
        self._sock = sock
        self._fd = sock.fileno()
        self._protocol = protocol
        self._peername = peername or _peername(sock)
        self._buffer: collections.deque[bytes | memoryview] = collections.deque()
        self._buffered = 0
        self._read_into = bytearray(READ_BATCH)
        self._reading = False
        self._writing = False
        self._write_paused = False
        self._closing = False
        self._draining = False  # our FIN is sent: what arrives now is read and dropped
        self._closed = False

    def start(self) -> None:
        self._protocol.connection_made(self)
        if not self._closing:
            self.resume_reading()

    # -- asyncio.Transport -------------------------------------------------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name in ("socket", "ssl_object"):
            return self._sock
        if name == "peername":
            return self._peername
        if name == "sockname":
            with contextlib.suppress(OSError):
                return self._sock.getsockname()
        return default

    def is_closing(self) -> bool:
        return self._closing

    def is_reading(self) -> bool:
        return self._reading

    def pause_reading(self) -> None:
        if self._reading and not self._closed:
            self._loop.remove_reader(self._fd)
            self._reading = False

    def resume_reading(self) -> None:
        if self._reading or self._closing:
            return
        self._reading = True
        self._loop.add_reader(self._fd, self._read_ready)
        # OpenSSL may hold bytes (decrypted, or read ahead) the socket will not signal again.
        self._loop.call_soon(self._read_ready)

    def get_write_buffer_size(self) -> int:
        return self._buffered

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or not data:
            return
        view = memoryview(data)
        if not self._buffer:
            try:
                while view:
                    view = view[self._sock.send(view) :]
                return
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
                # OpenSSL wants this same buffer back when the socket takes more.
                pass
            except (OSError, ssl.SSLError) as exc:
                self._write_failed(exc)
                return
        self._buffer.append(view)
        self._buffered += len(view)
        if not self._writing:
            self._writing = True
            self._loop.add_writer(self._fd, self._write_ready)
        if self._buffered > HIGH_WATER and not self._write_paused:
            self._write_paused = True
            self._protocol.pause_writing()

    def can_write_eof(self) -> bool:
        return False

    def close(self) -> None:
        """No more writes or data_received; what is buffered is written, then our FIN.

        The socket is closed only once the peer's FIN arrives (or CLOSE_LINGER passes): closed
        with bytes unread (a TLS session ticket, a last frame) the kernel would send a reset,
        and the peer could lose what we wrote last."""
        if self._closing:
            return
        self._closing = True
        self.pause_reading()
        if not self._buffer:
            self._loop.call_soon(self._shut_down)

    def _shut_down(self) -> None:
        if self._closed or self._draining:
            return
        try:
            # socket.socket's own: SSLSocket.shutdown() would drop the TLS session first.
            socket.socket.shutdown(self._sock, socket.SHUT_WR)
        except OSError:
            self._finish(None)
            return
        self._draining = True
        if not self._reading:
            self._reading = True
            self._loop.add_reader(self._fd, self._read_ready)
        self._loop.call_later(CLOSE_LINGER, self._finish, None)

    def abort(self) -> None:
        self._closing = True
        self._finish(None)

    # -- events ------------------------------------------------------------------------------

    def _read_ready(self) -> None:
        if not self._reading or self._closed:
            return
        if self._read_batch() and self._reading:
            self._loop.call_soon(self._read_ready)  # more may be waiting in OpenSSL

    def _read_batch(self) -> bool:
        """Read what is there, up to READ_BATCH, and hand it on in one call. True when the
        batch filled up (more may be waiting)."""
        buffer, got = memoryview(self._read_into), 0
        if self._draining:
            self._discard(buffer)
            return False
        eof = False
        try:
            while got < READ_BATCH:
                n = self._sock.recv_into(buffer[got:])
                if n == 0:
                    eof = True
                    break
                got += n
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
            pass
        except (OSError, ssl.SSLError) as exc:
            if got:
                self._protocol.data_received(bytes(buffer[:got]))
            self._fatal(exc)
            return False
        if got:
            # A copy: the Data events the protocol makes are views of these bytes.
            self._protocol.data_received(bytes(buffer[:got]))
        if eof and not self._closed:
            self._closing = True
            self._finish(None)
        return got >= READ_BATCH

    def _write_ready(self) -> None:
        while self._buffer:
            head = self._buffer[0]
            try:
                sent = self._sock.send(head)
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
                return
            except (OSError, ssl.SSLError) as exc:
                self._write_failed(exc)
                return
            self._buffered -= sent
            if sent < len(head):
                self._buffer[0] = memoryview(head)[sent:]
                continue
            self._buffer.popleft()
            if self._write_paused and self._buffered <= LOW_WATER:
                self._write_paused = False
                self._protocol.resume_writing()
        self._loop.remove_writer(self._fd)
        self._writing = False
        if self._closing:
            self._shut_down()

    def _discard(self, buffer: memoryview) -> None:
        try:
            for _ in range(16):  # a batch, then back to the loop: a peer may keep sending
                if not self._sock.recv_into(buffer):
                    break
            else:
                return
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
            return
        except (OSError, ssl.SSLError):
            pass
        self._finish(None)  # the peer's FIN, or it is gone

    def _write_failed(self, exc: BaseException) -> None:
        """The peer is gone (EPIPE, a reset). What it sent before is still read and handed
        on (a flood is still counted as one), and the read side ends the connection."""
        self._closing = True
        self._buffer.clear()
        self._buffered = 0
        if self._writing:
            self._loop.remove_writer(self._fd)
            self._writing = False
        self._loop.call_soon(self._last_read, exc)

    def _last_read(self, exc: BaseException) -> None:
        if not self._closed:
            self._read_batch()
        self._finish(exc)

    def _fatal(self, exc: BaseException) -> None:
        self._closing = True
        self._finish(exc)

    def _finish(self, exc: BaseException | None) -> None:
        if self._closed:
            return
        self._closed = True
        if self._reading:
            self._loop.remove_reader(self._fd)
            self._reading = False
        if self._writing:
            self._loop.remove_writer(self._fd)
            self._writing = False
        self._buffer.clear()
        self._buffered = 0
        with contextlib.suppress(OSError, ValueError):
            self._sock.close()
        # Never from inside a protocol call (as asyncio's transports).
        self._loop.call_soon(
            self._protocol.connection_lost, exc if isinstance(exc, Exception) else None
        )


def _peername(sock: socket.socket) -> Any:
    try:
        return sock.getpeername()
    except OSError:
        return None


async def _handshake(sock: ssl.SSLSocket, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    fd = sock.fileno()

    async def wait(add: Callable[..., None], remove: Callable[[int], object]) -> None:
        ready: asyncio.Future[None] = loop.create_future()

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        add(fd, wake)
        try:
            await ready
        finally:
            remove(fd)

    async def run() -> None:
        while True:
            try:
                sock.do_handshake()
                return
            except ssl.SSLWantReadError:
                await wait(loop.add_reader, loop.remove_reader)
            except ssl.SSLWantWriteError:
                await wait(loop.add_writer, loop.remove_writer)

    await asyncio.wait_for(run(), timeout)


async def connect(
    sock: socket.socket, context: ssl.SSLContext, factory: ProtocolFactory, timeout: float
) -> tuple[TlsTransport, asyncio.Protocol]:
    """TLS client over a connected socket: handshake, then the protocol starts. The socket is
    closed if the handshake fails."""
    sock.setblocking(False)
    tls = context.wrap_socket(sock, server_hostname=None, do_handshake_on_connect=False)
    try:
        await _handshake(tls, timeout)
    except BaseException:
        tls.close()
        raise
    protocol = factory()
    transport = TlsTransport(asyncio.get_running_loop(), tls, protocol)
    transport.start()
    return transport, protocol


class TlsServer:
    """Accepts on a listening socket, handshakes each connection (each within `timeout`), and
    hands it to a new protocol from `factory`. A failed handshake closes that connection."""

    def __init__(
        self,
        listener: socket.socket,
        context: ssl.SSLContext,
        factory: ProtocolFactory,
        timeout: float,
        spawn: Callable[[Any], object],
    ) -> None:
        self._listener = listener
        self._context = context
        self._factory = factory
        self._timeout = timeout
        self._spawn = spawn
        listener.setblocking(False)
        self._accepting = asyncio.ensure_future(self._accept())

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, peername = await loop.sock_accept(self._listener)
            except OSError:
                if self._listener.fileno() < 0:
                    return
                await asyncio.sleep(0.1)  # EMFILE and the like: try again shortly
                continue
            self._spawn(self._serve(sock, peername))

    async def _serve(self, sock: socket.socket, peername: Any) -> None:
        sock.setblocking(False)
        try:
            tls = self._context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        except (OSError, ssl.SSLError):
            sock.close()
            return
        try:
            await _handshake(tls, self._timeout)
        except (OSError, ssl.SSLError, TimeoutError):
            tls.close()
            return
        except BaseException:
            tls.close()
            raise
        TlsTransport(asyncio.get_running_loop(), tls, self._factory(), peername).start()

    def close(self) -> None:
        """Stop accepting; connections already made go on."""
        self._accepting.cancel()
        self._listener.close()
