"""Turn user-written authorization policies into `model.Policy`.

Two shapes are read (see docs/policy.md):

- the local-config shape, an entry of the config file's `policies:` list, close to what ztunnel
  receives: name, namespace, scope, action, dryRun, selector and rules -> clauses -> matches;
- a Kubernetes `security.istio.io` AuthorizationPolicy, translated the way istiod translates it
  for ztunnel (pilot/pkg/serviceregistry/kube/controller/ambient/authorization.go): every `from`
  list becomes one clause whose matches are its sources, every `to` list one clause, every `when`
  condition a clause of its own.

Everything is checked: unknown fields, malformed addresses and ports are a `PolicyError` naming
the policy and the field, because a policy that silently means less than it says is a hole.
Fields that only a proxy parsing HTTP can enforce (L7) are not errors, as in Istio ambient: they
are recorded in `Policy.wrong_layer` and the rule is made stricter (see `_k8s_rule`).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from agent.sources.document import Doc as _Doc
from agent.sources.document import DocumentError, doc_for, opened
from agent.sources.document import at as _at
from agent.sources.document import check_keys as _check_keys
from agent.sources.document import items as _items
from agent.sources.document import mapping as _mapping
from agent.sources.document import string as _string
from agent.sources.document import type_name as _type
from agent.state.policy import (
    ROOT_NAMESPACE,
    Action,
    Clause,
    IpNetwork,
    Match,
    Policy,
    Rule,
    Scope,
    ServiceAccountMatch,
    StringMatch,
    StringMatchKind,
)

DRY_RUN_ANNOTATION = "istio.io/dry-run"
API_VERSIONS = ("security.istio.io/v1", "security.istio.io/v1beta1")
KIND = "AuthorizationPolicy"

_SPIFFE_SCHEME = "spiffe://"
_DIGITS = re.compile(r"[0-9]+")


class PolicyError(DocumentError):
    """A policy the agent refuses: which one ("namespace/name"), which field, and why."""

    @property
    def policy(self) -> str:
        return self.key


def parse_policy(document: Mapping[str, object]) -> Policy:
    """One policy from either shape: a document with apiVersion, kind, metadata or spec is a
    Kubernetes AuthorizationPolicy, anything else the local-config shape."""
    if not isinstance(document, Mapping):
        raise PolicyError("?/?", "", f"a policy must be a mapping, not {_type(document)}")
    if any(key in document for key in ("apiVersion", "kind", "metadata", "spec")):
        return _parse_k8s(document)
    return _parse_local(document)


def parse_policies(documents: Iterable[Mapping[str, object]]) -> tuple[Policy, ...]:
    """Every policy of a config; two with one namespace/name are an error, since one would
    silently replace the other."""
    first_index: dict[str, int] = {}
    policies: list[Policy] = []
    for index, document in enumerate(documents):
        policy = parse_policy(document)
        if policy.key in first_index:
            raise PolicyError(
                policy.key,
                "",
                f"defined twice (policies[{first_index[policy.key]}] and policies[{index}])",
            )
        first_index[policy.key] = index
        policies.append(policy)
    return tuple(policies)


# --- shared helpers ---------------------------------------------------------------------------


def _doc_for(namespace: object, name: object) -> _Doc:
    return doc_for(namespace, name, PolicyError)


def _strings(
    doc: _Doc, mapping: Mapping[str, object], key: str, path: str
) -> list[tuple[str, str]]:
    return [
        (item_path, _string(doc, item, item_path))
        for item_path, item in _items(doc, mapping, key, path)
    ]


def _network(doc: _Doc, value: object, path: str) -> IpNetwork:
    # ip_network would also take an int, which no policy means.
    if isinstance(value, str):
        try:
            # strict=False: Istio accepts host bits in a CIDR ("10.1.2.3/16" is 10.1.0.0/16),
            # and a plain address becomes a /32 or /128.
            return ipaddress.ip_network(value, strict=False)
        except ValueError:
            pass
    raise doc.error(path, f"{value!r} is not an IP or CIDR")


def _port(doc: _Doc, value: object, path: str, *, allow_string: bool) -> int:
    number: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):  # `yes` is not a port
        number = value
    elif allow_string and isinstance(value, str) and _DIGITS.fullmatch(value):
        number = int(value)
    if number is None:
        raise doc.error(path, f"{value!r} is not a port number")
    if not 1 <= number <= 65535:
        raise doc.error(path, f"port {number} is outside 1..65535")
    return number


def _check_principal(doc: _Doc, text: str, path: str) -> None:
    # ztunnel compares principals without the scheme; one written with it never matches.
    if text.startswith(_SPIFFE_SCHEME):
        raise doc.error(
            path,
            f"{text!r}: principals are written without 'spiffe://', "
            "e.g. 'cluster.local/ns/default/sa/client'",
        )


def _glob(doc: _Doc, text: str, path: str, *, principal: bool) -> StringMatch:
    """Istio's wildcard form: "*" any non-empty value, "x*" prefix, "*x" suffix, else exact."""
    if text == "*":
        return StringMatch(StringMatchKind.PRESENCE)
    if text.startswith("*"):
        kind, rest = StringMatchKind.SUFFIX, text[1:]
    elif text.endswith("*"):
        kind, rest = StringMatchKind.PREFIX, text[:-1]
    else:
        kind, rest = StringMatchKind.EXACT, text
    if "*" in rest:
        # istiod would send it as a literal '*', which no name contains: say so instead.
        raise doc.error(path, f"{text!r}: '*' is only allowed at the start or the end")
    if principal:
        _check_principal(doc, rest, path)
    return StringMatch(kind, rest)


