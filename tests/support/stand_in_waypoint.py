"""A stand-in waypoint for lab tests of how node agents route to waypoints, until the real
one (`ambient-agent waypoint`, Envoy) exists: our own HBONE server in the waypoint pod's
netns, with the waypoint's certificate from the lab's CA. It records each CONNECT (its
`:authority` and the client's verified identity) and relays it as plain TCP, from the
waypoint pod, to where `backend(authority)` says.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from agent.hbone import protocol as p
from agent.hbone.connection import HboneConnection, HboneStream
from agent.identity import tls
from agent.identity.ca import CertificateAuthority
from agent.identity.manager import WorkloadCertificate
from agent.identity.spiffe import SpiffeId
from agent.inpod import sockets
from agent.netns import NetnsWorker
from agent.proxy.relay import SocketStream, relay

Endpoint = tuple[str, int]


@dataclass(frozen=True)
class Tunnel:
    authority: str
    peer: SpiffeId | None


class StandInWaypoint:
    def __init__(
        self,
        netns: Path,
        ca_dir: Path,
        identity: SpiffeId,
        backend: Callable[[str], Endpoint],
    ) -> None:
        ca = CertificateAuthority.load_or_create(ca_dir, identity.trust_domain)
        key = ec.generate_private_key(ec.SECP256R1())
        cert = WorkloadCertificate(
            identity, key, [ca.issue(identity, key.public_key(), timedelta(hours=1)), ca.root]
        )
        self._context = tls.server_context(cert, ca.root_pem)
        self._trust_domain = identity.trust_domain
        self._backend = backend
        self._worker = NetnsWorker(str(netns))
        self.tunnels: list[Tunnel] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._tasks: set[asyncio.Future[Any]] = set()
        self._conns: set[HboneConnection] = set()
        self._server: asyncio.Server | None = None

    def start(self) -> None:
        self._thread.start()
        listener = self._worker.call(lambda: sockets.listener(15008, False))
        asyncio.run_coroutine_threadsafe(self._serve(listener), self._loop).result(10)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
        self._worker.close()

    async def _serve(self, listener: socket.socket) -> None:
        self._server = await self._loop.create_server(
            self._connection, sock=listener, ssl=self._context, ssl_handshake_timeout=10
        )

    def _connection(self) -> HboneConnection:
        conn = HboneConnection(
            p.HboneServer(),
            on_tunnel=self._tunnel,
            spawn=self._spawn,
            verify_peer=self._verify,
            on_closed=self._conns.discard,
        )
        self._conns.add(conn)
        return conn

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _verify(self, ssl_object: ssl.SSLObject | None) -> SpiffeId:
        if ssl_object is None:
            raise tls.PeerIdentityError("not a TLS connection")
        return tls.verify_client_trust_domain(ssl_object, self._trust_domain)

    async def _tunnel(
        self, stream: HboneStream, request: p.TunnelRequested, conn: HboneConnection
    ) -> None:
        peer = conn.peer_identity
        self.tunnels.append(Tunnel(request.authority, peer if isinstance(peer, SpiffeId) else None))
        try:
            upstream = await self._worker.run(sockets.upstream)
            await asyncio.wait_for(
                self._loop.sock_connect(upstream, self._backend(request.authority)), 5
            )
            reader, writer = await asyncio.open_connection(sock=upstream)
        except (OSError, TimeoutError, KeyError):
            conn.refuse(stream, 503)
            return
        conn.accept(stream)
        with contextlib.suppress(ConnectionError, OSError):
            await relay(stream, SocketStream(reader, writer))

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns):
            conn.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


@contextlib.contextmanager
def stand_in_waypoint(
    netns: Path, ca_dir: Path, identity: SpiffeId, backend: Callable[[str], Endpoint]
) -> Iterator[StandInWaypoint]:
    waypoint = StandInWaypoint(netns, ca_dir, identity, backend)
    waypoint.start()
    try:
        yield waypoint
    finally:
        waypoint.stop()
