"""Gateway API HTTPRoutes into route.HttpRoute: a GAMMA route, the defaults, the way back to a
document, and every refusal, each naming the field a user has to fix."""

from __future__ import annotations

import copy
import datetime
from typing import Any

import pytest

from agent.sources.http_route import (
    RouteError,
    format_duration,
    parse_http_route,
    to_document,
)
from agent.state.route import (
    BackendRef,
    HeaderMatch,
    HeaderModifier,
    HttpRoute,
    ParentRef,
    PathMatch,
    PathMatchKind,
    Retry,
    RouteMatch,
    RouteRule,
)

ECHO = {"group": "", "kind": "Service", "name": "echo", "port": 80}
ECHO_PARENT = ParentRef("echo", "default", 80)


def route_doc(
    spec: Any = None, *, name: str = "echo", namespace: str = "default", **meta: Any
) -> dict[str, Any]:
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": name, "namespace": namespace, **meta},
        "spec": {"parentRefs": [ECHO]} if spec is None else spec,
    }


def rule_doc(rule: Any) -> dict[str, Any]:
    return route_doc({"parentRefs": [ECHO], "rules": [rule]})


def match_doc(match: Any) -> dict[str, Any]:
    return rule_doc({"matches": [match]})


def backend_doc(backend: Any) -> dict[str, Any]:
    return rule_doc({"backendRefs": [backend]})


def filter_doc(*filters: Any) -> dict[str, Any]:
    return rule_doc({"filters": list(filters)})


def modifier_doc(modifier: Any) -> dict[str, Any]:
    return filter_doc({"type": "RequestHeaderModifier", "requestHeaderModifier": modifier})


def only_rule(route: HttpRoute) -> RouteRule:
    (rule,) = route.rules
    return rule


def only_match(route: HttpRoute) -> RouteMatch:
    (match,) = only_rule(route).matches
    return match


GAMMA_ROUTE: dict[str, Any] = {
    "apiVersion": "gateway.networking.k8s.io/v1",
    "kind": "HTTPRoute",
    "metadata": {
        "name": "echo-routes",
        "namespace": "shop",
        "creationTimestamp": "2024-05-01T12:00:00Z",
        "uid": "6b1f0c52-0d0e-4c57-9d0a-3c1e0f5b2a11",
        "resourceVersion": "4711",
        "generation": 3,
        "labels": {"app": "echo"},
        "annotations": {"note": "canary"},
        "managedFields": [],
    },
    "spec": {
        "parentRefs": [{"group": "", "kind": "Service", "name": "echo", "port": 80}],
        "hostnames": ["echo.shop.svc.cluster.local"],
        "rules": [
            {
                "name": "v2",
                "matches": [{"path": {"type": "PathPrefix", "value": "/v2"}}],
                "backendRefs": [{"name": "echo-v2", "port": 80}],
            },
            {
                "matches": [
                    {
                        "path": {"type": "Exact", "value": "/login"},
                        "headers": [
                            {"name": "X-User", "value": "admin"},
                            {"type": "RegularExpression", "name": "Cookie", "value": "beta=.*"},
                        ],
                        "queryParams": [{"name": "debug", "value": "1"}],
                        "method": "POST",
                    }
                ],
                "backendRefs": [
                    {"name": "echo-v1", "port": 80, "weight": 90},
                    {"name": "echo-canary", "namespace": "canary", "port": 8080, "weight": 10},
                ],
                "filters": [
                    {
                        "type": "RequestHeaderModifier",
                        "requestHeaderModifier": {
                            "set": [{"name": "X-Route", "value": "login"}],
                            "add": [{"name": "X-Trace", "value": "on"}],
                            "remove": ["X-Debug"],
                        },
                    }
                ],
                "timeouts": {"request": "10s", "backendRequest": "2s500ms"},
                "retry": {"attempts": 2, "codes": [502, 503], "backoff": "100ms"},
            },
        ],
    },
    "status": {"parents": []},
}

