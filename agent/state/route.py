"""Gateway API HTTPRoutes attached to Services (the mesh's GAMMA use), as the state holds them.

A route's `parents` are Services; the waypoint a Service is bound to carries out its rules.
Parsing is agent/sources/http_route.py; this module holds the data and what follows from it
alone: the precedence of rules (Gateway API's order) and the route's status per parent.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from agent.state.service import Service

# Gateway API's default weight of a backendRef.
DEFAULT_WEIGHT = 1


class PathMatchKind(enum.StrEnum):
    EXACT = "Exact"
    PREFIX = "PathPrefix"
    REGEX = "RegularExpression"


@dataclass(frozen=True, slots=True)
class PathMatch:
    kind: PathMatchKind
    value: str


@dataclass(frozen=True, slots=True)
class HeaderMatch:
    """A header (or query parameter) to match: exact value, or a regular expression."""

    name: str
    value: str
    regex: bool = False


@dataclass(frozen=True, slots=True)
class RouteMatch:
    """All of its parts must hold. No path means Gateway API's default, prefix "/"."""

    path: PathMatch | None = None
    headers: tuple[HeaderMatch, ...] = ()
    query_params: tuple[HeaderMatch, ...] = ()
    method: str | None = None


@dataclass(frozen=True, slots=True)
class BackendRef:
    """A Service (in `namespace`) and port to send matched requests to, with its share."""

    name: str
    namespace: str
    port: int | None = None  # None: the port the request came in on
    weight: int = DEFAULT_WEIGHT
    kind: str = "Service"
    group: str = ""


@dataclass(frozen=True, slots=True)
class HeaderModifier:
    """RequestHeaderModifier: set (replace), add (append), remove."""

    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Retry:
    """HTTPRoute `retry` (Gateway API 1.2): attempts beyond the first, on these statuses."""

    attempts: int
    codes: tuple[int, ...] = ()
    backoff_seconds: float | None = None


@dataclass(frozen=True, slots=True)
class RouteRule:
    # Any of them (an empty tuple matches every request, as Gateway API's default match).
    matches: tuple[RouteMatch, ...] = ()
    backends: tuple[BackendRef, ...] = ()
    request_headers: HeaderModifier | None = None
    timeout_seconds: float | None = None  # timeouts.request
    backend_timeout_seconds: float | None = None  # timeouts.backendRequest
    retry: Retry | None = None


@dataclass(frozen=True, slots=True)
class ParentRef:
    """A Service the route attaches to (GAMMA), in `namespace`; `port` narrows it to one port."""

    name: str
    namespace: str
    port: int | None = None
    kind: str = "Service"
    group: str = ""


@dataclass(frozen=True, slots=True)
class HttpRoute:
    name: str
    namespace: str
    parents: tuple[ParentRef, ...]
    rules: tuple[RouteRule, ...]
    # metadata.creationTimestamp (RFC 3339, compared as text): the oldest route wins a tie.
    created: str = ""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class Condition:
    """One status condition of a route for one parent, as Gateway API names them."""

    type: str  # "Accepted" or "ResolvedRefs"
    status: bool
    reason: str
    message: str = ""


@dataclass(frozen=True, slots=True)
class ParentStatus:
    parent: ParentRef
    conditions: tuple[Condition, Condition]  # Accepted, ResolvedRefs

    @property
    def accepted(self) -> bool:
        return self.conditions[0].status

    @property
    def resolved(self) -> bool:
        return self.conditions[1].status


def _parent_name(parent: ParentRef) -> str:
    port = f":{parent.port}" if parent.port is not None else ""
    return f"{parent.kind} {parent.namespace}/{parent.name}{port}"


def backend_error(backend: BackendRef, find: Callable[[str], Service | None]) -> str | None:
    """Why the backend cannot be resolved (Gateway API reason, message), or None when it can.
    `find` looks a Service up by "namespace/name"."""
    if backend.group != "" or backend.kind != "Service":
        return f"InvalidKind: {backend.group or 'core'}/{backend.kind} is not a Service"
    service = find(f"{backend.namespace}/{backend.name}")
    if service is None:
        return f"BackendNotFound: Service {backend.namespace}/{backend.name} does not exist"
    if backend.port is not None and backend.port not in service.ports:
        return (
            f"BackendNotFound: Service {backend.namespace}/{backend.name} has no port "
            f"{backend.port}"
        )
    return None


