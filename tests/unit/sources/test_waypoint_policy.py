"""AuthorizationPolicies with targetRefs into WaypointPolicy: translation, round trip, refusals."""

from __future__ import annotations

import copy
import ipaddress
from typing import Any

import pytest

from agent.sources.authorization_policy import PolicyError
from agent.sources.waypoint_policy import (
    attaches_to_waypoint,
    parse_waypoint_policy,
    to_document,
)
from agent.state.policy import ServiceAccountMatch, StringMatch, StringMatchKind
from agent.state.waypoint_policy import (
    HeaderCondition,
    L7Match,
    PolicyTarget,
    TargetKind,
    WaypointAction,
    WaypointPolicy,
)

net = ipaddress.ip_network
ECHO = PolicyTarget(TargetKind.SERVICE, "echo")
WAYPOINT = PolicyTarget(TargetKind.GATEWAY, "waypoint")
ECHO_REF = {"group": "", "kind": "Service", "name": "echo"}
WAYPOINT_REF = {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "waypoint"}


def exact(value: str) -> StringMatch:
    return StringMatch(StringMatchKind.EXACT, value)


def prefix(value: str) -> StringMatch:
    return StringMatch(StringMatchKind.PREFIX, value)


def suffix(value: str) -> StringMatch:
    return StringMatch(StringMatchKind.SUFFIX, value)


PRESENT = StringMatch(StringMatchKind.PRESENCE)


def document(
    spec: Any, *, name: str = "p", namespace: str = "default", **meta: Any
) -> dict[str, Any]:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": namespace, **meta},
        "spec": spec,
    }


def on_echo(**spec: Any) -> dict[str, Any]:
    """A policy of default/p attached to Service echo, with the given spec fields."""
    return document({"targetRefs": [ECHO_REF], **spec})


def with_rules(*rules: Any) -> dict[str, Any]:
    return on_echo(rules=list(rules))


def only_rule(policy: WaypointPolicy) -> tuple[tuple[L7Match, ...], ...]:
    (rule,) = policy.rules
    return rule


# --- realistic policies -------------------------------------------------------------------------

DENY_ADMIN = document(
    {
        "targetRefs": [ECHO_REF],
        "action": "DENY",
        "rules": [
            {
                "to": [
                    {
                        "operation": {
                            "methods": ["POST", "DELETE"],
                            "paths": ["/admin*"],
                        }
                    }
                ]
            }
        ],
    },
    name="deny-admin",
    namespace="shop",
)

ALLOW_CLIENT_A = document(
    {
        "targetRefs": [WAYPOINT_REF],
        "action": "ALLOW",
        "rules": [
            {
                "from": [{"source": {"principals": ["cluster.local/ns/default/sa/client-a"]}}],
                "when": [{"key": "request.headers[X-Tenant]", "values": ["acme", "beta-*"]}],
            }
        ],
    },
    name="allow-client-a",
)

AUDIT_WRITES = document(
    {
        "targetRefs": [ECHO_REF],
        "action": "AUDIT",
        "rules": [{"to": [{"operation": {"methods": ["PUT", "PATCH"]}}]}],
    },
    name="audit-writes",
)

DRY_RUN_DENY = document(
    {
        "targetRefs": [WAYPOINT_REF],
        "action": "DENY",
        "rules": [{"from": [{"source": {"notNamespaces": ["default"]}}]}],
    },
    name="trial",
    annotations={"istio.io/dry-run": "true"},
)


def test_deny_on_a_service() -> None:
    assert parse_waypoint_policy(DENY_ADMIN) == WaypointPolicy(
        name="deny-admin",
        namespace="shop",
        action=WaypointAction.DENY,
        targets=(ECHO,),
        rules=(((L7Match(methods=(exact("POST"), exact("DELETE")), paths=(prefix("/admin"),)),),),),
    )


def test_allow_on_a_gateway_with_a_principal_and_a_header() -> None:
    assert parse_waypoint_policy(ALLOW_CLIENT_A) == WaypointPolicy(
        name="allow-client-a",
        namespace="default",
        action=WaypointAction.ALLOW,
        targets=(WAYPOINT,),
        rules=(
            (
                (L7Match(principals=(exact("cluster.local/ns/default/sa/client-a"),)),),
                (
                    L7Match(
                        headers=(
                            HeaderCondition("x-tenant", values=(exact("acme"), prefix("beta-"))),
                        )
                    ),
                ),
            ),
        ),
    )


