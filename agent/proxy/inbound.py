"""15006, inbound plaintext: a connection from outside the mesh to an enrolled pod.

pod_ingress authorized its SYN before it reached 15006 (a denial never gets here). The app
is connected to with the client's own address as source (IP_TRANSPARENT), so it sees who
called. The bytes go through the agent's socket relays (agent/proxy/socket_relay.py), as
the pod's other plain connections do.
"""

from __future__ import annotations

from agent.proxy import report
from agent.proxy.live_inbound import LiveInbound
from agent.proxy.pod import Pod, connect_from, identity_of
from agent.proxy.socket_listener import AcceptedSocket
from agent.proxy.socket_relay import SocketRelays
from agent.proxy.waypoint_bypass import WaypointBypasses
from agent.state.store import StateStore
from agent.telemetry.connections import ConnectionTelemetry, PolicyVerdict
from agent.telemetry.events import socket_cookie
from agent.telemetry.istio_labels import Reporter, dataplane_mode


class InboundPlaintext:
    def __init__(
        self,
        store: StateStore,
        telemetry: ConnectionTelemetry,
        live: LiveInbound,
        bypasses: WaypointBypasses,
        relays: SocketRelays,
    ) -> None:
        self._store = store
        self._bypasses = bypasses
        self._telemetry = telemetry
        self._live = live
        self._relays = relays

    async def handle(self, pod: Pod, client: AcceptedSocket) -> None:
        src, dst = report.socket_endpoints(client.sock)
        state = self._store.current
        source = state.workload_by_ip(src[0])
        report.captured(pod, "inbound", src, dst, dataplane_mode(False, pod.workload))
        conn = self._telemetry.open(socket_cookie(client.sock), report.connection_report(
            state, Reporter.DESTINATION, False, (report.address(src), source, None),
            (report.address(dst), dst[1], pod.workload, identity_of(pod.workload).uri),
        ))  # fmt: skip
        self._bypasses.check(state, pod.workload, None, "plaintext", report.address(src))
        verdict = PolicyVerdict("allow")
        try:
            upstream = await connect_from(pod.worker, dst, src[0])
        except (OSError, TimeoutError) as exc:
            client.reset()
            self._telemetry.done(conn, verdict, error=report.failed("upstream connect", exc))
            return
        relaying = await self._relays.start(client.release(), upstream)
        await self._live.relayed(relaying, pod, src[0], dst, None,
                                 lambda relayed: report.finish(self._telemetry, conn, verdict,
                                                               relayed))  # fmt: skip
