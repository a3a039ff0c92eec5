"""Pooled HBONE client connections.

A connection is shared by tunnels with the same key (as ztunnel: source identity, accepted
destination identities, destination address, source IP), up to 100 streams each; more
tunnels open more connections. A connection unused for IDLE_TIMEOUT is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog

from agent.hbone.connection import HboneConnection, HboneStream

log = structlog.get_logger("agent.hbone.pool")

IDLE_TIMEOUT = 300.0


@dataclass(frozen=True, slots=True)
class PoolKey:
    source_identity: str  # SPIFFE URI the client presents
    destination_identities: frozenset[str]  # SPIFFE URIs the server may present
    destination: tuple[str, int]  # ip, 15008
    source_ip: str


Dialer = Callable[[PoolKey], Awaitable[HboneConnection]]


class HboneClientPool:
    def __init__(self, dial: Dialer, idle_timeout: float = IDLE_TIMEOUT) -> None:
        self._dial = dial
        self._idle_timeout = idle_timeout
        self._connections: dict[PoolKey, list[HboneConnection]] = {}
        self._dialing: dict[PoolKey, asyncio.Lock] = {}
        self._reaper: asyncio.Task[None] | None = None

    def connections(self, key: PoolKey) -> list[HboneConnection]:
        live = [c for c in self._connections.get(key, []) if not c.closed]
        self._connections[key] = live
        return live

    def _pick(self, key: PoolKey) -> HboneConnection | None:
        for conn in self.connections(key):
            if conn.can_open_stream():
                return conn
        return None

    async def open_stream(
        self, key: PoolKey, authority: str, headers: dict[str, str]
    ) -> tuple[HboneStream, HboneConnection]:
        """A CONNECT sent on a pooled (or new) connection; its answer is the stream's
        `established` (HboneConnection.open_stream)."""
        if self._reaper is None:
            self._reaper = asyncio.ensure_future(self._reap_idle())
        conn = self._pick(key)
        if conn is None:
            # One dial per key at a time: tunnels that arrive together share it.
            async with self._dialing.setdefault(key, asyncio.Lock()):
                conn = self._pick(key)
                if conn is None:
                    conn = await self._dial(key)
                    self._connections.setdefault(key, []).append(conn)
        # open_stream() claims its stream slot at once, so the check above cannot be raced by
        # another tunnel on this event loop.
        return conn.open_stream(authority, headers), conn

    async def _reap_idle(self) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            while True:
                await asyncio.sleep(min(10.0, self._idle_timeout / 2))
                self.close_idle()

    def close_idle(self, older_than: float | None = None) -> int:
        """Close connections idle for `older_than` seconds (default: the idle timeout)."""
        limit = self._idle_timeout if older_than is None else older_than
        now = asyncio.get_running_loop().time()
        closed = 0
        for key in list(self._connections):
            for conn in self.connections(key):
                if conn.idle_since is not None and now - conn.idle_since >= limit:
                    conn.close()
                    closed += 1
            if not self.connections(key):
                del self._connections[key]
                self._dialing.pop(key, None)
        if closed:
            log.info("idle hbone connections closed", count=closed)
        return closed

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        for conns in self._connections.values():
            for conn in conns:
                conn.close()
        self._connections.clear()
