"""HBONE limits, sans-IO: what a peer with a mesh certificate could do to the agent's memory
and upstream connections, refused with GOAWAY ENHANCE_YOUR_CALM before h2 takes it in."""

from __future__ import annotations

import h2.errors
import hyperframe.frame as frames
import pytest

from agent.hbone import protocol as p

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def raw_client() -> bytes:
    return PREFACE + frames.SettingsFrame(0).serialize()


def goaway_code(server: p.HboneServer) -> int | None:
    data = server.data_to_send()
    at = 0
    while at + 9 <= len(data):
        frame, length = frames.Frame.parse_frame_header(memoryview(data[at : at + 9]))
        frame.parse_body(memoryview(data[at + 9 : at + 9 + length]))
        if isinstance(frame, frames.GoAwayFrame):
            return int(frame.error_code)
        at += 9 + length
    return None


def refused(server: p.HboneServer, data: bytes) -> p.HboneProtocolError:
    with pytest.raises(p.HboneProtocolError) as caught:
        server.receive_data(data)
    assert goaway_code(server) == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    return caught.value


def test_a_continuation_flood_is_refused_at_the_header_block_limit() -> None:
    server = p.HboneServer()
    server.receive_data(raw_client())
    headers = frames.HeadersFrame(1, data=b"\x00" * 1024).serialize()  # no END_HEADERS
    continuation = frames.ContinuationFrame(1, data=b"\x00" * 16384).serialize()
    error = refused(server, headers + continuation * 4)  # 65 KiB > 64 KiB
    assert error.reason == "header_block_too_large"


def test_a_header_block_within_the_limit_is_taken() -> None:
    client, server = p.HboneClient(), p.HboneServer()
    server.receive_data(client.data_to_send())
    client.open_tunnel("10.0.0.2:8080", {"baggage": "k=" + "v" * 30000})
    events = server.receive_data(client.data_to_send())
    assert [type(e) for e in events] == [p.TunnelRequested]


def test_rapid_reset_is_refused_past_the_burst() -> None:
    clock = Clock()
    client, server = p.HboneClient(), p.HboneServer(clock=clock)
    server.receive_data(client.data_to_send())
    burst = p.HboneLimits().reset_burst
    wire = b""
    for _ in range(burst + 1):
        stream = client.open_tunnel("10.0.0.2:8080")
        client.reset_stream(stream)
        wire += client.data_to_send()
    error = refused(server, wire)
    assert error.reason == "reset_flood"


def test_resets_at_a_normal_pace_are_fine() -> None:
    clock = Clock()
    client, server = p.HboneClient(), p.HboneServer(clock=clock)
    server.receive_data(client.data_to_send())
    for _ in range(1000):
        clock.now += 0.02  # 50 resets a second: under the rate
        stream = client.open_tunnel("10.0.0.2:8080")
        client.reset_stream(stream)
        server.receive_data(client.data_to_send())


def test_a_server_ending_each_stream_with_a_reset_is_not_a_flood() -> None:
    """Envoy ends every finished CONNECT with RST_STREAM(NO_ERROR): at a client, resets are
    bounded by the streams it opened, so no budget applies there (seen with a waypoint)."""
    client, server = p.HboneClient(), p.HboneServer(clock=Clock())
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    for _ in range(p.HboneLimits().reset_burst * 3):  # at one instant: far past any budget
        stream = client.open_tunnel("10.0.0.2:8080")
        server.receive_data(client.data_to_send())
        server.reset_stream(stream, h2.errors.ErrorCodes.NO_ERROR)
        events = client.receive_data(server.data_to_send())
        assert p.StreamReset(stream, h2.errors.ErrorCodes.NO_ERROR) in events


@pytest.mark.parametrize(
    "frame",
    [frames.PingFrame(0, opaque_data=b"12345678"), frames.SettingsFrame(0)],
    ids=["ping", "settings"],
)
def test_ping_and_settings_floods_are_refused(frame: frames.Frame) -> None:
    server = p.HboneServer(clock=Clock())
    server.receive_data(raw_client())
    error = refused(server, frame.serialize() * (p.HboneLimits().control_burst + 1))
    assert error.reason == "control_frame_flood"


def test_a_connect_to_the_agents_own_ports_is_answered_400() -> None:
    client, server = p.HboneClient(), p.HboneServer(refused_ports=frozenset({15008}))
    server.receive_data(client.data_to_send())
    stream = client.open_tunnel("10.0.0.2:15008")
    (event,) = server.receive_data(client.data_to_send())
    assert event == p.TunnelRefusedAutomatically(stream, 400, "port 15008 is the agent's own")