def route_status(route: HttpRoute, find: Callable[[str], Service | None]) -> list[ParentStatus]:
    """Accepted and ResolvedRefs for each parent, worked out from the Services `find` knows
    ("namespace/name" -> Service). A parent is accepted when it is an existing Service (and
    port) bound to a waypoint; otherwise no proxy would carry the route out, and saying so
    is the point of the status."""
    unresolved = [
        error
        for rule in route.rules
        for backend in rule.backends
        if (error := backend_error(backend, find)) is not None
    ]
    if unresolved:
        reason = unresolved[0].partition(": ")[0]
        resolved = Condition("ResolvedRefs", False, reason, "; ".join(unresolved))
    else:
        resolved = Condition("ResolvedRefs", True, "ResolvedRefs")
    statuses = []
    for parent in route.parents:
        accepted = _accepted(parent, find)
        statuses.append(ParentStatus(parent, (accepted, resolved)))
    return statuses


def _accepted(parent: ParentRef, find: Callable[[str], Service | None]) -> Condition:
    if parent.group != "" or parent.kind != "Service":
        hint = ' (a Service parent needs group: "")' if parent.kind == "Service" else ""
        return Condition(
            "Accepted",
            False,
            "UnsupportedValue",
            f"parent {parent.group or 'core'}/{parent.kind} {parent.namespace}/{parent.name}: "
            f"waypoints serve only Service parents{hint}",
        )
    service = find(f"{parent.namespace}/{parent.name}")
    if service is None:
        return Condition(
            "Accepted", False, "NoMatchingParent", f"{_parent_name(parent)} does not exist"
        )
    if parent.port is not None and parent.port not in service.ports:
        return Condition(
            "Accepted", False, "NoMatchingParent", f"{_parent_name(parent)}: no such port"
        )
    if service.waypoint is None:
        return Condition(
            "Accepted",
            False,
            "NoMatchingParent",
            f"{_parent_name(parent)} is bound to no waypoint, so no proxy applies the route",
        )
    if not service.waypoint.address:
        return Condition(
            "Accepted",
            False,
            "Pending",
            f"waypoint {service.waypoint.key} is not ready: traffic goes direct, without L7",
        )
    return Condition("Accepted", True, "Accepted", f"served by waypoint {service.waypoint.key}")


@dataclass(frozen=True, slots=True)
class RankedRule:
    """One (route, rule, match) of a Service's routes, in Gateway API's precedence order."""

    route: HttpRoute
    rule_index: int
    match: RouteMatch


def _precedence(ranked: RankedRule) -> tuple[object, ...]:
    """Gateway API's order: exact path, then the longest prefix, then a method match, then
    the most header matches, then the most query matches; ties go to the oldest route, then
    the first by namespace/name, then the rule's order."""
    path = ranked.match.path or PathMatch(PathMatchKind.PREFIX, "/")
    return (
        0 if path.kind is PathMatchKind.EXACT else 1 if path.kind is PathMatchKind.PREFIX else 2,
        -len(path.value.rstrip("/")),  # "/foo/" is the same prefix as "/foo"
        0 if ranked.match.method is not None else 1,
        -len(ranked.match.headers),
        -len(ranked.match.query_params),
        ranked.route.created,
        ranked.route.key,
        ranked.rule_index,
    )


def ranked_rules(routes: Iterable[HttpRoute]) -> list[RankedRule]:
    """Every match of the routes' rules, best first: the first that matches a request wins.
    A rule without matches matches everything (as a prefix "/" match)."""
    ranked = [
        RankedRule(route, index, match)
        for route in routes
        for index, rule in enumerate(route.rules)
        for match in (rule.matches or (RouteMatch(),))
    ]
    return sorted(ranked, key=_precedence)
