"""HBONE between enrolled pods on the real kernel (the agent in-process:
tests/support/inprocess_mesh.py)."""

from __future__ import annotations

import dataclasses
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import TypeVar

import h2.config
import h2.connection
import h2.events
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from agent.datapath import abi
from agent.hbone.pool import PoolKey
from agent.identity import tls
from agent.identity.ca import CertificateAuthority
from agent.identity.manager import WorkloadCertificate
from agent.identity.spiffe import SpiffeId
from agent.netns import NetnsWorker
from agent.state.store import MeshState
from lab import probes
from tests.support import bulk
from tests.support.inprocess_mesh import APP, Mesh, mesh_fixture, whoami_everywhere

pytestmark = pytest.mark.kernel
T = TypeVar("T")


@pytest.fixture(scope="module")
def mesh() -> Iterator[Mesh]:
    yield from mesh_fixture("tt")


@pytest.fixture(scope="module")
def servers(mesh: Mesh) -> Iterator[None]:
    yield from whoami_everywhere(mesh)


def in_pod(mesh: Mesh, pod: str, fn: Callable[[], T]) -> T:
    worker = NetnsWorker(str(mesh.pod(pod).netns_path))
    try:
        return worker.call(fn)
    finally:
        worker.close()


def workload_cert(ca: CertificateAuthority, identity: SpiffeId) -> WorkloadCertificate:
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = ca.issue(identity, key.public_key(), timedelta(hours=1))
    return WorkloadCertificate(identity, key, [leaf, ca.root])


CLIENT_A = SpiffeId("cluster.local", "default", "client-a")


def hbone_request(
    mesh: Mesh, context: ssl.SSLContext, target: str, headers: list[tuple[str, str]]
) -> int | str:
    """From the out-of-mesh pod, TLS to target's 15008, one HTTP/2 request; the :status, or
    the error that ended the attempt."""

    def inside() -> int | str:
        raw = socket.create_connection((mesh.pod(target).ip, abi.PORT_HBONE), timeout=5)
        try:
            with context.wrap_socket(raw, server_hostname=None) as sock:
                conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
                conn.initiate_connection()
                conn.send_headers(1, headers)
                sock.sendall(conn.data_to_send())
                while True:
                    data = sock.recv(65536)
                    if not data:
                        return "closed"
                    for event in conn.receive_data(data):
                        if isinstance(event, h2.events.ResponseReceived):
                            return int(dict(event.headers)[b":status"])
                    sock.sendall(conn.data_to_send())
        except (ssl.SSLError, OSError) as exc:
            return type(exc).__name__
        finally:
            raw.close()

    return in_pod(mesh, "outsider", inside)


def client_context(cert: WorkloadCertificate | None, roots: bytes) -> ssl.SSLContext:
    if cert is not None:
        return tls.client_context(cert, roots)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False
    context.load_verify_locations(cadata=roots.decode())
    context.set_alpn_protocols(["h2"])
    return context


CONNECT_B = [(":method", "CONNECT"), (":authority", "10.240.2.2:8080")]


def test_tunnels_verify_identities_both_ways(mesh: Mesh, servers: None) -> None:
    for target in ("server-b", "server-a"):  # another node, the same node
        exchange = probes.talk(mesh.pod("client-a").netns_path, mesh.pod(target).ip, APP, "x")
        assert exchange.server_saw.split(":")[0] == mesh.pod("client-a").ip
        out = mesh.wait_events(
            "connection complete", direction="outbound", src__addr=exchange.client
        )
        inn = mesh.wait_events(
            "connection complete", direction="inbound", src__addr=exchange.client
        )
        assert out[0]["route"] == "hbone" and inn[0]["route"] == "hbone"
        assert out[0]["dst.identity"] == f"spiffe://cluster.local/ns/default/sa/{target}"
        assert inn[0]["src.identity"] == CLIENT_A.uri
        assert out[0]["dst.hbone_addr"] == f"{mesh.pod(target).ip}:{abi.PORT_HBONE}"


