"""HBONE sans-IO: two protocol objects handing bytes to each other, no network."""

from __future__ import annotations

from typing import Any, TypeVar

import h2.config
import h2.connection
import hpack
import pytest

from agent.hbone import protocol as p
from agent.hbone import wire


def pump(a: p._HboneProtocol, b: p._HboneProtocol) -> tuple[list[p.Event], list[p.Event]]:
    """Move bytes both ways until quiet; returns (events at a, events at b)."""
    at_a: list[p.Event] = []
    at_b: list[p.Event] = []
    while True:
        to_b, to_a = a.data_to_send(), b.data_to_send()
        if not to_b and not to_a:
            return at_a, at_b
        if to_b:
            at_b += b.receive_data(to_b)
        if to_a:
            at_a += a.receive_data(to_a)


def connected() -> tuple[p.HboneClient, p.HboneServer]:
    client, server = p.HboneClient(), p.HboneServer()
    pump(client, server)
    return client, server


def tunnel(client: p.HboneClient, server: p.HboneServer) -> int:
    stream = client.open_tunnel("10.0.0.2:8080")
    _, at_server = pump(client, server)
    assert isinstance(at_server[0], p.TunnelRequested)
    server.accept(stream)
    at_client, _ = pump(client, server)
    assert p.TunnelEstablished(stream) in at_client
    return stream


E = TypeVar("E")


def of(events: list[p.Event], kind: type[E]) -> list[E]:
    return [e for e in events if isinstance(e, kind)]


def test_connect_carries_authority_and_istio_headers() -> None:
    client, server = connected()
    headers = {"forwarded": 'for="10.0.0.9:4000"', "baggage": "k=v", "traceparent": "00-ab-cd-01"}
    stream = client.open_tunnel("10.0.0.2:8080", headers)
    _, at_server = pump(client, server)
    assert at_server == [p.TunnelRequested(stream, "10.0.0.2:8080", "10.0.0.2", 8080, headers)]


def test_bytes_flow_both_ways_and_half_close_is_carried() -> None:
    client, server = connected()
    stream = tunnel(client, server)
    assert client.send_data(stream, b"request") == 7
    client.end_stream(stream)  # client FIN
    _, at_server = pump(client, server)
    assert [e.data for e in of(at_server, p.Data)] == [b"request"]
    assert p.PeerHalfClosed(stream) in at_server
    # The other direction still flows after the client's half-close.
    assert server.send_data(stream, b"response") == 8
    server.end_stream(stream)
    at_client, _ = pump(client, server)
    assert [e.data for e in of(at_client, p.Data)] == [b"response"]
    assert p.PeerHalfClosed(stream) in at_client
    assert client.open_streams == 0 and server.open_streams == 0


@pytest.mark.parametrize("status", [401, 503])
def test_refusals_reach_the_client_as_rejections(status: int) -> None:
    client, server = connected()
    stream = client.open_tunnel("10.0.0.2:8080")
    pump(client, server)
    server.refuse(stream, status)
    at_client, _ = pump(client, server)
    assert of(at_client, p.TunnelRejected) == [p.TunnelRejected(stream, status)]


def raw_h2_request(headers: list[tuple[str, str]]) -> tuple[list[p.Event], list[Any]]:
    """Send a request with plain h2 (which HboneClient would never produce)."""
    raw = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    raw.initiate_connection()
    server = p.HboneServer()
    at_server = server.receive_data(raw.data_to_send())
    raw.receive_data(server.data_to_send())
    raw.send_headers(1, headers, end_stream=False)
    at_server += server.receive_data(raw.data_to_send())
    answer = raw.receive_data(server.data_to_send())
    return at_server, answer


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        (
            [(":method", "GET"), (":scheme", "https"), (":authority", "10.0.0.2:80"),
             (":path", "/")],
            "method 'GET' is not CONNECT",
        ),
        ([(":method", "CONNECT"), (":authority", "example.com:80")], "does not appear"),
        ([(":method", "CONNECT"), (":authority", "10.0.0.2")], "is not ip:port"),
        ([(":method", "CONNECT"), (":authority", "10.0.0.2:70000")], "out of range"),
    ],
)  # fmt: skip
def test_invalid_requests_are_answered_400(headers: list[tuple[str, str]], reason: str) -> None:
    at_server, answer = raw_h2_request(headers)
    refused = of(at_server, p.TunnelRefusedAutomatically)
    assert len(refused) == 1 and refused[0].status == 400
    assert reason in refused[0].reason
    responses = [e for e in answer if type(e).__name__ == "ResponseReceived"]
    assert (b":status", b"400") in responses[0].headers


