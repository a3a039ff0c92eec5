"""Handlers for the three in-pod listeners.

- 15001 (outbound): a connection the pod opened, captured by pod_egress. Its local address
  is the original destination. Until the HBONE tunnel lands it is passed through as plain
  TCP from inside the pod netns (what ztunnel does for destinations outside the mesh).
- 15006 (inbound plaintext): a connection to the pod's app, captured by pod_ingress; the
  agent connects to the app with the client's own address as source (IP_TRANSPARENT).
- 15008 (HBONE): mTLS + HTTP/2 CONNECT termination, not in this version; refused plainly.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Protocol

import structlog

from agent.inpod import sockets
from agent.inpod.netns import NetnsWorker
from agent.proxy.relay import SocketStream, relay, reset

log = structlog.get_logger("agent.proxy")

CONNECT_TIMEOUT = 10.0


class PodContext(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def namespace(self) -> str: ...
    @property
    def worker(self) -> NetnsWorker: ...


@dataclass(frozen=True, slots=True)
class Endpoints:
    src: tuple[str, int]
    dst: tuple[str, int]

    @classmethod
    def of(cls, writer: asyncio.StreamWriter) -> Endpoints:
        peer = writer.get_extra_info("peername")
        local = writer.get_extra_info("sockname")
        return cls((peer[0], peer[1]), (local[0], local[1]))


def _addr(endpoint: tuple[str, int]) -> str:
    return f"{endpoint[0]}:{endpoint[1]}"


async def _connect(
    worker: NetnsWorker, dst: tuple[str, int], source: tuple[str, int] | None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    sock = await worker.run(sockets.upstream, source)
    try:
        loop = asyncio.get_running_loop()
        await asyncio.wait_for(loop.sock_connect(sock, dst), CONNECT_TIMEOUT)
    except BaseException:
        sock.close()
        raise
    return await asyncio.open_connection(sock=sock)


async def _pass_through(
    pod: PodContext,
    direction: str,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    transparent_source: bool,
) -> None:
    ends = Endpoints.of(writer)
    fields = {
        "direction": direction,
        "pod": f"{pod.namespace}/{pod.name}",
        "src.addr": _addr(ends.src),
        "dst.addr": _addr(ends.dst),
    }
    log.info("connection captured", **fields)
    started = time.monotonic()
    try:
        up_reader, up_writer = await _connect(
            pod.worker, ends.dst, ends.src if transparent_source else None
        )
    except (OSError, TimeoutError) as exc:
        log.warning("upstream connect failed", error=str(exc) or type(exc).__name__, **fields)
        reset(writer)
        return
    sent = received = 0
    error = None
    try:
        sent, received = await relay(
            SocketStream(reader, writer), SocketStream(up_reader, up_writer)
        )
    except (ConnectionError, OSError) as exc:
        error = str(exc)
    log.info(
        "connection complete",
        bytes_sent=sent,
        bytes_recv=received,
        duration_ms=round((time.monotonic() - started) * 1000, 3),
        error=error,
        **fields,
    )


async def handle_outbound(
    pod: PodContext, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    await _pass_through(pod, "outbound", reader, writer, transparent_source=False)


async def handle_inbound(
    pod: PodContext, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    await _pass_through(pod, "inbound", reader, writer, transparent_source=True)


async def handle_hbone(
    pod: PodContext, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    ends = Endpoints.of(writer)
    log.warning(
        "hbone connection refused: tunnel termination is not in this version",
        pod=f"{pod.namespace}/{pod.name}",
        **{"src.addr": _addr(ends.src), "dst.addr": _addr(ends.dst)},
    )
    reset(writer)