# --- local-config shape -----------------------------------------------------------------------

_LOCAL_KEYS = ("name", "namespace", "scope", "action", "dryRun", "selector", "rules")
_LOCAL_ACTIONS = {
    "Allow": Action.ALLOW,
    "Deny": Action.DENY,
    "ALLOW": Action.ALLOW,
    "DENY": Action.DENY,
}

# camelCase field -> Match attribute, by the kind of value it holds.
_LOCAL_STRING_FIELDS = {
    "namespaces": "namespaces",
    "notNamespaces": "not_namespaces",
    "principals": "principals",
    "notPrincipals": "not_principals",
}
_LOCAL_SA_FIELDS = {
    "serviceAccounts": "service_accounts",
    "notServiceAccounts": "not_service_accounts",
}
_LOCAL_IP_FIELDS = {
    "sourceIps": "source_ips",
    "notSourceIps": "not_source_ips",
    "destinationIps": "destination_ips",
    "notDestinationIps": "not_destination_ips",
}
_LOCAL_PORT_FIELDS = {
    "destinationPorts": "destination_ports",
    "notDestinationPorts": "not_destination_ports",
}
_LOCAL_MATCH_KEYS = (
    *_LOCAL_STRING_FIELDS,
    *_LOCAL_SA_FIELDS,
    *_LOCAL_IP_FIELDS,
    *_LOCAL_PORT_FIELDS,
)
_STRING_MATCH_KINDS = tuple(kind.value for kind in StringMatchKind)


def _parse_local(document: Mapping[str, object]) -> Policy:
    doc = _doc_for(document.get("namespace"), document.get("name"))
    _check_keys(doc, document, _LOCAL_KEYS, "")
    name = _string(doc, document.get("name"), "name")
    namespace = _string(doc, document.get("namespace"), "namespace")

    scope_value = _string(doc, document.get("scope"), "scope")
    try:
        scope = Scope(scope_value)
    except ValueError:
        raise doc.error(
            "scope", f"{scope_value!r} must be one of: {', '.join(s.value for s in Scope)}"
        ) from None

    action_value = document.get("action")
    action = _LOCAL_ACTIONS.get(_string(doc, action_value, "action"))
    if action is None:
        raise doc.error("action", f"{action_value!r} must be Allow or Deny")

    dry_run = document.get("dryRun", False)
    if not isinstance(dry_run, bool):
        raise doc.error("dryRun", f"must be true or false, not {dry_run!r}")

    selector: tuple[tuple[str, str], ...] = ()
    if scope is Scope.WORKLOAD_SELECTOR:
        if document.get("selector") is None:
            raise doc.error("selector", "is required with scope WorkloadSelector")
        selector = _selector(doc, document["selector"], "selector")
    elif document.get("selector") is not None:
        # Silently ignoring it would widen the policy to the whole namespace (or mesh).
        raise doc.error("selector", f"only applies with scope WorkloadSelector, not {scope.value}")

    rules: list[Rule] = []
    for rule_path, rule_value in _items(doc, document, "rules", ""):
        rule = _mapping(doc, rule_value, rule_path)
        _check_keys(doc, rule, ("clauses",), rule_path)
        clauses: list[Clause] = []
        for clause_path, clause_value in _items(doc, rule, "clauses", rule_path):
            clause = _mapping(doc, clause_value, clause_path)
            _check_keys(doc, clause, ("matches",), clause_path)
            clauses.append(
                tuple(
                    _local_match(doc, match, match_path)
                    for match_path, match in _items(doc, clause, "matches", clause_path)
                )
            )
        rules.append(tuple(clauses))

    return Policy(
        name=name,
        namespace=namespace,
        scope=scope,
        action=action,
        rules=tuple(rules),
        dry_run=dry_run,
        selector=selector,
    )


