"""15001, outbound: what an enrolled pod's app connects to.

The connection's local address is its original destination, which agent/proxy/destination.py
turns into a route: a Service VIP becomes one of its ready endpoints (pod IP:targetPort), or
a refusal. A destination in the mesh (a workload with protocol HBONE) is reached through
HBONE: mutual TLS with the source pod's certificate to the destination's 15008, the
destination's identity checked, CONNECT to ip:port. A destination pod this agent has
enrolled itself (on this node), reached directly (not through a waypoint), gets no tunnel:
agent/proxy/local_delivery.py does what the destination side of one would, and relays plain
bytes. Anything else is passed through as plain TCP from inside the pod netns, as ztunnel
does for destinations outside the mesh; pass-through uses the threaded socket relay
(agent/proxy/socket_relay.py).

The listener hands over connections as accepted sockets (agent/proxy/socket_listener.py):
the route is decided before anything is read, so a relay can take the socket as it is
(agent/proxy/tunnel_relay.py for HBONE), and the DNS path makes asyncio streams of it.
"""

from __future__ import annotations

import asyncio
import collections
import os
import ssl
from collections.abc import Callable

import structlog

from agent.hbone import protocol as hbone
from agent.hbone import tls_transport
from agent.hbone.connection import HboneConnection, MemoryBudget, Refusals, TunnelRefused
from agent.hbone.pool import HboneClientPool, PoolKey
from agent.identity import tls
from agent.identity.spiffe import SpiffeId
from agent.proxy import report
from agent.proxy.destination import EndpointPicker, Refused, Route, route
from agent.proxy.local_delivery import ROUTE as LOCAL_ROUTE
from agent.proxy.local_delivery import LocalDelivery
from agent.proxy.pod import Pod, connect_from, identity_of
from agent.proxy.pod_dns import PodDns
from agent.proxy.relay import DRAINED
from agent.proxy.socket_listener import AcceptedSocket
from agent.proxy.socket_relay import SocketRelays
from agent.proxy.tls_contexts import TlsContexts
from agent.proxy.tunnel_relay import TunnelRelay
from agent.state.store import StateStore
from agent.state.waypoint import Waypoint
from agent.state.workload import Workload
from agent.telemetry.connections import ConnectionTelemetry, PolicyVerdict, TrackedConnection
from agent.telemetry.events import socket_cookie
from agent.telemetry.istio_labels import Reporter, dataplane_mode

log = structlog.get_logger("agent.proxy")

HANDSHAKE_TIMEOUT = 10.0
DNS_PORT = 53


