"""The thin shell around the kernel's telemetry ring buffer: the event loop watches the
ring's epoll fd and, when records wait, reads them all and hands them on as one batch.

No thread: the records are read on the loop itself, so nothing contends for the GIL with the
proxy (a polling thread measured about 17% fewer new connections per second). The kernel
wakes a reader only when the ring was empty, so under load one wake-up reads many records.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

import structlog

from agent.telemetry.events import EventError, SocketClosed, decode

log = structlog.get_logger("agent.telemetry")


class TelemetryRing(Protocol):
    def open_telemetry_ring(self, on_event: Callable[[bytes], None]) -> int: ...
    def consume_rings(self) -> None: ...


class RingReader:
    def __init__(
        self,
        ring: TelemetryRing,
        on_batch: Callable[[list[SocketClosed]], None],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self._ring = ring
        self._on_batch = on_batch
        self._loop = loop
        self._batch: list[SocketClosed] = []
        self._fd: int | None = None
        self.malformed = 0

    def start(self) -> None:
        self._fd = self._ring.open_telemetry_ring(self._record)
        self._loop.add_reader(self._fd, self.read)

    def stop(self) -> None:
        """Stop watching; the records still in the ring are read once more first."""
        if self._fd is not None:
            self._loop.remove_reader(self._fd)
            self._fd = None
            self.read()

    def read(self) -> None:
        self._ring.consume_rings()
        if self._batch:
            batch, self._batch = self._batch, []
            self._on_batch(batch)

    def _record(self, raw: bytes) -> None:
        try:
            self._batch.append(decode(raw))
        except EventError as exc:
            self.malformed += 1
            log.error("telemetry record dropped", error=str(exc))
