"""The thin shell around the kernel's telemetry ring buffer: one thread polls it and hands
each batch of decoded records to the event loop in a single call."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Protocol

import structlog

from agent.telemetry.events import EventError, SocketClosed, decode

log = structlog.get_logger("agent.telemetry")

POLL_MS = 100  # also how long stop() may wait for the thread


class TelemetryRing(Protocol):
    def open_telemetry_ring(self, on_event: Callable[[bytes], None]) -> None: ...
    def poll_rings(self, timeout_ms: int) -> None: ...


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
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="telemetry-ring", daemon=True)
        self.malformed = 0

    def start(self) -> None:
        self._ring.open_telemetry_ring(self._record)
        self._thread.start()

    def stop(self) -> None:
        """Stop polling; records still in the ring are read once more first."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _record(self, raw: bytes) -> None:
        try:
            self._batch.append(decode(raw))
        except EventError as exc:
            self.malformed += 1
            log.error("telemetry record dropped", error=str(exc))

    def _run(self) -> None:
        while True:
            stopping = self._stop.is_set()
            self._ring.poll_rings(0 if stopping else POLL_MS)
            if self._batch:
                batch, self._batch = self._batch, []
                try:
                    self._loop.call_soon_threadsafe(self._on_batch, batch)
                except RuntimeError:  # the loop closed under us: nobody left to tell
                    return
            if stopping:
                return
