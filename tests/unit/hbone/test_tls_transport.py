"""The TLS transport HBONE runs on (agent/hbone/tls_transport.py), over loopback with real
certificates: bulk both ways, backpressure on a peer that stops reading, handshakes that fail,
and connection_lost exactly once."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import ssl
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from agent.hbone import protocol as p
from agent.hbone import tls_transport
from agent.hbone.connection import HboneConnection
from agent.identity import openssl_tuning, tls
from agent.identity.ca import CertificateAuthority
from agent.identity.manager import WorkloadCertificate
from agent.identity.spiffe import SpiffeId
from tests.support.waiting import until
from tests.unit.hbone.test_connection import echo

TD = "cluster.local"
TIMEOUT = 30.0


def certificate(ca: CertificateAuthority, name: str) -> WorkloadCertificate:
    identity = SpiffeId(TD, "default", name)
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = ca.issue(identity, key.public_key(), timedelta(hours=1))
    return WorkloadCertificate(identity, key, [leaf, ca.root])


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create(TD)


class Recorder(asyncio.Protocol):
    """Counts what the transport tells it; reads nothing unless told to."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.received = bytearray()
        self.lost: list[Exception | None] = []
        self.paused = 0
        self.resumed = 0
        self.done = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        assert not self.lost, "data after connection_lost"
        self.received += data

    def pause_writing(self) -> None:
        self.paused += 1

    def resume_writing(self) -> None:
        self.resumed += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.append(exc)
        if not self.done.done():
            self.done.set_result(None)


