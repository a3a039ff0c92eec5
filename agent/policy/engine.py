"""Keeps the kernel's policy maps in step with the mesh state.

On every state change: compile the state's policies (parsed once, by their source) for this
node's enrolled workloads, write them under the idle generation, flip, and delete the old
generation after a grace period, without waiting for it. Also tags HBONE upstream sockets with
the peer's identity for agent_connect4.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterable
from typing import NamedTuple

import structlog

from agent.datapath.abi import PolicyReason
from agent.identity.spiffe import SpiffeId
from agent.policy.compiler import (
    UNAUTHENTICATED,
    CompiledPolicies,
    IdentityNumbers,
    PolicyNumbers,
    compile_policies,
    identity_masks,
)
from agent.policy.kernel_maps import PolicyMaps
from agent.policy.live import LiveConnection
from agent.state.policy import Policy, WorkloadSelectorTarget, applies_to
from agent.state.store import MeshState
from agent.state.workload import Workload

log = structlog.get_logger("agent.policy")


class _Inputs(NamedTuple):
    policies: tuple[Policy, ...]
    workloads: tuple[Workload, ...]  # every workload: the plaintext identities of sources
    destinations: tuple[Workload, ...]  # this node's enrolled workloads


# A decision reads the generation once and then does a handful of lookups: far below this.
RETIRE_GRACE = 0.5


class PolicyEngine:
    def __init__(self, maps: PolicyMaps) -> None:
        self._maps = maps
        self.identities = IdentityNumbers()
        self.policy_numbers = PolicyNumbers()
        self._compiled: CompiledPolicies | None = None
        self._lock = asyncio.Lock()
        # The generation the last flip retired is deleted RETIRE_GRACE later, by a timer: an
        # apply does not wait for it. Only an apply within that grace, which must reuse the
        # generation, waits out the rest of it first.
        self._reusable_at = 0.0
        self._retiring: asyncio.TimerHandle | None = None
        # What the maps were compiled from: the same again writes nothing.
        self._applied: _Inputs | None = None

    async def apply(self, state: MeshState, destinations: Iterable[Workload]) -> None:
        async with self._lock:
            policies = state.policies
            targets = [(w, dict(w.labels)) for w in destinations]
            inputs = _Inputs(policies, state.workloads, tuple(w for w, _ in targets))
            if inputs == self._applied:
                return
            compiled = compile_policies(
                policies, targets, state.workloads, self.identities, self.policy_numbers
            )
            loop = asyncio.get_running_loop()
            if (wait := self._reusable_at - loop.time()) > 0:
                await asyncio.sleep(wait)
            self._cancel_retirement()  # write() clears the idle generation itself
            retired = self._maps.write(compiled)
            self._reusable_at = loop.time() + RETIRE_GRACE
            self._retiring = loop.call_later(RETIRE_GRACE, self._retire, retired)
            self._compiled = compiled
            self._applied = inputs
            for workload, labels in targets:
                # Deep guide, wrong-layer policy: an L7 rule on a workload without a waypoint.
                target = WorkloadSelectorTarget(workload.namespace, labels, workload.uid)
                for policy in policies:
                    if policy.wrong_layer and applies_to(policy, target):
                        log.warning(
                            "wrong-layer policy",
                            workload=workload.key,
                            policy=policy.key,
                            findings=list(policy.wrong_layer),
                        )
            for tables in compiled.workloads:
                if tables.fallback_reason:
                    log.warning("policy fallback: denying", reason=tables.fallback_reason)
            log.info("policies applied", policies=len(policies), workloads=len(targets),
                     generation=self._maps.generation)  # fmt: skip

    def _retire(self, generation: int) -> None:
        self._retiring = None
        self._maps.clear_generation(generation)

    def _cancel_retirement(self) -> None:
        if self._retiring is not None:
            self._retiring.cancel()
            self._retiring = None

    def close(self) -> None:
        """Before the datapath closes: no retirement may touch its maps afterwards."""
        self._cancel_retirement()

    def tag_upstream(self, sock: socket.socket, peer: SpiffeId, client_ip: str) -> None:
        """Before the upstream connect of an HBONE tunnel: who the verified peer is."""
        known = peer in self.identities.known()
        number = self.identities.number(peer)
        if not known and self._compiled is not None:
            # A peer the state did not list: its masks join the live generation (new keys
            # only, so no decision sees a half-written set).
            for tables in self._compiled.workloads:
                mask = identity_masks(tables, peer)
                if mask != tables.identity_default:
                    self._maps.write_identities(tables, {number: mask}, None)
        self._maps.tag_upstream(sock, number, client_ip)

    def cut_denied(self, connections: Iterable[LiveConnection]) -> int:
        """Reset live inbound connections the policies in force now deny (asked for with
        --cut-denied-connections). The kernel decides each, through policy_probe."""
        cut = 0
        for conn in connections:
            # Plaintext is unauthenticated, as pod_ingress judged it.
            identity = UNAUTHENTICATED if conn.peer is None else self.identities.number(conn.peer)
            allowed, reason, policy = self._maps.evaluate(
                conn.src_ip, conn.dst_ip, conn.dst_port, identity
            )
            if not allowed:
                conn.cut()
                cut += 1
                log.info("connection cut by a policy change", pod=conn.pod, src=conn.src_ip,
                         dst=f"{conn.dst_ip}:{conn.dst_port}",
                         reason=PolicyReason.label_of(reason),
                         policy=self.policy_numbers.names().get(policy))  # fmt: skip
        return cut

    def decisions(self) -> list[tuple[str, str, int]]:
        """(policy, reason, count) as the kernel counted them."""
        names = self.policy_numbers.names()
        return sorted(
            (names.get(policy, "-") if policy else "-", PolicyReason.label_of(reason), count)
            for (policy, reason), count in self._maps.decisions().items()
        )  # fmt: skip

    def policies_in_force(self) -> tuple[Policy, ...]:
        """The policies the kernel's maps hold now."""
        return self._applied.policies if self._applied is not None else ()

    def decision(self, sock: socket.socket) -> tuple[str | None, str] | None:
        """(policy name or None, reason) agent_connect4 wrote back on this upstream socket:
        for the 401 and the access log."""
        decided = self._maps.upstream_decision(sock)
        if decided is None:
            return None
        policy, reason = decided
        return self.policy_numbers.names().get(policy), PolicyReason.label_of(reason)
