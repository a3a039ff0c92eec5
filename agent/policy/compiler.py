"""Compile authorization policies into the kernel's lookup tables (bpf/lib/policy.h).

For each destination workload W on this node, the policies that apply to it are expanded
into conjunctive terms (a rule's clauses are ANDed, a clause's matches ORed, so a rule is the
product of its clauses' matches). Each term gets a bit, numbered per W. Then, per dimension of
a connection, every value class gets the mask of the terms it satisfies:

- source identity: each identity number (0 = unauthenticated);
- source IP and destination IP: the CIDRs the terms name, plus 0.0.0.0/0, in an LPM trie.
  CIDRs nest or are disjoint, so an address whose longest listed prefix is `c` lies inside
  exactly the listed networks that contain `c`;
- destination port: each port the terms name, plus 0 for every other port.

The kernel ANDs the four masks and reads the answer off W's DENY/ALLOW masks: a constant
number of lookups however many policies there are. String matching on principals and
namespaces happens here, once per identity, never per connection.
"""

from __future__ import annotations

import ipaddress
import itertools
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import TypeVar

from agent.datapath import abi
from agent.identity.spiffe import SpiffeId
from agent.state.policy import (
    Action,
    IpNetwork,
    Match,
    Policy,
    Rule,
    WorkloadSelectorTarget,
    applies_to,
)
from agent.state.workload import Workload

# struct policy_mask: MASK_WORDS words of 64 bits (bpf/lib/policy.h, read and checked by abi).
MASK_WORDS = abi.POLICY_MASK_WORDS
# A workload's terms fill pages of TERMS_PER_PAGE, up to POL_MAX_PAGES of them.
TERMS_PER_PAGE = 64 * MASK_WORDS
MAX_TERMS = TERMS_PER_PAGE * abi.POL_MAX_PAGES
ANY_V4 = ipaddress.IPv4Network("0.0.0.0/0")

# flags of struct pol_workload, read from bpf/lib/policy.h
HAS_ALLOW = abi.POL_HAS_ALLOW
DRY_HAS_ALLOW = abi.POL_DRY_HAS_ALLOW
FALLBACK = abi.POL_FALLBACK
HAS_DRY_RUN = abi.POL_HAS_DRY_RUN

UNAUTHENTICATED = 0


@dataclass(frozen=True, slots=True)
class Term:
    policy: Policy
    matches: tuple[Match, ...]  # all must hold


@dataclass
class WorkloadTables:
    """Everything the kernel needs for one destination workload W."""

    wid: int
    addresses: tuple[str, ...]
    flags: int = 0
    deny: int = 0
    allow: int = 0
    dry_deny: int = 0
    dry_allow: int = 0
    terms: list[Term] = field(default_factory=list)
    identity_default: int = 0  # the mask of every identity not in by_identity
    by_identity: dict[int, int] = field(default_factory=dict)
    by_src: dict[ipaddress.IPv4Network, int] = field(default_factory=dict)
    by_dst: dict[ipaddress.IPv4Network, int] = field(default_factory=dict)
    by_port: dict[int, int] = field(default_factory=dict)  # 0: every other port
    fallback_reason: str | None = None
    # Masks span every page (bit i: term i); page p holds terms p*TERMS_PER_PAGE onwards,
    # numbered wid + p in the kernel.
    pages: int = 1


@dataclass
class CompiledPolicies:
    workloads: list[WorkloadTables]
    policy_numbers: dict[str, int]  # "ns/name" -> number used in the kernel's counters


class IdentityNumbers:
    """Stable numbers for identities (0 = unauthenticated): the kernel keys masks by them
    and the agent tags HBONE upstream sockets with them, so they survive recompiles."""

    def __init__(self) -> None:
        self._numbers: dict[SpiffeId, int] = {}

    def number(self, identity: SpiffeId) -> int:
        if identity not in self._numbers:
            self._numbers[identity] = len(self._numbers) + 1
        return self._numbers[identity]

    def known(self) -> dict[SpiffeId | None, int]:
        known: dict[SpiffeId | None, int] = {None: UNAUTHENTICATED}
        for identity, number in self._numbers.items():
            known[identity] = number
        return known


class PolicyNumbers:
    """Stable numbers for policies (0 = none), for the kernel's per-policy counters."""

    def __init__(self) -> None:
        self._numbers: dict[str, int] = {}

    def number(self, key: str) -> int:
        if key not in self._numbers:
            self._numbers[key] = len(self._numbers) + 1
        return self._numbers[key]

    def names(self) -> dict[int, str]:
        return {number: key for key, number in self._numbers.items()}


# ---- term expansion -------------------------------------------------------------------------


