"""AuthorizationPolicies attached with `targetRefs` to a Service or a waypoint Gateway: the
waypoint enforces them, with L7 attributes (Istio's semantics, enforced by Envoy's RBAC).

The shape follows the L4 policies of agent/state/policy.py: a policy matches when ANY rule
does; a rule when ALL its clauses do; a clause when ANY of its matches does; a match when
ALL its non-empty fields hold, where a field holds when ANY positive value matches (or there
are none) and NO negative value matches. Each clause comes from one part of a rule: its
`from` list (source fields), its `to` list (operation fields) or one `when` condition, so a
clause's matches are all about the source or all about the request.

Decision at the waypoint, per request to a target: AUDIT policies only mark; any matching
DENY denies (403); if ALLOW policies apply, one must match, else 403; dry-run policies are
evaluated and logged but never decide.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from agent.state.policy import IpNetwork, ServiceAccountMatch, StringMatch


class WaypointAction(enum.StrEnum):
    ALLOW = "ALLOW"
    DENY = "DENY"
    AUDIT = "AUDIT"


class TargetKind(enum.StrEnum):
    SERVICE = "Service"  # group ""
    GATEWAY = "Gateway"  # group gateway.networking.k8s.io: every service of that waypoint


@dataclass(frozen=True, slots=True)
class PolicyTarget:
    """A targetRef: always in the policy's own namespace (Istio's rule)."""

    kind: TargetKind
    name: str


@dataclass(frozen=True, slots=True)
class HeaderCondition:
    """`when: request.headers[name]`: the header's value against Istio's glob values."""

    name: str  # lower case
    values: tuple[StringMatch, ...] = ()
    not_values: tuple[StringMatch, ...] = ()


@dataclass(frozen=True, slots=True)
class L7Match:
    # Of the original client (its HBONE certificate, as the waypoint verified it).
    principals: tuple[StringMatch, ...] = ()  # against "td/ns/x/sa/y" (no spiffe://)
    not_principals: tuple[StringMatch, ...] = ()
    namespaces: tuple[StringMatch, ...] = ()
    not_namespaces: tuple[StringMatch, ...] = ()
    service_accounts: tuple[ServiceAccountMatch, ...] = ()
    not_service_accounts: tuple[ServiceAccountMatch, ...] = ()
    source_ips: tuple[IpNetwork, ...] = ()  # ipBlocks, source.ip: the client's own address
    not_source_ips: tuple[IpNetwork, ...] = ()
    remote_ips: tuple[IpNetwork, ...] = ()  # remoteIpBlocks, remote.ip: X-Forwarded-For aware
    not_remote_ips: tuple[IpNetwork, ...] = ()
    # Of the request.
    hosts: tuple[StringMatch, ...] = ()  # case-insensitive, against the Host / :authority
    not_hosts: tuple[StringMatch, ...] = ()
    ports: tuple[int, ...] = ()  # the Service port asked for
    not_ports: tuple[int, ...] = ()
    methods: tuple[StringMatch, ...] = ()
    not_methods: tuple[StringMatch, ...] = ()
    paths: tuple[StringMatch, ...] = ()  # the path without the query
    not_paths: tuple[StringMatch, ...] = ()
    headers: tuple[HeaderCondition, ...] = ()
    destination_ips: tuple[IpNetwork, ...] = ()
    not_destination_ips: tuple[IpNetwork, ...] = ()

    def is_empty(self) -> bool:
        return not any(getattr(self, name) for name in self.__slots__)


L7Clause = tuple[L7Match, ...]  # any of its matches
L7Rule = tuple[L7Clause, ...]  # all of its clauses


@dataclass(frozen=True, slots=True)
class WaypointPolicy:
    name: str
    namespace: str
    action: WaypointAction
    targets: tuple[PolicyTarget, ...]
    rules: tuple[L7Rule, ...]  # a policy with no rules never matches (ALLOW: denies all)
    dry_run: bool = False

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def targets_service(self, namespace: str, name: str) -> bool:
        return self.namespace == namespace and PolicyTarget(TargetKind.SERVICE, name) in (
            self.targets
        )

    def targets_gateway(self, gateway_key: str) -> bool:
        namespace, _, name = gateway_key.partition("/")
        return self.namespace == namespace and PolicyTarget(TargetKind.GATEWAY, name) in (
            self.targets
        )