@contextmanager
def tls_server(ca: CertificateAuthority) -> Iterator[tuple[tuple[str, int], list[Recorder]]]:
    """A TlsServer on loopback: its address, and the protocols of the connections it made."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    served: list[Recorder] = []

    def on_server() -> Recorder:
        served.append(Recorder())
        return served[-1]

    context = tls.server_context(certificate(ca, "server"), ca.root_pem)
    server = tls_transport.TlsServer(listener, context, on_server, 5.0, asyncio.ensure_future)
    try:
        yield listener.getsockname(), served
    finally:
        server.close()


async def tls_client(
    ca: CertificateAuthority, address: tuple[str, int], client_ca: CertificateAuthority
) -> tuple[tls_transport.TlsTransport, Recorder]:
    """A client with a certificate from `client_ca`, trusting `ca`."""
    context = tls.client_context(certificate(client_ca, "client"), ca.root_pem)
    transport, protocol = await tls_transport.connect(
        socket.create_connection(address), context, Recorder, 5.0
    )
    assert isinstance(protocol, Recorder)
    return transport, protocol


@asynccontextmanager
async def tls_pair(
    ca: CertificateAuthority,
) -> AsyncIterator[tuple[list[Recorder], tls_transport.TlsTransport, Recorder]]:
    with tls_server(ca) as (address, served):
        transport, protocol = await tls_client(ca, address, ca)
        yield served, transport, protocol


def test_bytes_arrive_exact_and_close_flushes_first(ca: CertificateAuthority) -> None:
    payload = os.urandom(8 * 1024 * 1024)

    async def main() -> None:
        async with tls_pair(ca) as (served, client, client_protocol):
            await until(lambda: served)
            for at in range(0, len(payload), 300_000):  # writes of odd sizes
                client.write(payload[at : at + 300_000])
            client.close()  # only once the buffer is out
            await asyncio.wait_for(served[0].done, TIMEOUT)
            assert hashlib.sha256(served[0].received).digest() == hashlib.sha256(payload).digest()
            await asyncio.wait_for(client_protocol.done, TIMEOUT)
            assert client_protocol.lost == [None] and served[0].lost == [None]

    asyncio.run(main())


def test_a_peer_that_stops_reading_pauses_the_writer(ca: CertificateAuthority) -> None:
    async def main() -> None:
        async with tls_pair(ca) as (served, client, client_protocol):
            await until(lambda: served and served[0].transport)
            server_transport = served[0].transport
            assert server_transport is not None
            server_transport.pause_reading()
            chunk = b"x" * 65536

            async def fill() -> None:
                while not client_protocol.paused:
                    client.write(chunk)
                    await asyncio.sleep(0)

            await asyncio.wait_for(fill(), TIMEOUT)
            # The transport holds a bounded amount beyond its high-water mark.
            assert client.get_write_buffer_size() <= tls_transport.HIGH_WATER + len(chunk)
            await asyncio.sleep(0.1)
            assert not served[0].received  # the paused reader was given nothing
            server_transport.resume_reading()
            await until(lambda: client_protocol.resumed)
            assert client.get_write_buffer_size() <= tls_transport.LOW_WATER
            client.abort()
            await asyncio.wait_for(served[0].done, TIMEOUT)

    asyncio.run(main())


def test_a_failed_handshake_makes_no_protocol_and_the_server_goes_on(
    ca: CertificateAuthority,
) -> None:
    other = CertificateAuthority.create(TD)

    async def main() -> None:
        with tls_server(ca) as (address, served):
            try:
                _, protocol = await tls_client(ca, address, client_ca=other)
            except (ssl.SSLError, ConnectionError):
                pass  # refused within the handshake
            else:
                # TLS 1.3: the client may finish before the server refuses its certificate;
                # the server then ends the connection.
                await asyncio.wait_for(protocol.done, TIMEOUT)
                assert not protocol.received
            assert not served
            transport, _ = await tls_client(ca, address, client_ca=ca)
            transport.write(b"after the refusal")
            await until(lambda: served and served[0].received == b"after the refusal")
            transport.abort()

    asyncio.run(main())


def test_abort_reports_connection_lost_once(ca: CertificateAuthority) -> None:
    async def main() -> None:
        async with tls_pair(ca) as (served, client, client_protocol):
            await until(lambda: served)
            client.write(b"last words")
            client.abort()
            client.abort()
            client.close()
            await asyncio.wait_for(client_protocol.done, TIMEOUT)
            await asyncio.sleep(0.05)
            assert client_protocol.lost == [None]
            await asyncio.wait_for(served[0].done, TIMEOUT)
            assert len(served[0].lost) == 1

    asyncio.run(main())


def test_hbone_tunnels_run_on_it(ca: CertificateAuthority) -> None:
    """An HBONE client and server over the transport: a tunnel, both directions, half-close."""
    size = 4 * 1024 * 1024

    async def main() -> None:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        server = tls_transport.TlsServer(
            listener,
            tls.server_context(certificate(ca, "server"), ca.root_pem),
            lambda: HboneConnection(p.HboneServer(), on_tunnel=echo),
            5.0,
            asyncio.ensure_future,
        )
        sock = socket.create_connection(listener.getsockname())
        context = tls.client_context(certificate(ca, "client"), ca.root_pem)
        _, conn = await tls_transport.connect(
            sock, context, lambda: HboneConnection(p.HboneClient()), 5.0
        )
        assert isinstance(conn, HboneConnection)
        try:
            await conn.ready()
            stream = await conn.open_tunnel("10.0.0.2:80", {})
            payload = os.urandom(size)
            received = bytearray()

            async def read_all() -> None:
                while chunk := await stream.read():
                    received.extend(chunk)

            reader = asyncio.ensure_future(read_all())
            await stream.write(payload)
            stream.write_eof()
            await asyncio.wait_for(reader, TIMEOUT)
            assert bytes(received) == payload
        finally:
            conn.close()
            server.close()

    asyncio.run(main())


def test_contexts_read_ahead_and_offer_aes_128_first(ca: CertificateAuthority) -> None:
    cert = certificate(ca, "client")
    for context in (tls.client_context(cert, ca.root_pem), tls.server_context(cert, ca.root_pem)):
        lib = openssl_tuning._libssl()
        assert lib is not None
        ctx = openssl_tuning._ssl_ctx(lib, context)
        assert ctx is not None
        assert lib.SSL_CTX_ctrl(ctx, openssl_tuning._SSL_CTRL_GET_READ_AHEAD, 0, None) == 1
        assert context.get_ciphers()[0]["name"] == openssl_tuning.FIRST


def test_reading_paused_mid_burst_resumes_with_every_byte(ca: CertificateAuthority) -> None:
    """With read-ahead, OpenSSL takes in records the socket will not signal again: a reader
    that pauses after a full batch, ending on a record boundary while the last record is
    already off the socket, still gets it once it resumes (the peer sends nothing more)."""
    payload = os.urandom(tls_transport.READ_BATCH + 5000)  # 16 records of 16 KiB, then one

    async def main() -> None:
        async with tls_pair(ca) as (served, client, _):
            await until(lambda: served)
            server = served[0]
            transport = server.transport
            assert transport is not None
            transport.pause_reading()
            batches: list[int] = []
            receive = server.data_received

            def pause_after_first(data: bytes) -> None:
                batches.append(len(data))
                receive(data)
                transport.pause_reading()

            server.data_received = pause_after_first  # type: ignore[method-assign]
            client.write(payload)
            await asyncio.sleep(0.3)  # all of it in the server's socket
            transport.resume_reading()
            await until(lambda: batches)
            assert batches == [tls_transport.READ_BATCH]
            await asyncio.sleep(0.3)
            transport.resume_reading()
            await until(lambda: len(server.received) == len(payload), timeout=3)
            assert bytes(server.received) == payload

    asyncio.run(asyncio.wait_for(main(), TIMEOUT))
