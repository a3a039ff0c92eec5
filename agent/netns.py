"""A worker thread that lives inside one network namespace.

setns(2) changes the namespace of the calling thread only, and a socket stays in the
namespace it was created in. So the agent keeps one thread per pod inside that pod's netns,
creates the pod's sockets there, and uses them from the event loop in the host netns.
Python 3.11 has no os.setns, hence ctypes.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import functools
import os
import socket
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
# TCP sockets kept made in the namespace: a new connection takes one without a hop to the
# worker thread (about 95 us of CPU and a thread wake-up, against 5 us for the socket).
# Refilled when half gone: one wake-up of the thread per SOCKET_STOCK / 2 connections.
SOCKET_STOCK = 8
_libc = ctypes.CDLL(None, use_errno=True)


def _enter(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


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
        self._stock: collections.deque[socket.socket] = collections.deque()
        self._refilling = False
        self._closed = False
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

    async def tcp_socket(self) -> socket.socket:
        """A new IPv4 TCP socket of this namespace, from the stock when there is one (the
        stock is refilled on the worker thread, off the caller's path)."""
        try:
            sock = self._stock.popleft()
        except IndexError:
            sock = await self.run(_new_tcp_socket)
        if len(self._stock) <= SOCKET_STOCK // 2 and not self._refilling and not self._closed:
            self._refilling = True
            self._executor.submit(self._refill)
        return sock

    def _refill(self) -> None:
        try:
            while len(self._stock) < SOCKET_STOCK and not self._closed:
                self._stock.append(_new_tcp_socket())
        finally:
            self._refilling = False

    def close(self) -> None:
        self._closed = True
        self._executor.shutdown(wait=True)
        while self._stock:
            with contextlib.suppress(OSError):
                self._stock.popleft().close()
        os.close(self._fd)


def _new_tcp_socket() -> socket.socket:
    return socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
