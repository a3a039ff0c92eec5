"""A worker thread that lives inside one network namespace.

setns(2) changes the namespace of the calling thread only, and a socket stays in the
namespace it was created in. So the agent keeps one thread per pod inside that pod's netns,
creates the pod's sockets there, and uses them from the event loop in the host netns.
Python 3.11 has no os.setns, hence ctypes.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import os
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

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        os.close(self._fd)
