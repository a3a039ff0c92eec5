"""Both policy shapes into model.Policy: translation, L7 findings, and every refusal."""

from __future__ import annotations

import copy
import ipaddress
from typing import Any

import pytest

from agent.sources.authorization_policy import PolicyError, parse_policies, parse_policy
from agent.state.policy import (
    Action,
    Match,
    Policy,
    Scope,
    ServiceAccountMatch,
    StringMatch,
    StringMatchKind,
)

net = ipaddress.ip_network


def exact(value: str) -> StringMatch:
    return StringMatch(StringMatchKind.EXACT, value)


def k8s_doc(
    spec: Any, *, name: str = "p", namespace: str = "default", **meta: Any
) -> dict[str, Any]:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": namespace, **meta},
        "spec": spec,
    }


def local_doc(**fields: Any) -> dict[str, Any]:
    document: dict[str, Any] = {
        "name": "p",
        "namespace": "default",
        "scope": "Namespace",
        "action": "Allow",
        "rules": [],
    }
    document.update(fields)
    return document


def local_match(match: dict[str, Any]) -> dict[str, Any]:
    return local_doc(rules=[{"clauses": [{"matches": [match]}]}])


def single_match(policy: Policy) -> Match:
    ((clause,),) = policy.rules
    (match,) = clause
    return match


# --- local shape --------------------------------------------------------------------------------


def test_local_shape_every_field() -> None:
    policy = parse_policy(
        {
            "name": "allow-web",
            "namespace": "shop",
            "scope": "WorkloadSelector",
            "action": "Allow",
            "dryRun": True,
            "selector": {"matchLabels": {"app": "web", "tier": "front"}},
            "rules": [
                {
                    "clauses": [
                        {
                            "matches": [
                                {
                                    "namespaces": [{"exact": "shop"}, {"prefix": "team-"}],
                                    "notNamespaces": [{"suffix": "-test"}],
                                    "serviceAccounts": [
                                        {"namespace": "shop", "serviceAccount": "front"}
                                    ],
                                    "notServiceAccounts": [
                                        {"namespace": "shop", "serviceAccount": "batch"}
                                    ],
                                    "principals": [{"presence": {}}],
                                    "notPrincipals": [{"exact": "cluster.local/ns/shop/sa/x"}],
                                    "sourceIps": ["10.0.0.0/8", "10.1.2.3"],
                                    "notSourceIps": ["fd00::1"],
                                    "destinationIps": ["10.2.0.0/16"],
                                    "notDestinationIps": ["10.2.0.1"],
                                    "destinationPorts": [80, 443],
                                    "notDestinationPorts": [8080],
                                },
                                {"destinationPorts": [9090]},
                            ]
                        },
                        {"matches": []},
                    ]
                },
                {"clauses": []},
            ],
        }
    )
    assert policy == Policy(
        name="allow-web",
        namespace="shop",
        scope=Scope.WORKLOAD_SELECTOR,
        action=Action.ALLOW,
        rules=(
            (
                (
                    Match(
                        namespaces=(exact("shop"), StringMatch(StringMatchKind.PREFIX, "team-")),
                        not_namespaces=(StringMatch(StringMatchKind.SUFFIX, "-test"),),
                        service_accounts=(ServiceAccountMatch("shop", "front"),),
                        not_service_accounts=(ServiceAccountMatch("shop", "batch"),),
                        principals=(StringMatch(StringMatchKind.PRESENCE),),
                        not_principals=(exact("cluster.local/ns/shop/sa/x"),),
                        source_ips=(net("10.0.0.0/8"), net("10.1.2.3/32")),
                        not_source_ips=(net("fd00::1/128"),),
                        destination_ips=(net("10.2.0.0/16"),),
                        not_destination_ips=(net("10.2.0.1/32"),),
                        destination_ports=(80, 443),
                        not_destination_ports=(8080,),
                    ),
                    Match(destination_ports=(9090,)),
                ),
                (),
            ),
            (),
        ),
        dry_run=True,
        selector=(("app", "web"), ("tier", "front")),
    )
    assert policy.wrong_layer == ()


@pytest.mark.parametrize(
    ("written", "action"),
    [
        ("Allow", Action.ALLOW),
        ("ALLOW", Action.ALLOW),
        ("Deny", Action.DENY),
        ("DENY", Action.DENY),
    ],
)
def test_local_actions(written: str, action: Action) -> None:
    assert parse_policy(local_doc(action=written)).action is action