def test_reset_reaches_the_peer() -> None:
    client, server = connected()
    stream = tunnel(client, server)
    server.reset_stream(stream)
    at_client, _ = pump(client, server)
    assert of(at_client, p.StreamReset) == [p.StreamReset(stream, 8)]  # CANCEL


def test_unconsumed_data_stalls_the_sender_at_the_stream_window() -> None:
    client, server = connected()
    stream = tunnel(client, server)
    chunk = b"x" * (1024 * 1024)
    sent = 0
    for _ in range(10):  # try to push 10 MiB without the server consuming any
        sent += client.send_data(stream, chunk)
        pump(client, server)
    assert sent == p.STREAM_WINDOW  # 4 MiB in flight, not a byte more
    assert client.sendable(stream) == 0


def test_consuming_opens_the_window_again() -> None:
    client, server = connected()
    stream = tunnel(client, server)
    payload = b"y" * p.STREAM_WINDOW
    assert client.send_data(stream, payload) == p.STREAM_WINDOW
    _, at_server = pump(client, server)
    data = of(at_server, p.Data)
    assert max(len(e.data) for e in data) <= p.MAX_FRAME
    for event in data:
        server.consumed(stream, event.flow_length)
    at_client, _ = pump(client, server)
    assert of(at_client, p.WindowOpened)
    # h2 hands windows back in batches (at least half a window at a time), never all at once.
    assert client.sendable(stream) >= p.STREAM_WINDOW // 2


def test_connection_window_is_16_mib_across_streams() -> None:
    client, server = connected()
    streams = [tunnel(client, server) for _ in range(5)]
    sent = sum(client.send_data(s, b"z" * p.STREAM_WINDOW) for s in streams)
    assert sent == p.CONNECTION_WINDOW


def test_at_most_100_streams_per_connection() -> None:
    client, _ = connected()
    opened = 0
    while client.can_open_stream():
        client.open_tunnel("10.0.0.2:8080")
        opened += 1
        assert opened <= 1000
    assert opened == p.MAX_STREAMS


def test_ping_is_acknowledged() -> None:
    client, server = connected()
    client.ping(b"12345678")
    at_client, _ = pump(client, server)
    assert at_client == [p.PingAcknowledged(b"12345678")]


def test_goaway_is_reported() -> None:
    client, server = connected()
    server.close()
    at_client, _ = pump(client, server)
    assert of(at_client, p.ConnectionClosed) == [p.ConnectionClosed(0, 0)]


def test_garbage_is_a_protocol_error() -> None:
    server = p.HboneServer()
    with pytest.raises(p.HboneProtocolError):
        server.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")


@pytest.mark.parametrize(
    ("authority", "parsed"),
    [("10.0.0.2:80", ("10.0.0.2", 80)), ("[fd00::1]:15008", ("fd00::1", 15008))],
)
def test_parse_authority(authority: str, parsed: tuple[str, int]) -> None:
    assert p.parse_authority(authority) == parsed
    assert p.format_authority(*parsed) == authority


def test_header_blocks_decode_with_an_independent_hpack() -> None:
    """Literals without indexing and :status 200 by index, long values included (an integer
    past its prefix)."""
    headers = [(":method", "CONNECT"), (":authority", "10.0.0.2:8080"),
               ("baggage", "k=" + "v" * 5000), ("forwarded", 'for="10.0.0.9:4000"'),
               (":status", "200"), (":status", "503")]  # fmt: skip
    decoded = hpack.Decoder().decode(wire.encode_headers(headers))
    assert [(str(name), str(value)) for name, value in decoded] == headers