def test_audit() -> None:
    assert parse_waypoint_policy(AUDIT_WRITES) == WaypointPolicy(
        name="audit-writes",
        namespace="default",
        action=WaypointAction.AUDIT,
        targets=(ECHO,),
        rules=(((L7Match(methods=(exact("PUT"), exact("PATCH"))),),),),
    )


def test_dry_run() -> None:
    assert parse_waypoint_policy(DRY_RUN_DENY) == WaypointPolicy(
        name="trial",
        namespace="default",
        action=WaypointAction.DENY,
        targets=(WAYPOINT,),
        rules=(((L7Match(not_namespaces=(exact("default"),)),),),),
        dry_run=True,
    )


@pytest.mark.parametrize(
    ("value", "dry_run"), [("true", True), ("True", True), ("false", False), (True, True)]
)
def test_dry_run_annotation_values(value: object, dry_run: bool) -> None:
    policy = parse_waypoint_policy(
        document({"targetRefs": [ECHO_REF]}, annotations={"istio.io/dry-run": value})
    )
    assert policy.dry_run is dry_run


def test_action_defaults_to_allow_and_absent_rules_allow_nothing() -> None:
    policy = parse_waypoint_policy(on_echo())
    assert policy == WaypointPolicy(
        name="p", namespace="default", action=WaypointAction.ALLOW, targets=(ECHO,), rules=()
    )
    assert not policy.dry_run


# --- rules and clauses --------------------------------------------------------------------------


def test_rules_absent_empty_and_one_empty_rule() -> None:
    # Absent (or []) rules: the policy matches nothing, so an ALLOW denies every request; one
    # empty rule has no clauses and matches every request.
    assert parse_waypoint_policy(on_echo()).rules == ()
    assert parse_waypoint_policy(on_echo(rules=[])).rules == ()
    assert parse_waypoint_policy(on_echo(rules=[{}])).rules == ((),)


def test_clause_structure() -> None:
    rule = only_rule(
        parse_waypoint_policy(
            with_rules(
                {
                    "from": [
                        {"source": {"namespaces": ["ops"]}},
                        {"source": {"principals": ["cluster.local/ns/a/sa/b"]}},
                    ],
                    "to": [
                        {"operation": {"methods": ["GET"]}},
                        {"operation": {"paths": ["/healthz"]}},
                    ],
                    "when": [
                        {"key": "source.ip", "values": ["10.0.0.0/8"]},
                        {"key": "request.headers[x-debug]", "notValues": ["*"]},
                    ],
                }
            )
        )
    )
    # from: ONE clause of its sources (OR); to: ONE clause of its operations; each condition
    # a clause of its own; the clauses all hold together (AND).
    assert rule == (
        (
            L7Match(namespaces=(exact("ops"),)),
            L7Match(principals=(exact("cluster.local/ns/a/sa/b"),)),
        ),
        (L7Match(methods=(exact("GET"),)), L7Match(paths=(exact("/healthz"),))),
        (L7Match(source_ips=(net("10.0.0.0/8"),)),),
        (L7Match(headers=(HeaderCondition("x-debug", not_values=(PRESENT,)),)),),
    )


def test_empty_from_and_to_lists_add_no_clause() -> None:
    assert only_rule(parse_waypoint_policy(with_rules({"from": [], "to": [], "when": []}))) == ()


