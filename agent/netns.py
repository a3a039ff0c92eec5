"""A worker thread that lives inside one network namespace.

setns(2) changes the namespace of the calling thread only, and a socket stays in the
namespace it was created in. So the agent keeps one thread per pod inside that pod's netns
for work done there (its listeners, lookups), and uses the sockets from the event loop in
the host netns. A new connection's TCP socket is made without that thread: the calling
thread enters the namespace for the socket() call alone (NetnsWorker.tcp_socket). Python
3.11 has no os.setns, hence ctypes.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import os
import socket
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _enter(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


class _Home(threading.local):
    """Each thread's own network namespace, opened once, to come back to (kept open for the
    thread's life: in the agent, the event loop's thread alone makes sockets this way)."""

    fd: int | None = None


_home = _Home()


class NetnsWorker:
    """Runs callables on a thread inside the network namespace at `path`."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise OSError(
                exc.errno, f"cannot open network namespace {path}: {exc.strerror}"
            ) from None
        self._executor = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix=f"netns:{path}",
            initializer=_enter,
            initargs=(self._fd,),
        )
        # Fail here, not on first use, if the thread could not enter the namespace.
        inside = self.call(lambda: os.stat("/proc/thread-self/ns/net").st_ino)
        if inside != os.fstat(self._fd).st_ino:
            self.close()
            raise OSError(f"worker thread did not enter network namespace {path}")

    def call(self, fn: Callable[[], T]) -> T:
        return self._executor.submit(fn).result()

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args))

    def tcp_socket(self) -> socket.socket:
        """A new IPv4 TCP socket of this namespace, made on the calling thread, which enters
        the namespace for the socket() call and comes back: two setns(2) calls (about 4 us
        here) instead of a hop to the worker thread (about 95 us of CPU and a wake-up), or a
        stock refilled on that thread, whose GIL hand-offs with the event loop cost a few
        futex waits per connection."""
        if _home.fd is None:
            _home.fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        _enter(self._fd)
        try:
            return _new_tcp_socket()
        finally:
            _return_home(_home.fd)

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        os.close(self._fd)


def _return_home(fd: int) -> None:
    try:
        _enter(fd)
    except OSError as exc:
        # The thread would go on making its sockets in a pod's namespace: nothing it does
        # after that can be trusted, so the process ends here (the DaemonSet restarts it).
        os.write(2, f"fatal: cannot return to the thread's network namespace: {exc}\n".encode())
        os._exit(70)


def _new_tcp_socket() -> socket.socket:
    return socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
