"""15008, inbound HBONE: tunnels from other mesh agents (or Envoy, or ztunnel) to a pod.

The client must present a certificate of our trust domain; each CONNECT must name this pod's
address (else 400). The app is connected to with the client's address as source, and the
kernel authorizes that connect (agent_connect4) with the identity verified in TLS: a denial
is a 401 naming the policy. 200 only once the connection to the app exists (else 503).
"""

from __future__ import annotations

import asyncio
import socket

from agent.hbone import protocol as hbone
from agent.hbone.connection import HboneConnection, HboneStream
from agent.identity import tls
from agent.identity.spiffe import SpiffeId
from agent.inpod import sockets
from agent.policy.engine import PolicyEngine
from agent.proxy import report
from agent.proxy.live_inbound import LiveInbound
from agent.proxy.pod import CONNECT_TIMEOUT, Pod, identity_of
from agent.proxy.relay import SocketStream
from agent.proxy.tls_contexts import TlsContexts
from agent.proxy.waypoint_bypass import WaypointBypasses
from agent.state.store import StateStore
from agent.telemetry.connections import ConnectionReport, ConnectionTelemetry, PolicyVerdict
from agent.telemetry.events import socket_cookie
from agent.telemetry.istio_labels import Reporter


class InboundHbone:
    def __init__(
        self,
        store: StateStore,
        contexts: TlsContexts,
        authorizer: PolicyEngine | None,
        telemetry: ConnectionTelemetry,
        live: LiveInbound,
        bypasses: WaypointBypasses,
    ) -> None:
        self._store = store
        self._bypasses = bypasses
        self._contexts = contexts
        self._authorizer = authorizer
        self._telemetry = telemetry
        self._live = live

    def verify_client(self, ssl_object: tls.TlsSession | None) -> SpiffeId:
        if ssl_object is None:
            raise tls.PeerIdentityError("not a TLS connection")
        if not tls.negotiated_alpn_ok(ssl_object):
            # HBONE is HTTP/2: a client that did not ask for h2 is not speaking it.
            raise tls.PeerIdentityError(
                f"client negotiated ALPN {ssl_object.selected_alpn_protocol()!r}, not 'h2'",
                reason="no_alpn_h2",
            )
        # The handshake already checked the chain against our roots; the trust domain is the
        # remaining condition (ztunnel: same trust domain, any workload).
        peer = tls.peer_identity(ssl_object)
        own = self._contexts.trust_domains()
        if peer.trust_domain not in own:
            raise tls.PeerIdentityError(f"client {peer.uri} is outside trust domains {own}")
        return peer

    async def tunnel(
        self, pod: Pod, stream: HboneStream, request: hbone.TunnelRequested, conn: HboneConnection
    ) -> None:
        peer = conn.peer
        client_ip = peer.rsplit(":", 1)[0].strip("[]")
        peer_id = conn.peer_identity
        principal = peer_id.uri if isinstance(peer_id, SpiffeId) else None
        state = self._store.current
        # The source workload is named only when its identity is the one the peer proved.
        source = state.workload_by_ip(client_ip)
        if source is not None and identity_of(source).uri != principal:
            source = None
        client = _forwarded_for(request.headers.get(hbone.FORWARDED, "")) or peer
        # The registered socket is the one to the app: its peer is the server.
        connection = report.connection_report(
            state, Reporter.DESTINATION, True, (client, source, principal),
            (request.authority, request.port, pod.workload, identity_of(pod.workload).uri),
            {"src.hbone_addr": peer}, peer_is_client=False,
        )  # fmt: skip
        if request.host not in pod.workload.ips:
            conn.refuse(stream, 400)
            self._refused(connection, PolicyVerdict("none"),
                          f"authority {request.authority} is not this pod's address")  # fmt: skip
            return
        if stream.was_reset:
            return  # reset by the peer before its turn (rapid reset): no app connection
        self._bypasses.check(state, pod.workload, peer_id if isinstance(peer_id, SpiffeId)
                             else None, "hbone", client)  # fmt: skip
        up = await pod.worker.run(sockets.upstream, (client_ip, 0))
        try:
            if self._authorizer is not None and isinstance(peer_id, SpiffeId):
                # The kernel decides this connect (agent_connect4) with the identity we
                # verified in the handshake; userspace holds no copy of the policy logic.
                self._authorizer.tag_upstream(up, peer_id, client_ip)
            loop = asyncio.get_running_loop()
            await asyncio.wait_for(loop.sock_connect(up, (request.host, request.port)),
                                   CONNECT_TIMEOUT)  # fmt: skip
        except PermissionError:
            verdict = self._verdict(up, allowed=False)
            up.close()
            conn.refuse(stream, 401)
            self._refused(
                connection, verdict, f"denied: {verdict.reason} ({verdict.policy or '-'})"
            )
            return
        except (OSError, TimeoutError) as exc:
            verdict = self._verdict(up, allowed=True)  # read before close: it is on the socket
            up.close()
            conn.refuse(stream, 503)
            self._refused(connection, verdict, report.failed("upstream connect", exc))
            return
        if stream.was_reset:  # while we connected: the app connection goes unused
            up.close()
            return
        tracked = self._telemetry.open(socket_cookie(up), connection)
        verdict = self._verdict(up, allowed=True)
        conn.accept(stream)
        up_reader, up_writer = await asyncio.open_connection(sock=up)
        relayed = await self._live.relay(
            pod, client_ip, (request.host, request.port),
            peer_id if isinstance(peer_id, SpiffeId) else None,
            stream, SocketStream(up_reader, up_writer),
        )  # fmt: skip
        report.finish(self._telemetry, tracked, verdict, relayed)

    def _refused(self, connection: ConnectionReport, verdict: PolicyVerdict, error: str) -> None:
        """An inbound tunnel answered with an error: no app socket, nothing relayed."""
        self._telemetry.done(self._telemetry.open(None, connection), verdict, error=error)

    def _verdict(self, up: socket.socket, allowed: bool) -> PolicyVerdict:
        """The decision agent_connect4 wrote back on the upstream socket, with its policy."""
        decided = self._authorizer.decision(up) if self._authorizer else None
        if decided is None:
            return PolicyVerdict("allow" if allowed else "deny")
        policy, reason = decided
        return PolicyVerdict("allow" if allowed else "deny", policy, reason)


def _forwarded_for(value: str) -> str | None:
    """The client address from `forwarded: for="ip:port"` (RFC 7239), as ztunnel sends it."""
    for element in value.split(";"):
        name, _, address = element.strip().partition("=")
        if name.lower() == "for" and address:
            return address.strip('"')
    return None