GAMMA_EXPECTED = HttpRoute(
    name="echo-routes",
    namespace="shop",
    parents=(ParentRef("echo", "shop", 80),),
    rules=(
        RouteRule(
            matches=(RouteMatch(path=PathMatch(PathMatchKind.PREFIX, "/v2")),),
            backends=(BackendRef("echo-v2", "shop", 80),),
        ),
        RouteRule(
            matches=(
                RouteMatch(
                    path=PathMatch(PathMatchKind.EXACT, "/login"),
                    headers=(
                        HeaderMatch("x-user", "admin"),
                        HeaderMatch("cookie", "beta=.*", regex=True),
                    ),
                    query_params=(HeaderMatch("debug", "1"),),
                    method="POST",
                ),
            ),
            backends=(
                BackendRef("echo-v1", "shop", 80, weight=90),
                BackendRef("echo-canary", "canary", 8080, weight=10),
            ),
            request_headers=HeaderModifier(
                set=(("x-route", "login"),), add=(("x-trace", "on"),), remove=("x-debug",)
            ),
            timeout_seconds=10.0,
            backend_timeout_seconds=2.5,
            retry=Retry(attempts=2, codes=(502, 503), backoff_seconds=0.1),
        ),
    ),
    created="2024-05-01T12:00:00Z",
)


def test_gamma_route_parses_to_the_model() -> None:
    route = parse_http_route(GAMMA_ROUTE)
    assert route == GAMMA_EXPECTED
    assert route.key == "shop/echo-routes"


def test_v1beta1_is_accepted() -> None:
    document = copy.deepcopy(GAMMA_ROUTE)
    document["apiVersion"] = "gateway.networking.k8s.io/v1beta1"
    assert parse_http_route(document) == GAMMA_EXPECTED


# --- defaults -----------------------------------------------------------------------------------


def test_parent_without_group_and_kind_is_a_gateway() -> None:
    route = parse_http_route(route_doc({"parentRefs": [{"name": "mesh-gw"}]}))
    assert route.parents == (
        ParentRef("mesh-gw", "default", kind="Gateway", group="gateway.networking.k8s.io"),
    )


def test_parent_kind_service_without_group_is_still_in_the_gateway_group() -> None:
    # Gateway API defaults the group, not the pair; the status then says it is no Service.
    route = parse_http_route(route_doc({"parentRefs": [{"kind": "Service", "name": "echo"}]}))
    assert route.parents[0].group == "gateway.networking.k8s.io"


def test_parent_group_core_is_the_core_group() -> None:
    route = parse_http_route(
        route_doc({"parentRefs": [{"group": "core", "kind": "Service", "name": "echo"}]})
    )
    assert route.parents == (ParentRef("echo", "default"),)


def test_parent_namespace_defaults_to_the_routes_and_can_be_another() -> None:
    route = parse_http_route(
        route_doc(
            {"parentRefs": [ECHO, {**ECHO, "namespace": "other"}]},
            namespace="client",
        )
    )
    assert route.parents == (ParentRef("echo", "client", 80), ParentRef("echo", "other", 80))


def test_absent_rules_are_one_rule_matching_everything() -> None:
    route = parse_http_route(route_doc())
    assert route == HttpRoute("echo", "default", (ECHO_PARENT,), (RouteRule(),))


def test_empty_rules_are_no_rules() -> None:
    assert parse_http_route(route_doc({"parentRefs": [ECHO], "rules": []})).rules == ()


def test_rule_without_matches_or_backends() -> None:
    assert only_rule(parse_http_route(rule_doc({}))) == RouteRule()


def test_empty_match_is_route_match_without_path() -> None:
    assert only_match(parse_http_route(match_doc({}))) == RouteMatch()


def test_path_defaults_to_prefix_slash() -> None:
    assert only_match(parse_http_route(match_doc({"path": {}}))).path == PathMatch(
        PathMatchKind.PREFIX, "/"
    )
    assert only_match(parse_http_route(match_doc({"path": {"value": "/api"}}))).path == PathMatch(
        PathMatchKind.PREFIX, "/api"
    )
    assert only_match(parse_http_route(match_doc({"path": {"type": "Exact"}}))).path == PathMatch(
        PathMatchKind.EXACT, "/"
    )


@pytest.mark.parametrize("value", ["/foo", "/foo/", "/", "/a-b_c.d~e/%20x", "/v1;v=2/@me"])
def test_prefix_values_accepted(value: str) -> None:
    match = only_match(parse_http_route(match_doc({"path": {"value": value}})))
    assert match.path == PathMatch(PathMatchKind.PREFIX, value)


def test_regular_expression_path() -> None:
    match = only_match(
        parse_http_route(match_doc({"path": {"type": "RegularExpression", "value": "/v[0-9]+/.*"}}))
    )
    assert match.path == PathMatch(PathMatchKind.REGEX, "/v[0-9]+/.*")


def test_backend_defaults() -> None:
    rule = only_rule(parse_http_route(backend_doc({"name": "echo-v1", "port": 8080})))
    assert rule.backends == (BackendRef("echo-v1", "default", 8080, weight=1),)
    assert rule.backends[0].kind == "Service"
    assert rule.backends[0].group == ""