def expand_rule(rule: Rule) -> list[tuple[Match, ...]] | None:
    """The rule as a list of conjunctions; [] when it can never match. None when it expands
    past MAX_TERMS."""
    choices: list[list[tuple[Match, ...]]] = []
    for clause in rule:
        if not clause:
            continue  # an empty clause matches anything
        matches = [m for m in clause if not m.is_empty()]
        if not matches:
            return []  # ztunnel skips empty match groups: this clause can never match
        choices.append([(m,) for m in matches])
    size = 1
    for options in choices:
        size *= len(options)
        if size > MAX_TERMS:
            return None
    return [tuple(itertools.chain.from_iterable(combo)) for combo in itertools.product(*choices)]


# ---- per-dimension predicates (ztunnel's rbac.rs, field by field) -----------------------------


T = TypeVar("T")


def _field(positive: tuple[T, ...], negative: tuple[T, ...], holds: Callable[[T], bool]) -> bool:
    return (not positive or any(holds(v) for v in positive)) and not (
        negative and any(holds(v) for v in negative)
    )


def identity_holds(match: Match, identity: SpiffeId | None) -> bool:
    namespace = identity.namespace if identity else ""
    return (
        _field(match.namespaces, match.not_namespaces, lambda s: s.matches(namespace))
        and _field(
            match.service_accounts,
            match.not_service_accounts,
            lambda sa: (
                identity is not None
                and (identity.namespace, identity.service_account)
                == (sa.namespace, sa.service_account)
            ),
        )
        # ztunnel strips "spiffe://" first and fails without an identity, whatever the matcher
        and _field(
            match.principals,
            match.not_principals,
            lambda s: identity is not None and s.matches(identity.principal),
        )
    )


def _inside(inner: ipaddress.IPv4Network) -> Callable[[IpNetwork], bool]:
    return lambda net: isinstance(net, ipaddress.IPv4Network) and inner.subnet_of(net)


def src_holds(match: Match, cls: ipaddress.IPv4Network) -> bool:
    return _field(match.source_ips, match.not_source_ips, _inside(cls))


def dst_holds(match: Match, cls: ipaddress.IPv4Network) -> bool:
    return _field(match.destination_ips, match.not_destination_ips, _inside(cls))


def port_holds(match: Match, port: int) -> bool:
    return _field(match.destination_ports, match.not_destination_ports, lambda p: p == port)


def _classes(
    terms: list[Term], pick: Callable[[Match], Iterable[IpNetwork]]
) -> set[ipaddress.IPv4Network]:
    found = {ANY_V4}
    for term in terms:
        for match in term.matches:
            found.update(n for n in pick(match) if isinstance(n, ipaddress.IPv4Network))
    return found


def _identity_of(identity: SpiffeId | None, match: Match) -> bool:
    return identity_holds(match, identity)


def _src_of(cls: ipaddress.IPv4Network, match: Match) -> bool:
    return src_holds(match, cls)


def _dst_of(cls: ipaddress.IPv4Network, match: Match) -> bool:
    return dst_holds(match, cls)


def _port_of(port: int, match: Match) -> bool:
    return port_holds(match, port)


def _mask(terms: list[Term], holds: Callable[[Match], bool]) -> int:
    mask = 0
    for bit, term in enumerate(terms):
        if all(holds(m) for m in term.matches):
            mask |= 1 << bit
    return mask


# ---- compile ----------------------------------------------------------------------------------


class IdentityAcceptance:
    """Which identities each distinct Match's identity fields accept, as a bitset over the
    identities' positions. Shared by every destination of a compile: the same matches recur
    across workloads, and evaluating them per identity per workload dominated compile time."""

    def __init__(self, identities: Mapping[SpiffeId | None, int]) -> None:
        self.identities = list(identities.items())
        self.everyone = (1 << len(self.identities)) - 1
        self._by_match: dict[Match, int] = {}

    def of_match(self, match: Match) -> int:
        if not (
            match.namespaces
            or match.not_namespaces
            or match.service_accounts
            or match.not_service_accounts
            or match.principals
            or match.not_principals
        ):
            return self.everyone  # no identity field: every identity passes
        accepted = self._by_match.get(match)
        if accepted is None:
            accepted = 0
            for position, (identity, _) in enumerate(self.identities):
                if identity_holds(match, identity):
                    accepted |= 1 << position
            self._by_match[match] = accepted
        return accepted

    def masks(self, terms: list[Term]) -> dict[int, int]:
        """identity number -> the mask of the terms it satisfies."""
        accepts = []
        for term in terms:
            accepted = self.everyone
            for match in term.matches:
                accepted &= self.of_match(match)
            accepts.append(accepted)
        masks = {}
        for position, (_, number) in enumerate(self.identities):
            mask = 0
            for bit, accepted in enumerate(accepts):
                if (accepted >> position) & 1:
                    mask |= 1 << bit
            masks[number] = mask
        return masks


