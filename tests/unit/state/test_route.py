"""What follows from routes alone: their status per parent, and Gateway API's precedence."""

from __future__ import annotations

from collections.abc import Callable

from agent.state.route import (
    BackendRef,
    HeaderMatch,
    HttpRoute,
    ParentRef,
    PathMatch,
    PathMatchKind,
    RankedRule,
    RouteMatch,
    RouteRule,
    ranked_rules,
    route_status,
)
from agent.state.service import Service
from agent.state.waypoint import Waypoint

WAYPOINT = Waypoint("10.96.0.50", name="wp", namespace="default")


def service(name: str, *, ports: tuple[int, ...] = (80,), waypoint: bool = True) -> Service:
    return Service(
        name=name,
        namespace="default",
        hostname=f"{name}.default.svc.cluster.local",
        vips=("10.96.0.10",),
        ports={port: port for port in ports},
        waypoint=WAYPOINT if waypoint else None,
    )


def finder(*services: Service) -> Callable[[str], Service | None]:
    by_key = {f"{s.namespace}/{s.name}": s for s in services}
    return by_key.get


def route(
    *rules: RouteRule,
    parents: tuple[ParentRef, ...] = (ParentRef("echo", "default", 80),),
    name: str = "r",
    namespace: str = "default",
    created: str = "",
) -> HttpRoute:
    return HttpRoute(name, namespace, parents, rules or (RouteRule(),), created=created)


def to(*backends: BackendRef) -> RouteRule:
    return RouteRule(backends=backends)


def prefix(
    value: str, *, method: str | None = None, headers: tuple[HeaderMatch, ...] = ()
) -> RouteMatch:
    return RouteMatch(path=PathMatch(PathMatchKind.PREFIX, value), headers=headers, method=method)


def exact(value: str) -> RouteMatch:
    return RouteMatch(path=PathMatch(PathMatchKind.EXACT, value))


def header(name: str) -> HeaderMatch:
    return HeaderMatch(name, "1")


# --- route_status -------------------------------------------------------------------------------


def test_accepted_when_the_parent_service_has_a_waypoint() -> None:
    (status,) = route_status(
        route(to(BackendRef("echo-v2", "default", 80))), finder(service("echo"), service("echo-v2"))
    )
    assert status.parent == ParentRef("echo", "default", 80)
    assert status.accepted and status.resolved
    accepted, resolved = status.conditions
    assert (accepted.type, accepted.reason) == ("Accepted", "Accepted")
    assert "default/wp" in accepted.message
    assert (resolved.type, resolved.reason) == ("ResolvedRefs", "ResolvedRefs")


def test_accepted_without_port_for_every_port() -> None:
    (status,) = route_status(
        route(parents=(ParentRef("echo", "default"),)), finder(service("echo", ports=(80, 443)))
    )
    assert status.accepted


def test_missing_parent_service() -> None:
    (status,) = route_status(route(), finder())
    accepted = status.conditions[0]
    assert not status.accepted
    assert accepted.reason == "NoMatchingParent"
    assert "Service default/echo:80 does not exist" in accepted.message


def test_parent_port_the_service_lacks() -> None:
    (status,) = route_status(
        route(parents=(ParentRef("echo", "default", 8080),)), finder(service("echo"))
    )
    assert not status.accepted
    assert status.conditions[0].reason == "NoMatchingParent"
    assert "echo:8080: no such port" in status.conditions[0].message


def test_parent_without_waypoint() -> None:
    (status,) = route_status(route(), finder(service("echo", waypoint=False)))
    assert not status.accepted
    assert status.conditions[0].reason == "NoMatchingParent"
    assert "bound to no waypoint" in status.conditions[0].message


def test_gateway_parent_is_not_accepted() -> None:
    gateway = ParentRef("mesh-gw", "default", kind="Gateway", group="gateway.networking.k8s.io")
    (status,) = route_status(route(parents=(gateway,)), finder(service("mesh-gw")))
    assert not status.accepted
    assert "only Service parents" in status.conditions[0].message


def test_status_per_parent() -> None:
    statuses = route_status(
        route(parents=(ParentRef("echo", "default", 80), ParentRef("gone", "default", 80))),
        finder(service("echo")),
    )
    assert [s.accepted for s in statuses] == [True, False]


def test_missing_backend_is_backend_not_found() -> None:
    (status,) = route_status(
        route(to(BackendRef("echo-v3", "default", 80))), finder(service("echo"))
    )
    assert status.accepted  # unresolved backends do not unattach the route
    resolved = status.conditions[1]
    assert not status.resolved
    assert resolved.reason == "BackendNotFound"
    assert "default/echo-v3" in resolved.message


def test_backend_port_the_service_lacks() -> None:
    (status,) = route_status(
        route(to(BackendRef("echo-v2", "default", 9090))),
        finder(service("echo"), service("echo-v2")),
    )
    assert status.conditions[1].reason == "BackendNotFound"
    assert "default/echo-v2 has no port 9090" in status.conditions[1].message