def test_every_source_field() -> None:
    rule = only_rule(
        parse_waypoint_policy(
            with_rules(
                {
                    "from": [
                        {
                            "source": {
                                "principals": ["cluster.local/ns/a/*", "*"],
                                "notPrincipals": ["*/sa/evil"],
                                "namespaces": ["team-*"],
                                "notNamespaces": ["kube-system"],
                                "serviceAccounts": ["client", "other/robot"],
                                "notServiceAccounts": ["default/legacy"],
                                # Both at once are fine at the waypoint: different addresses.
                                "ipBlocks": ["10.1.2.3/16"],
                                "notIpBlocks": ["10.1.9.9"],
                                "remoteIpBlocks": ["203.0.113.0/24"],
                                "notRemoteIpBlocks": ["2001:db8::/32"],
                            }
                        }
                    ]
                }
            )
        )
    )
    assert rule == (
        (
            L7Match(
                principals=(prefix("cluster.local/ns/a/"), PRESENT),
                not_principals=(suffix("/sa/evil"),),
                namespaces=(prefix("team-"),),
                not_namespaces=(exact("kube-system"),),
                # A bare name is in the policy's namespace.
                service_accounts=(
                    ServiceAccountMatch("default", "client"),
                    ServiceAccountMatch("other", "robot"),
                ),
                not_service_accounts=(ServiceAccountMatch("default", "legacy"),),
                source_ips=(net("10.1.0.0/16"),),
                not_source_ips=(net("10.1.9.9/32"),),
                remote_ips=(net("203.0.113.0/24"),),
                not_remote_ips=(net("2001:db8::/32"),),
            ),
        ),
    )


def test_every_operation_field() -> None:
    rule = only_rule(
        parse_waypoint_policy(
            with_rules(
                {
                    "to": [
                        {
                            "operation": {
                                "hosts": ["Echo.Shop.svc.cluster.local", "*.Example.COM"],
                                "notHosts": ["ADMIN*"],
                                "ports": ["8080", 9090],
                                "notPorts": [15000],
                                "methods": ["get", "P*"],
                                "notMethods": ["CONNECT"],
                                "paths": ["/api/*", "*.js", "/Exact"],
                                "notPaths": ["/api/internal*"],
                            }
                        }
                    ]
                }
            )
        )
    )
    assert rule == (
        (
            L7Match(
                # Hosts compare case-insensitively: stored lower-cased.
                hosts=(exact("echo.shop.svc.cluster.local"), suffix(".example.com")),
                not_hosts=(prefix("admin"),),
                ports=(8080, 9090),
                not_ports=(15000,),
                # Methods and paths are case-sensitive: as written.
                methods=(exact("get"), prefix("P")),
                not_methods=(exact("CONNECT"),),
                paths=(prefix("/api/"), suffix(".js"), exact("/Exact")),
                not_paths=(prefix("/api/internal"),),
            ),
        ),
    )


@pytest.mark.parametrize(
    ("key", "values", "not_values", "expected"),
    [
        (
            "source.ip",
            ["10.0.0.1"],
            ["10.0.0.0/24"],
            L7Match(source_ips=(net("10.0.0.1/32"),), not_source_ips=(net("10.0.0.0/24"),)),
        ),
        (
            "remote.ip",
            ["198.51.100.0/24"],
            [],
            L7Match(remote_ips=(net("198.51.100.0/24"),)),
        ),
        (
            "source.namespace",
            ["prod-*"],
            ["prod-x"],
            L7Match(namespaces=(prefix("prod-"),), not_namespaces=(exact("prod-x"),)),
        ),
        (
            "source.principal",
            ["cluster.local/ns/a/sa/b"],
            [],
            L7Match(principals=(exact("cluster.local/ns/a/sa/b"),)),
        ),
        (
            "destination.ip",
            [],
            ["10.96.0.10"],
            L7Match(not_destination_ips=(net("10.96.0.10/32"),)),
        ),
        ("destination.port", ["80", "443"], ["8080"], L7Match(ports=(80, 443), not_ports=(8080,))),
        (
            "request.headers[User-Agent]",
            ["curl/*"],
            ["*bot"],
            L7Match(headers=(HeaderCondition("user-agent", (prefix("curl/"),), (suffix("bot"),)),)),
        ),
        (
            "request.headers[:authority]",
            ["*"],
            [],
            L7Match(headers=(HeaderCondition(":authority", (PRESENT,)),)),
        ),
    ],
)
def test_when_keys(key: str, values: list[str], not_values: list[str], expected: L7Match) -> None:
    condition: dict[str, Any] = {"key": key}
    if values:
        condition["values"] = values
    if not_values:
        condition["notValues"] = not_values
    assert only_rule(parse_waypoint_policy(with_rules({"when": [condition]}))) == ((expected,),)