def _selector(doc: _Doc, value: object, path: str) -> tuple[tuple[str, str], ...]:
    selector = _mapping(doc, value, path)
    _check_keys(doc, selector, ("matchLabels",), path)
    labels_path = _at(path, "matchLabels")
    labels = _mapping(doc, selector.get("matchLabels"), labels_path)
    pairs: list[tuple[str, str]] = []
    for key, label_value in labels.items():
        if not isinstance(key, str) or not key:
            raise doc.error(labels_path, f"label name {key!r} must be a non-empty string")
        # Kubernetes label values are strings; `version: 1` would never equal a pod's "1".
        if not isinstance(label_value, str):
            raise doc.error(
                _at(labels_path, key), f"label value must be a string, not {label_value!r}"
            )
        pairs.append((key, label_value))
    return tuple(sorted(pairs))


def _local_match(doc: _Doc, value: object, path: str) -> Match:
    match = _mapping(doc, value, path)
    _check_keys(doc, match, _LOCAL_MATCH_KEYS, path)
    # Any: the values are tuples of four different element types, one per Match field.
    fields: dict[str, Any] = {}
    for key, attribute in _LOCAL_STRING_FIELDS.items():
        principal = attribute.endswith("principals")
        fields[attribute] = tuple(
            _local_string_match(doc, item, item_path, principal=principal)
            for item_path, item in _items(doc, match, key, path)
        )
    for key, attribute in _LOCAL_SA_FIELDS.items():
        fields[attribute] = tuple(
            _local_service_account(doc, item, item_path)
            for item_path, item in _items(doc, match, key, path)
        )
    for key, attribute in _LOCAL_IP_FIELDS.items():
        fields[attribute] = tuple(
            _network(doc, item, item_path) for item_path, item in _items(doc, match, key, path)
        )
    for key, attribute in _LOCAL_PORT_FIELDS.items():
        fields[attribute] = tuple(
            _port(doc, item, item_path, allow_string=False)
            for item_path, item in _items(doc, match, key, path)
        )
    result = Match(**fields)
    if result.is_empty():
        # ztunnel skips a match with no fields, so it never matches: almost certainly not what
        # was meant (an empty *clause*, `matches: []`, is the one that matches everything).
        raise doc.error(
            path,
            "a match with no fields never matches; to match every connection, leave the "
            "clause's matches empty instead",
        )
    return result


def _local_string_match(doc: _Doc, value: object, path: str, *, principal: bool) -> StringMatch:
    written = _mapping(doc, value, path)
    if len(written) != 1:
        raise doc.error(
            path,
            f"must have exactly one of: {', '.join(_STRING_MATCH_KINDS)}, not {dict(written)!r}",
        )
    ((key, text),) = written.items()
    try:
        kind = StringMatchKind(key)
    except ValueError:
        raise doc.error(
            _at(path, str(key)),
            f"unknown field (expected one of: {', '.join(_STRING_MATCH_KINDS)})",
        ) from None
    if kind is StringMatchKind.PRESENCE:
        if text not in (None, {}):
            raise doc.error(_at(path, key), f"takes no value ({{}}), not {text!r}")
        return StringMatch(kind)
    # An empty exact/prefix/suffix would match the empty string, which is what a source
    # without an identity has; presence says "any" without that trap.
    text = _string(doc, text, _at(path, key))
    if principal:
        _check_principal(doc, text, _at(path, key))
    return StringMatch(kind, text)