def test_backend_of_another_kind_needs_no_port() -> None:
    rule = only_rule(
        parse_http_route(
            backend_doc({"group": "multicluster.x-k8s.io", "kind": "ServiceImport", "name": "e"})
        )
    )
    assert rule.backends == (
        BackendRef("e", "default", None, kind="ServiceImport", group="multicluster.x-k8s.io"),
    )


def test_weight_zero_is_allowed() -> None:
    rule = only_rule(parse_http_route(backend_doc({"name": "e", "port": 80, "weight": 0})))
    assert rule.backends[0].weight == 0


def test_later_header_of_the_same_name_is_dropped() -> None:
    match = only_match(
        parse_http_route(
            match_doc(
                {
                    "headers": [
                        {"name": "X-Env", "value": "prod"},
                        {"name": "x-env", "value": "dev"},
                        {"name": "X-Other", "value": "1"},
                    ]
                }
            )
        )
    )
    assert match.headers == (HeaderMatch("x-env", "prod"), HeaderMatch("x-other", "1"))


def test_query_param_names_are_case_sensitive_and_first_wins() -> None:
    match = only_match(
        parse_http_route(
            match_doc(
                {
                    "queryParams": [
                        {"name": "Page", "value": "1"},
                        {"name": "page", "value": "2"},
                        {"name": "page", "value": "3"},
                    ]
                }
            )
        )
    )
    assert match.query_params == (HeaderMatch("Page", "1"), HeaderMatch("page", "2"))


def test_dropped_duplicate_is_still_checked() -> None:
    with pytest.raises(RouteError) as caught:
        parse_http_route(
            match_doc(
                {
                    "headers": [
                        {"name": "x", "value": "a"},
                        {"type": "RegularExpression", "name": "x", "value": "("},
                    ]
                }
            )
        )
    assert caught.value.path == "spec.rules[0].matches[0].headers[1].value"


def test_empty_header_modifier() -> None:
    route = parse_http_route(modifier_doc({}))
    assert only_rule(route).request_headers == HeaderModifier()


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("10s", 10.0), ("1m30s", 90.0), ("500ms", 0.5), ("0s", 0.0), ("1h", 3600.0)],
)
def test_durations(text: str, seconds: float) -> None:
    rule = only_rule(parse_http_route(rule_doc({"timeouts": {"request": text}})))
    assert rule.timeout_seconds == seconds
    assert rule.backend_timeout_seconds is None


def test_backend_timeout_may_exceed_a_disabled_request_timeout() -> None:
    rule = only_rule(
        parse_http_route(rule_doc({"timeouts": {"request": "0s", "backendRequest": "30s"}}))
    )
    assert (rule.timeout_seconds, rule.backend_timeout_seconds) == (0.0, 30.0)


def test_retry_without_codes_or_backoff() -> None:
    rule = only_rule(parse_http_route(rule_doc({"retry": {"attempts": 0}})))
    assert rule.retry == Retry(attempts=0)


def test_creation_time_is_normalized_to_utc() -> None:
    route = parse_http_route(route_doc(creationTimestamp="2024-05-01T14:00:00.25+02:00"))
    assert route.created == "2024-05-01T12:00:00Z"
    # As PyYAML reads an unquoted timestamp.
    moment = datetime.datetime(2024, 5, 1, 12, 0, tzinfo=datetime.UTC)
    assert parse_http_route(route_doc(creationTimestamp=moment)).created == "2024-05-01T12:00:00Z"
    assert parse_http_route(route_doc()).created == ""


def test_gateway_listeners_of_one_gateway_are_one_parent() -> None:
    route = parse_http_route(
        route_doc(
            {
                "parentRefs": [
                    {"name": "gw", "sectionName": "http"},
                    {"name": "gw", "sectionName": "https"},
                ]
            }
        )
    )
    assert len(route.parents) == 1


def test_hostnames_are_checked_and_not_kept() -> None:
    route = parse_http_route(
        route_doc({"parentRefs": [ECHO], "hostnames": ["echo.shop", "*.example.com"]})
    )
    assert route == HttpRoute("echo", "default", (ECHO_PARENT,), (RouteRule(),))


def test_status_is_ignored() -> None:
    document = route_doc()
    document["status"] = {"parents": [{"conditions": "anything"}]}
    assert parse_http_route(document).key == "default/echo"


# --- back to a document -------------------------------------------------------------------------