def test_header_values_keep_their_case() -> None:
    rule = only_rule(
        parse_waypoint_policy(
            with_rules({"when": [{"key": "request.headers[X-Env]", "values": ["Prod"]}]})
        )
    )
    assert rule == ((L7Match(headers=(HeaderCondition("x-env", (exact("Prod"),)),)),),)


# --- targets ------------------------------------------------------------------------------------


def test_singular_target_ref() -> None:
    policy = parse_waypoint_policy(document({"targetRef": WAYPOINT_REF, "action": "DENY"}))
    assert policy.targets == (WAYPOINT,)
    assert policy.action is WaypointAction.DENY


def test_several_targets_keep_order_and_drop_duplicates() -> None:
    policy = parse_waypoint_policy(
        document(
            {
                "targetRefs": [
                    WAYPOINT_REF,
                    ECHO_REF,
                    {"kind": "Service", "name": "echo"},  # group left out: the core group
                    {"group": "core", "kind": "Service", "name": "web"},  # Istio accepts "core"
                    {**WAYPOINT_REF, "namespace": "default"},  # its own namespace: the same
                    {**ECHO_REF, "namespace": ""},
                ]
            }
        )
    )
    assert policy.targets == (WAYPOINT, ECHO, PolicyTarget(TargetKind.SERVICE, "web"))
    assert policy.targets_gateway("default/waypoint")
    assert policy.targets_service("default", "web")
    assert not policy.targets_service("other", "echo")


def test_sixteen_targets_are_allowed() -> None:
    refs = [{"kind": "Service", "name": f"s{i}"} for i in range(16)]
    assert len(parse_waypoint_policy(document({"targetRefs": refs})).targets) == 16


# --- metadata -----------------------------------------------------------------------------------


def test_v1beta1_server_set_metadata_and_status_are_accepted() -> None:
    written = on_echo()
    written["apiVersion"] = "security.istio.io/v1beta1"
    written["metadata"].update(
        uid="0b5e",
        resourceVersion="42",
        generation=3,
        creationTimestamp="2024-01-01T00:00:00Z",
        managedFields=[],
        labels={"team": "shop"},
    )
    written["status"] = {"conditions": []}
    assert parse_waypoint_policy(written) == parse_waypoint_policy(on_echo())


def test_input_is_not_modified() -> None:
    before = copy.deepcopy(ALLOW_CLIENT_A)
    parse_waypoint_policy(ALLOW_CLIENT_A)
    assert before == ALLOW_CLIENT_A


# --- back to a document -------------------------------------------------------------------------


def test_to_document_shape() -> None:
    assert to_document(parse_waypoint_policy(DRY_RUN_DENY)) == {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {
            "name": "trial",
            "namespace": "default",
            "annotations": {"istio.io/dry-run": "true"},
        },
        "spec": {
            "targetRefs": [WAYPOINT_REF],
            "action": "DENY",
            "rules": [{"from": [{"source": {"notNamespaces": ["default"]}}]}],
        },
    }


ROUND_TRIP_CASES = {
    "deny": DENY_ADMIN,
    "allow": ALLOW_CLIENT_A,
    "audit": AUDIT_WRITES,
    "dry-run": DRY_RUN_DENY,
    "no rules": on_echo(),
    "empty rule": on_echo(rules=[{}, {"to": [{"operation": {"ports": ["80"]}}]}]),
    "singular targetRef": document({"targetRef": {"kind": "Service", "name": "echo"}}),
    # Conditions whose clause looks like a one-entry from or to list: order must survive.
    "conditions only": with_rules(
        {
            "when": [
                {"key": "source.namespace", "values": ["a"]},
                {"key": "destination.port", "values": ["80"]},
                {"key": "source.principal", "notValues": ["*"]},
                {"key": "remote.ip", "values": ["10.0.0.0/8"], "notValues": ["10.1.0.0/16"]},
                {"key": "destination.ip", "values": ["10.96.0.1"]},
            ]
        }
    ),
    "to then a source condition": with_rules(
        {
            "to": [{"operation": {"hosts": ["A.example"], "notPaths": ["*.png"]}}],
            "when": [
                {"key": "source.ip", "values": ["10.0.0.1"]},
                {"key": "request.headers[x-a]", "values": ["1"], "notValues": ["2*"]},
            ],
        }
    ),
    "from then a port condition": with_rules(
        {
            "from": [{"source": {"serviceAccounts": ["a"], "remoteIpBlocks": ["1.2.3.4"]}}],
            "when": [{"key": "destination.port", "notValues": ["9090"]}],
        }
    ),
}


