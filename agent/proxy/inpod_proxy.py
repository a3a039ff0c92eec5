"""What happens to the connections the tc programs capture, for every enrolled pod.

- 15001 (outbound): the connection's local address is its original destination. A
  destination in the mesh (a workload with protocol HBONE) is reached through HBONE: mutual
  TLS with the source pod's certificate to the destination's 15008, the destination's
  identity checked, CONNECT to ip:port. Anything else is passed through as plain TCP, from
  inside the pod netns, as ztunnel does for destinations outside the mesh.
- 15006 (inbound plaintext): connected to the pod's app with the client's own address as
  source (IP_TRANSPARENT).
- 15008 (inbound HBONE): the client must present a certificate of our trust domain; each
  CONNECT must name this pod's address (else 400); the app is connected to with the client's
  address as source; 200 only once that connection exists (else 503).
Every connection is reported to the telemetry (agent/telemetry/connections.py) under the
cookie of the agent's socket that faces the pod's app, so the kernel's byte counts for that
socket are the app's own; it ends with one "connection complete" access log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

import structlog

from agent.datapath import abi
from agent.hbone import protocol as hbone
from agent.hbone.connection import HboneConnection, HboneStream, TunnelRefused
from agent.hbone.pool import HboneClientPool, PoolKey
from agent.identity import tls
from agent.identity.manager import IdentityManager, WorkloadCertificate
from agent.identity.spiffe import SpiffeId
from agent.inpod import sockets
from agent.netns import NetnsWorker
from agent.policy.engine import PolicyEngine
from agent.policy.live import LiveConnection
from agent.proxy.relay import ByteStream, RelayResult, SocketStream, relay, reset
from agent.state.store import MeshState, StateStore
from agent.state.workload import Workload
from agent.telemetry.connections import (
    ConnectionReport,
    ConnectionTelemetry,
    PolicyVerdict,
    Relayed,
    TrackedConnection,
)
from agent.telemetry.events import socket_cookie
from agent.telemetry.istio_labels import (
    Reporter,
    SecurityPolicy,
    connection_labels,
    dataplane_mode,
    destination_service,
)

log = structlog.get_logger("agent.proxy")

CONNECT_TIMEOUT = 10.0
HANDSHAKE_TIMEOUT = 10.0


class Pod(Protocol):
    """What the proxy needs of an enrolled pod."""

    @property
    def workload(self) -> Workload: ...
    @property
    def worker(self) -> NetnsWorker: ...
    def spawn(self, coro: Coroutine[Any, Any, None]) -> object: ...


def identity_of(workload: Workload) -> SpiffeId:
    return SpiffeId(workload.trust_domain, workload.namespace, workload.service_account)


def _addr(endpoint: tuple[str, int]) -> str:
    return hbone.format_authority(endpoint[0], endpoint[1])


def _endpoints(writer: asyncio.StreamWriter) -> tuple[tuple[str, int], tuple[str, int]]:
    peer, local = writer.get_extra_info("peername"), writer.get_extra_info("sockname")
    return (peer[0], peer[1]), (local[0], local[1])


async def connect_from(
    worker: NetnsWorker, dst: tuple[str, int], source_ip: str | None = None
) -> socket.socket:
    """A connected agent socket inside the pod's netns; with source_ip, bound to that
    (foreign) address so the peer sees the original client."""
    sock = await worker.run(sockets.upstream, (source_ip, 0) if source_ip else None)
    try:
        loop = asyncio.get_running_loop()
        await asyncio.wait_for(loop.sock_connect(sock, dst), CONNECT_TIMEOUT)
    except BaseException:
        sock.close()
        raise
    return sock


class InPodProxy:
    def __init__(
        self,
        store: StateStore,
        identities: IdentityManager,
        authorizer: PolicyEngine | None,
        telemetry: ConnectionTelemetry,
    ) -> None:
        self._store = store
        self._identities = identities
        self._authorizer = authorizer
        self.telemetry = telemetry
        self._pods_by_ip: dict[str, Pod] = {}
        self._server_contexts: dict[SpiffeId, ssl.SSLContext] = {}
        self._client_contexts: dict[SpiffeId, ssl.SSLContext] = {}
        self._hbone_connections: dict[str, set[HboneConnection]] = {}
        self._live: set[LiveConnection] = set()
        self.pool = HboneClientPool(self._dial)
        identities.on_rotate(self._rotated)

    # -- pod lifecycle ---------------------------------------------------------------------

    async def serve(self, pod: Pod, listeners: dict[int, socket.socket]) -> list[asyncio.Server]:
        """Start serving the pod's three listeners (created in its netns by enrollment)."""
        workload = pod.workload
        identity = identity_of(workload)
        cert = await self._identities.get(identity)
        self._contexts_for(cert)
        for ip in workload.ips:
            self._pods_by_ip[ip] = pod
        loop = asyncio.get_running_loop()
        conns = self._hbone_connections.setdefault(workload.uid, set())

        def accept(handler: Callable[[Pod, Any, Any], Coroutine[Any, Any, None]]) -> Any:
            return lambda reader, writer: pod.spawn(
                _guarded(handler(pod, reader, writer), lambda: reset(writer))
            )

        def verify_client(conn: HboneConnection, ssl_object: ssl.SSLObject | None) -> SpiffeId:
            if (sock := conn.socket()) is not None:
                self.telemetry.track_tunnel(socket_cookie(sock), "inbound")
            return self._verify_client(ssl_object)

        def hbone_connection() -> HboneConnection:
            conn = HboneConnection(
                hbone.HboneServer(),
                on_tunnel=lambda stream, request, c: _guarded(
                    self._tunnel_in(pod, stream, request, c), stream.reset
                ),
                spawn=pod.spawn,
                verify_peer=lambda ssl_object: verify_client(conn, ssl_object),
                on_closed=conns.discard,
            )
            conns.add(conn)
            return conn

        return [
            await asyncio.start_server(accept(self._outbound), sock=listeners[abi.PORT_OUTBOUND]),
            await asyncio.start_server(accept(self._inbound), sock=listeners[abi.PORT_INBOUND]),
            await loop.create_server(
                hbone_connection, sock=listeners[abi.PORT_HBONE],
                ssl=self._server_contexts[identity], ssl_handshake_timeout=HANDSHAKE_TIMEOUT,
            ),
        ]  # fmt: skip

    def release(self, pod: Pod) -> None:
        """The pod is gone from this node: close its tunnels and forget it."""
        for ip in pod.workload.ips:
            if self._pods_by_ip.get(ip) is pod:
                del self._pods_by_ip[ip]
        for conn in self._hbone_connections.pop(pod.workload.uid, set()):
            conn.close()
        identity = identity_of(pod.workload)
        if not any(identity_of(p.workload) == identity for p in self._pods_by_ip.values()):
            self._identities.forget(identity)
            self._server_contexts.pop(identity, None)
            self._client_contexts.pop(identity, None)

    async def close(self) -> None:
        await self.pool.close()

    def live_connections(self) -> list[LiveConnection]:
        return list(self._live)

    async def _relay_live(
        self,
        live_args: tuple[Pod, tuple[str, int], tuple[str, int], SpiffeId | None],
        client: ByteStream,
        upstream: SocketStream,
    ) -> RelayResult:
        """relay(), with the connection known as live for the while (policy re-checks)."""
        pod, src, dst, peer = live_args

        def cut() -> None:
            client.reset()
            upstream.reset()

        live = LiveConnection(pod.workload.key, src[0], dst[0], dst[1], peer, cut)
        self._live.add(live)
        try:
            return await relay(client, upstream)
        finally:
            self._live.discard(live)

    # -- identities ------------------------------------------------------------------------

    def _contexts_for(self, cert: WorkloadCertificate) -> None:
        roots = self._identities.roots_pem
        if cert.identity not in self._server_contexts:
            self._server_contexts[cert.identity] = tls.server_context(cert, roots)
        if cert.identity not in self._client_contexts:
            self._client_contexts[cert.identity] = tls.client_context(cert, roots)

    def _rotated(self, cert: WorkloadCertificate) -> None:
        """New handshakes use the new certificate; established connections keep theirs."""
        server = self._server_contexts.get(cert.identity)
        if server is not None:
            tls.load_certificate(server, cert)  # the listener holds this very context
        if cert.identity in self._client_contexts:
            self._client_contexts[cert.identity] = tls.client_context(
                cert, self._identities.roots_pem
            )
        log.info("certificate rotated", identity=cert.identity.uri,
                 not_after=cert.not_after.isoformat())  # fmt: skip

    def _verify_client(self, ssl_object: ssl.SSLObject | None) -> SpiffeId:
        if ssl_object is None:
            raise tls.PeerIdentityError("not a TLS connection")
        # The handshake already checked the chain against our roots; the trust domain is the
        # remaining condition (ztunnel: same trust domain, any workload).
        peer = tls.peer_identity(ssl_object)
        own = {identity.trust_domain for identity in self._server_contexts}
        if peer.trust_domain not in own:
            raise tls.PeerIdentityError(f"client {peer.uri} is outside trust domains {own}")
        return peer

    # -- outbound (15001) ------------------------------------------------------------------

    async def _outbound(
        self, pod: Pod, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        src, dst = _endpoints(writer)
        state = self._store.current
        target = state.workload_by_ip(dst[0])
        tunnelled = target is not None and target.captured
        _captured(pod, "outbound", src, dst, dataplane_mode(tunnelled, target))
        report = _report(
            state, Reporter.SOURCE, tunnelled,
            (_addr(src), pod.workload, identity_of(pod.workload).uri),
            (_addr(dst), dst[1], target, identity_of(target).uri if target and tunnelled else None),
            {"dst.hbone_addr": _addr((dst[0], abi.PORT_HBONE)) if tunnelled else None},
        )  # fmt: skip
        conn = self.telemetry.open(_cookie(writer), report)
        if target is not None and tunnelled:
            await self._tunnel_out(pod, target, reader, writer, src, dst, conn)
        else:
            await self._pass_through(pod, reader, writer, dst, None, conn, PolicyVerdict("none"))

    async def _tunnel_out(
        self,
        pod: Pod,
        target: Workload,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        src: tuple[str, int],
        dst: tuple[str, int],
        conn: TrackedConnection,
    ) -> None:
        source_id, target_id = identity_of(pod.workload), identity_of(target)
        hbone_addr = (dst[0], abi.PORT_HBONE)
        key = PoolKey(source_id.uri, frozenset({target_id.uri}), hbone_addr, src[0])
        source = pod.workload
        headers = {
            hbone.FORWARDED: f'for="{_addr(src)}"',
            # Who is calling, for the destination's telemetry (ztunnel's baggage keys).
            hbone.BAGGAGE: f"k8s.namespace.name={source.namespace},"
            f"k8s.pod.name={source.name},service.name={source.name}",
            hbone.TRACEPARENT: f"00-{os.urandom(16).hex()}-{os.urandom(8).hex()}-01",
        }
        try:
            stream, _ = await self.pool.open_tunnel(key, _addr(dst), headers)
        except TunnelRefused as exc:
            reset(writer)  # the pod sees what a refused connection looks like
            # 401 is the destination's L4 authorization saying no; its log names the policy.
            verdict = PolicyVerdict("deny") if exc.status == 401 else PolicyVerdict("none")
            self.telemetry.done(conn, verdict, error=f"tunnel refused: {exc.status}")
            return
        except (OSError, ssl.SSLError, tls.PeerIdentityError, TimeoutError) as exc:
            reset(writer)
            self.telemetry.done(conn, PolicyVerdict("none"), error=_failed("tunnel", exc))
            return
        # Allowed by the destination's kernel (it answered 200 only after its connect).
        self._finish(
            conn, PolicyVerdict("allow"), await relay(SocketStream(reader, writer), stream)
        )

    async def _dial(self, key: PoolKey) -> HboneConnection:
        """A new HBONE connection from the source pod's netns (mark 0x539: not captured)."""
        pod = self._pods_by_ip.get(key.source_ip)
        if pod is None:
            raise ConnectionAbortedError(f"source pod {key.source_ip} is no longer enrolled")
        context = self._client_contexts[SpiffeId.parse(key.source_identity)]
        expected = [SpiffeId.parse(uri) for uri in key.destination_identities]
        sock = await connect_from(pod.worker, key.destination)
        self.telemetry.track_tunnel(socket_cookie(sock), "outbound")
        loop = asyncio.get_running_loop()
        try:
            _, conn = await loop.create_connection(
                lambda: HboneConnection(
                    hbone.HboneClient(),
                    verify_peer=lambda obj: tls.verify_server_identity(_tls(obj), expected),
                ),
                sock=sock, ssl=context, server_hostname="",
                ssl_handshake_timeout=HANDSHAKE_TIMEOUT,
            )  # fmt: skip
        except BaseException:
            sock.close()
            raise
        await conn.ready()  # raises verify_peer's refusal (PeerIdentityError)
        return conn

    # -- inbound plaintext (15006) ---------------------------------------------------------

    async def _inbound(
        self, pod: Pod, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        src, dst = _endpoints(writer)
        state = self._store.current
        source = state.workload_by_ip(src[0])
        _captured(pod, "inbound", src, dst, dataplane_mode(False, pod.workload))
        report = _report(
            state, Reporter.DESTINATION, False, (_addr(src), source, None),
            (_addr(dst), dst[1], pod.workload, identity_of(pod.workload).uri),
        )  # fmt: skip
        conn = self.telemetry.open(_cookie(writer), report)
        # pod_ingress authorized the SYN before it reached 15006 (a denial never gets here).
        await self._pass_through(pod, reader, writer, dst, src, conn, PolicyVerdict("allow"))

    async def _pass_through(
        self,
        pod: Pod,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        dst: tuple[str, int],
        inbound_from: tuple[str, int] | None,
        conn: TrackedConnection,
        verdict: PolicyVerdict,
    ) -> None:
        """Plain TCP to dst from the pod's netns: outbound to a destination outside the mesh,
        or inbound (inbound_from: the client, whose address the app sees)."""
        try:
            up = await connect_from(pod.worker, dst, inbound_from[0] if inbound_from else None)
        except (OSError, TimeoutError) as exc:
            reset(writer)
            self.telemetry.done(conn, verdict, error=_failed("upstream connect", exc))
            return
        up_reader, up_writer = await asyncio.open_connection(sock=up)
        client, upstream = SocketStream(reader, writer), SocketStream(up_reader, up_writer)
        if inbound_from is not None:
            relayed = await self._relay_live((pod, inbound_from, dst, None), client, upstream)
        else:
            relayed = await relay(client, upstream)
        self._finish(conn, verdict, relayed)

    def _finish(
        self, conn: TrackedConnection, verdict: PolicyVerdict, relayed: RelayResult
    ) -> None:
        """relay() is always called with the client's side first."""
        counts = Relayed(relayed.a_to_b, relayed.b_to_a)
        self.telemetry.done(conn, verdict, counts, relayed.error)

    # -- inbound HBONE (15008) -------------------------------------------------------------

    async def _tunnel_in(
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
        report = _report(
            state, Reporter.DESTINATION, True, (client, source, principal),
            (request.authority, request.port, pod.workload, identity_of(pod.workload).uri),
            {"src.hbone_addr": peer}, peer_is_client=False,
        )  # fmt: skip
        if request.host not in pod.workload.ips:
            conn.refuse(stream, 400)
            self._refused(report, PolicyVerdict("none"),
                          f"authority {request.authority} is not this pod's address")  # fmt: skip
            return
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
            self._refused(report, verdict, f"denied: {verdict.reason} ({verdict.policy or '-'})")
            return
        except (OSError, TimeoutError) as exc:
            verdict = self._verdict(up, allowed=True)  # read before close: it is on the socket
            up.close()
            conn.refuse(stream, 503)
            self._refused(report, verdict, _failed("upstream connect", exc))
            return
        tracked = self.telemetry.open(socket_cookie(up), report)
        verdict = self._verdict(up, allowed=True)
        conn.accept(stream)
        up_reader, up_writer = await asyncio.open_connection(sock=up)
        client_addr = (client_ip, 0)
        live_args = (pod, client_addr, (request.host, request.port),
                     peer_id if isinstance(peer_id, SpiffeId) else None)  # fmt: skip
        relayed = await self._relay_live(live_args, stream, SocketStream(up_reader, up_writer))
        self._finish(tracked, verdict, relayed)

    def _refused(self, report: ConnectionReport, verdict: PolicyVerdict, error: str) -> None:
        """An inbound tunnel answered with an error: no app socket, nothing relayed."""
        self.telemetry.done(self.telemetry.open(None, report), verdict, error=error)

    def _verdict(self, up: socket.socket, allowed: bool) -> PolicyVerdict:
        """The decision agent_connect4 wrote back on the upstream socket, with its policy."""
        decided = self._authorizer.decision(up) if self._authorizer else None
        if decided is None:
            return PolicyVerdict("allow" if allowed else "deny")
        policy, reason = decided
        return PolicyVerdict("allow" if allowed else "deny", policy, reason)


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


def _captured(
    pod: Pod, direction: str, src: tuple[str, int], dst: tuple[str, int], mode: str
) -> None:
    log.info("connection captured", direction=direction, pod=pod.workload.key,
             dataplane_mode=mode, **{"src.addr": _addr(src), "dst.addr": _addr(dst)})  # fmt: skip


def _report(
    state: MeshState,
    reporter: Reporter,
    tunnelled: bool,
    source: tuple[str, Workload | None, str | None],
    destination: tuple[str, int, Workload | None, str | None],
    extra: dict[str, Any] | None = None,
    peer_is_client: bool = True,
) -> ConnectionReport:
    """A connection's Istio labels and access log fields, from its two ends: source
    (address, workload, principal) and destination (address, port, workload, principal)."""
    src_addr, src_workload, src_principal = source
    dst_addr, dst_port, dst_workload, dst_principal = destination
    service = destination_service(state, dst_workload, dst_port)
    security = SecurityPolicy.MUTUAL_TLS if tunnelled else SecurityPolicy.NONE
    labels = connection_labels(reporter, src_workload, src_principal, dst_workload,
                               dst_principal, service, security)  # fmt: skip
    fields = {
        "src.addr": src_addr, **_peer_fields("src", src_workload), "src.identity": src_principal,
        "dst.addr": dst_addr, **_peer_fields("dst", dst_workload), "dst.identity": dst_principal,
        "dst.service": service.hostname if service else None,
        "route": "hbone" if tunnelled else "passthrough", **(extra or {}),
    }  # fmt: skip
    direction = "outbound" if reporter is Reporter.SOURCE else "inbound"
    return ConnectionReport(labels, direction, peer_is_client, fields)


def _failed(what: str, exc: BaseException) -> str:
    return f"{what} failed: {exc or type(exc).__name__}"


def _peer_fields(end: str, workload: Workload | None) -> dict[str, str | None]:
    return {f"{end}.workload": workload.name if workload else None,
            f"{end}.namespace": workload.namespace if workload else None}  # fmt: skip


def _cookie(writer: asyncio.StreamWriter) -> int | None:
    sock = writer.get_extra_info("socket")
    return socket_cookie(sock) if sock is not None else None


def _forwarded_for(value: str) -> str | None:
    """The client address from `forwarded: for="ip:port"` (RFC 7239), as ztunnel sends it."""
    for element in value.split(";"):
        name, _, address = element.strip().partition("=")
        if name.lower() == "for" and address:
            return address.strip('"')
    return None


def _tls(obj: ssl.SSLObject | None) -> ssl.SSLObject:
    if obj is None:
        raise tls.PeerIdentityError("not a TLS connection")
    return obj
