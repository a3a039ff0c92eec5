"""What the proxy needs of an enrolled pod, and connections made from inside it."""

from __future__ import annotations

import asyncio
import functools
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
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(CONNECT_TIMEOUT):  # no task per connect, as wait_for
            await loop.sock_connect(sock, dst)
    except BaseException:
        sock.close()
        raise
    return sock
