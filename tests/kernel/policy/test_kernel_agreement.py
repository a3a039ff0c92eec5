"""Way two of three: every case of the semantics table decided by the kernel.

For each case the policies are compiled for the destination, written to the maps (a
generation flip, as in the agent), and a SYN from the case's source goes through pod_ingress
with BPF_PROG_RUN. The decision is read back from the kernel's own counters (verdicts and
policy_stats) and must equal the case's hand-written expectation, deciding policy included.
Sources with an identity get it through the workload-identity map: pod_ingress and
agent_connect4 share authorize(), so this exercises the decision HBONE tunnels get too (the
lab test covers agent_connect4 itself with real tunnels).
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from agent.datapath import abi, packets
from agent.datapath.abi import PolicyReason, VerdictReason
from agent.datapath.loader import LoadedDatapath
from agent.datapath.prog_run import run_tc
from agent.inpod.enrollment import pod_key_addr
from agent.netns import NetnsWorker
from agent.policy.compiler import IdentityNumbers, PolicyNumbers, compile_policies
from agent.policy.kernel_maps import PolicyMaps
from agent.state.policy import Connection, Decision, Reason, Verdict
from agent.state.workload import Protocol, Workload
from tests.support.policy_cases import CASES, MANY_POLICY_CASES, SERVER_IP, Case
from tests.support.policy_reference import DRY_RUN_DEFAULT_DENY

pytestmark = pytest.mark.kernel

DRY_RUN_WOULD_DENY = PolicyReason.DRY_RUN_WOULD_DENY
KERNEL_REASONS = {r.value: Reason(r.label) for r in PolicyReason if r is not DRY_RUN_WOULD_DENY}


@dataclass
class Kernel:
    datapath: LoadedDatapath
    worker: NetnsWorker
    maps: PolicyMaps


@pytest.fixture(scope="module")
def kernel() -> Iterator[Kernel]:
    tag = uuid.uuid4().hex[:6]
    netns = f"tpol-{tag}"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    datapath = worker = None
    try:
        datapath = LoadedDatapath(abi.DEFAULT_PIN_DIR / f"test-{tag}")
        worker = NetnsWorker(f"/run/netns/{netns}")
        pods = datapath.table("pods")
        value = pods.Leaf()
        value.flags = abi.POD_CAPTURE
        pods[pods.Key(addr=pod_key_addr(SERVER_IP))] = value
        yield Kernel(datapath, worker, PolicyMaps(datapath))
    finally:
        if worker is not None:
            worker.close()
        if datapath is not None:
            datapath.close(unpin=True)
        subprocess.run(["ip", "netns", "del", netns], check=False)


def _sources(case: Case) -> list[Workload]:
    """The case's source as a mesh workload, so its address carries its identity."""
    conn = case.conn
    if conn.src_identity is None:
        return []
    identity = conn.src_identity
    return [
        Workload(f"src-{conn.src_ip}", identity.service_account, identity.namespace,
                 identity.service_account, (conn.src_ip,), Protocol.HBONE, "node-1")
    ]  # fmt: skip


def kernel_decision(kernel: Kernel, case: Case) -> Decision:
    target = Workload("dst", "server", case.target.namespace, "server", (SERVER_IP,),
                      Protocol.HBONE, "node-2", labels=case.target.labels)  # fmt: skip
    numbers = PolicyNumbers()
    compiled = compile_policies(
        case.policies, [(target, dict(case.target.labels))], _sources(case), IdentityNumbers(),
        numbers,
    )  # fmt: skip
    kernel.maps.clear_generation(kernel.maps.write(compiled))
    verdicts_before = _verdicts(kernel)
    stats_before = kernel.maps.decisions()
    conn: Connection = case.conn
    fd = kernel.datapath.program_fds["pod_ingress"]
    packet = packets.tcp4(conn.src_ip, 40000, conn.dst_ip, conn.dst_port)
    kernel.worker.call(lambda: run_tc(fd, packet))
    verdicts = {k: v - verdicts_before.get(k, 0) for k, v in _verdicts(kernel).items()}
    stats = {k: v - stats_before.get(k, 0) for k, v in kernel.maps.decisions().items()}
    counted = {k: v for k, v in stats.items() if v}
    names = numbers.names()
    dry = [policy for (policy, reason) in counted if reason == DRY_RUN_WOULD_DENY]
    main = [(policy, reason) for (policy, reason) in counted if reason != DRY_RUN_WOULD_DENY]
    assert len(main) == 1, f"one decision counted, got {counted}"
    policy, reason = main[0]
    denied = verdicts.get(VerdictReason.DROP_POLICY_DENIED.name, 0) == 1
    # Allowed SYNs go on to look for the 15006 listener, which this netns does not have.
    assert denied or verdicts.get(VerdictReason.DROP_NO_LISTENER.name, 0) == 1, verdicts
    return Decision(
        Verdict.DENY if denied else Verdict.ALLOW,
        KERNEL_REASONS[reason],
        names.get(policy),
        (names.get(dry[0]) or DRY_RUN_DEFAULT_DENY) if dry else None,
    )


def _verdicts(kernel: Kernel) -> dict[str, int]:
    table = kernel.datapath.table("verdicts")
    return {VerdictReason(int(k.value)).name: sum(v) for k, v in table.items()}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_kernel_decides_as_the_semantics_table_says(kernel: Kernel, case: Case) -> None:
    assert kernel_decision(kernel, case) == case.expected


@pytest.mark.parametrize("case", MANY_POLICY_CASES, ids=[c.name for c in MANY_POLICY_CASES])
def test_sets_past_one_page_of_terms_are_decided_not_fallen_back(
    kernel: Kernel, case: Case
) -> None:
    assert kernel_decision(kernel, case) == case.expected


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_the_policy_probe_gives_the_same_decisions_without_counting(
    kernel: Kernel, case: Case
) -> None:
    """policy_probe (how the agent re-checks live connections after a policy change) reaches
    the table's verdict, reason and policy, and leaves the decision counters alone."""
    target = Workload("dst", "server", case.target.namespace, "server", (SERVER_IP,),
                      Protocol.HBONE, "node-2", labels=case.target.labels)  # fmt: skip
    numbers, identities = PolicyNumbers(), IdentityNumbers()
    compiled = compile_policies(
        case.policies, [(target, dict(case.target.labels))], _sources(case), identities, numbers
    )
    kernel.maps.clear_generation(kernel.maps.write(compiled))
    conn = case.conn
    identity = identities.number(conn.src_identity) if conn.src_identity else 0
    before = kernel.maps.decisions()
    allowed, reason, policy = kernel.maps.evaluate(conn.src_ip, conn.dst_ip, conn.dst_port,
                                                   identity)  # fmt: skip
    assert kernel.maps.decisions() == before
    expected = case.expected
    assert allowed == (expected.verdict is Verdict.ALLOW)
    assert KERNEL_REASONS[reason] is expected.reason
    assert numbers.names().get(policy) == expected.policy
