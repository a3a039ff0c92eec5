"""Turn `security.istio.io` AuthorizationPolicies attached to a waypoint into `WaypointPolicy`.

A policy with `targetRefs` (or the deprecated `targetRef`) naming a Service or a waypoint
Gateway of its namespace is enforced by that waypoint, which parses HTTP: unlike the node
agent's L4 translation (authorization_policy.py) every field is enforceable, so nothing is
dropped or made stricter. What the waypoint cannot enforce (JWT, CUSTOM, path templates, other
`when` keys) is refused, since a rule that silently never matches is a hole in a DENY policy.

Rules become clauses exactly as in the L4 translation: a rule's `from` list is one clause whose
matches are its sources, its `to` list one clause whose matches are its operations, and each
`when` condition a clause of its own with one match. Globs ("x", "x*", "*x", "*") and
principals (written without `spiffe://`) read as there too, through the same helpers.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

from agent.sources.authorization_policy import (
    _CONDITION_KEYS,
    _RULE_KEYS,
    API_VERSIONS,
    DRY_RUN_ANNOTATION,
    KIND,
    PolicyError,
    _glob,
    _k8s_service_account,
    _network,
    _port,
    _strings,
    open_k8s_policy,
)
from agent.sources.document import Doc as _Doc
from agent.sources.document import at as _at
from agent.sources.document import check_keys as _check_keys
from agent.sources.document import items as _items
from agent.sources.document import mapping as _mapping
from agent.sources.document import string as _string
from agent.state.policy import ServiceAccountMatch, StringMatch, StringMatchKind
from agent.state.waypoint_policy import (
    HeaderCondition,
    L7Clause,
    L7Match,
    L7Rule,
    PolicyTarget,
    TargetKind,
    WaypointAction,
    WaypointPolicy,
)

__all__ = ["PolicyError", "attaches_to_waypoint", "parse_waypoint_policy", "to_document"]

_TARGET_REF_KEYS = ("group", "kind", "name", "namespace")

MAX_TARGET_REFS = 16  # Istio's CRD limit
GATEWAY_GROUP = "gateway.networking.k8s.io"
# Istio's CRD accepts the core group of a Service written either way.
_SERVICE_GROUPS = ("", "core")
_SUPPORTED_TARGETS = f'Service (group "") and Gateway (group {GATEWAY_GROUP})'

_JWT_SOURCE_KEYS = ("requestPrincipals", "notRequestPrincipals")
_NO_JWT = "JWT request authentication is not supported by this waypoint (no RequestAuthentication)"

# `request.headers[name]`: the name is an HTTP token, or a pseudo-header such as ":authority".
_HEADER_KEY = re.compile(r"request\.headers\[(.*)\]")
_HEADER_NAME = re.compile(r":?[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_HEADER_KEY_FORM = "request.headers[<name>]"


# --- how each written value becomes a model value ---------------------------------------------

# (doc, written value, its path, the policy's namespace) -> a value of an L7Match field.
_Convert = Callable[[_Doc, object, str, str], object]


def _as_glob(doc: _Doc, value: object, path: str, namespace: str) -> object:
    return _glob(doc, _string(doc, value, path), path, principal=False)


def _as_principal(doc: _Doc, value: object, path: str, namespace: str) -> object:
    return _glob(doc, _string(doc, value, path), path, principal=True)


def _as_host(doc: _Doc, value: object, path: str, namespace: str) -> object:
    # Host names are case-insensitive: stored lower-cased, compared with the lower-cased Host.
    return _glob(doc, _string(doc, value, path).lower(), path, principal=False)


def _as_path(doc: _Doc, value: object, path: str, namespace: str) -> object:
    text = _string(doc, value, path)
    if "{" in text:
        # Istio reads "{*}" and "{**}" as path segments; taken as a glob here, the brace would
        # be matched literally and the rule would never match.
        raise doc.error(
            path,
            f"{text!r}: path templates ({{*}}, {{**}}) are not supported by this waypoint; "
            "use an exact path, a prefix ('/api/*') or a suffix ('*.js')",
        )
    return _glob(doc, text, path, principal=False)


def _as_service_account(doc: _Doc, value: object, path: str, namespace: str) -> object:
    return _k8s_service_account(doc, _string(doc, value, path), path, namespace)


def _as_network(doc: _Doc, value: object, path: str, namespace: str) -> object:
    return _network(doc, _string(doc, value, path), path)


def _as_port(doc: _Doc, value: object, path: str, namespace: str) -> object:
    # Kubernetes writes ports as strings ("8080"); a YAML number is accepted as the same.
    return _port(doc, value, path, allow_string=True)


# Written field -> (L7Match attribute, conversion), in Istio's order of the fields.
_SOURCE_FIELDS: dict[str, tuple[str, _Convert]] = {
    "principals": ("principals", _as_principal),
    "notPrincipals": ("not_principals", _as_principal),
    "namespaces": ("namespaces", _as_glob),
    "notNamespaces": ("not_namespaces", _as_glob),
    "serviceAccounts": ("service_accounts", _as_service_account),
    "notServiceAccounts": ("not_service_accounts", _as_service_account),
    # At the waypoint these differ: the client's own address, and the X-Forwarded-For one.
    "ipBlocks": ("source_ips", _as_network),
    "notIpBlocks": ("not_source_ips", _as_network),
    "remoteIpBlocks": ("remote_ips", _as_network),
    "notRemoteIpBlocks": ("not_remote_ips", _as_network),
}
_OPERATION_FIELDS: dict[str, tuple[str, _Convert]] = {
    "hosts": ("hosts", _as_host),
    "notHosts": ("not_hosts", _as_host),
    "ports": ("ports", _as_port),
    "notPorts": ("not_ports", _as_port),
    "methods": ("methods", _as_glob),
    "notMethods": ("not_methods", _as_glob),
    "paths": ("paths", _as_path),
    "notPaths": ("not_paths", _as_path),
}
# `when` key -> (attribute for values, attribute for notValues, conversion). Unlike at L4,
# remote.ip is its own attribute: the waypoint sees X-Forwarded-For.
_WHEN: dict[str, tuple[str, str, _Convert]] = {
    "source.ip": ("source_ips", "not_source_ips", _as_network),
    "remote.ip": ("remote_ips", "not_remote_ips", _as_network),
    "source.namespace": ("namespaces", "not_namespaces", _as_glob),
    "source.principal": ("principals", "not_principals", _as_principal),
    "destination.ip": ("destination_ips", "not_destination_ips", _as_network),
    "destination.port": ("ports", "not_ports", _as_port),
}
WHEN_KEYS = (*_WHEN, _HEADER_KEY_FORM)


# --- parsing ----------------------------------------------------------------------------------


def attaches_to_waypoint(document: Mapping[str, object]) -> bool:
    """Whether the document is a Kubernetes AuthorizationPolicy with targetRef(s), i.e. one for
    `parse_waypoint_policy` rather than the node agent's `parse_policy`. Never raises: routing
    must not fail on a document that the chosen parser will then reject with a reason."""
    if not isinstance(document, Mapping) or document.get("kind") != KIND:
        return False
    spec = document.get("spec")
    return isinstance(spec, Mapping) and (
        spec.get("targetRef") is not None or spec.get("targetRefs") is not None
    )


def parse_waypoint_policy(document: Mapping[str, object]) -> WaypointPolicy:
    """One waypoint policy; a `PolicyError` (policy, field path, reason) for anything wrong."""
    if not isinstance(document, Mapping):
        raise PolicyError("?/?", "", f"a policy must be a mapping, not {type(document).__name__}")
    header = open_k8s_policy(document)
    doc, name, namespace, dry_run, spec = (
        header.doc, header.name, header.namespace, header.dry_run, header.spec
    )  # fmt: skip
    targets = _targets(doc, spec, namespace)
    action = _action(doc, spec.get("action"))
    if spec.get("provider") is not None:
        raise doc.error(
            "provider", "only applies to action CUSTOM, which this waypoint does not support"
        )

    rules = tuple(
        _rule(doc, rule, rule_path, namespace) for rule_path, rule in _items(doc, spec, "rules", "")
    )
    return WaypointPolicy(
        name=name,
        namespace=namespace,
        action=action,
        targets=targets,
        rules=rules,
        dry_run=dry_run,
    )


def _targets(doc: _Doc, spec: Mapping[str, object], namespace: str) -> tuple[PolicyTarget, ...]:
    single, several = spec.get("targetRef"), spec.get("targetRefs")
    if single is not None and several is not None:
        raise doc.error(
            "targetRef", "set either targetRef or targetRefs, not both (targetRef is deprecated)"
        )
    if single is None and several is None:
        raise doc.error(
            "targetRefs",
            "is required: without targetRef(s) the policy selects workloads and is enforced by "
            "the node agent (authorization_policy.parse_policy), not by a waypoint",
        )
    if spec.get("selector") is not None:
        # Istio rejects both together: attached to a waypoint, a selector has nothing to select.
        raise doc.error(
            "selector",
            "selector and targetRef(s) are mutually exclusive; drop the selector to attach the "
            "policy to the waypoint, or the targetRefs to enforce it at the workloads",
        )
    if single is not None:
        refs = [("targetRef", single)]
    else:
        refs = _items(doc, spec, "targetRefs", "")
        if not refs:
            # Istio would read an empty list as no targetRefs, widening the policy to the
            # whole namespace's workloads: almost certainly not what was meant.
            raise doc.error("targetRefs", "must not be empty; name a Service or Gateway")
        if len(refs) > MAX_TARGET_REFS:
            raise doc.error(
                "targetRefs", f"has {len(refs)} entries; Istio allows at most {MAX_TARGET_REFS}"
            )
    targets: list[PolicyTarget] = []
    for ref_path, ref in refs:
        target = _target(doc, ref, ref_path, namespace)
        if target not in targets:  # a duplicate means nothing more
            targets.append(target)
    return tuple(targets)


def _target(doc: _Doc, value: object, path: str, namespace: str) -> PolicyTarget:
    ref = _mapping(doc, value, path)
    _check_keys(doc, ref, _TARGET_REF_KEYS, path)
    kind = _string(doc, ref.get("kind"), _at(path, "kind"))
    name = _string(doc, ref.get("name"), _at(path, "name"))
    group = ref.get("group")
    if group is None:
        group = ""  # unset in the protobuf: the core group
    if not isinstance(group, str):
        raise doc.error(_at(path, "group"), f"must be a string, not {group!r}")
    ref_namespace = ref.get("namespace")
    if ref_namespace not in (None, "", namespace):
        raise doc.error(
            _at(path, "namespace"),
            f"{ref_namespace!r}: a targetRef can only name a resource of the policy's own "
            f"namespace ({namespace!r}); create the policy in {ref_namespace!r} instead",
        )
    if kind == TargetKind.SERVICE.value:
        if group not in _SERVICE_GROUPS:
            raise doc.error(
                _at(path, "group"), f'{group!r}: a Service is in the core group, written ""'
            )
        return PolicyTarget(TargetKind.SERVICE, name)
    if kind == TargetKind.GATEWAY.value:
        if group != GATEWAY_GROUP:
            raise doc.error(
                _at(path, "group"), f"{group!r}: a Gateway target's group is {GATEWAY_GROUP}"
            )
        return PolicyTarget(TargetKind.GATEWAY, name)
    raise doc.error(
        _at(path, "kind"),
        f"{kind!r} is not supported as a waypoint policy target (supported: {_SUPPORTED_TARGETS})",
    )


def _action(doc: _Doc, value: object) -> WaypointAction:
    if value is None:
        return WaypointAction.ALLOW  # Istio's default
    if value == "CUSTOM":
        raise doc.error(
            "action",
            "CUSTOM (external authorization) is not supported: this waypoint has no ext-authz "
            "provider; use ALLOW, DENY or AUDIT",
        )
    for action in WaypointAction:
        if value == action.value:
            return action
    choices = ", ".join(action.value for action in WaypointAction)
    raise doc.error("action", f"{value!r} must be one of: {choices}")


def _rule(doc: _Doc, value: object, path: str, namespace: str) -> L7Rule:
    rule = _mapping(doc, value, path)
    _check_keys(doc, rule, _RULE_KEYS, path)
    clauses: list[L7Clause] = []
    for key, wrapper, fields in (
        ("from", "source", _SOURCE_FIELDS),
        ("to", "operation", _OPERATION_FIELDS),
    ):
        matches = tuple(
            _entry(doc, entry, entry_path, wrapper, fields, namespace)
            for entry_path, entry in _items(doc, rule, key, path)
        )
        if matches:  # `from: []` says nothing, as in Istio: no clause
            clauses.append(matches)
    for condition_path, condition in _items(doc, rule, "when", path):
        clauses.append((_condition(doc, condition, condition_path, namespace),))
    return tuple(clauses)


def _entry(
    doc: _Doc,
    value: object,
    path: str,
    wrapper: str,
    fields: Mapping[str, tuple[str, _Convert]],
    namespace: str,
) -> L7Match:
    """`{source: {...}}` or `{operation: {...}}` as one match."""
    entry = _mapping(doc, value, path)
    _check_keys(doc, entry, (wrapper,), path)
    inner_path = _at(path, wrapper)
    if entry.get(wrapper) is None:
        raise doc.error(inner_path, "is required")
    inner = _mapping(doc, entry[wrapper], inner_path)
    jwt_keys = _JWT_SOURCE_KEYS if wrapper == "source" else ()
    _check_keys(doc, inner, (*fields, *jwt_keys), inner_path)
    for key in jwt_keys:
        if inner.get(key) is not None:
            raise doc.error(_at(inner_path, key), _NO_JWT)
    # Any: the values are tuples of four different element types, one per attribute.
    values: dict[str, Any] = {
        attribute: tuple(
            convert(doc, item, item_path, namespace)
            for item_path, item in _items(doc, inner, key, inner_path)
        )
        for key, (attribute, convert) in fields.items()
    }
    match = L7Match(**values)
    if match.is_empty():
        # Istio's validation rejects it too: it is unclear whether it should match all or none.
        raise doc.error(
            inner_path,
            f"must not be empty; to match any {wrapper}, leave the rule's "
            f"{'from' if wrapper == 'source' else 'to'} list out",
        )
    return match


def _condition(doc: _Doc, value: object, path: str, namespace: str) -> L7Match:
    condition = _mapping(doc, value, path)
    _check_keys(doc, condition, _CONDITION_KEYS, path)
    key_path = _at(path, "key")
    key = _string(doc, condition.get("key"), key_path)
    header = _header_name(doc, key, key_path)
    if header is None and key not in _WHEN:
        supported = f"supported keys: {', '.join(WHEN_KEYS)}"
        if key.startswith("request.auth."):
            raise doc.error(key_path, f"{key!r}: {_NO_JWT}; {supported}")
        raise doc.error(key_path, f"{key!r} is not supported by this waypoint; {supported}")
    values = _strings(doc, condition, "values", path)
    not_values = _strings(doc, condition, "notValues", path)
    if not values and not not_values:
        raise doc.error(path, "needs values or notValues")
    if header is not None:
        # Header values are case-sensitive: globs as written.
        return L7Match(
            headers=(
                HeaderCondition(
                    name=header,
                    values=tuple(_glob(doc, t, p, principal=False) for p, t in values),
                    not_values=tuple(_glob(doc, t, p, principal=False) for p, t in not_values),
                ),
            )
        )
    positive, negative, convert = _WHEN[key]
    fields: dict[str, Any] = {  # Any: one of four element types, depending on the key
        positive: tuple(convert(doc, text, p, namespace) for p, text in values),
        negative: tuple(convert(doc, text, p, namespace) for p, text in not_values),
    }
    return L7Match(**fields)


def _header_name(doc: _Doc, key: str, path: str) -> str | None:
    """The lower-cased header name of a `request.headers[...]` key, None for other keys."""
    if not key.startswith("request.headers"):
        return None
    written = _HEADER_KEY.fullmatch(key)
    if written is None or not _HEADER_NAME.fullmatch(written.group(1)):
        raise doc.error(path, f"{key!r} must be {_HEADER_KEY_FORM}, with an HTTP header name")
    # HTTP header names are case-insensitive, and HTTP/2 sends them lower-cased.
    return written.group(1).lower()


# --- back to a Kubernetes document ------------------------------------------------------------

_L7_ATTRIBUTES = tuple(field.name for field in dataclasses.fields(L7Match))
_SOURCE_ATTRIBUTES = frozenset(attribute for attribute, _ in _SOURCE_FIELDS.values())
_OPERATION_ATTRIBUTES = frozenset(attribute for attribute, _ in _OPERATION_FIELDS.values())


def to_document(policy: WaypointPolicy) -> dict[str, Any]:
    """The policy as a Kubernetes AuthorizationPolicy (security.istio.io/v1), for config dumps:
    `parse_waypoint_policy` of it gives the same policy. Raises ValueError for a policy built by
    hand whose clauses no AuthorizationPolicy can express."""
    metadata: dict[str, Any] = {"name": policy.name, "namespace": policy.namespace}
    if policy.dry_run:
        metadata["annotations"] = {DRY_RUN_ANNOTATION: "true"}
    spec: dict[str, Any] = {
        "targetRefs": [
            {
                "group": GATEWAY_GROUP if target.kind is TargetKind.GATEWAY else "",
                "kind": target.kind.value,
                "name": target.name,
            }
            for target in policy.targets
        ],
        "action": policy.action.value,
    }
    if policy.rules:
        spec["rules"] = [
            _rule_document(rule, f"{policy.key}: rules[{index}]")
            for index, rule in enumerate(policy.rules)
        ]
    return {"apiVersion": API_VERSIONS[0], "kind": KIND, "metadata": metadata, "spec": spec}


def _used(match: L7Match) -> frozenset[str]:
    return frozenset(name for name in _L7_ATTRIBUTES if getattr(match, name))


def _rule_document(rule: L7Rule, where: str) -> dict[str, Any]:
    """A rule written so that parsing it gives the same clauses in the same order.

    Parsing yields the `from` clause, then the `to` clause, then one clause per condition, so
    the clauses are written in that order: a source-only clause first may be the `from` list, an
    operation-only one before any condition the `to` list, and the rest must be conditions. A
    condition written as a one-entry `from` or `to` parses to the very same clause.
    """
    document: dict[str, Any] = {}
    stage = 0  # 0: `from` may come, 1: `to` may come, 2: only conditions
    for index, clause in enumerate(rule):
        used = [_used(match) for match in clause]
        if not clause or not all(used):
            raise ValueError(f"{where}: clause {index} has an empty match or none")
        if stage == 0 and all(u <= _SOURCE_ATTRIBUTES for u in used):
            document["from"] = [{"source": _fields_document(m, _SOURCE_FIELDS)} for m in clause]
            stage = 1
        elif stage <= 1 and all(u <= _OPERATION_ATTRIBUTES for u in used):
            document["to"] = [{"operation": _fields_document(m, _OPERATION_FIELDS)} for m in clause]
            stage = 2
        else:
            document.setdefault("when", []).append(
                _condition_document(clause, f"{where}: clause {index}")
            )
            stage = 2
    return document


def _glob_text(match: StringMatch) -> str:
    if match.kind is StringMatchKind.PRESENCE:
        return "*"
    if match.kind is StringMatchKind.PREFIX:
        return f"{match.value}*"
    if match.kind is StringMatchKind.SUFFIX:
        return f"*{match.value}"
    return match.value


def _written(value: object) -> object:
    """One model value as the document writes it (ports stay numbers, as in `ports: [80]`)."""
    if isinstance(value, StringMatch):
        return _glob_text(value)
    if isinstance(value, ServiceAccountMatch):
        return f"{value.namespace}/{value.service_account}"
    if isinstance(value, int):
        return value
    return str(value)  # an IP network


def _fields_document(
    match: L7Match, fields: Mapping[str, tuple[str, _Convert]]
) -> dict[str, list[object]]:
    return {
        key: [_written(value) for value in getattr(match, attribute)]
        for key, (attribute, _) in fields.items()
        if getattr(match, attribute)
    }


def _condition_document(clause: L7Clause, where: str) -> dict[str, Any]:
    if len(clause) == 1:
        (match,) = clause
        used = _used(match)
        if used == {"headers"} and len(match.headers) == 1:
            (header,) = match.headers
            key = f"request.headers[{header.name}]"
            return _values_document(key, header.values, header.not_values)
        for key, (positive, negative, _) in _WHEN.items():
            if used <= {positive, negative}:
                return _values_document(key, getattr(match, positive), getattr(match, negative))
    raise ValueError(f"{where}: not expressible as a from list, a to list or one condition")


def _values_document(
    key: str, values: tuple[object, ...], not_values: tuple[object, ...]
) -> dict[str, Any]:
    document: dict[str, Any] = {"key": key}
    # Condition values are strings in the CRD, ports too.
    if values:
        document["values"] = [str(_written(value)) for value in values]
    if not_values:
        document["notValues"] = [str(_written(value)) for value in not_values]
    return document
