"""The inbound connections being relayed to pods' apps now, for policy re-checks
(--cut-denied-connections, agent/policy/engine.py): HBONE tunnels, plaintext, and same-node
connections the agent delivers itself (agent/proxy/local_delivery.py)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator

from agent.identity.spiffe import SpiffeId
from agent.policy.live import LiveConnection
from agent.proxy.pod import Pod
from agent.proxy.relay import RelayResult
from agent.proxy.socket_relay import Relaying, ended

# Why a connection a policy re-check denies ends.
POLICY_CUT = "connection cut by a policy change"


class LiveInbound:
    def __init__(self) -> None:
        self._live: set[LiveConnection] = set()

    def all(self) -> list[LiveConnection]:
        return list(self._live)

    @contextlib.contextmanager
    def tracking(
        self,
        pod: Pod,
        client_ip: str,
        dst: tuple[str, int],
        peer: SpiffeId | None,
        cut: Callable[[], None],
    ) -> Iterator[LiveConnection]:
        """The connection into `pod` is live for the block; `cut` resets both its sides."""
        live = LiveConnection(pod.workload.key, client_ip, dst[0], dst[1], peer, cut)
        self._live.add(live)
        try:
            yield live
        finally:
            self._live.discard(live)

    async def relayed(
        self,
        relaying: Relaying,
        pod: Pod,
        client_ip: str,
        dst: tuple[str, int],
        peer: SpiffeId | None,
        done: Callable[[RelayResult], None],
    ) -> None:
        """Wait for a socket relay into `pod`, the connection live meanwhile (a policy
        re-check that denies it cuts it: POLICY_CUT). `done` gets the result, also when the
        wait is cancelled (a pod's drain reset the relay), and the cancellation goes on."""
        with self.tracking(pod, client_ip, dst, peer, lambda: relaying.cut(POLICY_CUT)):
            try:
                result = await relaying.wait()
            except asyncio.CancelledError:
                done(ended(relaying))
                raise
        done(result)
