"""The in-pod proxy: serves every enrolled pod's three listeners, one handler per direction.

- 15001 outbound (agent/proxy/outbound.py): HBONE to mesh destinations, same-node delivery
  to this node's pods (agent/proxy/local_delivery.py), plain TCP elsewhere;
- 15006 inbound plaintext (agent/proxy/inbound.py);
- 15008 inbound HBONE (agent/proxy/inbound_hbone.py);
- with DNS capture, 15053 UDP DNS (agent/proxy/pod_dns.py; TCP DNS comes through 15001).

Every connection is reported to the telemetry (agent/telemetry/connections.py) under the
cookie of the agent's socket that faces the pod's app, so the kernel's byte counts for that
socket are the app's own; it ends with one "connection complete" access log line.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import socket
from collections.abc import Callable, Coroutine
from typing import Any

import structlog

from agent.datapath import abi
from agent.hbone import protocol as hbone
from agent.hbone.connection import HboneConnection, MemoryBudget, Refusals
from agent.hbone.pool import HboneClientPool
from agent.hbone.tls_transport import TlsServer
from agent.identity.manager import IdentityManager
from agent.identity.spiffe import SpiffeId
from agent.identity.tls import TlsSession
from agent.inpod.enrollment import Listening
from agent.policy.engine import PolicyEngine
from agent.policy.live import LiveConnection
from agent.proxy.app_connection import AGENT_POD_PORTS, AppConnector
from agent.proxy.inbound import InboundPlaintext
from agent.proxy.inbound_hbone import InboundHbone
from agent.proxy.live_inbound import LiveInbound
from agent.proxy.local_delivery import LocalDelivery
from agent.proxy.outbound import HANDSHAKE_TIMEOUT, Outbound
from agent.proxy.pod import Pod, identity_of
from agent.proxy.pod_dns import MeshNamesCache, PodDns
from agent.proxy.socket_listener import AcceptedSocket, SocketListener
from agent.proxy.socket_relay import SocketRelays
from agent.proxy.tls_contexts import TlsContexts
from agent.proxy.waypoint_bypass import WaypointBypasses
from agent.state.store import StateStore
from agent.telemetry.connections import ConnectionTelemetry
from agent.telemetry.events import socket_cookie

log = structlog.get_logger("agent.proxy")

SocketHandler = Callable[[Pod, AcceptedSocket], Coroutine[Any, Any, None]]


class InPodProxy:
    def __init__(
        self,
        store: StateStore,
        identities: IdentityManager,
        authorizer: PolicyEngine | None,
        telemetry: ConnectionTelemetry,
        dns_capture: bool = True,
        local_delivery: bool = True,
    ) -> None:
        """local_delivery: connections between two pods of this node go without HBONE
        (agent/proxy/local_delivery.py); off, they are tunnelled like any other."""
        self._identities = identities
        self._dns_capture = dns_capture
        self._dns: dict[str, PodDns] = {}
        self._names = MeshNamesCache(store)
        # Every pod's DNS queries, by reason (agent/dns/answer.py's Reason), for /metrics.
        self.dns_counts: collections.Counter[str] = collections.Counter()
        self.telemetry = telemetry
        self._pods_by_ip: dict[str, Pod] = {}
        self._hbone_connections: dict[str, set[HboneConnection]] = {}
        self._contexts = TlsContexts(identities)
        self._live = LiveInbound()
        # Shared by every HBONE connection of the agent, both directions.
        self.hbone_refusals = Refusals()
        self._budget = MemoryBudget()
        self.waypoint_bypasses = WaypointBypasses()
        self._relays = SocketRelays()
        # The destination side of a mesh connection, for HBONE tunnels and local delivery.
        connector = AppConnector(authorizer, telemetry, self.waypoint_bypasses)
        self._local = LocalDelivery(connector, telemetry, self._live, self._relays)
        local = self._local if local_delivery else None
        self._outbound = Outbound(store, self._contexts, telemetry, self._pods_by_ip.get,
                                  self.hbone_refusals, self._budget, self._dns.get,
                                  self._relays, local)  # fmt: skip
        self._inbound = InboundPlaintext(store, telemetry, self._live, self.waypoint_bypasses,
                                         self._relays)  # fmt: skip
        self._inbound_hbone = InboundHbone(store, self._contexts, connector, telemetry,
                                           self._live)  # fmt: skip

    @property
    def vip_refusals(self) -> collections.Counter[str]:
        return self._outbound.vip_refusals

    @property
    def waypoint_skipped(self) -> collections.Counter[str]:
        return self._outbound.waypoint_skipped

    @property
    def pool(self) -> HboneClientPool:
        return self._outbound.pool

    @property
    def local_deliveries(self) -> collections.Counter[str]:
        """Same-node connections delivered without HBONE, by outcome (for /metrics)."""
        return self._local.counts

    @property
    def socket_relays(self) -> collections.Counter[str]:
        """Relays between plain sockets started, by mode: splice, copy, asyncio (past the
        threads' cap), for /metrics."""
        return self._relays.started

    async def serve(self, pod: Pod, listeners: dict[int, socket.socket]) -> list[Listening]:
        """Start serving the pod's three listeners (created in its netns by enrollment)."""
        workload = pod.workload
        cert = await self._identities.get(identity_of(workload))
        self._contexts.ensure(cert)
        for ip in workload.ips:
            self._pods_by_ip[ip] = pod
        conns = self._hbone_connections.setdefault(workload.uid, set())

        def take(handler: SocketHandler) -> Callable[[AcceptedSocket], Coroutine[Any, Any, None]]:
            return lambda client: _guarded(handler(pod, client), client.reset)

        def hbone_connection() -> HboneConnection:
            def verify_client(ssl_object: TlsSession | None) -> SpiffeId:
                if (sock := conn.socket()) is not None:
                    self.telemetry.track_tunnel(socket_cookie(sock), "inbound")
                return self._inbound_hbone.verify_client(ssl_object)

            conn = HboneConnection(
                hbone.HboneServer(refused_ports=AGENT_POD_PORTS),
                on_tunnel=lambda stream, request, c: _guarded(
                    self._inbound_hbone.tunnel(pod, stream, request, c), stream.reset
                ),
                spawn=pod.spawn,
                verify_peer=verify_client,
                on_closed=conns.discard,
                refusals=self.hbone_refusals,
                budget=self._budget,
            )
            conns.add(conn)
            return conn

        outbound = listeners[abi.PORT_OUTBOUND]
        inbound = listeners[abi.PORT_INBOUND]
        if self._dns_capture and workload.uid not in self._dns:
            self._dns[workload.uid] = await PodDns.start(pod, self._names, self.dns_counts)
        return [
            # Sockets as accepted: the route is decided before anything is read from one,
            # and the relays take them as they are.
            SocketListener(outbound, take(self._outbound.handle), pod.spawn),
            SocketListener(inbound, take(self._inbound.handle), pod.spawn),
            TlsServer(listeners[abi.PORT_HBONE], self._contexts.server(workload.uid, cert),
                      hbone_connection, HANDSHAKE_TIMEOUT, pod.spawn),
        ]  # fmt: skip

    async def change_identity(self, pod: Pod) -> None:
        """pod.workload now names another identity (same netns and addresses): its listener
        presents the new certificate to new handshakes; live tunnels keep theirs."""
        cert = await self._identities.get(identity_of(pod.workload))
        self._contexts.ensure(cert)
        self._contexts.server(pod.workload.uid, cert)

    def release(self, pod: Pod) -> None:
        """The pod is gone from this node: close its tunnels and forget it."""
        for ip in pod.workload.ips:
            if self._pods_by_ip.get(ip) is pod:
                del self._pods_by_ip[ip]
        for conn in self._hbone_connections.pop(pod.workload.uid, set()):
            conn.close()
        if (dns := self._dns.pop(pod.workload.uid, None)) is not None:
            dns.close()
        self._contexts.release(pod.workload.uid)

    async def close(self) -> None:
        await self._outbound.pool.close()
        self._relays.close()

    def live_connections(self) -> list[LiveConnection]:
        return self._live.all()


async def _guarded(handler: Coroutine[Any, Any, None], reset_peer: Callable[[], None]) -> None:
    """A bug in a handler must not leave the pod's connection (or the tunnel's stream)
    hanging: log it, reset it."""
    try:
        await handler
    except asyncio.CancelledError:
        _reset_quietly(reset_peer)
        raise
    except Exception:
        log.exception("connection handler failed")
        _reset_quietly(reset_peer)


def _reset_quietly(reset_peer: Callable[[], None]) -> None:
    # The peer may be gone already (a closed stream or socket): nothing left to tell it.
    with contextlib.suppress(Exception):
        reset_peer()
