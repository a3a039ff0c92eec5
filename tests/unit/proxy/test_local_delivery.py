"""Same-node delivery without a kernel (agent/proxy/local_delivery.py, outbound.py's choice of
it): which routes are delivered locally, and what both reporters record, with the
destination side (agent/proxy/app_connection.py) faked and the relay real over loopback."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import threading
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

import pytest

from agent.netns import NetnsWorker
from agent.proxy.app_connection import AppConnected, AppConnector, AppRefused, Caller
from agent.proxy.destination import Route
from agent.proxy.live_inbound import LiveInbound
from agent.proxy.local_delivery import LocalDelivery
from agent.proxy.outbound import local_destination
from agent.proxy.pod import Pod
from agent.proxy.report import connection_report
from agent.proxy.socket_listener import AcceptedSocket
from agent.proxy.socket_relay import SocketRelays
from agent.proxy.waypoint_bypass import WaypointBypasses
from agent.state.store import MeshState
from agent.state.waypoint import Waypoint
from agent.state.workload import Protocol, Workload
from agent.telemetry.connections import (
    ConnectionReport,
    ConnectionTelemetry,
    PolicyVerdict,
    TrackedConnection,
)
from agent.telemetry.istio_labels import Reporter
from tests.support.loopback import closing, receive_outcome, tcp_pair

CLIENT = Workload("uid-client", "client", "default", "client", ("10.240.1.2",), Protocol.HBONE,
                  "node-1")  # fmt: skip
SERVER = Workload("uid-server", "server", "default", "server", ("10.240.1.3",), Protocol.HBONE,
                  "node-1")  # fmt: skip
STATE = MeshState(workloads=(CLIENT, SERVER))
WAYPOINT = Waypoint("10.240.1.4", name="waypoint", namespace="default")


@dataclass
class FakePod:
    workload: Workload
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def worker(self) -> NetnsWorker:
        raise AssertionError("the destination side is faked: no netns work here")

    def spawn(self, coro: Coroutine[Any, Any, None]) -> object:
        task = asyncio.ensure_future(coro)
        self.tasks.append(task)
        return task


def routed(workload: Workload | None, ip: str = "10.240.1.3", **kw: Any) -> Route:
    return Route((ip, 8080), workload, None, False, **kw)


def test_a_direct_route_to_a_pod_this_agent_enrolled_is_delivered_locally() -> None:
    server = FakePod(SERVER)
    enrolled = {"10.240.1.3": server}
    assert local_destination(routed(SERVER), enrolled.get) is server


@pytest.mark.parametrize(
    ("why", "decided", "enrolled"),
    [
        ("not enrolled on this node", routed(SERVER), {}),
        ("through a waypoint", routed(SERVER, waypoint=WAYPOINT),
         {"10.240.1.3": FakePod(SERVER)}),
        ("outside the mesh", routed(dataclasses.replace(SERVER, protocol=Protocol.TCP)),
         {"10.240.1.3": FakePod(SERVER)}),
        ("another pod at the address now", routed(SERVER),
         {"10.240.1.3": FakePod(dataclasses.replace(SERVER, uid="uid-other"))}),
        ("the state names another identity", routed(dataclasses.replace(SERVER,
         service_account="impostor")), {"10.240.1.3": FakePod(SERVER)}),
        ("an address that is not the workload's", routed(SERVER, ip="10.240.1.9"),
         {"10.240.1.9": FakePod(SERVER)}),
        ("unknown destination", routed(None), {}),
    ],
)  # fmt: skip
def test_other_routes_keep_hbone_or_pass_through(
    why: str, decided: Route, enrolled: dict[str, Pod]
) -> None:
    assert local_destination(decided, enrolled.get) is None, why


class FakeConnector(AppConnector):
    """The destination side: hands out the prepared app socket, or refuses, recording the
    destination report as the real one does."""

    def __init__(self, telemetry: ConnectionTelemetry, answer: socket.socket | AppRefused) -> None:
        super().__init__(None, telemetry, WaypointBypasses())
        self.telemetry = telemetry
        self.answer = answer
        self.asked: list[tuple[Caller, tuple[str, int], ConnectionReport]] = []

    async def connect(
        self, state: MeshState, pod: Pod, caller: Caller, dst: tuple[str, int],
        connection: ConnectionReport, gone: Any = None,
    ) -> AppConnected | AppRefused | None:  # fmt: skip
        self.asked.append((caller, dst, connection))
        if isinstance(self.answer, AppRefused):
            tracked = self.telemetry.open(None, connection)
            self.telemetry.done(tracked, self.answer.verdict, error=self.answer.error)
            return self.answer
        tracked = self.telemetry.open(None, connection)
        return AppConnected(self.answer, tracked, PolicyVerdict("allow", "default/p", "allowed"))


def source_report(telemetry: ConnectionTelemetry) -> TrackedConnection:
    return telemetry.open(None, connection_report(
        STATE, Reporter.SOURCE, True, ("10.240.1.2:40000", CLIENT, "spiffe://cluster.local/ns/default/sa/client"),
        ("10.240.1.3:8080", 8080, SERVER, "spiffe://cluster.local/ns/default/sa/server"),
        route="local",
    ))  # fmt: skip


def test_bytes_are_relayed_and_counted_at_both_reporters_with_the_route_local() -> None:
    lines: list[dict[str, Any]] = []
    telemetry = ConnectionTelemetry(kernel_records=False, write_log=lines.append)
    source_app, client_side = tcp_pair()
    server_side, server_app = tcp_pair()
    client_side.setblocking(False)
    connector = FakeConnector(telemetry, server_side)
    live = LiveInbound()
    delivery = LocalDelivery(connector, telemetry, live, SocketRelays())
    seen_live: list[int] = []

    def server() -> bytes:
        request = bytearray()
        while chunk := server_app.recv(65536):
            request += chunk
        seen_live.append(len(live.all()))
        server_app.sendall(b"r" * 5000)
        server_app.shutdown(socket.SHUT_WR)
        return bytes(request)

    def client() -> bytes:
        source_app.sendall(b"q" * 300_001)
        source_app.shutdown(socket.SHUT_WR)
        reply = bytearray()
        while chunk := source_app.recv(65536):
            reply += chunk
        return bytes(reply)

    async def main() -> tuple[bytes, bytes]:
        source, destination = FakePod(CLIENT), FakePod(SERVER)
        got = asyncio.gather(asyncio.to_thread(server), asyncio.to_thread(client))
        await delivery.deliver(STATE, source, destination, AcceptedSocket(client_side),
                               ("10.240.1.2", 40000), ("10.240.1.3", 8080),
                               source_report(telemetry))  # fmt: skip
        await asyncio.gather(*destination.tasks)  # the destination's hold ends with the relay
        request, reply = await got
        return request, reply

    with closing(source_app, server_app):
        request, reply = asyncio.run(main())
    assert (len(request), len(reply)) == (300_001, 5000)
    (caller, dst, _), = connector.asked  # fmt: skip
    assert (caller.ip, caller.address, caller.transport) == (
        "10.240.1.2", "10.240.1.2:40000", "local",
    )  # fmt: skip
    assert caller.identity is not None and caller.identity.uri.endswith("/sa/client")
    assert dst == ("10.240.1.3", 8080)
    assert seen_live == [1] and live.all() == []  # known as live for policy re-checks, then not
    by_reporter = {line["reporter"]: line for line in lines}
    assert set(by_reporter) == {"source", "destination"}
    for reporter, line in by_reporter.items():
        assert (line["route"], line["bytes_sent"], line["bytes_recv"]) == ("local", 300_001, 5000)
        assert line["connection_security_policy"] == "mutual_tls", reporter
        assert (line["policy.verdict"], line["policy.name"]) == ("allow", "default/p")
        assert line["src.identity"].endswith("/sa/client")
        assert line["dst.identity"].endswith("/sa/server")
    assert by_reporter["destination"]["direction"] == "inbound"
    assert delivery.counts == {"delivered": 1}


def test_a_denied_connect_resets_the_source_and_its_report_records_the_deny() -> None:
    """The destination's report is AppConnector's (the fake's here): what both reporters
    log is tests/e2e/test_local_delivery.py's, on the real connector."""
    lines: list[dict[str, Any]] = []
    telemetry = ConnectionTelemetry(kernel_records=False, write_log=lines.append)
    source_app, client_side = tcp_pair()
    client_side.setblocking(False)
    denied = AppRefused(401, PolicyVerdict("deny", "default/deny-client", "denied-by-policy"),
                        "denied: denied-by-policy (default/deny-client)")  # fmt: skip
    delivery = LocalDelivery(FakeConnector(telemetry, denied), telemetry, LiveInbound(),
                             SocketRelays())  # fmt: skip
    outcome: list[str] = []
    reader = threading.Thread(target=lambda: outcome.append(receive_outcome(source_app)))
    reader.start()

    async def main() -> None:
        await delivery.deliver(STATE, FakePod(CLIENT), FakePod(SERVER), AcceptedSocket(client_side),
                               ("10.240.1.2", 40000), ("10.240.1.3", 8080),
                               source_report(telemetry))  # fmt: skip

    with closing(source_app):
        asyncio.run(main())
        reader.join(10)
    assert outcome == ["reset"]
    source = [line for line in lines if line["reporter"] == "source"]
    assert [(line["policy.verdict"], line["policy.name"], line["error"]) for line in source] == [
        ("deny", "default/deny-client", "denied: denied-by-policy (default/deny-client)"),
    ]
    assert delivery.counts == {"denied": 1}