@pytest.mark.parametrize("written", ROUND_TRIP_CASES.values(), ids=ROUND_TRIP_CASES.keys())
def test_round_trip(written: dict[str, Any]) -> None:
    policy = parse_waypoint_policy(written)
    assert parse_waypoint_policy(to_document(policy)) == policy


def test_to_document_refuses_what_no_policy_can_say() -> None:
    mixed = L7Match(namespaces=(exact("a"),), methods=(exact("GET"),))
    policy = WaypointPolicy("p", "default", WaypointAction.ALLOW, (ECHO,), (((mixed,),),))
    with pytest.raises(ValueError, match="rules\\[0\\]: clause 0: not expressible"):
        to_document(policy)
    empty = WaypointPolicy("p", "default", WaypointAction.ALLOW, (ECHO,), (((),),))
    with pytest.raises(ValueError, match="empty match"):
        to_document(empty)


# --- which parser ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "written",
    [
        on_echo(),
        document({"targetRef": ECHO_REF}),
        document({"targetRefs": []}),  # for the waypoint parser, which refuses it
        document({"targetRefs": [ECHO_REF], "selector": {}}),
    ],
)
def test_attaches_to_waypoint(written: dict[str, Any]) -> None:
    assert attaches_to_waypoint(written)


@pytest.mark.parametrize(
    "written",
    [
        document({}),
        document(None),
        document({"selector": {"matchLabels": {"app": "echo"}}}),
        document({"targetRefs": None, "targetRef": None}),
        {**on_echo(), "kind": "RequestAuthentication"},
        {"kind": "AuthorizationPolicy", "spec": ["targetRefs"]},
        {"name": "p", "namespace": "default", "scope": "Namespace", "action": "Allow"},
        {},
        None,
        [],
        "AuthorizationPolicy",
        42,
    ],
)
def test_does_not_attach_to_waypoint(written: Any) -> None:
    assert not attaches_to_waypoint(written)


# --- refusals -----------------------------------------------------------------------------------


def source(**fields: Any) -> dict[str, Any]:
    return with_rules({"from": [{"source": fields}]})


def operation(**fields: Any) -> dict[str, Any]:
    return with_rules({"to": [{"operation": fields}]})


def when(**condition: Any) -> dict[str, Any]:
    return with_rules({"when": [condition]})


def target(**ref: Any) -> dict[str, Any]:
    return document({"targetRefs": [ref]})


def without_metadata(key: str) -> dict[str, Any]:
    written = on_echo()
    del written["metadata"][key]
    return written


