"""Way two of three: every case of the semantics table decided by the kernel.

For each case the policies are compiled for the destination, written to the maps (a
generation flip, as in the agent), and a SYN from the case's source goes through pod_ingress
with BPF_PROG_RUN. The decision is read back from the kernel's own counters (verdicts and
policy_stats) and must equal the case's hand-written expectation, deciding policy included.
A SYN through pod_ingress is plaintext, which is unauthenticated whatever its address: a
case whose source has an identity is sent from that mesh workload's address and must get
the reference's decision for the same connection without an identity (never the one the
identity would get). The identity decisions themselves are checked through policy_probe,
which runs authorize() as pod_ingress and agent_connect4 do (the lab test covers
agent_connect4 with real tunnels).
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace

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
from tests.support.policy_reference import DRY_RUN_DEFAULT_DENY, decide

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
    """The case's source as a mesh workload: its address is a known workload's."""
    conn = case.conn
    if conn.src_identity is None:
        return []
    identity = conn.src_identity
    return [
        Workload(f"src-{conn.src_ip}", identity.service_account, identity.namespace,
                 identity.service_account, (conn.src_ip,), Protocol.HBONE, "node-1")
    ]  # fmt: skip


def plaintext_decision(kernel: Kernel, case: Case) -> Decision:
    """The kernel's decision for the case's connection as a plaintext SYN to pod_ingress."""
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


def _unauthenticated(case: Case) -> Decision:
    plaintext = replace(case.conn, src_identity=None)
    return (
        case.expected
        if case.conn.src_identity is None
        else decide(case.policies, case.target, plaintext)
    )


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_plaintext_is_decided_as_the_semantics_table_says_for_no_identity(
    kernel: Kernel, case: Case
) -> None:
    assert plaintext_decision(kernel, case) == _unauthenticated(case)


def test_a_mesh_workloads_address_in_plaintext_is_not_its_principal(kernel: Kernel) -> None:
    """The witness for "identity only from mTLS": an ALLOW for the client's principal denies
    a plaintext SYN from the client's own address (its HBONE is allowed: policy_probe below,
    and the lab's tunnels)."""
    (case,) = [c for c in CASES if c.name == "allow-client: client"]
    assert case.expected.verdict is Verdict.ALLOW
    assert plaintext_decision(kernel, case) == Decision(Verdict.DENY, Reason.DEFAULT_DENY)


@pytest.mark.parametrize("case", MANY_POLICY_CASES, ids=[c.name for c in MANY_POLICY_CASES])
def test_sets_past_one_page_of_terms_are_decided_not_fallen_back(
    kernel: Kernel, case: Case
) -> None:
    """Their deciding terms are principals: the walk over pages is asked with the identity."""
    assert probe_decision(kernel, case) == case.expected


def probe_decision(kernel: Kernel, case: Case) -> Decision:
    """policy_probe's decision for the case's connection, with its identity; it must leave
    the decision counters alone."""
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
    # The probe reports no dry-run verdict: the table's is carried over for the comparison.
    return Decision(
        Verdict.ALLOW if allowed else Verdict.DENY,
        KERNEL_REASONS[reason],
        numbers.names().get(policy),
        case.expected.dry_run_would_deny,
    )


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_the_policy_probe_gives_the_tables_decisions_with_identities(
    kernel: Kernel, case: Case
) -> None:
    """policy_probe (how the agent re-checks live connections after a policy change) runs
    authorize() as agent_connect4 does for a tunnel: the table's verdict, reason and policy
    for the source's verified identity."""
    assert probe_decision(kernel, case) == case.expected