def _local_service_account(doc: _Doc, value: object, path: str) -> ServiceAccountMatch:
    written = _mapping(doc, value, path)
    _check_keys(doc, written, ("namespace", "serviceAccount"), path)
    return ServiceAccountMatch(
        namespace=_string(doc, written.get("namespace"), _at(path, "namespace")),
        service_account=_string(doc, written.get("serviceAccount"), _at(path, "serviceAccount")),
    )


# --- Kubernetes AuthorizationPolicy -----------------------------------------------------------

_K8S_KEYS = ("apiVersion", "kind", "metadata", "spec", "status")
# The last five are set by the API server; accepted so that `kubectl get -o yaml` output loads.
_METADATA_KEYS = (
    "name", "namespace", "annotations", "labels",
    "uid", "resourceVersion", "generation", "creationTimestamp", "managedFields",
)  # fmt: skip
_SPEC_KEYS = ("selector", "action", "rules", "targetRef", "targetRefs", "provider")
_RULE_KEYS = ("from", "to", "when")
_SOURCE_KEYS = (
    "principals", "notPrincipals", "namespaces", "notNamespaces",
    "serviceAccounts", "notServiceAccounts", "ipBlocks", "notIpBlocks",
    "remoteIpBlocks", "notRemoteIpBlocks", "requestPrincipals", "notRequestPrincipals",
)  # fmt: skip
_SOURCE_L7 = ("requestPrincipals", "notRequestPrincipals")  # JWT claims: need HTTP
_OPERATION_KEYS = (
    "ports",
    "notPorts",
    "hosts",
    "notHosts",
    "methods",
    "notMethods",
    "paths",
    "notPaths",
)
_OPERATION_L7 = ("hosts", "notHosts", "methods", "notMethods", "paths", "notPaths")
_CONDITION_KEYS = ("key", "values", "notValues")


@dataclass(frozen=True, slots=True)
class K8sPolicyHeader:
    """What every Kubernetes AuthorizationPolicy starts with, checked: for the node agents'
    policies here and the waypoints' (agent/sources/waypoint_policy.py)."""

    doc: _Doc
    name: str
    namespace: str
    dry_run: bool
    spec: Mapping[str, object]


def open_k8s_policy(document: Mapping[str, object]) -> K8sPolicyHeader:
    doc, meta = opened(
        document,
        PolicyError,
        api_versions=API_VERSIONS,
        kind=KIND,
        top_keys=_K8S_KEYS,
        metadata_keys=_METADATA_KEYS,
    )
    name = _string(doc, meta.get("name"), "metadata.name")
    # Required although kubectl would default it: it decides the policy's scope, and where
    # its targets are looked up.
    namespace = _string(doc, meta.get("namespace"), "metadata.namespace")
    dry_run = _dry_run(doc, meta.get("annotations"))
    spec = _mapping(doc, document.get("spec"), "spec")
    _check_keys(doc, spec, _SPEC_KEYS, "spec")
    return K8sPolicyHeader(doc, name, namespace, dry_run, spec)


