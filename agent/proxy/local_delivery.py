"""Same-node delivery: a mesh connection between two pods this agent has both enrolled is
handed from one to the other without HBONE.

Both ends are on this node, in pods whose sockets the agent makes itself, so there is no wire
to protect and nobody to authenticate: TLS and HTTP/2 framing would cost two TLS sessions'
worth of CPU on one event loop for nothing. The outbound handler (agent/proxy/outbound.py)
hands such a connection here instead of tunnelling it; this does exactly what the
destination side of a tunnel does (agent/proxy/app_connection.py: the address check, the
waypoint-bypass count, the socket to the app in the destination pod's netns from the
client's address, tagged with the source pod's identity so that the destination's kernel
decides the connect), and relays plain bytes between the two app-facing sockets on threads
(agent/proxy/socket_relay.py).

Telemetry is that of the HBONE path: the source report under the cookie of the socket
facing the source app, the destination report under that of the socket facing the
destination app, with the route "local" in the access log. A denial resets the source's
connection and is recorded with its policy at both reporters (as a 401 is).
"""

from __future__ import annotations

import collections

from agent.proxy import report
from agent.proxy.app_connection import AppConnector, AppRefused, Caller
from agent.proxy.live_inbound import LiveInbound
from agent.proxy.pod import Pod, identity_of
from agent.proxy.relay import RelayResult
from agent.proxy.socket_listener import AcceptedSocket
from agent.proxy.socket_relay import Relaying, SocketRelays
from agent.state.store import MeshState
from agent.telemetry.connections import ConnectionTelemetry, TrackedConnection
from agent.telemetry.istio_labels import Reporter

ROUTE = "local"  # the access log's route for these connections


class LocalDelivery:
    def __init__(
        self,
        connector: AppConnector,
        telemetry: ConnectionTelemetry,
        live: LiveInbound,
        relays: SocketRelays,
    ) -> None:
        self._connector = connector
        self._telemetry = telemetry
        self._live = live
        self._relays = relays
        # Same-node connections by outcome: delivered, denied (the kernel refused the
        # connect), unreachable (the app did not answer), bad_address; for /metrics.
        self.counts: collections.Counter[str] = collections.Counter()

    async def deliver(
        self,
        state: MeshState,
        source: Pod,
        destination: Pod,
        client: AcceptedSocket,
        src: report.Endpoint,
        dst: report.Endpoint,
        source_report: TrackedConnection,
    ) -> None:
        """`client`: the source app's connection, accepted on its pod's 15001 (its report
        opened as `source_report`); `dst`: the destination app's address."""
        peer = identity_of(source.workload)
        caller = Caller(src[0], report.address(src), peer, "local")
        # The labels of the HBONE path, connection_security_policy mutual_tls included: the
        # agent captured both ends itself, so what mTLS proves between two agents (each
        # end's identity) it knows first hand. The source's identity is that of the pod it
        # accepted the connection from, the destination's that of the pod it connects to,
        # both pods it enrolled and holds the certificates of.
        connection = report.connection_report(
            state, Reporter.DESTINATION, True, (caller.address, source.workload, peer.uri),
            (report.address(dst), dst[1], destination.workload,
             identity_of(destination.workload).uri),
            peer_is_client=False, route=ROUTE,
        )  # fmt: skip
        outcome = await self._connector.connect(state, destination, caller, dst, connection)
        assert outcome is not None  # no tunnel that could have been reset meanwhile
        if isinstance(outcome, AppRefused):
            self.counts[outcome.outcome] += 1
            client.reset()  # what a refused tunnel looks like to the source app
            self._telemetry.done(source_report, outcome.verdict, error=outcome.error)
            return
        self.counts["delivered"] += 1
        relaying = await self._relays.start(client.release(), outcome.sock)
        # The destination pod's drain ends the relay too (its unenrolling, the agent's
        # shutdown), as it ends the tunnels into the pod; the source's runs this handler.
        destination.spawn(_held(relaying))

        def finish(relayed: RelayResult) -> None:
            # One relay, both reports: each side's kernel record has its own socket's bytes
            # (on the source pod's drain, the relay's counts only stand in without them).
            report.finish(self._telemetry, source_report, outcome.verdict, relayed)
            report.finish(self._telemetry, outcome.tracked, outcome.verdict, relayed)

        await self._live.relayed(relaying, destination, caller.ip, dst, peer, finish)


async def _held(relaying: Relaying) -> None:
    """Waits with the relay; cancelled by the destination pod's drain, it cuts it."""
    await relaying.wait()
