"""The inbound connections being relayed to pods' apps now, for policy re-checks
(--cut-denied-connections, agent/policy/engine.py)."""

from __future__ import annotations

from agent.identity.spiffe import SpiffeId
from agent.policy.live import LiveConnection
from agent.proxy.pod import Pod
from agent.proxy.relay import ByteStream, RelayResult, SocketStream, relay


class LiveInbound:
    def __init__(self) -> None:
        self._live: set[LiveConnection] = set()

    def all(self) -> list[LiveConnection]:
        return list(self._live)

    async def relay(
        self,
        pod: Pod,
        client_ip: str,
        dst: tuple[str, int],
        peer: SpiffeId | None,
        client: ByteStream,
        upstream: SocketStream,
    ) -> RelayResult:
        """relay(), with the connection known as live for the while."""

        def cut() -> None:
            client.reset()
            upstream.reset()

        live = LiveConnection(pod.workload.key, client_ip, dst[0], dst[1], peer, cut)
        self._live.add(live)
        try:
            return await relay(client, upstream)
        finally:
            self._live.discard(live)
