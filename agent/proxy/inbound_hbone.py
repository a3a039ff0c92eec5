"""15008, inbound HBONE: tunnels from other mesh agents (or Envoy, or ztunnel) to a pod.

The client must present a certificate of our trust domain; each CONNECT must name this pod's
address (else 400). The app is connected to with the client's address as source, and the
kernel authorizes that connect (agent_connect4) with the identity verified in TLS: a denial
is a 401 naming the policy. 200 only once the connection to the app exists (else 503). That
destination side is agent/proxy/app_connection.py, which same-node delivery
(agent/proxy/local_delivery.py) shares.
"""

from __future__ import annotations

from agent.hbone import protocol as hbone
from agent.hbone.connection import HboneConnection, HboneStream
from agent.identity import tls
from agent.identity.spiffe import SpiffeId
from agent.proxy import report
from agent.proxy.app_connection import AppConnector, AppRefused, Caller
from agent.proxy.live_inbound import POLICY_CUT, LiveInbound
from agent.proxy.pod import Pod, identity_of
from agent.proxy.tls_contexts import TlsContexts
from agent.proxy.tunnel_relay import TunnelRelay
from agent.state.store import StateStore
from agent.telemetry.connections import ConnectionTelemetry
from agent.telemetry.istio_labels import Reporter


class InboundHbone:
    def __init__(
        self,
        store: StateStore,
        contexts: TlsContexts,
        connector: AppConnector,
        telemetry: ConnectionTelemetry,
        live: LiveInbound,
    ) -> None:
        self._store = store
        self._contexts = contexts
        self._connector = connector
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
        verified = peer_id if isinstance(peer_id, SpiffeId) else None
        principal = verified.uri if verified is not None else None
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
        dst = (request.host, request.port)
        outcome = await self._connector.connect(
            state, pod, Caller(client_ip, client, verified, "hbone"), dst, connection,
            gone=lambda: stream.was_reset,
        )  # fmt: skip
        if outcome is None:
            return  # the peer reset the stream: nothing to answer
        if isinstance(outcome, AppRefused):
            conn.refuse(stream, outcome.status)
            return
        # Allowed by the kernel: 200 only now that the connection to the app exists.
        conn.accept(stream)
        tunnel = TunnelRelay(outcome.sock, stream, app_is_client=False)
        tunnel.start()
        with self._live.tracking(pod, client_ip, dst, verified, lambda: tunnel.cut(POLICY_CUT)):
            relayed = await tunnel.wait()
        report.finish(self._telemetry, outcome.tracked, outcome.verdict, relayed)


def _forwarded_for(value: str) -> str | None:
    """The client address from `forwarded: for="ip:port"` (RFC 7239), as ztunnel sends it."""
    for element in value.split(";"):
        name, _, address = element.strip().partition("=")
        if name.lower() == "for" and address:
            return address.strip('"')
    return None