class Outbound:
    def __init__(
        self,
        store: StateStore,
        contexts: TlsContexts,
        telemetry: ConnectionTelemetry,
        pod_by_ip: Callable[[str], Pod | None],
        refusals: Refusals,
        budget: MemoryBudget,
        dns_of: Callable[[str], PodDns | None],
        relays: SocketRelays,
        local: LocalDelivery | None,
    ) -> None:
        """dns_of: a pod's DNS proxy by uid, when its DNS is captured (TCP to port 53);
        relays: for pass-through; local: same-node delivery (None: HBONE to every mesh
        destination, this node's pods included)."""
        self._store = store
        self._contexts = contexts
        self._telemetry = telemetry
        self._pod_by_ip = pod_by_ip
        self._refusals = refusals
        self._budget = budget
        self._dns_of = dns_of
        self._relays = relays
        self._local = local
        self.pool = HboneClientPool(self._dial)
        self._picker = EndpointPicker()
        # Connections to a VIP refused before any upstream was tried, by reason (/metrics).
        self.vip_refusals: collections.Counter[str] = collections.Counter()
        # Connections that went direct because their bound waypoint was not ready, by
        # waypoint (for /metrics).
        self.waypoint_skipped: collections.Counter[str] = collections.Counter()

    async def handle(self, pod: Pod, client: AcceptedSocket) -> None:
        try:
            src, dst = report.socket_endpoints(client.sock)
        except OSError:  # reset by the app while it waited in the backlog: nothing to serve
            client.reset()
            return
        if dst[1] == DNS_PORT and (dns := self._dns_of(pod.workload.uid)) is not None:
            await dns.handle_tcp(*await client.streams(), dst)  # answered here, as UDP DNS is
            return
        state = self._store.current
        decided = route(state, dst, self._picker, pod.workload)
        if isinstance(decided, Refused):
            self._refuse(pod, client, src, dst, decided)
            return
        if decided.skipped is not None:
            self._skipped_waypoint(pod, src, dst, decided.skipped)
        target, upstream, tunnelled = decided.workload, decided.upstream, decided.tunnelled
        via_waypoint = decided.waypoint is not None
        report.captured(pod, "outbound", src, dst, dataplane_mode(tunnelled, target, via_waypoint))
        local = local_destination(decided, self._pod_by_ip) if self._local else None
        hbone = decided.hbone_address if tunnelled and local is None else None
        conn = self._telemetry.open(socket_cookie(client.sock), report.connection_report(
            state, Reporter.SOURCE, tunnelled,
            (report.address(src), pod.workload, identity_of(pod.workload).uri),
            (report.address(upstream), upstream[1], target,
             identity_of(target).uri if target and tunnelled else None),
            {"dst.hbone_addr": report.address(hbone) if hbone else None,
             "dst.vip": report.address(dst) if decided.by_vip else None,
             "dst.waypoint": decided.waypoint.key if decided.waypoint else None},
            service=decided.service, via_waypoint=via_waypoint,
            route=LOCAL_ROUTE if local is not None else None,
        ))  # fmt: skip
        if local is not None and self._local is not None:
            await self._local.deliver(state, pod, local, client, src, upstream, conn)
        elif target is not None and hbone is not None:
            await self._tunnel(pod, target, client, src, upstream, hbone, conn)
        else:
            await self._pass_through(pod, client, upstream, conn)

    def _skipped_waypoint(
        self, pod: Pod, src: report.Endpoint, dst: report.Endpoint, waypoint: Waypoint
    ) -> None:
        """L7 was asked for and will not happen: say so loudly (deep guide §20)."""
        self.waypoint_skipped[waypoint.key] += 1
        log.warning("waypoint not ready: connection goes direct, without L7",
                    waypoint=waypoint.key, pod=pod.workload.key, **{"src.addr": report.address(src),
                    "dst.addr": report.address(dst)})  # fmt: skip

    def _refuse(
        self,
        pod: Pod,
        client: AcceptedSocket,
        src: report.Endpoint,
        dst: report.Endpoint,
        refused: Refused,
    ) -> None:
        """A VIP the mesh knows but cannot route: reset, never passed through as it is."""
        cookie = socket_cookie(client.sock)  # before the reset closes it
        client.reset()
        self.vip_refusals[refused.reason.value] += 1
        state = self._store.current
        conn = self._telemetry.open(cookie, report.connection_report(
            state, Reporter.SOURCE, False,
            (report.address(src), pod.workload, identity_of(pod.workload).uri),
            (report.address(dst), dst[1], None, None),
            {"dst.vip": report.address(dst)},
            service=refused.service, response_flags=refused.reason.response_flags,
        ))  # fmt: skip
        error = f"refused: {refused.reason.value} ({refused.describe(dst[1])})"
        self._telemetry.done(conn, PolicyVerdict("none"), error=error)

    async def _tunnel(
        self,
        pod: Pod,
        target: Workload,
        client: AcceptedSocket,
        src: report.Endpoint,
        dst: report.Endpoint,
        hbone_addr: report.Endpoint,
        conn: TrackedConnection,
    ) -> None:
        """dst: the `:authority`; hbone_addr: where the tunnel is dialled (the destination's
        15008, or a waypoint pod's); target: who must answer there (its identity checked)."""
        source_id, target_id = identity_of(pod.workload), identity_of(target)
        key = PoolKey(source_id.uri, frozenset({target_id.uri}), hbone_addr, src[0])
        source = pod.workload
        headers = {
            hbone.FORWARDED: f'for="{report.address(src)}"',
            # Who is calling, for the destination's telemetry (ztunnel's baggage keys).
            hbone.BAGGAGE: f"k8s.namespace.name={source.namespace},"
            f"k8s.pod.name={source.name},service.name={source.name}",
            hbone.TRACEPARENT: f"00-{os.urandom(16).hex()}-{os.urandom(8).hex()}-01",
        }
        try:
            stream, _ = await self.pool.open_stream(key, report.address(dst), headers)
        except (OSError, ssl.SSLError, tls.PeerIdentityError, TimeoutError) as exc:
            client.reset()
            self._telemetry.done(conn, PolicyVerdict("none"), error=report.failed("tunnel", exc))
            return
        # The app's bytes go before the answer (agent/proxy/tunnel_relay.py).
        tunnel = TunnelRelay(client.release(), stream, app_is_client=True)
        tunnel.start()
        try:
            await stream.established
        except asyncio.CancelledError:
            tunnel.cut(DRAINED)
            raise
        except (TunnelRefused, OSError) as exc:
            tunnel.cut(str(exc))  # the pod sees what a refused connection looks like
            await tunnel.wait()
            # 401 is the destination's L4 authorization saying no; its log names the policy.
            if isinstance(exc, TunnelRefused):
                verdict = PolicyVerdict("deny") if exc.status == 401 else PolicyVerdict("none")
                error = f"tunnel refused: {exc.status}"
            else:
                verdict, error = PolicyVerdict("none"), report.failed("tunnel", exc)
            self._telemetry.done(conn, verdict, error=error)
            return
        # Allowed by the destination's kernel (it answered 200 only after its connect).
        relayed = await tunnel.wait()
        report.finish(self._telemetry, conn, PolicyVerdict("allow"), relayed)

    async def _dial(self, key: PoolKey) -> HboneConnection:
        """A new HBONE connection from the source pod's netns (mark 0x539: not captured)."""
        pod = self._pod_by_ip(key.source_ip)
        if pod is None:
            raise ConnectionAbortedError(f"source pod {key.source_ip} is no longer enrolled")
        context = self._contexts.client(SpiffeId.parse(key.source_identity))
        expected = [SpiffeId.parse(uri) for uri in key.destination_identities]
        sock = await connect_from(pod.worker, key.destination)
        self._telemetry.track_tunnel(socket_cookie(sock), "outbound")
        _, conn = await tls_transport.connect(
            sock,
            context,
            lambda: HboneConnection(
                hbone.HboneClient(),
                verify_peer=lambda obj: tls.verify_server_identity(_tls(obj), expected),
                refusals=self._refusals,
                budget=self._budget,
            ),
            HANDSHAKE_TIMEOUT,
        )
        assert isinstance(conn, HboneConnection)
        await conn.ready()  # raises verify_peer's refusal (PeerIdentityError)
        return conn

    async def _pass_through(
        self, pod: Pod, client: AcceptedSocket, dst: report.Endpoint, conn: TrackedConnection
    ) -> None:
        """Plain TCP to a destination outside the mesh, from the pod's netns."""
        verdict = PolicyVerdict("none")
        try:
            upstream = await connect_from(pod.worker, dst)
        except (OSError, TimeoutError) as exc:
            client.reset()
            self._telemetry.done(conn, verdict, error=report.failed("upstream connect", exc))
            return
        relayed = await self._relays.relay(client.release(), upstream)
        report.finish(self._telemetry, conn, verdict, relayed)


def local_destination(decided: Route, pod_by_ip: Callable[[str], Pod | None]) -> Pod | None:
    """The pod to deliver to on this node, without HBONE: a tunnelled route straight to the
    workload itself (not through a waypoint, which does L7 and must see the connection),
    whose pod this agent has enrolled (`pod_by_ip`). Only the very workload the route chose,
    under the identity the route expects: should this agent's pod at that address be
    another (a state that changed meanwhile), HBONE goes, and checks the certificate."""
    target = decided.workload
    if target is None or not decided.tunnelled or decided.waypoint is not None:
        return None
    if decided.upstream[0] not in target.ips:
        return None
    pod = pod_by_ip(decided.upstream[0])
    if pod is None or pod.workload.uid != target.uid:
        return None
    return pod if identity_of(pod.workload) == identity_of(target) else None


def _tls(obj: tls.TlsSession | None) -> tls.TlsSession:
    if obj is None:
        raise tls.PeerIdentityError("not a TLS connection")
    return obj