def test_backend_of_another_kind_is_invalid_kind() -> None:
    backend = BackendRef("e", "default", kind="ServiceImport", group="multicluster.x-k8s.io")
    (status,) = route_status(route(to(backend)), finder(service("echo"), service("e")))
    resolved = status.conditions[1]
    assert resolved.reason == "InvalidKind"
    assert "multicluster.x-k8s.io/ServiceImport" in resolved.message


def test_first_unresolved_backend_gives_the_reason_and_all_are_named() -> None:
    (status,) = route_status(
        route(
            to(BackendRef("e", "default", kind="ServiceImport", group="x.io")),
            to(BackendRef("missing", "default", 80)),
        ),
        finder(service("echo")),
    )
    resolved = status.conditions[1]
    assert resolved.reason == "InvalidKind"
    assert "x.io/ServiceImport" in resolved.message
    assert "default/missing" in resolved.message


# --- ranked_rules -------------------------------------------------------------------------------


def order(ranked: list[RankedRule]) -> list[tuple[str, int, RouteMatch]]:
    return [(r.route.name, r.rule_index, r.match) for r in ranked]


def test_exact_beats_a_longer_prefix() -> None:
    r = route(RouteRule(matches=(prefix("/login/and/more"),)), RouteRule(matches=(exact("/a"),)))
    assert [m for _, _, m in order(ranked_rules([r]))] == [exact("/a"), prefix("/login/and/more")]


def test_longer_prefix_beats_shorter() -> None:
    r = route(RouteRule(matches=(prefix("/"), prefix("/api"), prefix("/api/v2"))))
    assert [m.path.value for _, _, m in order(ranked_rules([r])) if m.path] == [
        "/api/v2",
        "/api",
        "/",
    ]


def test_method_beats_none() -> None:
    with_method = prefix("/api", method="GET")
    r = route(RouteRule(matches=(prefix("/api"), with_method)))
    assert [m for _, _, m in order(ranked_rules([r]))] == [with_method, prefix("/api")]


def test_more_headers_beat_fewer() -> None:
    one = prefix("/", headers=(header("a"),))
    two = prefix("/", headers=(header("a"), header("b")))
    r = route(RouteRule(matches=(one,)), RouteRule(matches=(two,)))
    assert [m for _, _, m in order(ranked_rules([r]))] == [two, one]


def test_method_beats_headers() -> None:
    headers = prefix("/", headers=(header("a"), header("b")))
    method = prefix("/", method="POST")
    r = route(RouteRule(matches=(headers, method)))
    assert [m for _, _, m in order(ranked_rules([r]))] == [method, headers]


def test_older_route_wins_a_tie() -> None:
    newer = route(name="a", created="2024-05-02T00:00:00Z")
    older = route(name="b", created="2024-05-01T00:00:00Z")
    assert [name for name, _, _ in order(ranked_rules([newer, older]))] == ["b", "a"]


def test_then_namespace_and_name() -> None:
    routes = [
        route(name="b", namespace="a"),
        route(name="a", namespace="b"),
        route(name="a", namespace="a"),
    ]
    ranked = ranked_rules(routes)
    assert [r.route.key for r in ranked] == ["a/a", "a/b", "b/a"]


def test_then_rule_order() -> None:
    r = route(RouteRule(matches=(prefix("/x"),)), RouteRule(matches=(prefix("/x"),)))
    assert [index for _, index, _ in order(ranked_rules([r]))] == [0, 1]


def test_rule_without_matches_ranks_as_prefix_slash() -> None:
    catch_all = RouteRule()
    r = route(catch_all, RouteRule(matches=(prefix("/a"),)), RouteRule(matches=(prefix("/"),)))
    ranked = ranked_rules([r])
    # "/a" first; the rule without matches ties with the explicit "/" and keeps its rule order.
    assert [(index, m) for _, index, m in order(ranked)] == [
        (1, prefix("/a")),
        (0, RouteMatch()),
        (2, prefix("/")),
    ]


def test_precedence_across_routes_before_age() -> None:
    # Specificity decides before creation time: a newer route's exact match wins.
    older = route(
        RouteRule(matches=(prefix("/login"),)), name="old", created="2020-01-01T00:00:00Z"
    )
    newer = route(RouteRule(matches=(exact("/login"),)), name="new", created="2024-01-01T00:00:00Z")
    assert [name for name, _, _ in order(ranked_rules([older, newer]))] == ["new", "old"]


def test_every_match_of_a_rule_is_ranked() -> None:
    r = route(RouteRule(matches=(prefix("/a"), exact("/b"))))
    assert len(ranked_rules([r])) == 2


def test_more_query_params_beat_fewer() -> None:
    none = prefix("/")
    one = RouteMatch(path=PathMatch(PathMatchKind.PREFIX, "/"), query_params=(header("q"),))
    r = route(RouteRule(matches=(none, one)))
    assert [m for _, _, m in order(ranked_rules([r]))] == [one, none]