def test_local_defaults() -> None:
    policy = parse_policy(
        {"name": "p", "namespace": "default", "scope": "Global", "action": "Deny"}
    )
    assert (policy.scope, policy.dry_run, policy.rules, policy.selector) == (
        Scope.GLOBAL,
        False,
        (),
        (),
    )


def test_local_presence_may_be_written_null() -> None:
    match = single_match(parse_policy(local_match({"principals": [{"presence": None}]})))
    assert match.principals == (StringMatch(StringMatchKind.PRESENCE),)


def test_cidr_host_bits_are_cleared_as_istio_does() -> None:
    match = single_match(parse_policy(local_match({"sourceIps": ["10.1.2.3/16"]})))
    assert match.source_ips == (net("10.1.0.0/16"),)


# --- Kubernetes shape ---------------------------------------------------------------------------


def test_k8s_translation() -> None:
    policy = parse_policy(
        k8s_doc(
            {
                "selector": {"matchLabels": {"app": "server"}},
                "action": "DENY",
                "rules": [
                    {
                        "from": [
                            {
                                "source": {
                                    "principals": ["cluster.local/ns/default/sa/client"],
                                    "notNamespaces": ["kube-*"],
                                    "ipBlocks": ["10.0.0.0/8"],
                                    "notIpBlocks": ["10.9.0.0/16"],
                                    "notRemoteIpBlocks": ["10.8.0.1"],
                                }
                            },
                            {"source": {"namespaces": ["*-prod"], "notPrincipals": ["*"]}},
                        ],
                        "to": [{"operation": {"ports": ["80", 443], "notPorts": ["8080"]}}],
                        "when": [
                            {"key": "destination.ip", "values": ["10.2.0.1"]},
                            {"key": "remote.ip", "notValues": ["10.3.0.0/16"]},
                        ],
                    }
                ],
            },
            name="deny-some",
        )
    )
    assert policy == Policy(
        name="deny-some",
        namespace="default",
        scope=Scope.WORKLOAD_SELECTOR,
        action=Action.DENY,
        rules=(
            (
                (
                    Match(
                        principals=(exact("cluster.local/ns/default/sa/client"),),
                        not_namespaces=(StringMatch(StringMatchKind.PREFIX, "kube-"),),
                        source_ips=(net("10.0.0.0/8"),),
                        # not-forms of both blocks add up: not in A and not in B.
                        not_source_ips=(net("10.9.0.0/16"), net("10.8.0.1/32")),
                    ),
                    Match(
                        namespaces=(StringMatch(StringMatchKind.SUFFIX, "-prod"),),
                        not_principals=(StringMatch(StringMatchKind.PRESENCE),),
                    ),
                ),
                (Match(destination_ports=(80, 443), not_destination_ports=(8080,)),),
                (Match(destination_ips=(net("10.2.0.1/32"),)),),
                (Match(not_source_ips=(net("10.3.0.0/16"),)),),
            ),
        ),
        selector=(("app", "server"),),
    )


@pytest.mark.parametrize(
    ("written", "expected"),
    [
        ("*", StringMatch(StringMatchKind.PRESENCE)),
        ("foo*", StringMatch(StringMatchKind.PREFIX, "foo")),
        ("*foo", StringMatch(StringMatchKind.SUFFIX, "foo")),
        ("foo", exact("foo")),
    ],
)
def test_glob_translation(written: str, expected: StringMatch) -> None:
    policy = parse_policy(
        k8s_doc(
            {"rules": [{"from": [{"source": {"namespaces": [written], "principals": [written]}}]}]}
        )
    )
    match = single_match(policy)
    assert match.namespaces == (expected,) and match.principals == (expected,)


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("source.ip", Match(source_ips=(net("10.0.0.0/8"),), not_source_ips=(net("10.1.0.0/16"),))),
        ("remote.ip", Match(source_ips=(net("10.0.0.0/8"),), not_source_ips=(net("10.1.0.0/16"),))),
        (
            "destination.ip",
            Match(destination_ips=(net("10.0.0.0/8"),), not_destination_ips=(net("10.1.0.0/16"),)),
        ),
    ],
)
def test_when_address_keys(key: str, expected: Match) -> None:
    policy = parse_policy(
        k8s_doc(
            {
                "rules": [
                    {"when": [{"key": key, "values": ["10.0.0.0/8"], "notValues": ["10.1.0.0/16"]}]}
                ]
            }
        )
    )
    assert single_match(policy) == expected