def test_valid_client_gets_200(mesh: Mesh, servers: None) -> None:
    context = client_context(workload_cert(mesh.ca, CLIENT_A), mesh.ca.root_pem)
    assert hbone_request(mesh, context, "server-b", CONNECT_B) == 200


def test_client_without_certificate_is_refused(mesh: Mesh) -> None:
    context = client_context(None, mesh.ca.root_pem)
    assert hbone_request(mesh, context, "server-b", CONNECT_B) != 200


def test_client_certificate_from_another_ca_is_refused(mesh: Mesh) -> None:
    stranger = CertificateAuthority.create("cluster.local")
    cert = workload_cert(stranger, CLIENT_A)
    # Trust the mesh's root for the server, present the stranger's chain.
    assert hbone_request(mesh, client_context(cert, mesh.ca.root_pem), "server-b",
                         CONNECT_B) != 200  # fmt: skip


def test_non_connect_is_answered_400(mesh: Mesh) -> None:
    context = client_context(workload_cert(mesh.ca, CLIENT_A), mesh.ca.root_pem)
    get = [(":method", "GET"), (":scheme", "https"), (":authority", "10.240.2.2:8080"),
           (":path", "/")]  # fmt: skip
    assert hbone_request(mesh, context, "server-b", get) == 400


def test_authority_not_the_pods_address_is_answered_400(mesh: Mesh, servers: None) -> None:
    context = client_context(workload_cert(mesh.ca, CLIENT_A), mesh.ca.root_pem)
    elsewhere = [(":method", "CONNECT"), (":authority", f"{mesh.pod('server-a').ip}:8080")]
    assert hbone_request(mesh, context, "server-b", elsewhere) == 400


def test_upstream_refused_is_503_and_the_client_sees_a_reset(mesh: Mesh) -> None:
    context = client_context(workload_cert(mesh.ca, CLIENT_A), mesh.ca.root_pem)
    closed_port = [(":method", "CONNECT"), (":authority", "10.240.2.2:9")]
    assert hbone_request(mesh, context, "server-b", closed_port) == 503

    def connect_and_read() -> str:
        with socket.create_connection((mesh.pod("server-b").ip, 9), timeout=5) as sock:
            try:
                return repr(sock.recv(1))
            except ConnectionResetError:
                return "reset"

    assert in_pod(mesh, "client-a", connect_and_read) == "reset"
    refused = mesh.wait_events(
        "connection complete", direction="outbound", dst__addr="10.240.2.2:9"
    )
    assert refused and refused[-1]["error"] == "tunnel refused: 503"


def test_server_with_the_wrong_identity_is_refused_by_the_client(mesh: Mesh, servers: None) -> None:
    """The mesh says server-b runs as `impostor`; the real server-b presents `server-b`."""
    current = mesh.store.current
    swapped = [
        dataclasses.replace(w, service_account="impostor") if w.name == "server-b" else w
        for w in current.workloads
    ]
    mesh.loop.call(mesh.store.replace, MeshState(tuple(swapped), current.services,
                                                 current.policies))  # fmt: skip
    try:

        def attempt() -> str:
            with socket.create_connection((mesh.pod("server-b").ip, APP), timeout=5) as sock:
                try:  # the reset may come before the send is done
                    sock.sendall(b"hello\n")
                    return repr(sock.recv(100))
                except ConnectionResetError:
                    return "reset"

        assert in_pod(mesh, "client-a", attempt) == "reset"
        impostor = "spiffe://cluster.local/ns/default/sa/impostor"
        failed = mesh.wait_events(
            "connection complete", direction="outbound", dst__identity=impostor
        )
        assert failed
        assert "server is spiffe://cluster.local/ns/default/sa/server-b" in failed[-1]["error"]
        assert f"expected one of: {impostor}" in failed[-1]["error"]
    finally:
        mesh.loop.call(mesh.store.replace, current)


