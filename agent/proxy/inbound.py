"""15006, inbound plaintext: a connection from outside the mesh to an enrolled pod.

pod_ingress authorized its SYN before it reached 15006 (a denial never gets here). The app
is connected to with the client's own address as source (IP_TRANSPARENT), so it sees who
called.
"""

from __future__ import annotations

import asyncio

from agent.proxy import report
from agent.proxy.live_inbound import LiveInbound
from agent.proxy.pod import Pod, identity_of, plain_upstream
from agent.proxy.relay import SocketStream, reset
from agent.proxy.waypoint_bypass import WaypointBypasses
from agent.state.store import StateStore
from agent.telemetry.connections import ConnectionTelemetry, PolicyVerdict
from agent.telemetry.istio_labels import Reporter, dataplane_mode


class InboundPlaintext:
    def __init__(
        self,
        store: StateStore,
        telemetry: ConnectionTelemetry,
        live: LiveInbound,
        bypasses: WaypointBypasses,
    ) -> None:
        self._store = store
        self._bypasses = bypasses
        self._telemetry = telemetry
        self._live = live

    async def handle(
        self, pod: Pod, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        src, dst = report.endpoints(writer)
        state = self._store.current
        source = state.workload_by_ip(src[0])
        report.captured(pod, "inbound", src, dst, dataplane_mode(False, pod.workload))
        conn = self._telemetry.open(report.cookie(writer), report.connection_report(
            state, Reporter.DESTINATION, False, (report.address(src), source, None),
            (report.address(dst), dst[1], pod.workload, identity_of(pod.workload).uri),
        ))  # fmt: skip
        self._bypasses.check(state, pod.workload, None, "plaintext", report.address(src))
        verdict = PolicyVerdict("allow")
        try:
            upstream = await plain_upstream(pod.worker, dst, src[0])
        except (OSError, TimeoutError) as exc:
            reset(writer)
            self._telemetry.done(conn, verdict, error=report.failed("upstream connect", exc))
            return
        client = SocketStream(reader, writer)
        relayed = await self._live.relay(pod, src[0], dst, None, client, upstream)
        report.finish(self._telemetry, conn, verdict, relayed)