def test_when_identity_and_port_keys() -> None:
    policy = parse_policy(
        k8s_doc(
            {
                "rules": [
                    {
                        "when": [
                            {"key": "source.namespace", "values": ["a*"], "notValues": ["ab"]},
                            {"key": "source.principal", "values": ["*/sa/x"]},
                            {"key": "destination.port", "values": ["80"], "notValues": ["81"]},
                        ]
                    }
                ]
            }
        )
    )
    assert policy.rules == (
        (
            (
                Match(
                    namespaces=(StringMatch(StringMatchKind.PREFIX, "a"),),
                    not_namespaces=(exact("ab"),),
                ),
            ),
            (Match(principals=(StringMatch(StringMatchKind.SUFFIX, "/sa/x"),)),),
            (Match(destination_ports=(80,), not_destination_ports=(81,)),),
        ),
    )


def test_k8s_service_accounts_bare_name_is_in_the_policy_namespace() -> None:
    match = single_match(
        parse_policy(
            k8s_doc(
                {
                    "rules": [
                        {
                            "from": [
                                {
                                    "source": {
                                        "serviceAccounts": ["a", "other/b"],
                                        "notServiceAccounts": ["c"],
                                    }
                                }
                            ]
                        }
                    ]
                },
                namespace="shop",
            )
        )
    )
    assert match.service_accounts == (
        ServiceAccountMatch("shop", "a"),
        ServiceAccountMatch("other", "b"),
    )
    assert match.not_service_accounts == (ServiceAccountMatch("shop", "c"),)


def test_remote_ip_blocks_are_source_ips() -> None:
    match = single_match(
        parse_policy(k8s_doc({"rules": [{"from": [{"source": {"remoteIpBlocks": ["10.0.0.1"]}}]}]}))
    )
    assert match == Match(source_ips=(net("10.0.0.1/32"),))


def test_k8s_defaults_and_empty_forms() -> None:
    allow_nothing = parse_policy(k8s_doc({}))
    assert (allow_nothing.action, allow_nothing.rules) == (Action.ALLOW, ())
    assert parse_policy(k8s_doc(None)).rules == ()  # `spec:` written with nothing after it
    deny_nothing = parse_policy(k8s_doc({"action": "DENY"}))
    assert (deny_nothing.action, deny_nothing.rules) == (Action.DENY, ())
    assert parse_policy(k8s_doc({"rules": [{}]})).rules == ((),)
    assert parse_policy(k8s_doc({"rules": [{"from": [], "to": None}]})).rules == ((),)


def test_v1beta1_and_server_set_metadata_are_accepted() -> None:
    document = k8s_doc({}, uid="1234", resourceVersion="7", labels={"team": "a"})
    document["apiVersion"] = "security.istio.io/v1beta1"
    document["status"] = {"conditions": []}
    assert parse_policy(document).key == "default/p"


@pytest.mark.parametrize(
    ("namespace", "spec", "scope", "selector"),
    [
        ("istio-system", {}, Scope.GLOBAL, ()),
        ("default", {}, Scope.NAMESPACE, ()),
        (
            "default",
            {"selector": {"matchLabels": {"app": "a"}}},
            Scope.WORKLOAD_SELECTOR,
            (("app", "a"),),
        ),
        (
            "istio-system",
            {"selector": {"matchLabels": {"app": "a"}}},
            Scope.WORKLOAD_SELECTOR,
            (("app", "a"),),
        ),
        ("default", {"selector": {}}, Scope.WORKLOAD_SELECTOR, ()),
    ],
)
def test_k8s_scopes(
    namespace: str, spec: dict[str, Any], scope: Scope, selector: tuple[tuple[str, str], ...]
) -> None:
    policy = parse_policy(k8s_doc(spec, namespace=namespace))
    assert (policy.scope, policy.selector) == (scope, selector)


@pytest.mark.parametrize(
    ("value", "dry_run"), [("true", True), ("True", True), ("false", False), (True, True)]
)
def test_dry_run_annotation(value: object, dry_run: bool) -> None:
    policy = parse_policy(k8s_doc({}, annotations={"istio.io/dry-run": value, "other": "x"}))
    assert policy.dry_run is dry_run