def _parse_k8s(document: Mapping[str, object]) -> Policy:
    header = open_k8s_policy(document)
    doc, name, namespace, dry_run, spec = (
        header.doc, header.name, header.namespace, header.dry_run, header.spec
    )  # fmt: skip
    action = _k8s_action(doc, spec.get("action"))
    for key in ("targetRef", "targetRefs"):
        if spec.get(key) is not None:
            raise doc.error(
                key,
                "a policy attached to a waypoint or gateway is enforced there, not at L4 by the "
                "node agent; use selector (or none) for workload policies",
            )
    if spec.get("provider") is not None:
        raise doc.error("provider", "only applies to action CUSTOM, which L4 does not support")

    # Istio: any selector (even one with no labels) makes a workload policy; without one the
    # policy covers its namespace, or the whole mesh from the root namespace.
    if spec.get("selector") is not None:
        scope = Scope.WORKLOAD_SELECTOR
        selector = _selector(doc, spec["selector"], "selector")
    else:
        scope = Scope.GLOBAL if namespace == ROOT_NAMESPACE else Scope.NAMESPACE
        selector = ()

    rules: list[Rule] = []
    findings: list[str] = []
    written_rules = _items(doc, spec, "rules", "")
    for rule_path, rule_value in written_rules:
        rule, rule_findings = _k8s_rule(doc, rule_value, rule_path, action, namespace)
        findings.extend(rule_findings)
        if rule is not None:
            rules.append(rule)
    if action is Action.ALLOW and written_rules and not rules:
        findings.append(
            "rules: every rule of this ALLOW policy needs L7, so at L4 it matches nothing and "
            "denies every connection to the workloads it selects"
        )

    return Policy(
        name=name,
        namespace=namespace,
        scope=scope,
        action=action,
        rules=tuple(rules),
        dry_run=dry_run,
        selector=selector,
        wrong_layer=tuple(findings),
    )


def _dry_run(doc: _Doc, annotations_value: object) -> bool:
    annotations = _mapping(doc, annotations_value, "metadata.annotations")
    value = annotations.get(DRY_RUN_ANNOTATION)
    if value is None:
        return False
    # Annotations are strings; an unquoted YAML `true` is accepted as meaning the same.
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    # Guessing would either enforce a policy meant as a trial or the reverse.
    raise doc.error(
        f"metadata.annotations.{DRY_RUN_ANNOTATION}", f'{value!r} must be "true" or "false"'
    )


def _k8s_action(doc: _Doc, value: object) -> Action:
    if value is None or value == "ALLOW":
        return Action.ALLOW
    if value == "DENY":
        return Action.DENY
    if value in ("AUDIT", "CUSTOM"):
        raise doc.error(
            "action",
            f"{value} is not supported at L4 (only ALLOW and DENY are); "
            f"{value} policies need a waypoint",
        )
    raise doc.error("action", f"{value!r} must be ALLOW or DENY")


@dataclass(slots=True)
class _L7:
    """What of a rule needs L7, for the finding: its path and how to name it."""

    path: str
    what: str = "L7 field"


def _k8s_rule(
    doc: _Doc, value: object, path: str, action: Action, namespace: str
) -> tuple[Rule | None, list[str]]:
    """One rule's clauses, or None when the rule must be dropped; and its findings.

    Istio ambient's treatment of L7 parts, which keeps the failure on the safe side: an ALLOW
    rule that needs L7 is dropped, so it never allows; in a DENY rule the L7 parts are removed,
    so it denies more. Where removing them leaves a source, operation or condition with nothing
    to check, that part holds for every connection and its clause is dropped (istiod sends an
    empty match instead, which ztunnel never matches, so such a DENY denies nothing: istio
    issue 61126).
    """
    rule = _mapping(doc, value, path)
    _check_keys(doc, rule, _RULE_KEYS, path)
    clauses: list[Clause] = []
    l7: list[_L7] = []

    for field, parse_entry in (("from", _source_entry), ("to", _operation_entry)):
        entries = _items(doc, rule, field, path)
        matches: list[Match] = []
        for entry_path, entry in entries:
            match, entry_l7 = parse_entry(doc, entry, entry_path, namespace)
            l7.extend(entry_l7)
            matches.append(match)
        # An entry left with nothing to check matches anything, and so does its clause.
        if matches and not any(match.is_empty() for match in matches):
            clauses.append(tuple(matches))

    for condition_path, condition in _items(doc, rule, "when", path):
        condition_match = _condition(doc, condition, condition_path)
        if condition_match is None:
            key = _mapping(doc, condition, condition_path).get("key")
            l7.append(_L7(condition_path, f"L7 or unknown attribute {key!r}"))
        else:
            clauses.append((condition_match,))

    if not l7:
        return tuple(clauses), []
    if action is Action.ALLOW:
        article, consequence = "an", "the rule never matches at L4"
    else:
        article, consequence = "a", "ignored at L4, so the rule denies more broadly"
    findings = [
        f"{part.path}: {part.what} in {article} {action.value} rule: {consequence}; use a waypoint"
        for part in l7
    ]
    if action is Action.ALLOW:
        return None, findings
    if not clauses:
        findings.append(f"{path}: without its L7 parts this DENY rule matches every connection")
    return tuple(clauses), findings


