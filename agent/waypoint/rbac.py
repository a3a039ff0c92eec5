"""L7 AuthorizationPolicies (agent/state/waypoint_policy.py) as Envoy RBAC filters (sans-IO).

Istio's translation, in the parts that matter: one RBAC filter per action, DENY before
ALLOW before AUDIT (LOG); each policy rule an Envoy policy named
`ns[NS]-policy[NAME]-rule[I]`, so a denied request's response details name the policy;
dry-run policies go to the filter's shadow rules, which decide nothing and leave their
verdict in dynamic metadata under DRY_RUN_PREFIX. The client is matched by the principal it
proved to connect_terminate, carried in filter state (`io.istio.peer_principal`), not by the
TLS peer of this hop, which is the waypoint's own internal connection.

A TCP chain sees no HTTP, so fields that need it are handled as Istio does at L4: in an
ALLOW rule they make their match never hold; in DENY and AUDIT rules they are left out, so
the rule covers more.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from agent.state.policy import IpNetwork, StringMatch, StringMatchKind
from agent.state.waypoint_policy import (
    HeaderCondition,
    L7Clause,
    L7Match,
    WaypointAction,
    WaypointPolicy,
)

JsonObject = dict[str, Any]

PEER_PRINCIPAL = "io.istio.peer_principal"
DRY_RUN_PREFIX = "istio_dry_run_"
_ENVOY_ACTION = {
    WaypointAction.ALLOW: "ALLOW",
    WaypointAction.DENY: "DENY",
    WaypointAction.AUDIT: "LOG",
}
# Fields only a principal can express; a clause holding one goes to the principal side.
_PRINCIPAL_FIELDS = (
    "principals", "not_principals", "namespaces", "not_namespaces", "service_accounts",
    "not_service_accounts", "source_ips", "not_source_ips", "remote_ips", "not_remote_ips",
)  # fmt: skip
_HTTP_FIELDS = ("hosts", "not_hosts", "methods", "not_methods", "paths", "not_paths", "headers")
_ANY_PRINCIPAL: JsonObject = {"any": True}
_NO_PRINCIPAL: JsonObject = {"not_id": {"any": True}}
_ANY_PERMISSION: JsonObject = {"any": True}
_NO_PERMISSION: JsonObject = {"not_rule": {"any": True}}


def envoy_policy_name(policy: WaypointPolicy, rule: int) -> str:
    return f"ns[{policy.namespace}]-policy[{policy.name}]-rule[{rule}]"


_DENIED = re.compile(r"rbac_access_denied_matched_policy\[(.*)\]")
_POLICY_NAME = re.compile(r"ns\[([^\]]*)\]-policy\[([^\]]*)\]-rule\[\d+\]")


def policy_key(envoy_name: str) -> str:
    """ "ns/name" of an Envoy policy named by envoy_policy_name, else ""."""
    named = _POLICY_NAME.fullmatch(envoy_name)
    return f"{named.group(1)}/{named.group(2)}" if named else ""


def denying_policy(details: str) -> str | None:
    """From a response's details: "ns/name" of the DENY policy that matched, "" when
    ALLOW policies applied and none matched, None when RBAC did not deny."""
    denied = _DENIED.search(details)
    return None if denied is None else policy_key(denied.group(1))


def _string(match: StringMatch, prefix: str = "", ignore_case: bool = False) -> JsonObject:
    if match.kind is StringMatchKind.EXACT:
        out: JsonObject = {"exact": prefix + match.value}
    elif match.kind is StringMatchKind.PREFIX:
        out = {"prefix": prefix + match.value}
    elif match.kind is StringMatchKind.SUFFIX:
        out = {"suffix": match.value}
    else:
        return {"safe_regex": {"regex": ".+"}}
    if ignore_case:
        out["ignore_case"] = True
    return out


def _glob_regex(match: StringMatch) -> str:
    value = re.escape(match.value)
    if match.kind is StringMatchKind.EXACT:
        return value
    if match.kind is StringMatchKind.PREFIX:
        return f"{value}[^/]*"
    if match.kind is StringMatchKind.SUFFIX:
        return f"[^/]*{value}"
    return "[^/]+"


def _peer(string_match: JsonObject) -> JsonObject:
    return {"filter_state": {"key": PEER_PRINCIPAL, "string_match": string_match}}


def _cidr(network: IpNetwork) -> JsonObject:
    return {"address_prefix": str(network.network_address), "prefix_len": network.prefixlen}


def _header(name: str, match: StringMatch, ignore_case: bool = False) -> JsonObject:
    # Presence ("*") is a non-empty value, as in the model (not Envoy's present_match, which
    # also takes an empty one).
    return {"header": {"name": name, "string_match": _string(match, ignore_case=ignore_case)}}


def _field_matchers(match: L7Match, field: str) -> list[JsonObject]:
    """One Envoy matcher per value of a positive field (the caller ORs them)."""
    if field == "principals":
        return [_peer(_string(m, "spiffe://")) for m in match.principals]
    if field == "namespaces":
        return [
            _peer({"safe_regex": {"regex": f"spiffe://[^/]+/ns/{_glob_regex(m)}/sa/[^/]+"}})
            for m in match.namespaces
        ]
    if field == "service_accounts":
        return [
            _peer(
                {
                    "safe_regex": {
                        "regex": f"spiffe://[^/]+/ns/{re.escape(a.namespace)}/sa/"
                        f"{re.escape(a.service_account)}"
                    }
                }
            )
            for a in match.service_accounts
        ]
    if field == "source_ips":
        return [{"direct_remote_ip": _cidr(n)} for n in match.source_ips]
    if field == "remote_ips":
        return [{"remote_ip": _cidr(n)} for n in match.remote_ips]
    if field == "hosts":
        return [_header(":authority", m, ignore_case=True) for m in match.hosts]
    if field == "methods":
        return [_header(":method", m) for m in match.methods]
    if field == "paths":
        return [{"url_path": {"path": _string(m)}} for m in match.paths]
    if field == "ports":
        return [{"destination_port": port} for port in match.ports]
    if field == "destination_ips":
        return [{"destination_ip": _cidr(n)} for n in match.destination_ips]
    raise ValueError(f"no matcher for {field}")


_POSITIVE_FIELDS = (
    "principals", "namespaces", "service_accounts", "source_ips", "remote_ips", "hosts",
    "methods", "paths", "ports", "destination_ips",
)  # fmt: skip


class _Side:
    """The and/or/not/any words of one side of an Envoy policy (principals or permissions)."""

    def __init__(self, principal: bool) -> None:
        self.principal = principal
        self.and_, self.or_, self.not_, self.list_ = (
            ("and_ids", "or_ids", "not_id", "ids")
            if principal
            else ("and_rules", "or_rules", "not_rule", "rules")
        )
        self.any = _ANY_PRINCIPAL if principal else _ANY_PERMISSION
        self.none = _NO_PRINCIPAL if principal else _NO_PERMISSION

    def all_of(self, items: list[JsonObject]) -> JsonObject:
        if not items:
            return self.any
        return items[0] if len(items) == 1 else {self.and_: {self.list_: items}}

    def any_of(self, items: list[JsonObject]) -> JsonObject:
        if not items:
            return self.none
        return items[0] if len(items) == 1 else {self.or_: {self.list_: items}}

    def negated(self, item: JsonObject) -> JsonObject:
        return {self.not_: item}


def _header_condition(side: _Side, condition: HeaderCondition) -> list[JsonObject]:
    parts = []
    if condition.values:
        parts.append(side.any_of([_header(condition.name, m) for m in condition.values]))
    if condition.not_values:
        parts.append(
            side.negated(side.any_of([_header(condition.name, m) for m in condition.not_values]))
        )
    return parts


def _match(side: _Side, match: L7Match, http: bool, action: WaypointAction) -> JsonObject:
    if not http and any(getattr(match, f) for f in _HTTP_FIELDS):
        if action is WaypointAction.ALLOW:
            return side.none  # the TCP chain cannot tell: this match never allows
        match = L7Match(**{f: getattr(match, f) for f in match.__slots__ if f not in _HTTP_FIELDS})
    parts: list[JsonObject] = []
    for field in _POSITIVE_FIELDS:
        if getattr(match, field):
            parts.append(side.any_of(_field_matchers(match, field)))
        negative = f"not_{field}"
        if getattr(match, negative):
            positive = L7Match(**{field: getattr(match, negative)})
            parts.append(side.negated(side.any_of(_field_matchers(positive, field))))
    for condition in match.headers:
        parts.extend(_header_condition(side, condition))
    return side.all_of(parts)


def _is_principal_clause(clause: L7Clause) -> bool:
    return any(getattr(m, f) for m in clause for f in _PRINCIPAL_FIELDS)


def _envoy_policy(rule: tuple[L7Clause, ...], http: bool, action: WaypointAction) -> JsonObject:
    principals, permissions = _Side(True), _Side(False)
    principal_parts: list[JsonObject] = []
    permission_parts: list[JsonObject] = []
    for clause in rule:
        side = principals if _is_principal_clause(clause) else permissions
        matched = side.any_of([_match(side, m, http, action) for m in clause])
        (principal_parts if side.principal else permission_parts).append(matched)
    return {
        "permissions": [permissions.all_of(permission_parts)],
        "principals": [principals.all_of(principal_parts)],
    }


def _rules(policies: Iterable[WaypointPolicy], http: bool, action: WaypointAction) -> JsonObject:
    return {
        "action": _ENVOY_ACTION[action],
        "policies": {
            envoy_policy_name(policy, index): _envoy_policy(rule, http, action)
            for policy in policies
            for index, rule in enumerate(policy.rules)
        },
    }


def _config(
    chain: str, action: WaypointAction, policies: list[WaypointPolicy], http: bool
) -> JsonObject | None:
    enforced = [p for p in policies if not p.dry_run]
    dry_run = [p for p in policies if p.dry_run]
    if not enforced and not dry_run:
        return None
    # Each filter its own stats (the brief: two RBAC filters otherwise share counters).
    config: JsonObject = {"stat_prefix": f"{chain}.{action.value.lower()}."}
    if enforced:
        # An ALLOW policy with no rules adds no Envoy policy: an ALLOW filter with none
        # denies every request, as Istio's ALLOW-nothing does.
        config["rules"] = _rules(enforced, http, action)
    if dry_run:
        config["shadow_rules"] = _rules(dry_run, http, action)
        config["shadow_rules_stat_prefix"] = DRY_RUN_PREFIX
    return config


def http_filter(
    chain: str, action: WaypointAction, policies: list[WaypointPolicy]
) -> JsonObject | None:
    """The HTTP RBAC filter of `chain` for one action, or None when no policy has it."""
    config = _config(chain, action, policies, http=True)
    if config is None:
        return None
    return {
        "name": f"envoy.filters.http.rbac.{action.value.lower()}",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
            # stat_prefix is the HTTP filter's rules_stat_prefix.
            "rules_stat_prefix": config.pop("stat_prefix"),
            **config,
        },
    }


def network_filter(
    chain: str, action: WaypointAction, policies: list[WaypointPolicy]
) -> JsonObject | None:
    """The network (TCP) RBAC filter of `chain` for one action, or None."""
    config = _config(chain, action, policies, http=False)
    if config is None:
        return None
    return {
        "name": f"envoy.filters.network.rbac.{action.value.lower()}",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC",
            **config,
        },
    }