def test_no_annotation_is_enforced() -> None:
    assert parse_policy(k8s_doc({}, annotations={"a": "b"})).dry_run is False


# --- L7 fields ----------------------------------------------------------------------------------


def test_l7_allow_rule_is_dropped_and_reported() -> None:
    policy = parse_policy(
        k8s_doc(
            {
                "rules": [
                    {
                        "from": [{"source": {"namespaces": ["a"], "requestPrincipals": ["*"]}}],
                        "to": [
                            {"operation": {"ports": ["80"], "methods": ["GET"], "paths": ["/x"]}}
                        ],
                    },
                    {"from": [{"source": {"namespaces": ["b"]}}]},
                ]
            }
        )
    )
    assert policy.rules == (((Match(namespaces=(exact("b"),)),),),)
    assert policy.wrong_layer == (
        "rules[0].from[0].source.requestPrincipals: L7 field in an ALLOW rule: the rule never "
        "matches at L4; use a waypoint",
        "rules[0].to[0].operation.methods: L7 field in an ALLOW rule: the rule never matches at "
        "L4; use a waypoint",
        "rules[0].to[0].operation.paths: L7 field in an ALLOW rule: the rule never matches at L4; "
        "use a waypoint",
    )


def test_allow_policy_with_only_l7_rules_still_allows_nothing() -> None:
    policy = parse_policy(k8s_doc({"rules": [{"to": [{"operation": {"hosts": ["a.example"]}}]}]}))
    assert (policy.action, policy.rules) == (Action.ALLOW, ())
    assert policy.wrong_layer[-1] == (
        "rules: every rule of this ALLOW policy needs L7, so at L4 it matches nothing and denies "
        "every connection to the workloads it selects"
    )


def test_l7_deny_keeps_the_l4_parts() -> None:
    policy = parse_policy(
        k8s_doc(
            {
                "action": "DENY",
                "rules": [
                    {
                        "from": [{"source": {"namespaces": ["a"], "notRequestPrincipals": ["*"]}}],
                        "to": [{"operation": {"ports": ["80"], "notMethods": ["GET"]}}],
                        "when": [{"key": "request.headers[x]", "values": ["1"]}],
                    }
                ],
            }
        )
    )
    assert policy.rules == (
        ((Match(namespaces=(exact("a"),)),), (Match(destination_ports=(80,)),)),
    )
    assert policy.wrong_layer == (
        "rules[0].from[0].source.notRequestPrincipals: L7 field in a DENY rule: ignored at L4, so "
        "the rule denies more broadly; use a waypoint",
        "rules[0].to[0].operation.notMethods: L7 field in a DENY rule: ignored at L4, so the rule "
        "denies more broadly; use a waypoint",
        "rules[0].when[0]: L7 or unknown attribute 'request.headers[x]' in a DENY rule: ignored "
        "at L4, so the rule denies more broadly; use a waypoint",
    )


def test_l7_only_entry_makes_its_clause_match_everything() -> None:
    # One `to` entry is only L7: at L4 it holds for any connection, so the OR of the clause
    # does too, and the clause goes; the `from` clause stays.
    policy = parse_policy(
        k8s_doc(
            {
                "action": "DENY",
                "rules": [
                    {
                        "from": [{"source": {"namespaces": ["a"]}}],
                        "to": [
                            {"operation": {"ports": ["80"]}},
                            {"operation": {"methods": ["GET"]}},
                        ],
                    }
                ],
            }
        )
    )
    assert policy.rules == (((Match(namespaces=(exact("a"),)),),),)


def test_l7_only_deny_rule_matches_everything_and_says_so() -> None:
    policy = parse_policy(
        k8s_doc({"action": "DENY", "rules": [{"from": [{"source": {"requestPrincipals": ["*"]}}]}]})
    )
    assert policy.rules == ((),)
    assert (
        policy.wrong_layer[-1]
        == "rules[0]: without its L7 parts this DENY rule matches every connection"
    )