def _wrapped(
    doc: _Doc, value: object, path: str, key: str, allowed: Sequence[str]
) -> tuple[Mapping[str, object], str]:
    """`{source: {...}}` or `{operation: {...}}`: the inner mapping, checked, and its path."""
    entry = _mapping(doc, value, path)
    _check_keys(doc, entry, (key,), path)
    inner_path = _at(path, key)
    if entry.get(key) is None:
        raise doc.error(inner_path, "is required")
    inner = _mapping(doc, entry[key], inner_path)
    _check_keys(doc, inner, allowed, inner_path)
    return inner, inner_path


def _source_entry(doc: _Doc, value: object, path: str, namespace: str) -> tuple[Match, list[_L7]]:
    source, source_path = _wrapped(doc, value, path, "source", _SOURCE_KEYS)
    written = {key: _strings(doc, source, key, source_path) for key in _SOURCE_KEYS}
    if not any(written.values()):
        # Istio's validation rejects it too: it is unclear whether it should match all or none.
        raise doc.error(source_path, "must not be empty")
    if written["ipBlocks"] and written["remoteIpBlocks"]:
        # Both would have to hold, and at L4 both are the peer's address: one list would be
        # the intersection, which is not what either says. (The not- forms simply add up.)
        raise doc.error(
            source_path,
            "ipBlocks and remoteIpBlocks both match the peer's address at L4 (no proxy in "
            "between); use only one",
        )

    def globs(key: str, *, principal: bool = False) -> tuple[StringMatch, ...]:
        return tuple(_glob(doc, text, p, principal=principal) for p, text in written[key])

    def networks(*keys: str) -> tuple[IpNetwork, ...]:
        return tuple(_network(doc, text, p) for key in keys for p, text in written[key])

    def accounts(key: str) -> tuple[ServiceAccountMatch, ...]:
        return tuple(_k8s_service_account(doc, text, p, namespace) for p, text in written[key])

    match = Match(
        namespaces=globs("namespaces"),
        not_namespaces=globs("notNamespaces"),
        service_accounts=accounts("serviceAccounts"),
        not_service_accounts=accounts("notServiceAccounts"),
        principals=globs("principals", principal=True),
        not_principals=globs("notPrincipals", principal=True),
        source_ips=networks("ipBlocks", "remoteIpBlocks"),
        not_source_ips=networks("notIpBlocks", "notRemoteIpBlocks"),
    )
    return match, [_L7(_at(source_path, key)) for key in _SOURCE_L7 if written[key]]


def _k8s_service_account(doc: _Doc, text: str, path: str, namespace: str) -> ServiceAccountMatch:
    # Istio: "namespace/name", or a bare name in the policy's namespace.
    account_namespace, slash, account = text.partition("/")
    if not slash:
        return ServiceAccountMatch(namespace, text)
    if not account_namespace or not account or "/" in account:
        raise doc.error(path, f"{text!r} must be a service account name or namespace/name")
    return ServiceAccountMatch(account_namespace, account)


def _operation_entry(
    doc: _Doc, value: object, path: str, namespace: str
) -> tuple[Match, list[_L7]]:
    del namespace  # same signature as _source_entry; operations are not namespaced
    operation, operation_path = _wrapped(doc, value, path, "operation", _OPERATION_KEYS)
    written = {key: _items(doc, operation, key, operation_path) for key in _OPERATION_KEYS}
    if not any(written.values()):
        raise doc.error(operation_path, "must not be empty")
    for key in _OPERATION_L7:  # checked although unused, so a typo'd value is still reported
        for item_path, item in written[key]:
            _string(doc, item, item_path)

    def ports(key: str) -> tuple[int, ...]:
        return tuple(_port(doc, item, p, allow_string=True) for p, item in written[key])

    match = Match(destination_ports=ports("ports"), not_destination_ports=ports("notPorts"))
    return match, [_L7(_at(operation_path, key)) for key in _OPERATION_L7 if written[key]]