def test_200_concurrent_connections_share_pooled_hbone_connections(
    mesh: Mesh, servers: None
) -> None:
    client, server = mesh.pod("client-a"), mesh.pod("server-b")

    def many() -> list[str]:
        socks = [socket.create_connection((server.ip, APP), timeout=10) for _ in range(200)]
        try:
            for i, sock in enumerate(socks):
                sock.sendall(f"n{i}\n".encode())
            # All 200 are open at once while their replies come back.
            return [sock.makefile("r").readline() for sock in socks]
        finally:
            for sock in socks:
                sock.close()

    replies = in_pod(mesh, "client-a", many)
    assert [r.split("echo=")[1].strip() for r in replies] == [f"n{i}" for i in range(200)]
    key = PoolKey(CLIENT_A.uri, frozenset({"spiffe://cluster.local/ns/default/sa/server-b"}),
                  (server.ip, abi.PORT_HBONE), client.ip)  # fmt: skip
    pooled = mesh.loop.call(mesh.proxy.pool.connections, key)
    assert 2 <= len(pooled) <= 3  # 100 streams each; a third only if one was still closing


def test_certificate_rotation_keeps_live_connections_and_new_handshakes_use_it(
    mesh: Mesh, servers: None
) -> None:
    server_id = SpiffeId("cluster.local", "default", "server-b")
    sock_holder: list[socket.socket] = []

    def open_and_talk() -> str:
        sock = socket.create_connection((mesh.pod("server-b").ip, APP), timeout=5)
        sock_holder.append(sock)
        sock.sendall(b"before\n")
        return sock.makefile("r").readline()

    def talk_again() -> str:
        sock = sock_holder[0]
        sock.sendall(b"after\n")
        return sock.makefile("r").readline()

    worker = NetnsWorker(str(mesh.pod("client-a").netns_path))
    try:
        assert "echo=before" in worker.call(open_and_talk)
        old = mesh.loop.run(mesh.identities.get(server_id))
        new = mesh.loop.run(mesh.identities.rotate_now(server_id))
        mesh.loop.run(mesh.identities.rotate_now(CLIENT_A))
        assert new.leaf.serial_number != old.leaf.serial_number
        assert "echo=after" in worker.call(talk_again)  # the live connection survived
        worker.call(lambda: sock_holder[0].close())
    finally:
        worker.close()

    def served_certificate() -> int:
        context = client_context(workload_cert(mesh.ca, CLIENT_A), mesh.ca.root_pem)
        raw = socket.create_connection((mesh.pod("server-b").ip, abi.PORT_HBONE), timeout=5)
        with context.wrap_socket(raw, server_hostname=None) as tls_sock:
            der = tls_sock.getpeercert(binary_form=True)
            assert der is not None
            return x509.load_der_x509_certificate(der).serial_number

    assert in_pod(mesh, "outsider", served_certificate) == new.leaf.serial_number
    assert mesh.events("certificate rotated", identity=server_id.uri)


BULK = 256 * 1024 * 1024  # per direction; the 1 GiB run with agent processes: test_lab_e2e.py


def test_bulk_transfer_is_byte_exact_both_ways(mesh: Mesh) -> None:
    server_b = mesh.pod("server-b")
    server_digest = bulk.serve_once(server_b.netns_path, 9000, seed=2, size=BULK)
    started = time.monotonic()
    client_digest = bulk.transfer(mesh.pod("client-a").netns_path, server_b.ip, 9000, 1, BULK)
    assert server_digest() == bulk.expected_digest(1, BULK)
    assert client_digest == bulk.expected_digest(2, BULK)
    complete = mesh.wait_events(
        "connection complete", direction="inbound", dst__addr=f"{server_b.ip}:9000"
    )
    assert complete[-1]["bytes_sent"] == BULK and complete[-1]["bytes_recv"] == BULK
    print(f"2 x {BULK >> 20} MiB through HBONE in {time.monotonic() - started:.1f}s")
