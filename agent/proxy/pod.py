"""What the proxy needs of an enrolled pod, and connections made from inside it."""

from __future__ import annotations

import asyncio
import errno
import functools
import os
import socket
from collections.abc import Coroutine
from typing import Any, Protocol

from agent.identity.spiffe import SpiffeId
from agent.inpod import sockets
from agent.netns import NetnsWorker
from agent.state.workload import Workload

CONNECT_TIMEOUT = 10.0


class Pod(Protocol):
    """An enrolled pod, as the proxy sees it (agent/inpod/enrollment.py's EnrolledPod)."""

    @property
    def workload(self) -> Workload: ...
    @property
    def worker(self) -> NetnsWorker: ...
    def spawn(self, coro: Coroutine[Any, Any, None]) -> object: ...


def identity_of(workload: Workload) -> SpiffeId:
    return _identity(workload.trust_domain, workload.namespace, workload.service_account)


@functools.lru_cache(maxsize=4096)
def _identity(trust_domain: str, namespace: str, service_account: str) -> SpiffeId:
    # Several times per connection, and a SpiffeId checks every part as it is made.
    return SpiffeId(trust_domain, namespace, service_account)


async def connect_from(
    worker: NetnsWorker, dst: tuple[str, int], source_ip: str | None = None
) -> socket.socket:
    """A connected agent socket inside the pod's netns; with source_ip, bound to that
    (foreign) address so the peer sees the original client."""
    sock = sockets.new_upstream(worker, (source_ip, 0) if source_ip else None)
    try:
        await connect_socket(sock, dst)
    except BaseException:
        sock.close()
        raise
    return sock


async def connect_socket(sock: socket.socket, dst: tuple[str, int]) -> None:
    """Connect the non-blocking `sock` to `dst`, raising as socket.connect() does (the
    kernel's denial in agent_connect4 is PermissionError), or TimeoutError after
    CONNECT_TIMEOUT. To an address of the socket's own netns (a pod's app, from the socket
    made in its netns) the handshake, or the refusal, runs over loopback inside connect()
    itself: it is over when connect() says EINPROGRESS, and waiting for the socket to be
    writable would cost two turns of the event loop for nothing. Elsewhere that check costs
    two system calls before the wait."""
    try:
        sock.connect(dst)
        return
    except (BlockingIOError, InterruptedError):  # under way (EINTR too: PEP 475's note)
        pass
    if _connect_over(sock):
        return
    loop = asyncio.get_running_loop()
    writable: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()
    loop.add_writer(fd, _settle, writable)
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT):  # no task per connect, as wait_for
            await writable
    finally:
        loop.remove_writer(fd)
    if not _connect_over(sock):
        raise OSError(errno.ENOTCONN, "writable but not connected")


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _connect_over(sock: socket.socket) -> bool:
    """True once the connect succeeded; its error if it failed; False while in progress."""
    if err := sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
        raise OSError(err, os.strerror(err))
    try:
        sock.getpeername()
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            return False
        raise
    return True