def test_round_trip_of_the_gamma_route() -> None:
    document = to_document(GAMMA_EXPECTED)
    assert document["apiVersion"] == "gateway.networking.k8s.io/v1"
    assert document["kind"] == "HTTPRoute"
    assert parse_http_route(document) == GAMMA_EXPECTED


@pytest.mark.parametrize(
    "route",
    [
        parse_http_route(route_doc()),
        parse_http_route(route_doc({"parentRefs": [ECHO], "rules": []})),
        parse_http_route(route_doc({"parentRefs": [{"name": "gw", "namespace": "infra"}]})),
        parse_http_route(match_doc({})),
        parse_http_route(modifier_doc({})),
        parse_http_route(modifier_doc({"remove": ["a", "b"]})),
        parse_http_route(
            backend_doc({"group": "multicluster.x-k8s.io", "kind": "ServiceImport", "name": "e"})
        ),
        parse_http_route(
            rule_doc(
                {
                    "matches": [
                        {"path": {"type": "RegularExpression", "value": "/x.*"}, "method": "GET"},
                        {
                            "queryParams": [
                                {"type": "RegularExpression", "name": "q", "value": "a+"}
                            ]
                        },
                    ],
                    "timeouts": {"request": "0s", "backendRequest": "99999h59m59s999ms"},
                    "retry": {"attempts": 1, "backoff": "1h1ms"},
                }
            )
        ),
    ],
)
def test_round_trip(route: HttpRoute) -> None:
    assert parse_http_route(to_document(route)) == route


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.0, "0s"), (0.5, "500ms"), (90.0, "1m30s"), (3661.001, "1h1m1s1ms"), (2.5, "2s500ms")],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_to_document_writes_every_default() -> None:
    spec = to_document(parse_http_route(backend_doc({"name": "e", "port": 80})))["spec"]
    assert spec["parentRefs"] == [
        {"group": "", "kind": "Service", "name": "echo", "namespace": "default", "port": 80}
    ]
    assert spec["rules"] == [
        {
            "backendRefs": [
                {
                    "group": "",
                    "kind": "Service",
                    "name": "e",
                    "namespace": "default",
                    "port": 80,
                    "weight": 1,
                }
            ]
        }
    ]


# --- refusals -----------------------------------------------------------------------------------


def test_error_message_names_route_field_and_reason() -> None:
    with pytest.raises(RouteError) as caught:
        parse_http_route(match_doc({"path": {"type": "Exact", "value": "login"}}))
    error = caught.value
    assert error.route == "default/echo"
    assert error.path == "spec.rules[0].matches[0].path.value"
    assert "must start with '/'" in error.reason
    assert str(error) == f"default/echo: spec.rules[0].matches[0].path.value: {error.reason}"


def test_route_without_name_is_unknown() -> None:
    document = route_doc()
    del document["metadata"]["name"]
    with pytest.raises(RouteError) as caught:
        parse_http_route(document)
    assert caught.value.route == "default/?"
    assert caught.value.path == "metadata.name"


def test_not_a_mapping() -> None:
    with pytest.raises(RouteError) as caught:
        parse_http_route(["not", "a", "route"])  # type: ignore[arg-type]
    assert caught.value.route == "?/?"
    assert "mapping" in caught.value.reason


def _many(count: int, make: Any) -> list[Any]:
    return [make(i) for i in range(count)]