# How each L4 `when` key becomes a Match: the attributes for values and notValues, and how
# one value is read.
_Convert = Callable[[_Doc, str, str], object]


def _as_glob(doc: _Doc, text: str, path: str) -> object:
    return _glob(doc, text, path, principal=False)


def _as_principal(doc: _Doc, text: str, path: str) -> object:
    return _glob(doc, text, path, principal=True)


def _as_network(doc: _Doc, text: str, path: str) -> object:
    return _network(doc, text, path)


def _as_port(doc: _Doc, text: str, path: str) -> object:
    return _port(doc, text, path, allow_string=True)


# The `when` keys enforceable at L4; any other is treated as L7 (istiod does the same with keys
# it does not know for ztunnel). remote.ip is the peer's address: at L4 there is no proxy in
# between whose X-Forwarded-For could differ from it.
_WHEN: dict[str, tuple[str, str, _Convert]] = {
    "source.ip": ("source_ips", "not_source_ips", _as_network),
    "remote.ip": ("source_ips", "not_source_ips", _as_network),
    "source.namespace": ("namespaces", "not_namespaces", _as_glob),
    "source.principal": ("principals", "not_principals", _as_principal),
    "destination.ip": ("destination_ips", "not_destination_ips", _as_network),
    "destination.port": ("destination_ports", "not_destination_ports", _as_port),
}
L4_WHEN_KEYS = tuple(_WHEN)


def _condition(doc: _Doc, value: object, path: str) -> Match | None:
    """The condition as one match, or None when its key is not an L4 attribute."""
    condition = _mapping(doc, value, path)
    _check_keys(doc, condition, _CONDITION_KEYS, path)
    key = _string(doc, condition.get("key"), _at(path, "key"))
    values = _strings(doc, condition, "values", path)
    not_values = _strings(doc, condition, "notValues", path)
    if not values and not not_values:
        raise doc.error(path, "needs values or notValues")
    if key not in _WHEN:
        return None
    positive, negative, convert = _WHEN[key]
    fields: dict[str, Any] = {  # Any: one of four element types, depending on the key
        positive: tuple(convert(doc, text, p) for p, text in values),
        negative: tuple(convert(doc, text, p) for p, text in not_values),
    }
    return Match(**fields)


# --- back to the local shape ------------------------------------------------------------------


def to_local_document(policy: Policy) -> dict[str, Any]:
    """The policy in the local-config shape, whatever shape it was written in: what the agent
    enforces, for config dumps and for writing a local config from parsed policies. Parsing
    it gives the same policy, less its wrong-layer findings (what they dropped is gone)."""

    def string_match(m: StringMatch) -> dict[str, Any]:
        return {m.kind.value: {} if m.kind is StringMatchKind.PRESENCE else m.value}

    def match_document(m: Match) -> dict[str, Any]:
        doc: dict[str, Any] = {}
        for key, attribute in _LOCAL_STRING_FIELDS.items():
            if values := getattr(m, attribute):
                doc[key] = [string_match(v) for v in values]
        for key, attribute in _LOCAL_SA_FIELDS.items():
            if values := getattr(m, attribute):
                doc[key] = [
                    {"namespace": v.namespace, "serviceAccount": v.service_account} for v in values
                ]
        for key, attribute in _LOCAL_IP_FIELDS.items():
            if values := getattr(m, attribute):
                doc[key] = [str(v) for v in values]
        for key, attribute in _LOCAL_PORT_FIELDS.items():
            if values := getattr(m, attribute):
                doc[key] = list(values)
        return doc

    document: dict[str, Any] = {
        "name": policy.name,
        "namespace": policy.namespace,
        "scope": policy.scope.value,
        "action": policy.action.value.capitalize(),
        "dryRun": policy.dry_run,
        "rules": [
            {"clauses": [{"matches": [match_document(m) for m in clause]} for clause in rule]}
            for rule in policy.rules
        ],
    }
    if policy.scope is Scope.WORKLOAD_SELECTOR:
        document["selector"] = {"matchLabels": dict(policy.selector)}
    return document
