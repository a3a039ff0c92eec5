"""The kernel's "socket closed" record (struct sock_closed_event in bpf/sock_telemetry.c)
and SO_COOKIE. No root, no kernel programs: the cookie tests use plain loopback sockets."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from agent.telemetry.events import (
    EVENT_SIZE,
    EventError,
    SocketClosed,
    decode,
    encode,
    socket_cookie,
)

EVENT = SocketClosed(
    cookie=0x0123_4567_89AB_CDEF,
    opened_ns=1_000_000_000,
    closed_ns=1_250_500_000,
    bytes_received=1_234_567,
    bytes_sent=89,
    local=("10.0.0.2", 15001),
    remote=("192.168.77.254", 54321),
    srtt_us=417,
    retransmits=3,
    passive=True,
)


def c_record(
    *,
    cookie: int,
    opened_ns: int,
    closed_ns: int,
    bytes_received: int,
    bytes_sent: int,
    local_addr: bytes,
    remote_addr: bytes,
    local_port: int,
    remote_port: int,
    srtt_us: int,
    total_retrans: int,
    passive: int,
) -> bytes:
    """The record field by field at the C struct's offsets (x86/arm64 little-endian)."""
    return b"".join((
        cookie.to_bytes(8, "little"),
        opened_ns.to_bytes(8, "little"),
        closed_ns.to_bytes(8, "little"),
        bytes_received.to_bytes(8, "little"),
        bytes_sent.to_bytes(8, "little"),
        local_addr,  # __u32 in network order, as skops->local_ip4 holds it
        remote_addr,
        local_port.to_bytes(2, "little"),  # host order (the C side converts remote_port)
        remote_port.to_bytes(2, "little"),
        srtt_us.to_bytes(4, "little"),
        total_retrans.to_bytes(4, "little"),
        passive.to_bytes(1, "little"),
        b"\0\0\0",  # reserved[3]
    ))  # fmt: skip


def test_event_size_is_the_c_structs_64_bytes() -> None:
    assert EVENT_SIZE == 64
    assert len(encode(EVENT)) == 64


@pytest.mark.parametrize("passive", [True, False])
def test_encode_then_decode_gives_back_every_field(passive: bool) -> None:
    event = SocketClosed(
        EVENT.cookie, EVENT.opened_ns, EVENT.closed_ns, EVENT.bytes_received, EVENT.bytes_sent,
        EVENT.local, EVENT.remote, EVENT.srtt_us, EVENT.retransmits, passive,
    )  # fmt: skip
    decoded = decode(encode(event))
    assert decoded == event
    assert decoded.local == ("10.0.0.2", 15001)
    assert decoded.remote == ("192.168.77.254", 54321)
    assert decoded.passive is passive


def test_round_trip_keeps_extreme_values() -> None:
    event = SocketClosed(
        cookie=2**64 - 1, opened_ns=0, closed_ns=2**64 - 1, bytes_received=2**64 - 1,
        bytes_sent=0, local=("0.0.0.0", 0), remote=("255.255.255.255", 65535),
        srtt_us=2**32 - 1, retransmits=2**32 - 1, passive=False,
    )  # fmt: skip
    assert decode(encode(event)) == event


def test_decode_reads_the_c_struct_layout() -> None:
    record = c_record(
        cookie=77, opened_ns=5_000, closed_ns=9_000, bytes_received=300, bytes_sent=200,
        local_addr=bytes([10, 0, 0, 2]), remote_addr=bytes([10, 0, 1, 3]), local_port=15008,
        remote_port=40000, srtt_us=25, total_retrans=1, passive=1,
    )  # fmt: skip
    assert decode(record) == SocketClosed(
        77, 5_000, 9_000, 300, 200, ("10.0.0.2", 15008), ("10.0.1.3", 40000), 25, 1, True
    )


def test_encode_writes_the_c_struct_layout_with_zeroed_reserved_bytes() -> None:
    assert encode(EVENT) == c_record(
        cookie=EVENT.cookie, opened_ns=EVENT.opened_ns, closed_ns=EVENT.closed_ns,
        bytes_received=EVENT.bytes_received, bytes_sent=EVENT.bytes_sent,
        local_addr=bytes([10, 0, 0, 2]), remote_addr=bytes([192, 168, 77, 254]),
        local_port=15001, remote_port=54321, srtt_us=417, total_retrans=3, passive=1,
    )  # fmt: skip


def test_duration_is_closed_minus_opened() -> None:
    assert EVENT.duration_ns == 250_500_000


@pytest.mark.parametrize("size", [0, 1, EVENT_SIZE - 1, EVENT_SIZE + 1, 2 * EVENT_SIZE])
def test_decode_of_a_record_of_the_wrong_size_names_both_sizes(size: int) -> None:
    with pytest.raises(EventError, match=rf"\b{size} bytes, expected {EVENT_SIZE}\b"):
        decode(bytes(size))


def test_event_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        decode(b"short")


@pytest.fixture
def loopback_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected TCP pair over 127.0.0.1, closed afterwards."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname()[:2])
        server, _ = listener.accept()
        try:
            yield client, server
        finally:
            client.close()
            server.close()


def test_socket_cookies_of_two_sockets_are_distinct_nonzero_ints(
    loopback_pair: tuple[socket.socket, socket.socket],
) -> None:
    client, server = loopback_pair
    cookies = socket_cookie(client), socket_cookie(server)
    assert all(type(c) is int and c > 0 for c in cookies)
    assert cookies[0] != cookies[1]


def test_socket_cookie_is_stable_for_one_socket(
    loopback_pair: tuple[socket.socket, socket.socket],
) -> None:
    client, _ = loopback_pair
    first = socket_cookie(client)
    client.sendall(b"x")  # the socket's traffic does not change its id
    assert socket_cookie(client) == first == socket_cookie(client)