@pytest.mark.parametrize("key", ["connection.sni", "request.auth.claims[iss]", "source.namspace"])
def test_unknown_and_l7_when_keys_drop_an_allow_rule(key: str) -> None:
    policy = parse_policy(k8s_doc({"rules": [{"when": [{"key": key, "values": ["x"]}]}]}))
    assert policy.rules == ()
    assert policy.wrong_layer[0].startswith(
        f"rules[0].when[0]: L7 or unknown attribute {key!r} in an ALLOW rule"
    )


def test_local_shape_has_no_findings() -> None:
    assert parse_policy(local_match({"destinationPorts": [80]})).wrong_layer == ()


# --- errors -------------------------------------------------------------------------------------


def test_error_names_policy_and_field() -> None:
    document = k8s_doc(
        {
            "action": "DENY",
            "rules": [{"from": [{"source": {"ipBlocks": ["10.0.0.1", "10.0.0.300"]}}]}],
        },
        name="deny-all",
    )
    with pytest.raises(PolicyError) as info:
        parse_policy(document)
    assert str(info.value) == (
        "default/deny-all: rules[0].from[0].source.ipBlocks[1]: '10.0.0.300' is not an IP or CIDR"
    )
    assert (info.value.policy, info.value.path) == (
        "default/deny-all",
        "rules[0].from[0].source.ipBlocks[1]",
    )


LOCAL_ERRORS: list[tuple[str, dict[str, Any], str]] = [
    ("unknown field", local_doc(kind2="x"), "default/p: kind2: unknown field"),
    (
        "missing name",
        {k: v for k, v in local_doc().items() if k != "name"},
        "default/?: name: is required",
    ),
    (
        "missing namespace",
        {k: v for k, v in local_doc().items() if k != "namespace"},
        "?/p: namespace: is required",
    ),
    (
        "missing scope",
        {k: v for k, v in local_doc().items() if k != "scope"},
        "default/p: scope: is required",
    ),
    (
        "bad scope",
        local_doc(scope="Cluster"),
        "default/p: scope: 'Cluster' must be one of: Global, Namespace, WorkloadSelector",
    ),
    (
        "missing action",
        {k: v for k, v in local_doc().items() if k != "action"},
        "default/p: action: is required",
    ),
    ("bad action", local_doc(action="Audit"), "default/p: action: 'Audit' must be Allow or Deny"),
    (
        "dryRun not bool",
        local_doc(dryRun="yes"),
        "default/p: dryRun: must be true or false, not 'yes'",
    ),
    (
        "selector missing",
        local_doc(scope="WorkloadSelector"),
        "default/p: selector: is required with scope WorkloadSelector",
    ),
    (
        "selector with namespace scope",
        local_doc(selector={"matchLabels": {"a": "b"}}),
        "default/p: selector: only applies with scope WorkloadSelector, not Namespace",
    ),
    (
        "label value not a string",
        local_doc(scope="WorkloadSelector", selector={"matchLabels": {"v": 1}}),
        "default/p: selector.matchLabels.v: label value must be a string, not 1",
    ),
    (
        "unknown selector field",
        local_doc(scope="WorkloadSelector", selector={"matchExpressions": []}),
        "default/p: selector.matchExpressions: unknown field",
    ),
    (
        "rules not a list",
        local_doc(rules={"clauses": []}),
        "default/p: rules: must be a list, not dict",
    ),
    (
        "unknown rule field",
        local_doc(rules=[{"matches": []}]),
        "default/p: rules[0].matches: unknown field",
    ),
    (
        "unknown clause field",
        local_doc(rules=[{"clauses": [{"match": []}]}]),
        "default/p: rules[0].clauses[0].match: unknown field",
    ),
    (
        "unknown match field",
        local_match({"sourceIp": ["10.0.0.1"]}),
        "default/p: rules[0].clauses[0].matches[0].sourceIp: unknown field",
    ),
    (
        "empty match",
        local_match({}),
        "default/p: rules[0].clauses[0].matches[0]: a match with no fields never matches",
    ),
    (
        "string match two kinds",
        local_match({"namespaces": [{"exact": "a", "prefix": "b"}]}),
        "rules[0].clauses[0].matches[0].namespaces[0]: must have exactly one of: exact, prefix, "
        "suffix, presence",
    ),
    (
        "string match unknown kind",
        local_match({"namespaces": [{"regex": "a.*"}]}),
        "rules[0].clauses[0].matches[0].namespaces[0].regex: unknown field",
    ),
    (
        "string match bare string",
        local_match({"namespaces": ["a"]}),
        "rules[0].clauses[0].matches[0].namespaces[0]: must be a mapping, not str",
    ),
    (
        "empty exact",
        local_match({"namespaces": [{"exact": ""}]}),
        "namespaces[0].exact: must be a non-empty string, not ''",
    ),
    (
        "presence with value",
        local_match({"namespaces": [{"presence": "a"}]}),
        "namespaces[0].presence: takes no value ({}), not 'a'",
    ),
    (
        "principal with scheme",
        local_match({"principals": [{"exact": "spiffe://cluster.local/ns/a/sa/b"}]}),
        "principals[0].exact: 'spiffe://cluster.local/ns/a/sa/b': principals are written without 'spiffe://'",
    ),
    (
        "bad IP",
        local_match({"sourceIps": ["10.0.0.1", "nope"]}),
        "sourceIps[1]: 'nope' is not an IP or CIDR",
    ),
    (
        "IP as int",
        local_match({"destinationIps": [167772161]}),
        "destinationIps[0]: 167772161 is not an IP or CIDR",
    ),
    (
        "port zero",
        local_match({"destinationPorts": [0]}),
        "destinationPorts[0]: port 0 is outside 1..65535",
    ),
    (
        "port too big",
        local_match({"notDestinationPorts": [65536]}),
        "notDestinationPorts[0]: port 65536 is outside 1..65535",
    ),
    (
        "port as string",
        local_match({"destinationPorts": ["80"]}),
        "destinationPorts[0]: '80' is not a port number",
    ),
    (
        "port as bool",
        local_match({"destinationPorts": [True]}),
        "destinationPorts[0]: True is not a port number",
    ),
    (
        "service account missing field",
        local_match({"serviceAccounts": [{"namespace": "a"}]}),
        "serviceAccounts[0].serviceAccount: is required",
    ),
    (
        "service account unknown field",
        local_match({"serviceAccounts": [{"namespace": "a", "name": "b"}]}),
        "serviceAccounts[0].name: unknown field",
    ),
]


