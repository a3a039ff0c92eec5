"""Real TLS 1.3 handshakes over loopback between the contexts HBONE uses."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from agent.identity import tls
from agent.identity.ca import CertificateAuthority
from agent.identity.manager import WorkloadCertificate
from agent.identity.spiffe import SpiffeId
from agent.identity.tls import (
    PeerIdentityError,
    client_context,
    negotiated_alpn_ok,
    server_context,
    verify_client_trust_domain,
    verify_server_identity,
)

TD = "cluster.local"
SLEEP = SpiffeId(TD, "default", "sleep")
HTTPBIN = SpiffeId(TD, "default", "httpbin")
LOOPBACK = "127.0.0.1"


def _workload_cert(ca: CertificateAuthority, identity: SpiffeId) -> WorkloadCertificate:
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = ca.issue(identity, key.public_key(), timedelta(hours=1))
    return WorkloadCertificate(identity, key, [leaf, ca.root])


@dataclass
class Served:
    port: int
    # The client's identity, or why the server refused the connection.
    outcome: asyncio.Future[SpiffeId]


async def _with_server(context: ssl.SSLContext, test: Callable[[Served], Awaitable[None]]) -> None:
    """Runs an HBONE-like server: TLS handshake, then the trust-domain check on the client."""
    outcome: asyncio.Future[SpiffeId] = asyncio.get_running_loop().create_future()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            # TLS started by hand, so the server's own handshake error can be observed.
            await writer.start_tls(context)
            ssl_object = writer.get_extra_info("ssl_object")
            client = verify_client_trust_domain(ssl_object, TD)
            alpn_ok = negotiated_alpn_ok(ssl_object)
        except (ssl.SSLError, PeerIdentityError, ConnectionError) as exc:
            outcome.set_exception(exc)
            writer.transport.abort()
            return
        outcome.set_result(client)
        writer.write(f"{client.uri} h2={alpn_ok}\n".encode())
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(handle, LOOPBACK, 0)
    try:
        await test(Served(server.sockets[0].getsockname()[1], outcome))
    finally:
        server.close()
        await server.wait_closed()


async def _expect_client_refused(port: int, context: ssl.SSLContext) -> None:
    """In TLS 1.3 the client finishes its handshake before the server checks the client's
    certificate, so a refusal may reach the client only as an alert on its first read."""
    try:
        reader, writer = await asyncio.open_connection(LOOPBACK, port, ssl=context)
    except (ssl.SSLError, ConnectionError):
        return
    try:
        received = await reader.read()
    except (ssl.SSLError, ConnectionError):
        received = b""
    finally:
        writer.transport.abort()
    assert received == b"", "a refused client received application data"


def _bare_client_context(roots_pem: bytes) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False
    context.set_alpn_protocols(["h2"])
    context.load_verify_locations(cadata=roots_pem.decode())
    return context


def test_mutual_tls_identities_both_ways() -> None:
    ca = CertificateAuthority.create(TD)
    server_ctx = server_context(_workload_cert(ca, HTTPBIN), ca.root_pem)
    client_ctx = client_context(_workload_cert(ca, SLEEP), ca.root_pem)

    async def exchange(served: Served) -> None:
        reader, writer = await asyncio.open_connection(LOOPBACK, served.port, ssl=client_ctx)
        ssl_object = writer.get_extra_info("ssl_object")
        assert ssl_object.version() == "TLSv1.3"
        assert negotiated_alpn_ok(ssl_object)
        assert ssl_object.selected_alpn_protocol() == "h2"
        assert verify_server_identity(ssl_object, {HTTPBIN, SLEEP}) == HTTPBIN
        assert tls.peer_identity(ssl_object) == HTTPBIN
        assert await reader.readline() == f"{SLEEP.uri} h2=True\n".encode()
        assert await asyncio.wait_for(served.outcome, 2) == SLEEP
        writer.close()
        await writer.wait_closed()

    asyncio.run(_with_server(server_ctx, exchange))


def test_contexts_are_tls13_only_with_h2_and_required_peer_certs() -> None:
    ca = CertificateAuthority.create(TD)
    for context in (
        server_context(_workload_cert(ca, HTTPBIN), ca.root_pem),
        client_context(_workload_cert(ca, SLEEP), ca.root_pem),
    ):
        assert context.minimum_version == ssl.TLSVersion.TLSv1_3
        assert context.maximum_version == ssl.TLSVersion.TLSv1_3
        assert context.verify_mode == ssl.CERT_REQUIRED
        assert not context.check_hostname


def test_unexpected_server_identity_raises() -> None:
    ca = CertificateAuthority.create(TD)
    server_ctx = server_context(_workload_cert(ca, HTTPBIN), ca.root_pem)
    client_ctx = client_context(_workload_cert(ca, SLEEP), ca.root_pem)
    reviews = SpiffeId(TD, "bookinfo", "reviews")

    async def exchange(served: Served) -> None:
        _, writer = await asyncio.open_connection(LOOPBACK, served.port, ssl=client_ctx)
        ssl_object = writer.get_extra_info("ssl_object")
        with pytest.raises(PeerIdentityError) as caught:
            verify_server_identity(ssl_object, [reviews])
        assert HTTPBIN.uri in str(caught.value)
        assert reviews.uri in str(caught.value)
        with pytest.raises(PeerIdentityError, match=r"expected one of: \(none\)"):
            verify_server_identity(ssl_object, [])
        writer.close()
        await writer.wait_closed()

    asyncio.run(_with_server(server_ctx, exchange))


def test_client_from_another_ca_refused() -> None:
    ca = CertificateAuthority.create(TD)
    impostor_ca = CertificateAuthority.create(TD)
    server_ctx = server_context(_workload_cert(ca, HTTPBIN), ca.root_pem)
    # The impostor trusts our root, so only the server's check can stop it.
    client_ctx = client_context(_workload_cert(impostor_ca, SLEEP), ca.root_pem)

    async def exchange(served: Served) -> None:
        await _expect_client_refused(served.port, client_ctx)
        with pytest.raises(ssl.SSLError, match="certificate verify failed"):
            await asyncio.wait_for(served.outcome, 2)

    asyncio.run(_with_server(server_ctx, exchange))


def test_client_without_certificate_refused() -> None:
    ca = CertificateAuthority.create(TD)
    server_ctx = server_context(_workload_cert(ca, HTTPBIN), ca.root_pem)

    async def exchange(served: Served) -> None:
        await _expect_client_refused(served.port, _bare_client_context(ca.root_pem))
        with pytest.raises(ssl.SSLError, match="PEER_DID_NOT_RETURN_A_CERTIFICATE"):
            await asyncio.wait_for(served.outcome, 2)

    asyncio.run(_with_server(server_ctx, exchange))


def test_tls12_client_refused() -> None:
    ca = CertificateAuthority.create(TD)
    server_ctx = server_context(_workload_cert(ca, HTTPBIN), ca.root_pem)
    client_ctx = client_context(_workload_cert(ca, SLEEP), ca.root_pem)
    client_ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    client_ctx.maximum_version = ssl.TLSVersion.TLSv1_2

    async def exchange(served: Served) -> None:
        # Whether the server's alert or its close arrives first is up to the scheduler.
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await asyncio.open_connection(LOOPBACK, served.port, ssl=client_ctx)
        with pytest.raises(ssl.SSLError, match="UNSUPPORTED_PROTOCOL"):
            await asyncio.wait_for(served.outcome, 2)

    asyncio.run(_with_server(server_ctx, exchange))


def test_server_refuses_client_from_another_trust_domain() -> None:
    ca = CertificateAuthority.create(TD)
    foreign_ca = CertificateAuthority.create("example.org")
    # Both roots trusted: the handshake succeeds and the trust-domain check must refuse.
    server_ctx = server_context(_workload_cert(ca, HTTPBIN), ca.root_pem + foreign_ca.root_pem)
    foreign = SpiffeId("example.org", "default", "sleep")
    client_ctx = client_context(_workload_cert(foreign_ca, foreign), ca.root_pem)

    async def exchange(served: Served) -> None:
        await _expect_client_refused(served.port, client_ctx)
        with pytest.raises(PeerIdentityError, match=r"'example\.org', expected 'cluster\.local'"):
            await asyncio.wait_for(served.outcome, 2)

    asyncio.run(_with_server(server_ctx, exchange))


def test_client_refuses_server_from_another_ca() -> None:
    ca = CertificateAuthority.create(TD)
    impostor_ca = CertificateAuthority.create(TD)
    server_ctx = server_context(_workload_cert(impostor_ca, HTTPBIN), ca.root_pem)
    client_ctx = client_context(_workload_cert(ca, SLEEP), ca.root_pem)

    async def exchange(served: Served) -> None:
        with pytest.raises(ssl.SSLError, match="certificate verify failed"):
            await asyncio.open_connection(LOOPBACK, served.port, ssl=client_ctx)
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await asyncio.wait_for(served.outcome, 2)

    asyncio.run(_with_server(server_ctx, exchange))


def test_key_material_removed_after_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[Path] = []
    real_mkdtemp = tempfile.mkdtemp

    def recording_mkdtemp(prefix: str, dir: str | None) -> str:
        path = real_mkdtemp(prefix=prefix, dir=dir)
        made.append(Path(path))
        assert Path(path).stat().st_mode & 0o777 == 0o700
        return path

    monkeypatch.setattr(tempfile, "mkdtemp", recording_mkdtemp)
    ca = CertificateAuthority.create(TD)
    server_context(_workload_cert(ca, HTTPBIN), ca.root_pem)
    client_context(_workload_cert(ca, SLEEP), ca.root_pem)
    assert len(made) == 2
    assert not any(path.exists() for path in made)


def test_hbone_contexts_negotiate_aes_128_gcm_first() -> None:
    """As Envoy and ztunnel do: OpenSSL's own order would pick AES-256-GCM."""
    ca = CertificateAuthority.create(TD)
    server_ctx = server_context(_workload_cert(ca, HTTPBIN), ca.root_pem)
    client_ctx = client_context(_workload_cert(ca, SLEEP), ca.root_pem)
    for context in (server_ctx, client_ctx):
        assert context.get_ciphers()[0]["name"] == "TLS_AES_128_GCM_SHA256"
    server_in, server_out, client_in, client_out = (ssl.MemoryBIO() for _ in range(4))
    server_side = server_ctx.wrap_bio(server_in, server_out, server_side=True)
    client_side = client_ctx.wrap_bio(client_in, client_out)
    for _ in range(10):  # a handshake in memory: hand the records across until done
        for obj in (client_side, server_side):
            with contextlib.suppress(ssl.SSLWantReadError):
                obj.do_handshake()
        server_in.write(client_out.read())
        client_in.write(server_out.read())
    client_cipher, server_cipher = client_side.cipher(), server_side.cipher()
    assert client_cipher is not None and server_cipher is not None
    assert client_cipher[0] == server_cipher[0] == "TLS_AES_128_GCM_SHA256"
