"""The destination side of a mesh connection: the agent's connection to the pod's app, made
as the client, with the kernel deciding.

One function for both ways a mesh connection reaches a pod: an HBONE tunnel accepted on the
pod's 15008 (agent/proxy/inbound_hbone.py) and a same-node connection the agent captured
itself (agent/proxy/local_delivery.py). The address must be the pod's own (else 400, as
HBONE answers it); a waypoint bypass is counted; the socket to the app is made in the pod's
netns, bound (transparently) to the client's address so the app sees who called, and tagged
with the client's identity, so that the kernel decides the connect (agent_connect4):
PermissionError is a denial naming the policy (401), any other failure 503. An answer other
than success is recorded at the destination reporter here; success registers the
destination report under the cookie of the socket to the app, whose bytes are the app's.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass

from agent.datapath import abi
from agent.identity.spiffe import SpiffeId
from agent.inpod import sockets
from agent.policy.engine import PolicyEngine
from agent.proxy import report
from agent.proxy.pod import Pod, connect_socket
from agent.proxy.waypoint_bypass import WaypointBypasses
from agent.state.store import MeshState
from agent.telemetry.connections import (
    ConnectionReport,
    ConnectionTelemetry,
    PolicyVerdict,
    TrackedConnection,
)
from agent.telemetry.events import socket_cookie

# The agent's listeners in the pod: a connection to one would loop back into the agent.
AGENT_POD_PORTS = frozenset((abi.PORT_OUTBOUND, abi.PORT_INBOUND, abi.PORT_HBONE))


@dataclass(frozen=True, slots=True)
class Caller:
    """Who a connection for a pod's app comes from, as the destination side knows it."""

    ip: str  # the source address of the connection to the app
    address: str  # ip:port of the client, as the bypass log names it
    identity: SpiffeId | None  # verified in mTLS, or the source pod the agent captured itself
    transport: str  # how it arrived: "hbone" or "local" (the bypass counts' label)


@dataclass(frozen=True, slots=True)
class AppConnected:
    sock: socket.socket  # connected to the app, from the caller's address
    tracked: TrackedConnection  # the destination report, under this socket's cookie
    verdict: PolicyVerdict  # the kernel's allow, with the deciding policy when it named one


@dataclass(frozen=True, slots=True)
class AppRefused:
    status: int  # as HBONE answers: 400 not this pod's address, 401 denied, 503 unreachable
    verdict: PolicyVerdict
    error: str  # as the access log says it

    @property
    def outcome(self) -> str:
        return {400: "bad_address", 401: "denied"}.get(self.status, "unreachable")


def _never() -> bool:
    return False


class AppConnector:
    def __init__(
        self,
        authorizer: PolicyEngine | None,
        telemetry: ConnectionTelemetry,
        bypasses: WaypointBypasses,
    ) -> None:
        self._authorizer = authorizer
        self._telemetry = telemetry
        self._bypasses = bypasses

    async def connect(
        self,
        state: MeshState,
        pod: Pod,
        caller: Caller,
        dst: tuple[str, int],
        connection: ConnectionReport,
        gone: Callable[[], bool] = _never,
    ) -> AppConnected | AppRefused | None:
        """Connect to the app at `dst` for `caller`; `connection` is the destination report.
        None when `gone()` says the client left first (a reset tunnel): no connection to
        the app is kept and nothing is recorded, the client having seen no answer."""
        if dst[0] not in pod.workload.ips:
            error = f"authority {report.address(dst)} is not this pod's address"
            return self._refused(connection, 400, PolicyVerdict("none"), error)
        if dst[1] in AGENT_POD_PORTS:
            error = f"port {dst[1]} is one of the agent's own in the pod"
            return self._refused(connection, 400, PolicyVerdict("none"), error)
        if gone():
            return None  # reset by the peer before its turn (rapid reset): no app connection
        self._bypasses.check(state, pod.workload, caller.identity, caller.transport,
                             caller.address)  # fmt: skip
        up = sockets.new_upstream(pod.worker, (caller.ip, 0))
        try:
            if self._authorizer is not None and caller.identity is not None:
                # The kernel decides this connect (agent_connect4) with the caller's identity;
                # userspace holds no copy of the policy logic.
                self._authorizer.tag_upstream(up, caller.identity, caller.ip)
            await connect_socket(up, dst)
        except PermissionError:
            verdict = self._verdict(up, allowed=False)
            up.close()
            return self._refused(connection, 401, verdict,
                                 f"denied: {verdict.reason} ({verdict.policy or '-'})")  # fmt: skip
        except (OSError, TimeoutError) as exc:
            verdict = self._verdict(up, allowed=True)  # read before close: it is on the socket
            up.close()
            return self._refused(connection, 503, verdict, report.failed("upstream connect", exc))
        except BaseException:
            up.close()  # cancelled while connecting: the socket is no one's
            raise
        if gone():  # while we connected: the app connection goes unused
            up.close()
            return None
        tracked = self._telemetry.open(socket_cookie(up), connection)
        return AppConnected(up, tracked, self._verdict(up, allowed=True))

    def _refused(
        self, connection: ConnectionReport, status: int, verdict: PolicyVerdict, error: str
    ) -> AppRefused:
        """No app socket, nothing relayed: recorded at the destination reporter at once."""
        self._telemetry.done(self._telemetry.open(None, connection), verdict, error=error)
        return AppRefused(status, verdict, error)

    def _verdict(self, up: socket.socket, allowed: bool) -> PolicyVerdict:
        """The decision agent_connect4 wrote back on the upstream socket, with its policy."""
        decided = self._authorizer.decision(up) if self._authorizer else None
        if decided is None:
            return PolicyVerdict("allow" if allowed else "deny")
        policy, reason = decided
        return PolicyVerdict("allow" if allowed else "deny", policy, reason)