K8S_ERRORS: list[tuple[str, dict[str, Any], str]] = [
    (
        "bad apiVersion",
        {**k8s_doc({}), "apiVersion": "security.istio.io/v2"},
        "default/p: apiVersion: 'security.istio.io/v2' must be one of: security.istio.io/v1, "
        "security.istio.io/v1beta1",
    ),
    (
        "bad kind",
        {**k8s_doc({}), "kind": "PeerAuthentication"},
        "default/p: kind: 'PeerAuthentication' must be AuthorizationPolicy",
    ),
    ("unknown top-level field", {**k8s_doc({}), "data": {}}, "default/p: data: unknown field"),
    (
        "missing name",
        {**k8s_doc({}), "metadata": {"namespace": "default"}},
        "default/?: metadata.name: is required",
    ),
    (
        "missing namespace",
        {**k8s_doc({}), "metadata": {"name": "p"}},
        "?/p: metadata.namespace: is required",
    ),
    (
        "unknown metadata field",
        k8s_doc({}, nameSpace="x"),
        "default/p: metadata.nameSpace: unknown field",
    ),
    (
        "bad dry-run annotation",
        k8s_doc({}, annotations={"istio.io/dry-run": "yes"}),
        'default/p: metadata.annotations.istio.io/dry-run: \'yes\' must be "true" or "false"',
    ),
    ("unknown spec field", k8s_doc({"rule": []}), "default/p: spec.rule: unknown field"),
    ("spec not a mapping", k8s_doc([]), "default/p: spec: must be a mapping, not list"),
    (
        "AUDIT",
        k8s_doc({"action": "AUDIT"}),
        "default/p: action: AUDIT is not supported at L4 (only ALLOW and DENY are); AUDIT "
        "policies need a waypoint",
    ),
    (
        "CUSTOM",
        k8s_doc({"action": "CUSTOM", "provider": {"name": "ext"}}),
        "default/p: action: CUSTOM is not supported at L4",
    ),
    (
        "bad action",
        k8s_doc({"action": "Allow"}),
        "default/p: action: 'Allow' must be ALLOW or DENY",
    ),
    (
        "targetRef",
        k8s_doc({"targetRef": {"kind": "Gateway", "name": "w"}}),
        "default/p: targetRef: a policy attached to a waypoint or gateway is enforced there",
    ),
    (
        "targetRefs",
        k8s_doc({"targetRefs": [{"kind": "Service", "name": "s"}]}),
        "default/p: targetRefs: a policy attached",
    ),
    (
        "provider without CUSTOM",
        k8s_doc({"provider": {"name": "ext"}}),
        "default/p: provider: only applies to action CUSTOM",
    ),
    (
        "unknown rule field",
        k8s_doc({"rules": [{"form": []}]}),
        "default/p: rules[0].form: unknown field",
    ),
    (
        "from without source",
        k8s_doc({"rules": [{"from": [{}]}]}),
        "default/p: rules[0].from[0].source: is required",
    ),
    (
        "empty source",
        k8s_doc({"rules": [{"from": [{"source": {}}]}]}),
        "default/p: rules[0].from[0].source: must not be empty",
    ),
    (
        "source of empty lists",
        k8s_doc({"rules": [{"from": [{"source": {"principals": []}}]}]}),
        "default/p: rules[0].from[0].source: must not be empty",
    ),
    (
        "unknown source field",
        k8s_doc({"rules": [{"from": [{"source": {"principal": ["a"]}}]}]}),
        "default/p: rules[0].from[0].source.principal: unknown field",
    ),
    (
        "ipBlocks and remoteIpBlocks",
        k8s_doc(
            {
                "rules": [
                    {
                        "from": [
                            {
                                "source": {
                                    "ipBlocks": ["10.0.0.0/8"],
                                    "remoteIpBlocks": ["10.1.0.0/16"],
                                }
                            }
                        ]
                    }
                ]
            }
        ),
        "default/p: rules[0].from[0].source: ipBlocks and remoteIpBlocks both match the "
        "peer's address",
    ),
    (
        "bad notIpBlocks",
        k8s_doc({"rules": [{"from": [{"source": {"notIpBlocks": ["10.0.0.0/33"]}}]}]}),
        "default/p: rules[0].from[0].source.notIpBlocks[0]: '10.0.0.0/33' is not an IP or CIDR",
    ),
    (
        "star in the middle",
        k8s_doc({"rules": [{"from": [{"source": {"namespaces": ["a*b"]}}]}]}),
        "default/p: rules[0].from[0].source.namespaces[0]: 'a*b': '*' is only allowed at the "
        "start or the end",
    ),
    (
        "double star",
        k8s_doc({"rules": [{"from": [{"source": {"principals": ["**"]}}]}]}),
        "source.principals[0]: '**': '*' is only allowed",
    ),
    (
        "empty string",
        k8s_doc({"rules": [{"from": [{"source": {"namespaces": [""]}}]}]}),
        "source.namespaces[0]: must be a non-empty string, not ''",
    ),
    (
        "string list is a string",
        k8s_doc({"rules": [{"from": [{"source": {"namespaces": "default"}}]}]}),
        "source.namespaces: must be a list, not str",
    ),
    (
        "principal with scheme",
        k8s_doc(
            {
                "rules": [
                    {"from": [{"source": {"principals": ["spiffe://cluster.local/ns/a/sa/b"]}}]}
                ]
            }
        ),
        "source.principals[0]: 'spiffe://cluster.local/ns/a/sa/b': principals are written without",
    ),
    (
        "bad service account",
        k8s_doc({"rules": [{"from": [{"source": {"serviceAccounts": ["a/b/c"]}}]}]}),
        "source.serviceAccounts[0]: 'a/b/c' must be a service account name or namespace/name",
    ),
    (
        "to without operation",
        k8s_doc({"rules": [{"to": [{}]}]}),
        "default/p: rules[0].to[0].operation: is required",
    ),
    (
        "empty operation",
        k8s_doc({"rules": [{"to": [{"operation": {}}]}]}),
        "default/p: rules[0].to[0].operation: must not be empty",
    ),
    (
        "unknown operation field",
        k8s_doc({"rules": [{"to": [{"operation": {"port": ["80"]}}]}]}),
        "default/p: rules[0].to[0].operation.port: unknown field",
    ),
    (
        "port out of range",
        k8s_doc({"rules": [{"to": [{"operation": {"ports": ["80", "70000"]}}]}]}),
        "default/p: rules[0].to[0].operation.ports[1]: port 70000 is outside 1..65535",
    ),
    (
        "port zero",
        k8s_doc({"rules": [{"to": [{"operation": {"notPorts": ["0"]}}]}]}),
        "operation.notPorts[0]: port 0 is outside 1..65535",
    ),
    (
        "port not a number",
        k8s_doc({"rules": [{"to": [{"operation": {"ports": ["http"]}}]}]}),
        "operation.ports[0]: 'http' is not a port number",
    ),
    (
        "L7 value not a string",
        k8s_doc({"rules": [{"to": [{"operation": {"methods": [1]}}]}]}),
        "operation.methods[0]: must be a non-empty string, not 1",
    ),
    (
        "when without key",
        k8s_doc({"rules": [{"when": [{"values": ["a"]}]}]}),
        "default/p: rules[0].when[0].key: is required",
    ),
    (
        "when without values",
        k8s_doc({"rules": [{"when": [{"key": "source.ip"}]}]}),
        "default/p: rules[0].when[0]: needs values or notValues",
    ),
    (
        "unknown condition field",
        k8s_doc({"rules": [{"when": [{"key": "source.ip", "value": ["a"]}]}]}),
        "default/p: rules[0].when[0].value: unknown field",
    ),
    (
        "when bad IP",
        k8s_doc({"rules": [{"when": [{"key": "source.ip", "values": ["x"]}]}]}),
        "default/p: rules[0].when[0].values[0]: 'x' is not an IP or CIDR",
    ),
    (
        "when bad port",
        k8s_doc({"rules": [{"when": [{"key": "destination.port", "notValues": ["99999"]}]}]}),
        "default/p: rules[0].when[0].notValues[0]: port 99999 is outside 1..65535",
    ),
    (
        "when principal with scheme",
        k8s_doc(
            {"rules": [{"when": [{"key": "source.principal", "values": ["spiffe://x/ns/a/sa/b"]}]}]}
        ),
        "rules[0].when[0].values[0]: 'spiffe://x/ns/a/sa/b': principals are written without",
    ),
    (
        "error in a dropped L7 allow rule",
        k8s_doc(
            {
                "rules": [
                    {
                        "from": [{"source": {"ipBlocks": ["bad"]}}],
                        "to": [{"operation": {"methods": ["GET"]}}],
                    }
                ]
            }
        ),
        "rules[0].from[0].source.ipBlocks[0]: 'bad' is not an IP or CIDR",
    ),
]


