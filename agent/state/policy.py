"""Authorization policies in the shape ztunnel evaluates (Istio's L4 semantics).

A policy's `rules` match when ANY rule matches; a rule when ALL its clauses match; a clause
when ANY of its matches matches (an empty clause matches); a match when ALL its fields match,
where a field holds when ANY positive value matches (or there are none) and NO negative value
matches. A source without an identity (plaintext) has principal "" and namespace "": positive
identity fields never match it, negative ones always do. Principals are compared without the
`spiffe://` prefix. A policy with no rules never matches.

Decision for a destination workload (enforced policies only; dry-run ones are reported):
any matching DENY denies; no ALLOW policy allows; otherwise allow only when an ALLOW matches.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from enum import StrEnum

from agent.identity.spiffe import SpiffeId

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class Action(StrEnum):
    ALLOW = "ALLOW"
    DENY = "DENY"


class Scope(StrEnum):
    GLOBAL = "Global"  # every workload (a policy in the root namespace)
    NAMESPACE = "Namespace"  # every workload of the policy's namespace
    WORKLOAD_SELECTOR = "WorkloadSelector"  # workloads of its namespace matching `selector`


class StringMatchKind(StrEnum):
    EXACT = "exact"
    PREFIX = "prefix"
    SUFFIX = "suffix"
    PRESENCE = "presence"


@dataclass(frozen=True, slots=True)
class StringMatch:
    kind: StringMatchKind
    value: str = ""

    def matches(self, text: str) -> bool:
        if self.kind is StringMatchKind.EXACT:
            return text == self.value
        if self.kind is StringMatchKind.PREFIX:
            return text.startswith(self.value)
        if self.kind is StringMatchKind.SUFFIX:
            return text.endswith(self.value)
        return text != ""


@dataclass(frozen=True, slots=True)
class ServiceAccountMatch:
    namespace: str
    service_account: str


@dataclass(frozen=True, slots=True)
class Match:
    """One match group: every non-empty field must hold."""

    namespaces: tuple[StringMatch, ...] = ()
    not_namespaces: tuple[StringMatch, ...] = ()
    service_accounts: tuple[ServiceAccountMatch, ...] = ()
    not_service_accounts: tuple[ServiceAccountMatch, ...] = ()
    principals: tuple[StringMatch, ...] = ()  # against "td/ns/x/sa/y" (no spiffe://)
    not_principals: tuple[StringMatch, ...] = ()
    source_ips: tuple[IpNetwork, ...] = ()
    not_source_ips: tuple[IpNetwork, ...] = ()
    destination_ips: tuple[IpNetwork, ...] = ()
    not_destination_ips: tuple[IpNetwork, ...] = ()
    destination_ports: tuple[int, ...] = ()
    not_destination_ports: tuple[int, ...] = ()

    def is_empty(self) -> bool:
        return not any(getattr(self, name) for name in self.__slots__)


Clause = tuple[Match, ...]  # any of its matches
Rule = tuple[Clause, ...]  # all of its clauses


@dataclass(frozen=True, slots=True)
class Policy:
    name: str
    namespace: str
    scope: Scope
    action: Action
    rules: tuple[Rule, ...]
    dry_run: bool = False
    # For Scope.WORKLOAD_SELECTOR: labels a workload of the namespace must all carry.
    selector: tuple[tuple[str, str], ...] = ()
    # Why (parts of) the policy cannot be enforced at L4, e.g. "rules[0].to[0].operation.paths:
    # L7 field; the ALLOW rule never matches at L4" (deep guide: wrong-layer policy).
    wrong_layer: tuple[str, ...] = ()
    # When set, the policy governs these workloads only (by uid), whatever its scope: how
    # the allow-only-waypoint option (agent/state/waypoint_only.py) names what a waypoint
    # serves, which no label selector can.
    workload_uids: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class Connection:
    """What an L4 decision sees."""

    src_ip: str
    dst_ip: str
    dst_port: int
    src_identity: SpiffeId | None = None  # None: plaintext, unauthenticated


class Verdict(StrEnum):
    ALLOW = "allow"
    DENY = "deny"


class Reason(StrEnum):
    NO_POLICY = "no-policy"  # no ALLOW policy applies: allowed
    ALLOWED_BY_POLICY = "allowed-by-policy"
    DENIED_BY_POLICY = "denied-by-policy"  # a DENY policy matched
    DEFAULT_DENY = "default-deny"  # ALLOW policies apply, none matched
    FALLBACK = "fallback"  # not expressible in the kernel maps: denied, counted


@dataclass(frozen=True, slots=True)
class Decision:
    verdict: Verdict
    reason: Reason
    policy: str | None = None  # "namespace/name" of the deciding policy, when one decided
    # Set when dry-run policies, had they been enforced, would have denied.
    dry_run_would_deny: str | None = None


@dataclass(frozen=True, slots=True)
class WorkloadSelectorTarget:
    """What scope selection needs to know about a destination workload."""

    namespace: str
    labels: dict[str, str] = field(default_factory=dict)
    uid: str = ""


ROOT_NAMESPACE = "istio-system"  # Istio's default root namespace: policies there are global


def applies_to(policy: Policy, target: WorkloadSelectorTarget) -> bool:
    """Whether a policy governs connections to the workload (Istio's scope rules)."""
    if policy.workload_uids:
        return target.uid in policy.workload_uids
    if policy.scope is Scope.GLOBAL:
        return True
    if policy.scope is Scope.NAMESPACE:
        return policy.namespace == target.namespace
    same_namespace = policy.namespace in (target.namespace, ROOT_NAMESPACE)
    return same_namespace and all(target.labels.get(k) == v for k, v in policy.selector)
