"""The reference semantics: what a decision must be, written to be read, not to be fast.

A direct transcription of ztunnel's src/rbac.rs (`Authorization::matches`) and of its decision
order, used to compute expected verdicts in tests and to explain a decision. The agent never
decides with it: the kernel does, from the maps the compiler builds; tests hold the two equal.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from typing import TypeVar

from agent.state.policy import (
    Action,
    Clause,
    Connection,
    Decision,
    Match,
    Policy,
    Reason,
    Verdict,
    WorkloadSelectorTarget,
    applies_to,
)

# `Decision.dry_run_would_deny` when dry-run ALLOW policies, had they been enforced, would have
# made the connection fall to default deny (no single policy denied it).
DRY_RUN_DEFAULT_DENY = Reason.DEFAULT_DENY.value

_T = TypeVar("_T")


def _field_matches(
    positive: Sequence[_T], negative: Sequence[_T], predicate: Callable[[_T], bool]
) -> bool:
    """rbac.rs `matches_internal`: ANY positive value (or none given), and NO negative one."""
    if positive and not any(predicate(value) for value in positive):
        return False
    return not any(predicate(value) for value in negative)


def match_matches(match: Match, conn: Connection) -> bool:
    """One match group: every field holds."""
    # ztunnel skips a match group with no fields, so it never matches (unlike an empty clause,
    # which matches). The parser refuses to produce one; this keeps the reference exact anyway.
    if match.is_empty():
        return False
    src_ip = ipaddress.ip_address(conn.src_ip)
    dst_ip = ipaddress.ip_address(conn.dst_ip)
    identity = conn.src_identity
    # Without an identity ztunnel matches namespaces against "" but never matches a principal
    # (matches_principal fails when the "spiffe://" it strips is missing) nor a service account.
    namespace = identity.namespace if identity is not None else ""
    principal = identity.principal if identity is not None else None
    return (
        _field_matches(match.destination_ips, match.not_destination_ips, lambda n: dst_ip in n)
        and _field_matches(match.source_ips, match.not_source_ips, lambda n: src_ip in n)
        and _field_matches(
            match.destination_ports, match.not_destination_ports, lambda p: p == conn.dst_port
        )
        and _field_matches(
            match.service_accounts,
            match.not_service_accounts,
            lambda sa: (
                identity is not None
                and sa.namespace == identity.namespace
                and sa.service_account == identity.service_account
            ),
        )
        and _field_matches(
            match.principals,
            match.not_principals,
            lambda p: principal is not None and p.matches(principal),
        )
        and _field_matches(match.namespaces, match.not_namespaces, lambda p: p.matches(namespace))
    )


def clause_matches(clause: Clause, conn: Connection) -> bool:
    """ANY of its matches; a clause with none matches."""
    return not clause or any(match_matches(match, conn) for match in clause)


def policy_matches(policy: Policy, conn: Connection) -> bool:
    """ANY rule whose clauses ALL match; a policy without rules never matches (while a rule
    without clauses always does)."""
    return any(all(clause_matches(clause, conn) for clause in rule) for rule in policy.rules)


def _decide_enforced(policies: Sequence[Policy], conn: Connection) -> Decision:
    """ztunnel's order over policies that all count: DENY first, then ALLOW, else default."""
    for policy in policies:
        if policy.action is Action.DENY and policy_matches(policy, conn):
            return Decision(Verdict.DENY, Reason.DENIED_BY_POLICY, policy.key)
    allows = [policy for policy in policies if policy.action is Action.ALLOW]
    # An ALLOW policy whose rules were all dropped (L7 only) still counts here: it is what
    # turns default deny on, as in Istio.
    if not allows:
        return Decision(Verdict.ALLOW, Reason.NO_POLICY)
    for policy in allows:
        if policy_matches(policy, conn):
            return Decision(Verdict.ALLOW, Reason.ALLOWED_BY_POLICY, policy.key)
    return Decision(Verdict.DENY, Reason.DEFAULT_DENY)


def decide(
    policies: Iterable[Policy], target: WorkloadSelectorTarget, conn: Connection
) -> Decision:
    """The decision for a connection to `target`, with what dry-run policies would have done.

    Policies are taken in (namespace, name) order so that the deciding policy is the same
    whatever order they came in."""
    selected = sorted(
        (policy for policy in policies if applies_to(policy, target)),
        key=lambda policy: (policy.namespace, policy.name),
    )
    decision = _decide_enforced([policy for policy in selected if not policy.dry_run], conn)
    if decision.verdict is Verdict.DENY or not any(policy.dry_run for policy in selected):
        return decision
    # As if the dry-run policies were enforced as well. Only a flip to deny is reported: that is
    # what enforcing them would break.
    shadow = _decide_enforced(selected, conn)
    if shadow.verdict is Verdict.ALLOW:
        return decision
    would_deny = shadow.policy if shadow.policy is not None else DRY_RUN_DEFAULT_DENY
    return replace(decision, dry_run_would_deny=would_deny)