# (id, document, the error's path, a part of its reason)
ERRORS: list[tuple[str, dict[str, Any], str, str]] = [
    ("unknown top field", {**on_echo(), "extra": 1}, "extra", "unknown field"),
    (
        "apiVersion",
        {**on_echo(), "apiVersion": "security.istio.io/v2"},
        "apiVersion",
        "must be one of: security.istio.io/v1, security.istio.io/v1beta1",
    ),
    ("kind", {**on_echo(), "kind": "PeerAuthentication"}, "kind", "must be AuthorizationPolicy"),
    ("no name", without_metadata("name"), "metadata.name", "is required"),
    ("no namespace", without_metadata("namespace"), "metadata.namespace", "is required"),
    (
        "unknown metadata field",
        document({"targetRefs": [ECHO_REF]}, finalizers=[]),
        "metadata.finalizers",
        "unknown field",
    ),
    (
        "bad dry-run annotation",
        document({"targetRefs": [ECHO_REF]}, annotations={"istio.io/dry-run": "yes"}),
        "metadata.annotations.istio.io/dry-run",
        'must be "true" or "false"',
    ),
    ("spec not a mapping", document([]), "spec", "must be a mapping"),
    ("unknown spec field", on_echo(targetref=[]), "spec.targetref", "unknown field"),
    ("no targetRefs", document({"action": "DENY"}), "targetRefs", "is required"),
    (
        "targetRef and targetRefs",
        on_echo(targetRef=ECHO_REF),
        "targetRef",
        "either targetRef or targetRefs, not both",
    ),
    (
        "selector with targetRefs",
        on_echo(selector={"matchLabels": {"app": "echo"}}),
        "selector",
        "mutually exclusive",
    ),
    (
        "selector with targetRef",
        document({"targetRef": ECHO_REF, "selector": {}}),
        "selector",
        "mutually exclusive",
    ),
    ("empty targetRefs", document({"targetRefs": []}), "targetRefs", "must not be empty"),
    ("targetRefs not a list", document({"targetRefs": ECHO_REF}), "targetRefs", "must be a list"),
    (
        "17 targetRefs",
        document({"targetRefs": [{"kind": "Service", "name": f"s{i}"} for i in range(17)]}),
        "targetRefs",
        "at most 16",
    ),
    ("targetRef not a mapping", document({"targetRef": "echo"}), "targetRef", "must be a mapping"),
    (
        "unknown targetRef field",
        target(kind="Gateway", name="w", group="gateway.networking.k8s.io", sectionName="http"),
        "targetRefs[0].sectionName",
        "unknown field",
    ),
    ("no kind", target(name="echo"), "targetRefs[0].kind", "is required"),
    ("no name", target(kind="Service"), "targetRefs[0].name", "is required"),
    (
        "group not a string",
        target(kind="Service", name="e", group=1),
        "targetRefs[0].group",
        "must be a string",
    ),
    (
        "Service with a gateway group",
        target(kind="Service", name="echo", group="gateway.networking.k8s.io"),
        "targetRefs[0].group",
        'a Service is in the core group, written ""',
    ),
    (
        "Gateway without its group",
        target(kind="Gateway", name="waypoint"),
        "targetRefs[0].group",
        "a Gateway target's group is gateway.networking.k8s.io",
    ),
    (
        "ServiceEntry",
        target(kind="ServiceEntry", name="ext", group="networking.istio.io"),
        "targetRefs[0].kind",
        'not supported as a waypoint policy target (supported: Service (group "") and Gateway',
    ),
    (
        "GatewayClass",
        target(kind="GatewayClass", name="istio-waypoint", group="gateway.networking.k8s.io"),
        "targetRefs[0].kind",
        "'GatewayClass' is not supported",
    ),
    (
        "other namespace",
        target(kind="Service", name="echo", namespace="shop"),
        "targetRefs[0].namespace",
        "only name a resource of the policy's own namespace",
    ),
    (
        "second targetRef is checked too",
        document({"targetRefs": [ECHO_REF, {"kind": "HTTPRoute", "name": "r"}]}),
        "targetRefs[1].kind",
        "not supported",
    ),
    (
        "CUSTOM",
        on_echo(action="CUSTOM"),
        "action",
        "no ext-authz provider; use ALLOW, DENY or AUDIT",
    ),
    ("lower-case action", on_echo(action="allow"), "action", "must be one of: ALLOW, DENY, AUDIT"),
    (
        "provider",
        on_echo(action="DENY", provider={"name": "opa"}),
        "provider",
        "only applies to action CUSTOM",
    ),
    ("rules not a list", on_echo(rules={}), "rules", "must be a list"),
    ("unknown rule field", with_rules({"froms": []}), "rules[0].froms", "unknown field"),
    ("from not a list", with_rules({"from": {"source": {}}}), "rules[0].from", "must be a list"),
    ("entry without source", with_rules({"from": [{}]}), "rules[0].from[0].source", "is required"),
    (
        "null source",
        with_rules({"from": [{"source": None}]}),
        "rules[0].from[0].source",
        "is required",
    ),
    (
        "entry with operation in from",
        with_rules({"from": [{"operation": {"methods": ["GET"]}}]}),
        "rules[0].from[0].operation",
        "unknown field (expected one of: source)",
    ),
    ("empty source", source(), "rules[0].from[0].source", "must not be empty"),
    ("empty source lists", source(principals=[]), "rules[0].from[0].source", "must not be empty"),
    ("empty operation", operation(), "rules[0].to[0].operation", "must not be empty"),
    (
        "unknown source field",
        source(principal=["x"]),
        "rules[0].from[0].source.principal",
        "unknown field",
    ),
    (
        "operation field in a source",
        source(methods=["GET"]),
        "rules[0].from[0].source.methods",
        "unknown field",
    ),
    (
        "requestPrincipals",
        source(requestPrincipals=["https://issuer/*"]),
        "rules[0].from[0].source.requestPrincipals",
        "JWT request authentication is not supported by this waypoint (no RequestAuthentication)",
    ),
    (
        "notRequestPrincipals",
        source(principals=["cluster.local/ns/a/sa/b"], notRequestPrincipals=["*"]),
        "rules[0].from[0].source.notRequestPrincipals",
        "JWT request authentication is not supported",
    ),
    (
        "requestPrincipals in an operation",
        operation(requestPrincipals=["*"]),
        "rules[0].to[0].operation.requestPrincipals",
        "unknown field",
    ),
    (
        "principal with spiffe://",
        source(principals=["spiffe://cluster.local/ns/a/sa/b"]),
        "rules[0].from[0].source.principals[0]",
        "principals are written without 'spiffe://'",
    ),
    (
        "star in the middle",
        source(namespaces=["team-*-prod"]),
        "rules[0].from[0].source.namespaces[0]",
        "'*' is only allowed at the start or the end",
    ),
    (
        "empty string",
        source(namespaces=[""]),
        "rules[0].from[0].source.namespaces[0]",
        "must be a non-empty string",
    ),
    (
        "values not a list",
        source(principals="cluster.local/ns/a/sa/b"),
        "rules[0].from[0].source.principals",
        "must be a list",
    ),
    (
        "bad ipBlock",
        source(ipBlocks=["10.0.0.300"]),
        "rules[0].from[0].source.ipBlocks[0]",
        "is not an IP or CIDR",
    ),
    (
        "bad remoteIpBlock",
        source(notRemoteIpBlocks=["example.com"]),
        "rules[0].from[0].source.notRemoteIpBlocks[0]",
        "is not an IP or CIDR",
    ),
    (
        "bad service account",
        source(serviceAccounts=["a/b/c"]),
        "rules[0].from[0].source.serviceAccounts[0]",
        "must be a service account name or namespace/name",
    ),
    (
        "port out of range",
        operation(ports=["70000"]),
        "rules[0].to[0].operation.ports[0]",
        "outside 1..65535",
    ),
    (
        "named port",
        operation(notPorts=["http"]),
        "rules[0].to[0].operation.notPorts[0]",
        "is not a port number",
    ),
    (
        "boolean port",
        operation(ports=[True]),
        "rules[0].to[0].operation.ports[0]",
        "is not a port number",
    ),
    (
        "path template",
        operation(paths=["/users/{*}/profile"]),
        "rules[0].to[0].operation.paths[0]",
        "path templates ({*}, {**}) are not supported by this waypoint",
    ),
    (
        "notPaths template",
        operation(notPaths=["/static/{**}"]),
        "rules[0].to[0].operation.notPaths[0]",
        "are not supported",
    ),
    (
        "host not a string",
        operation(hosts=[5]),
        "rules[0].to[0].operation.hosts[0]",
        "must be a non-empty string",
    ),
    (
        "bad method glob",
        operation(methods=["G*T"]),
        "rules[0].to[0].operation.methods[0]",
        "'*' is only allowed",
    ),
    (
        "unknown operation field",
        operation(path=["/"]),
        "rules[0].to[0].operation.path",
        "unknown field",
    ),
    ("when not a list", with_rules({"when": {}}), "rules[0].when", "must be a list"),
    (
        "unknown condition field",
        when(key="source.ip", values=["10.0.0.1"], value="x"),
        "rules[0].when[0].value",
        "unknown field",
    ),
    ("condition without key", when(values=["x"]), "rules[0].when[0].key", "is required"),
    (
        "condition without values",
        when(key="source.ip"),
        "rules[0].when[0]",
        "needs values or notValues",
    ),
    (
        "condition with empty values",
        when(key="request.headers[x]", values=[], notValues=[]),
        "rules[0].when[0]",
        "needs values or notValues",
    ),
    (
        "request.auth claims",
        when(key="request.auth.claims[iss]", values=["https://issuer"]),
        "rules[0].when[0].key",
        "JWT request authentication is not supported by this waypoint",
    ),
    (
        "request.auth.principal",
        when(key="request.auth.principal", values=["*"]),
        "rules[0].when[0].key",
        "(no RequestAuthentication)",
    ),
    (
        "connection.sni",
        when(key="connection.sni", values=["*.example.com"]),
        "rules[0].when[0].key",
        "'connection.sni' is not supported by this waypoint; supported keys: source.ip,",
    ),
    (
        "experimental key",
        when(key="experimental.envoy.filters.network.mysql_proxy[db.table]", values=["[update]"]),
        "rules[0].when[0].key",
        "is not supported by this waypoint",
    ),
    (
        "misspelt key",
        when(key="source.namspace", values=["a"]),
        "rules[0].when[0].key",
        "request.headers[<name>]",
    ),
    (
        "header without a name",
        when(key="request.headers[]", values=["a"]),
        "rules[0].when[0].key",
        "must be request.headers[<name>], with an HTTP header name",
    ),
    (
        "header without brackets",
        when(key="request.headers", values=["a"]),
        "rules[0].when[0].key",
        "must be request.headers[<name>]",
    ),
    (
        "header name with a space",
        when(key="request.headers[x tenant]", values=["a"]),
        "rules[0].when[0].key",
        "with an HTTP header name",
    ),
    (
        "bad header glob",
        when(key="request.headers[x]", notValues=["a*b"]),
        "rules[0].when[0].notValues[0]",
        "'*' is only allowed",
    ),
    (
        "bad condition port",
        when(key="destination.port", values=["99999"]),
        "rules[0].when[0].values[0]",
        "outside 1..65535",
    ),
    (
        "bad condition address",
        when(key="remote.ip", notValues=["nope"]),
        "rules[0].when[0].notValues[0]",
        "is not an IP or CIDR",
    ),
    (
        "condition principal with spiffe://",
        when(key="source.principal", values=["spiffe://td/ns/a/sa/b"]),
        "rules[0].when[0].values[0]",
        "without 'spiffe://'",
    ),
    (
        "error in the second rule",
        with_rules({}, {"to": [{"operation": {"ports": [0]}}]}),
        "rules[1].to[0].operation.ports[0]",
        "outside 1..65535",
    ),
]