def compile_workload(
    wid: int,
    workload: Workload,
    labels: Mapping[str, str],
    policies: Iterable[Policy],
    acceptance: IdentityAcceptance,
) -> WorkloadTables:
    target = WorkloadSelectorTarget(workload.namespace, dict(labels), workload.uid)
    applicable = sorted(
        (p for p in policies if applies_to(p, target)), key=lambda p: (p.namespace, p.name)
    )
    tables = WorkloadTables(wid, tuple(ip for ip in workload.ips if ":" not in ip))
    for policy in applicable:
        if policy.action is Action.ALLOW:
            tables.flags |= DRY_HAS_ALLOW if policy.dry_run else HAS_ALLOW
        if policy.dry_run:
            tables.flags |= HAS_DRY_RUN
        for rule in policy.rules:
            expanded = expand_rule(rule)
            if expanded is None or len(tables.terms) + len(expanded) > MAX_TERMS:
                tables.flags |= FALLBACK
                tables.fallback_reason = (
                    f"the policies for {workload.key} expand past {MAX_TERMS} terms"
                )
                return tables
            tables.terms.extend(Term(policy, matches) for matches in expanded)
    for bit, term in enumerate(tables.terms):
        dry, action = term.policy.dry_run, term.policy.action
        if action is Action.DENY:
            tables.dry_deny |= (1 << bit) if dry else 0
            tables.deny |= 0 if dry else (1 << bit)
        else:
            tables.dry_allow |= (1 << bit) if dry else 0
            tables.allow |= 0 if dry else (1 << bit)
    terms = tables.terms
    tables.pages = max(1, -(-len(terms) // TERMS_PER_PAGE))
    # Most identities share one mask (the policies name a few of them): that one becomes W's
    # default, and only the others get map entries. This keeps pol_identities proportional
    # to what the policies say, not to workloads x identities.
    masks = acceptance.masks(terms)
    tables.identity_default = Counter(masks.values()).most_common(1)[0][0]
    tables.by_identity = {n: m for n, m in masks.items() if m != tables.identity_default}
    tables.by_src = {
        c: _mask(terms, partial(_src_of, c))
        for c in _classes(terms, lambda m: (*m.source_ips, *m.not_source_ips))
    }
    tables.by_dst = {
        c: _mask(terms, partial(_dst_of, c))
        for c in _classes(terms, lambda m: (*m.destination_ips, *m.not_destination_ips))
    }
    ports = {
        p
        for t in terms
        for m in t.matches
        for p in (*m.destination_ports, *m.not_destination_ports)
    }
    # Key 0 is the class of every port no term names: policies' ports are 1..65535 (the
    # parser refuses others), so it stands for no real port.
    assert 0 not in ports, f"port 0 in the policies for {workload.key}"
    tables.by_port = {p: _mask(terms, partial(_port_of, p)) for p in ports}
    tables.by_port[0] = _mask(terms, partial(_port_of, 0))
    return tables


def compile_policies(
    policies: Iterable[Policy],
    destinations: Iterable[tuple[Workload, Mapping[str, str]]],
    mesh_workloads: Iterable[Workload],
    identity_numbers: IdentityNumbers,
    policy_numbers: PolicyNumbers,
) -> CompiledPolicies:
    """destinations: this node's enrolled workloads with their labels; mesh_workloads: every
    workload known, whose identities get their masks now rather than at their first tunnel.

    No address stands for an identity: a plaintext source is unauthenticated, whatever
    workload's address it carries (a stale or spoofed address would carry another's)."""
    policies = tuple(policies)
    for policy in policies:
        policy_numbers.number(policy.key)
    for w in mesh_workloads:
        if w.captured:  # only mesh workloads present a certificate
            identity_numbers.number(SpiffeId(w.trust_domain, w.namespace, w.service_account))
    acceptance = IdentityAcceptance(identity_numbers.known())
    tables = []
    wid = 1  # each workload's pages take the numbers after its first
    for workload, labels in destinations:
        tables.append(compile_workload(wid, workload, labels, policies, acceptance))
        wid += tables[-1].pages
    return CompiledPolicies(tables, {p.key: policy_numbers.number(p.key) for p in policies})


def identity_masks(tables: WorkloadTables, identity: SpiffeId) -> int:
    """The mask of a newly seen identity (an HBONE peer the state did not list)."""
    return _mask(tables.terms, partial(_identity_of, identity))