@pytest.mark.parametrize(
    ("document", "message"),
    [(d, m) for _, d, m in LOCAL_ERRORS + K8S_ERRORS],
    ids=[n for n, _, _ in LOCAL_ERRORS + K8S_ERRORS],
)
def test_errors(document: dict[str, Any], message: str) -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy(document)
    assert message in str(info.value)


def test_a_policy_must_be_a_mapping() -> None:
    with pytest.raises(PolicyError, match="a policy must be a mapping, not list"):
        parse_policy([])  # type: ignore[arg-type]


def test_input_is_not_modified() -> None:
    document = k8s_doc({"rules": [{"from": [{"source": {"namespaces": ["a*"]}}]}]})
    before = copy.deepcopy(document)
    parse_policy(document)
    assert document == before


# --- several policies ---------------------------------------------------------------------------


def test_parse_policies_mixes_shapes() -> None:
    policies = parse_policies([k8s_doc({}, name="a"), local_doc(name="b")])
    assert [policy.key for policy in policies] == ["default/a", "default/b"]


def test_same_name_in_two_namespaces_is_fine() -> None:
    policies = parse_policies([k8s_doc({}), k8s_doc({}, namespace="other")])
    assert len(policies) == 2


def test_duplicates_are_refused_across_shapes() -> None:
    with pytest.raises(PolicyError) as info:
        parse_policies([k8s_doc({}), local_doc(name="x"), local_doc()])
    assert str(info.value) == "default/p: defined twice (policies[0] and policies[2])"


def test_every_case_policy_round_trips_through_the_local_shape() -> None:
    import dataclasses

    from agent.sources.authorization_policy import to_local_document
    from tests.support.policy_cases import CASES

    for case in CASES:
        for policy in case.policies:
            again = parse_policy(to_local_document(policy))
            assert again == dataclasses.replace(policy, wrong_layer=()), policy.key