@pytest.mark.parametrize(
    ("written", "path", "reason"),
    [(d, p, r) for _, d, p, r in ERRORS],
    ids=[n for n, _, _, _ in ERRORS],
)
def test_errors(written: dict[str, Any], path: str, reason: str) -> None:
    with pytest.raises(PolicyError) as info:
        parse_waypoint_policy(written)
    assert info.value.path == path
    assert reason in info.value.reason


def test_error_names_the_policy_and_the_field() -> None:
    written = document(
        {"targetRefs": [ECHO_REF], "rules": [{"to": [{"operation": {"paths": ["/a/{*}"]}}]}]},
        name="deny-admin",
        namespace="shop",
    )
    with pytest.raises(PolicyError) as info:
        parse_waypoint_policy(written)
    assert info.value.policy == "shop/deny-admin"
    assert str(info.value).startswith("shop/deny-admin: rules[0].to[0].operation.paths[0]: ")


def test_an_unnamed_policy_is_still_named_in_errors() -> None:
    with pytest.raises(PolicyError) as info:
        parse_waypoint_policy(without_metadata("name"))
    assert info.value.policy == "default/?"


@pytest.mark.parametrize("garbage", [None, [], "AuthorizationPolicy"])
def test_a_policy_must_be_a_mapping(garbage: Any) -> None:
    with pytest.raises(PolicyError, match="a policy must be a mapping"):
        parse_waypoint_policy(garbage)