ERRORS: list[tuple[str, dict[str, Any], str, str]] = [
    # document
    ("api-version", {**route_doc(), "apiVersion": "v1"}, "apiVersion", "must be one of"),
    ("kind", {**route_doc(), "kind": "GRPCRoute"}, "kind", "must be HTTPRoute"),
    ("top-key", {**route_doc(), "extra": 1}, "extra", "unknown field"),
    ("metadata-key", route_doc(finalizer="x"), "metadata.finalizer", "unknown field"),
    ("no-namespace", route_doc(namespace=""), "metadata.namespace", "non-empty string"),
    ("bad-namespace", route_doc(namespace="Shop"), "metadata.namespace", "namespace name"),
    ("created", route_doc(creationTimestamp="yesterday"), "creationTimestamp", "RFC 3339"),
    (
        "created-no-such-day",
        route_doc(creationTimestamp="2024-02-30T10:00:00Z"),
        "creationTimestamp",
        "RFC 3339",
    ),
    ("created-int", route_doc(creationTimestamp=1714564800), "creationTimestamp", "RFC 3339"),
    ("spec-key", route_doc({"parentRefs": [ECHO], "rule": []}), "spec.rule", "unknown field"),
    ("spec-list", route_doc([]), "spec", "must be a mapping"),
    # parentRefs
    ("no-parents", route_doc({"rules": []}), "spec.parentRefs", "is required"),
    ("empty-parents", route_doc({"parentRefs": []}), "spec.parentRefs", "is required"),
    (
        "many-parents",
        route_doc({"parentRefs": _many(33, lambda i: {**ECHO, "port": i + 1})}),
        "spec.parentRefs",
        "at most 32",
    ),
    (
        "parent-key",
        route_doc({"parentRefs": [{**ECHO, "ports": 80}]}),
        "spec.parentRefs[0].ports",
        "unknown field",
    ),
    (
        "parent-name",
        route_doc({"parentRefs": [{"group": "", "kind": "Service"}]}),
        "spec.parentRefs[0].name",
        "is required",
    ),
    (
        "parent-port",
        route_doc({"parentRefs": [{**ECHO, "port": 0}]}),
        "spec.parentRefs[0].port",
        "outside 1..65535",
    ),
    (
        "parent-port-bool",
        route_doc({"parentRefs": [{**ECHO, "port": True}]}),
        "spec.parentRefs[0].port",
        "not a port number",
    ),
    (
        "parent-port-string",
        route_doc({"parentRefs": [{**ECHO, "port": "80"}]}),
        "spec.parentRefs[0].port",
        "not a port number",
    ),
    (
        "parent-section-service",
        route_doc({"parentRefs": [{**ECHO, "sectionName": "http"}]}),
        "spec.parentRefs[0].sectionName",
        "sectionName is not supported for Service parents; use port",
    ),
    (
        "parent-kind",
        route_doc({"parentRefs": [{**ECHO, "group": None, "kind": 3}]}),
        "spec.parentRefs[0].kind",
        "non-empty string",
    ),
    (
        "parent-group-type",
        route_doc({"parentRefs": [{**ECHO, "group": 1}]}),
        "spec.parentRefs[0].group",
        "must be a string",
    ),
    (
        "parent-duplicate",
        route_doc({"parentRefs": [ECHO, ECHO]}),
        "spec.parentRefs[1]",
        "duplicates spec.parentRefs[0]",
    ),
    (
        "parent-port-and-not",
        route_doc({"parentRefs": [ECHO, {**ECHO, "port": None}]}),
        "spec.parentRefs[1]",
        "same parent as spec.parentRefs[0]",
    ),
    (
        "parent-namespace",
        route_doc({"parentRefs": [{**ECHO, "namespace": "a_b"}]}),
        "spec.parentRefs[0].namespace",
        "namespace name",
    ),
    # hostnames
    (
        "hostname-type",
        route_doc({"parentRefs": [ECHO], "hostnames": [7]}),
        "spec.hostnames[0]",
        "non-empty string",
    ),
    (
        "hostname-form",
        route_doc({"parentRefs": [ECHO], "hostnames": ["Echo_Shop"]}),
        "spec.hostnames[0]",
        "not a valid hostname",
    ),
    (
        "hostname-ip",
        route_doc({"parentRefs": [ECHO], "hostnames": ["10.0.0.1"]}),
        "spec.hostnames[0]",
        "not IP addresses",
    ),
    (
        "hostnames-string",
        route_doc({"parentRefs": [ECHO], "hostnames": "echo"}),
        "spec.hostnames",
        "must be a list",
    ),
    # rules
    (
        "many-rules",
        route_doc({"parentRefs": [ECHO], "rules": _many(17, lambda i: {})}),
        "spec.rules",
        "at most 16",
    ),
    ("rule-key", rule_doc({"backendRef": []}), "spec.rules[0].backendRef", "unknown field"),
    (
        "rule-name-twice",
        route_doc({"parentRefs": [ECHO], "rules": [{"name": "a"}, {"name": "a"}]}),
        "spec.rules[1].name",
        "also the name of spec.rules[0]",
    ),
    (
        "session-persistence",
        rule_doc({"sessionPersistence": {"sessionName": "s"}}),
        "spec.rules[0].sessionPersistence",
        "not supported",
    ),
    (
        "many-matches",
        rule_doc({"matches": _many(65, lambda i: {})}),
        "spec.rules[0].matches",
        "at most 64",
    ),
    (
        "matches-in-all",
        route_doc({"parentRefs": [ECHO], "rules": _many(3, lambda i: {"matches": [{}] * 60})}),
        "spec.rules[2].matches",
        "more than 128",
    ),
    # matches
    ("match-key", match_doc({"paths": {}}), "spec.rules[0].matches[0].paths", "unknown field"),
    ("match-list", match_doc(["/"]), "spec.rules[0].matches[0]", "must be a mapping"),
    (
        "path-type",
        match_doc({"path": {"type": "Prefix", "value": "/"}}),
        "spec.rules[0].matches[0].path.type",
        "must be one of: Exact, PathPrefix, RegularExpression",
    ),
    (
        "path-key",
        match_doc({"path": {"prefix": "/"}}),
        "spec.rules[0].matches[0].path.prefix",
        "unknown field",
    ),
    (
        "path-relative",
        match_doc({"path": {"value": "v2"}}),
        "spec.rules[0].matches[0].path.value",
        "must start with '/'",
    ),
    (
        "path-empty",
        match_doc({"path": {"value": ""}}),
        "spec.rules[0].matches[0].path.value",
        "non-empty string",
    ),
    (
        "path-query",
        match_doc({"path": {"type": "Exact", "value": "/a?b=1"}}),
        "spec.rules[0].matches[0].path.value",
        "must not contain '?'",
    ),
    (
        "path-fragment",
        match_doc({"path": {"value": "/a#top"}}),
        "spec.rules[0].matches[0].path.value",
        "must not contain '#'",
    ),
    (
        "path-double-slash",
        match_doc({"path": {"value": "/a//b"}}),
        "spec.rules[0].matches[0].path.value",
        "'//'",
    ),
    (
        "path-dot-segment",
        match_doc({"path": {"value": "/a/../b"}}),
        "spec.rules[0].matches[0].path.value",
        "'..' segments",
    ),
    (
        "path-encoded-slash",
        match_doc({"path": {"value": "/a%2Fb"}}),
        "spec.rules[0].matches[0].path.value",
        "encoded '/'",
    ),
    (
        "path-space",
        match_doc({"path": {"value": "/a b"}}),
        "spec.rules[0].matches[0].path.value",
        "percent-encoded",
    ),
    (
        "path-regex",
        match_doc({"path": {"type": "RegularExpression", "value": "/v[0-9"}}),
        "spec.rules[0].matches[0].path.value",
        "not a valid regular expression",
    ),
    (
        "header-name",
        match_doc({"headers": [{"name": "X User", "value": "a"}]}),
        "spec.rules[0].matches[0].headers[0].name",
        "not a valid HTTP header name",
    ),
    (
        "header-pseudo",
        match_doc({"headers": [{"name": ":authority", "value": "a"}]}),
        "spec.rules[0].matches[0].headers[0].name",
        "not a valid HTTP header name",
    ),
    (
        "header-type",
        match_doc({"headers": [{"type": "Prefix", "name": "x", "value": "a"}]}),
        "spec.rules[0].matches[0].headers[0].type",
        "Exact or RegularExpression",
    ),
    (
        "header-value",
        match_doc({"headers": [{"name": "x"}]}),
        "spec.rules[0].matches[0].headers[0].value",
        "is required",
    ),
    (
        "header-key",
        match_doc({"headers": [{"name": "x", "value": "a", "regex": True}]}),
        "spec.rules[0].matches[0].headers[0].regex",
        "unknown field",
    ),
    (
        "header-regex",
        match_doc({"headers": [{"type": "RegularExpression", "name": "x", "value": "*a"}]}),
        "spec.rules[0].matches[0].headers[0].value",
        "regular expression",
    ),
    (
        "many-headers",
        match_doc({"headers": _many(17, lambda i: {"name": f"h{i}", "value": "v"})}),
        "spec.rules[0].matches[0].headers",
        "at most 16",
    ),
    (
        "query-name",
        match_doc({"queryParams": [{"name": "a=b", "value": "1"}]}),
        "spec.rules[0].matches[0].queryParams[0].name",
        "not a valid query parameter name",
    ),
    (
        "query-regex",
        match_doc({"queryParams": [{"type": "RegularExpression", "name": "q", "value": "(?"}]}),
        "spec.rules[0].matches[0].queryParams[0].value",
        "regular expression",
    ),
    (
        "method",
        match_doc({"method": "get"}),
        "spec.rules[0].matches[0].method",
        "must be one of: GET",
    ),
    # filters
    (
        "filter-unsupported",
        filter_doc({"type": "RequestRedirect", "requestRedirect": {"statusCode": 301}}),
        "spec.rules[0].filters[0].type",
        "filter type RequestRedirect is not supported by this waypoint",
    ),
    (
        "filter-url-rewrite",
        filter_doc({"type": "URLRewrite", "urlRewrite": {}}),
        "spec.rules[0].filters[0].type",
        "filter type URLRewrite is not supported by this waypoint",
    ),
    (
        "filter-mirror",
        filter_doc({"type": "RequestMirror", "requestMirror": {}}),
        "spec.rules[0].filters[0].type",
        "filter type RequestMirror is not supported",
    ),
    (
        "filter-response-headers",
        filter_doc({"type": "ResponseHeaderModifier", "responseHeaderModifier": {}}),
        "spec.rules[0].filters[0].type",
        "filter type ResponseHeaderModifier is not supported",
    ),
    (
        "filter-extension",
        filter_doc({"type": "ExtensionRef", "extensionRef": {}}),
        "spec.rules[0].filters[0].type",
        "filter type ExtensionRef is not supported",
    ),
    (
        "filter-cors",
        filter_doc({"type": "CORS", "cors": {}}),
        "spec.rules[0].filters[0].type",
        "filter type CORS is not supported",
    ),
    (
        "filter-unknown-type",
        filter_doc({"type": "Rewrite"}),
        "spec.rules[0].filters[0].type",
        "unknown filter type 'Rewrite'",
    ),
    ("filter-no-type", filter_doc({}), "spec.rules[0].filters[0].type", "is required"),
    (
        "filter-twice",
        filter_doc(
            {"type": "RequestHeaderModifier", "requestHeaderModifier": {}},
            {"type": "RequestHeaderModifier", "requestHeaderModifier": {}},
        ),
        "spec.rules[0].filters[1]",
        "one RequestHeaderModifier filter",
    ),
    (
        "filter-missing-config",
        filter_doc({"type": "RequestHeaderModifier"}),
        "spec.rules[0].filters[0].requestHeaderModifier",
        "is required",
    ),
    (
        "filter-wrong-config",
        filter_doc(
            {"type": "RequestHeaderModifier", "requestHeaderModifier": {}, "urlRewrite": {}}
        ),
        "spec.rules[0].filters[0].urlRewrite",
        "does not go with filter type RequestHeaderModifier",
    ),
    (
        "filter-key",
        filter_doc({"type": "RequestHeaderModifier", "requestHeaderModifer": {}}),
        "spec.rules[0].filters[0].requestHeaderModifer",
        "unknown field",
    ),
    (
        "modifier-key",
        modifier_doc({"replace": []}),
        "spec.rules[0].filters[0].requestHeaderModifier.replace",
        "unknown field",
    ),
    (
        "modifier-set-twice",
        modifier_doc({"set": [{"name": "X-A", "value": "1"}, {"name": "x-a", "value": "2"}]}),
        "requestHeaderModifier.set[1].name",
        "already named at spec.rules[0].filters[0].requestHeaderModifier.set[0].name",
    ),
    (
        "modifier-add-twice",
        modifier_doc({"add": [{"name": "x-a", "value": "1"}, {"name": "x-a", "value": "2"}]}),
        "requestHeaderModifier.add[1].name",
        "already named",
    ),
    (
        "modifier-set-and-remove",
        modifier_doc({"set": [{"name": "x-a", "value": "1"}], "remove": ["X-A"]}),
        "requestHeaderModifier.remove[0]",
        "once across set, add and remove",
    ),
    (
        "modifier-value",
        modifier_doc({"set": [{"name": "x-a"}]}),
        "requestHeaderModifier.set[0].value",
        "is required",
    ),
    (
        "modifier-crlf",
        modifier_doc({"add": [{"name": "x-a", "value": "1\r\nx-b: 2"}]}),
        "requestHeaderModifier.add[0].value",
        "CR, LF",
    ),
    (
        "modifier-name",
        modifier_doc({"remove": ["bad name"]}),
        "requestHeaderModifier.remove[0]",
        "not a valid HTTP header name",
    ),
    (
        "modifier-many",
        modifier_doc({"remove": _many(17, lambda i: f"h{i}")}),
        "requestHeaderModifier.remove",
        "at most 16",
    ),
    # backendRefs
    (
        "backend-port",
        backend_doc({"name": "echo-v1"}),
        "spec.rules[0].backendRefs[0].port",
        "is required for a Service backend",
    ),
    (
        "backend-port-range",
        backend_doc({"name": "echo-v1", "port": 70000}),
        "spec.rules[0].backendRefs[0].port",
        "outside 1..65535",
    ),
    (
        "backend-port-bool",
        backend_doc({"name": "echo-v1", "port": True}),
        "spec.rules[0].backendRefs[0].port",
        "not a port number",
    ),
    (
        "backend-name",
        backend_doc({"port": 80}),
        "spec.rules[0].backendRefs[0].name",
        "is required",
    ),
    (
        "backend-weight",
        backend_doc({"name": "e", "port": 80, "weight": 1_000_001}),
        "spec.rules[0].backendRefs[0].weight",
        "outside 0..1000000",
    ),
    (
        "backend-weight-negative",
        backend_doc({"name": "e", "port": 80, "weight": -1}),
        "spec.rules[0].backendRefs[0].weight",
        "outside 0..1000000",
    ),
    (
        "backend-weight-bool",
        backend_doc({"name": "e", "port": 80, "weight": True}),
        "spec.rules[0].backendRefs[0].weight",
        "not a weight",
    ),
    (
        "backend-weight-float",
        backend_doc({"name": "e", "port": 80, "weight": 0.5}),
        "spec.rules[0].backendRefs[0].weight",
        "not a weight",
    ),
    (
        "backend-filters",
        backend_doc(
            {
                "name": "e",
                "port": 80,
                "filters": [{"type": "RequestHeaderModifier", "requestHeaderModifier": {}}],
            }
        ),
        "spec.rules[0].backendRefs[0].filters",
        "not supported",
    ),
    (
        "backend-key",
        backend_doc({"name": "e", "port": 80, "weigth": 5}),
        "spec.rules[0].backendRefs[0].weigth",
        "unknown field",
    ),
    (
        "many-backends",
        rule_doc({"backendRefs": _many(17, lambda i: {"name": f"e{i}", "port": 80})}),
        "spec.rules[0].backendRefs",
        "at most 16",
    ),
    # timeouts
    (
        "timeout-format",
        rule_doc({"timeouts": {"request": "1.5s"}}),
        "spec.rules[0].timeouts.request",
        "not a Gateway API duration",
    ),
    (
        "timeout-days",
        rule_doc({"timeouts": {"request": "1d"}}),
        "spec.rules[0].timeouts.request",
        "not a Gateway API duration",
    ),
    (
        "timeout-number",
        rule_doc({"timeouts": {"backendRequest": 10}}),
        "spec.rules[0].timeouts.backendRequest",
        "not a Gateway API duration",
    ),
    (
        "timeout-too-many-parts",
        rule_doc({"timeouts": {"request": "1h1m1s1ms1s"}}),
        "spec.rules[0].timeouts.request",
        "not a Gateway API duration",
    ),
    (
        "timeout-backend-longer",
        rule_doc({"timeouts": {"request": "5s", "backendRequest": "10s"}}),
        "spec.rules[0].timeouts.backendRequest",
        "10s is longer than timeouts.request (5s)",
    ),
    (
        "timeout-key",
        rule_doc({"timeouts": {"idle": "5s"}}),
        "spec.rules[0].timeouts.idle",
        "unknown field",
    ),
    # retry
    (
        "retry-attempts",
        rule_doc({"retry": {"codes": [503]}}),
        "spec.rules[0].retry.attempts",
        "is required",
    ),
    (
        "retry-attempts-negative",
        rule_doc({"retry": {"attempts": -1}}),
        "spec.rules[0].retry.attempts",
        "-1 must be at least 0",
    ),
    (
        "retry-code",
        rule_doc({"retry": {"attempts": 1, "codes": [503, 200]}}),
        "spec.rules[0].retry.codes[1]",
        "outside 400..599",
    ),
    (
        "retry-code-string",
        rule_doc({"retry": {"attempts": 1, "codes": ["5xx"]}}),
        "spec.rules[0].retry.codes[0]",
        "not an HTTP status code",
    ),
    (
        "retry-backoff",
        rule_doc({"retry": {"attempts": 1, "backoff": "fast"}}),
        "spec.rules[0].retry.backoff",
        "not a Gateway API duration",
    ),
    (
        "retry-key",
        rule_doc({"retry": {"attempts": 1, "perTryTimeout": "1s"}}),
        "spec.rules[0].retry.perTryTimeout",
        "unknown field",
    ),
]


@pytest.mark.parametrize(
    ("document", "path", "reason"),
    [pytest.param(document, path, reason, id=name) for name, document, path, reason in ERRORS],
)
def test_refusals(document: dict[str, Any], path: str, reason: str) -> None:
    with pytest.raises(RouteError) as caught:
        parse_http_route(document)
    assert path in caught.value.path
    assert reason in caught.value.reason
