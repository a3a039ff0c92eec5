"""Turn Gateway API HTTPRoutes (Kubernetes objects, as dicts) into `route.HttpRoute`.

The mesh's use of them is GAMMA: a route whose parent is a Service is carried out by the
waypoint that Service is bound to. Gateway API v1 semantics throughout, with its defaults
(a parentRef without group and kind is a Gateway, a backendRef without them a Service, a
path match without type a prefix, a backend's weight 1).

Everything is checked, the CRD's validation and the rules the spec states in prose alike: an
unknown field, a malformed value, or a feature this waypoint does not carry out (filters other
than RequestHeaderModifier, session persistence) is a `RouteError` naming the route and the
field, because a route that silently means less than it says sends traffic the wrong way.
Parents that are not Services are not errors here: `route.route_status` reports them as not
accepted, which is where Gateway API puts that verdict.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from agent.sources.document import Doc as _Doc
from agent.sources.document import DocumentError, doc_for, opened
from agent.sources.document import at as _at
from agent.sources.document import check_keys as _check_keys
from agent.sources.document import items as _items
from agent.sources.document import list_of as _list
from agent.sources.document import mapping as _mapping
from agent.sources.document import string as _string
from agent.sources.document import type_name as _type
from agent.state.route import (
    DEFAULT_WEIGHT,
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

API_VERSION = "gateway.networking.k8s.io/v1"
API_VERSIONS = (API_VERSION, "gateway.networking.k8s.io/v1beta1")
KIND = "HTTPRoute"
GATEWAY_GROUP = "gateway.networking.k8s.io"

# Gateway API's limits (CRD maxItems and CEL rules).
MAX_PARENT_REFS = 32
MAX_HOSTNAMES = 16
MAX_RULES = 16
MAX_MATCHES_PER_RULE = 64
MAX_MATCHES_PER_ROUTE = 128
MAX_HEADER_MATCHES = 16
MAX_FILTERS = 16
MAX_BACKEND_REFS = 16
MAX_HEADER_CHANGES = 16
MAX_WEIGHT = 1_000_000

METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")
SUPPORTED_FILTER = "RequestHeaderModifier"
# Filter type -> the field holding its configuration.
FILTER_FIELDS = {
    "RequestHeaderModifier": "requestHeaderModifier",
    "ResponseHeaderModifier": "responseHeaderModifier",
    "RequestMirror": "requestMirror",
    "RequestRedirect": "requestRedirect",
    "URLRewrite": "urlRewrite",
    "ExtensionRef": "extensionRef",
    "CORS": "cors",
    "ExternalAuth": "externalAuth",
}

_MODIFIER_FIELD = FILTER_FIELDS[SUPPORTED_FILTER]
_PATH_KINDS = {kind.value: kind for kind in PathMatchKind}

_TOP_KEYS = ("apiVersion", "kind", "metadata", "spec", "status")
# The last five are set by the API server; accepted so that `kubectl get -o yaml` output loads.
_METADATA_KEYS = (
    "name",
    "namespace",
    "annotations",
    "labels",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "managedFields",
)
_SPEC_KEYS = ("parentRefs", "hostnames", "rules")
_PARENT_KEYS = ("group", "kind", "name", "namespace", "port", "sectionName")
_RULE_KEYS = (
    "name",
    "matches",
    "filters",
    "backendRefs",
    "timeouts",
    "retry",
    "sessionPersistence",
)
_MATCH_KEYS = ("path", "headers", "queryParams", "method")
_PATH_KEYS = ("type", "value")
_HEADER_MATCH_KEYS = ("type", "name", "value")
_FILTER_KEYS = ("type", *FILTER_FIELDS.values())
_MODIFIER_KEYS = ("set", "add", "remove")
_HEADER_KEYS = ("name", "value")
_BACKEND_KEYS = ("group", "kind", "name", "namespace", "port", "weight", "filters")
_TIMEOUT_KEYS = ("request", "backendRequest")
_RETRY_KEYS = ("codes", "attempts", "backoff")

# Gateway API's patterns for its string types.
_NAMESPACE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_GROUP = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_KIND = re.compile(r"[a-zA-Z]([-a-zA-Z0-9]*[a-zA-Z0-9])?")
_SECTION_NAME = _GROUP
_HOSTNAME = re.compile(r"(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_HEADER_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+\-.^_`|~]+")
_PATH_CHARS = re.compile(r"(?:[-A-Za-z0-9/._~!$&'()*+,;=:@]|%[0-9a-fA-F]{2})+")
_DURATION = re.compile(r"([0-9]{1,5}(h|m|s|ms)){1,4}")
# "ms" before "m", or "500ms" would read as 500 minutes and a stray "s".
_DURATION_PART = re.compile(r"([0-9]{1,5})(ms|h|m|s)")
_DURATION_UNITS_MS = {"h": 3_600_000, "m": 60_000, "s": 1_000, "ms": 1}
_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})")

_HEADER_VALUE_MAX = 4096
_QUERY_VALUE_MAX = 1024
_PATH_MAX = 1024
_NAME_MAX = 253
_RETRY_CODES_MAX = 200  # as many as there are codes in 400..599


class RouteError(DocumentError):
    """A route the agent refuses: which one ("namespace/name"), which field, and why."""

    @property
    def route(self) -> str:
        return self.key


def parse_http_route(document: Mapping[str, object]) -> HttpRoute:
    """One HTTPRoute, as `kubectl get -o json` prints it (or as written for kubectl apply)."""
    if not isinstance(document, Mapping):
        raise RouteError("?/?", "", f"an HTTPRoute must be a mapping, not {_type(document)}")
    doc, meta = opened(
        document,
        RouteError,
        api_versions=API_VERSIONS,
        kind=KIND,
        top_keys=_TOP_KEYS,
        metadata_keys=_METADATA_KEYS,
    )
    name = _name(doc, meta.get("name"), "metadata.name")
    # Required although kubectl would default it: it is the default of every reference's.
    namespace = _namespace(doc, meta.get("namespace"), "metadata.namespace")
    created = _created(doc, meta.get("creationTimestamp"), "metadata.creationTimestamp")

    spec = _mapping(doc, document.get("spec"), "spec")
    _check_keys(doc, spec, _SPEC_KEYS, "spec")
    parents = _parent_refs(doc, spec, namespace)
    for hostname_path, hostname in _items(doc, spec, "hostnames", "spec", most=MAX_HOSTNAMES):
        # GAMMA ignores hostnames for Service parents, but a malformed one is still a mistake.
        _hostname(doc, hostname, hostname_path)
    return HttpRoute(
        name=name,
        namespace=namespace,
        parents=parents,
        rules=_rules(doc, spec, namespace),
        created=created,
    )


# --- helpers ----------------------------------------------------------------------------------


def _doc_for(namespace: object, name: object) -> _Doc:
    return doc_for(namespace, name, RouteError)


def _patterned(doc: _Doc, value: object, path: str, pattern: re.Pattern[str], what: str) -> str:
    text = _string(doc, value, path, most=_NAME_MAX)
    if not pattern.fullmatch(text):
        raise doc.error(path, f"{text!r} is not a valid {what}")
    return text


def _name(doc: _Doc, value: object, path: str) -> str:
    return _string(doc, value, path, most=_NAME_MAX)


def _namespace(doc: _Doc, value: object, path: str) -> str:
    text = _string(doc, value, path, most=63)
    if not _NAMESPACE.fullmatch(text):
        raise doc.error(path, f"{text!r} is not a valid namespace name (RFC 1123 label)")
    return text


def _group(doc: _Doc, value: object, path: str) -> str:
    """An API group; "" is the core group, which some write as "core"."""
    if not isinstance(value, str):
        raise doc.error(path, f'must be a string ("" for the core group), not {value!r}')
    if value in ("", "core"):
        return ""
    return _patterned(doc, value, path, _GROUP, "API group")


def _int(doc: _Doc, value: object, path: str, low: int, high: int | None, what: str) -> int:
    # bool is an int to Python, but `true` is no port or weight.
    if not isinstance(value, int) or isinstance(value, bool):
        raise doc.error(path, f"{value!r} is not {what}")
    if high is None and value < low:
        raise doc.error(path, f"{value} must be at least {low}")
    if high is not None and not low <= value <= high:
        raise doc.error(path, f"{value} is outside {low}..{high}")
    return value


def _port(doc: _Doc, value: object, path: str) -> int:
    return _int(doc, value, path, 1, 65535, "a port number")


def _hostname(doc: _Doc, value: object, path: str) -> str:
    text = _patterned(doc, value, path, _HOSTNAME, "hostname")
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return text
    raise doc.error(path, f"{text!r}: hostnames must be names, not IP addresses")


def _duration(doc: _Doc, value: object, path: str) -> float:
    """A Gateway API (GEP-2257) duration, in seconds."""
    if not isinstance(value, str) or not _DURATION.fullmatch(value):
        raise doc.error(
            path,
            f"{value!r} is not a Gateway API duration (up to four parts of 1-5 digits and a "
            "unit h, m, s or ms, e.g. 10s, 1m30s, 500ms)",
        )
    # Summed in whole milliseconds and divided once, so that formatting it back is exact.
    millis = sum(int(n) * _DURATION_UNITS_MS[unit] for n, unit in _DURATION_PART.findall(value))
    return millis / 1000


def format_duration(seconds: float) -> str:
    """Seconds as a Gateway API duration, in its canonical form (greatest unit first, each
    unit once, "0s" for zero)."""
    millis = round(seconds * 1000)
    if millis <= 0:
        return "0s"
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    parts: list[str] = []
    # Past 99999h (11 years) the canonical form has no room; repeating "h" still parses.
    while hours > 99999:
        parts.append("99999h")
        hours -= 99999
    for amount, unit in ((hours, "h"), (minutes, "m"), (secs, "s"), (millis, "ms")):
        if amount:
            parts.append(f"{amount}{unit}")
    return "".join(parts)


def _created(doc: _Doc, value: object, path: str) -> str:
    """The creation time in the API server's own form (UTC, whole seconds, "Z"), since the
    model compares creation times as text and other spellings of one moment would not."""
    if value is None:
        return ""
    moment: datetime | None = None
    if isinstance(value, datetime):  # PyYAML reads an unquoted timestamp as one
        moment = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    elif isinstance(value, str) and _RFC3339.fullmatch(value):
        # The right shape may still name no such day or hour.
        with contextlib.suppress(ValueError):
            moment = datetime.fromisoformat(value.upper())
    if moment is None:
        raise doc.error(path, f"{value!r} is not an RFC 3339 time (e.g. 2024-05-01T12:00:00Z)")
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _no_control_characters(doc: _Doc, text: str, path: str) -> str:
    # A CR or LF in a header value would split it into two headers on the wire.
    if any(char in text for char in "\r\n\0"):
        raise doc.error(path, f"{text!r} must not contain CR, LF or NUL")
    return text


# --- parentRefs -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _WrittenParent:
    path: str
    ref: ParentRef
    section_name: str | None


def _is_service(group: str, kind: str) -> bool:
    return group == "" and kind == "Service"


def _parent_refs(doc: _Doc, spec: Mapping[str, object], namespace: str) -> tuple[ParentRef, ...]:
    if not spec.get("parentRefs"):
        raise doc.error(
            "spec.parentRefs",
            "is required: a route without parents attaches to nothing (a Service parent is "
            'written group: "", kind: Service, name)',
        )
    written = [
        _parent_ref(doc, value, path, namespace)
        for path, value in _items(doc, spec, "parentRefs", "spec", most=MAX_PARENT_REFS)
    ]
    for later_index, later in enumerate(written):
        for earlier in written[:later_index]:
            _check_distinct_parents(doc, earlier, later)
    parents: list[ParentRef] = []
    for parent in written:
        # Two Gateway listeners of one Gateway (different sectionNames) are one ParentRef in
        # the model, which has no section name; keeping both would report its status twice.
        if parent.ref not in parents:
            parents.append(parent.ref)
    return tuple(parents)


def _check_distinct_parents(doc: _Doc, earlier: _WrittenParent, later: _WrittenParent) -> None:
    """Gateway API's rule: references to one parent must all narrow it (by port or
    sectionName) the same way, and to different parts of it."""
    a, b = earlier.ref, later.ref
    if (a.group, a.kind, a.namespace, a.name) != (b.group, b.kind, b.namespace, b.name):
        return
    if (a.port is None) != (b.port is None) or (earlier.section_name is None) != (
        later.section_name is None
    ):
        raise doc.error(
            later.path,
            f"refers to the same parent as {earlier.path}; references to one parent must "
            "each name a port (or sectionName), or none of them",
        )
    if a.port == b.port and earlier.section_name == later.section_name:
        raise doc.error(later.path, f"duplicates {earlier.path}")


def _parent_ref(doc: _Doc, value: object, path: str, namespace: str) -> _WrittenParent:
    ref = _mapping(doc, value, path)
    _check_keys(doc, ref, _PARENT_KEYS, path)
    # Gateway API's defaults: a parent without group and kind is a Gateway. A Service parent
    # has to say `group: ""`, and a forgotten group shows in the route's status.
    group_value = ref.get("group")
    group = GATEWAY_GROUP if group_value is None else _group(doc, group_value, _at(path, "group"))
    kind_value = ref.get("kind")
    kind = (
        "Gateway"
        if kind_value is None
        else _patterned(doc, kind_value, _at(path, "kind"), _KIND, "kind")
    )
    name = _name(doc, ref.get("name"), _at(path, "name"))
    parent_namespace = namespace
    if ref.get("namespace") is not None:
        parent_namespace = _namespace(doc, ref["namespace"], _at(path, "namespace"))
    port = None if ref.get("port") is None else _port(doc, ref["port"], _at(path, "port"))
    section_name = None
    if ref.get("sectionName") is not None:
        section_path = _at(path, "sectionName")
        if _is_service(group, kind):
            raise doc.error(
                section_path, "sectionName is not supported for Service parents; use port"
            )
        section_name = _patterned(
            doc, ref["sectionName"], section_path, _SECTION_NAME, "sectionName"
        )
    return _WrittenParent(
        path, ParentRef(name, parent_namespace, port, kind=kind, group=group), section_name
    )


# --- rules ------------------------------------------------------------------------------------


def _rules(doc: _Doc, spec: Mapping[str, object], namespace: str) -> tuple[RouteRule, ...]:
    if spec.get("rules") is None:
        # Gateway API's default: one rule matching every request, with no backends (for a
        # Service parent, the Service itself).
        return (RouteRule(),)
    rules: list[RouteRule] = []
    rule_names: dict[str, str] = {}
    match_count = 0
    for rule_path, value in _items(doc, spec, "rules", "spec", most=MAX_RULES):
        rule = _mapping(doc, value, rule_path)
        _check_keys(doc, rule, _RULE_KEYS, rule_path)
        if rule.get("name") is not None:
            name_path = _at(rule_path, "name")
            rule_name = _patterned(doc, rule["name"], name_path, _SECTION_NAME, "rule name")
            if rule_name in rule_names:
                raise doc.error(
                    name_path, f"{rule_name!r} is also the name of {rule_names[rule_name]}"
                )
            rule_names[rule_name] = rule_path
        if rule.get("sessionPersistence") is not None:
            raise doc.error(
                _at(rule_path, "sessionPersistence"),
                "session persistence is not supported by this waypoint",
            )
        matches = tuple(
            _match(doc, match, match_path)
            for match_path, match in _items(
                doc, rule, "matches", rule_path, most=MAX_MATCHES_PER_RULE
            )
        )
        match_count += len(matches)
        if match_count > MAX_MATCHES_PER_ROUTE:
            raise doc.error(
                _at(rule_path, "matches"),
                f"the route's rules have more than {MAX_MATCHES_PER_ROUTE} matches in all",
            )
        timeout, backend_timeout = _timeouts(doc, rule.get("timeouts"), _at(rule_path, "timeouts"))
        retry = None
        if rule.get("retry") is not None:
            retry = _retry(doc, rule["retry"], _at(rule_path, "retry"))
        rules.append(
            RouteRule(
                matches=matches,
                backends=tuple(
                    _backend_ref(doc, backend, backend_path, namespace)
                    for backend_path, backend in _items(
                        doc, rule, "backendRefs", rule_path, most=MAX_BACKEND_REFS
                    )
                ),
                request_headers=_filters(doc, rule, rule_path),
                timeout_seconds=timeout,
                backend_timeout_seconds=backend_timeout,
                retry=retry,
            )
        )
    return tuple(rules)


def _match(doc: _Doc, value: object, path: str) -> RouteMatch:
    match = _mapping(doc, value, path)
    _check_keys(doc, match, _MATCH_KEYS, path)
    method = None
    if match.get("method") is not None:
        method_value = match["method"]
        if not isinstance(method_value, str) or method_value not in METHODS:
            raise doc.error(
                _at(path, "method"), f"{method_value!r} must be one of: {', '.join(METHODS)}"
            )
        method = method_value
    return RouteMatch(
        path=None if match.get("path") is None else _path(doc, match["path"], _at(path, "path")),
        headers=_header_matches(doc, match, "headers", path),
        query_params=_header_matches(doc, match, "queryParams", path),
        method=method,
    )


def _path(doc: _Doc, value: object, path: str) -> PathMatch:
    written = _mapping(doc, value, path)
    _check_keys(doc, written, _PATH_KEYS, path)
    kind_value = written.get("type")
    if kind_value is None:
        kind_value = PathMatchKind.PREFIX.value
    kind = _PATH_KINDS.get(kind_value) if isinstance(kind_value, str) else None
    if kind is None:
        raise doc.error(
            _at(path, "type"),
            f"{kind_value!r} must be one of: {', '.join(_PATH_KINDS)}",
        )
    value_path = _at(path, "value")
    text_value = written.get("value")
    text = "/" if text_value is None else _string(doc, text_value, value_path, most=_PATH_MAX)
    if kind is PathMatchKind.REGEX:
        _regex(doc, text, value_path)
    else:
        _check_path(doc, text, value_path)
    return PathMatch(kind, text)


def _check_path(doc: _Doc, text: str, path: str) -> None:
    """Gateway API's rules for Exact and PathPrefix values: what a normalized request path
    could be, so that a match which can never hold is refused rather than silently dead."""
    if not text.startswith("/"):
        raise doc.error(path, f"{text!r} must start with '/'")
    if "?" in text:
        raise doc.error(path, f"{text!r} must not contain '?': to match the query, use queryParams")
    if "#" in text:
        raise doc.error(path, f"{text!r} must not contain '#': a fragment is never sent")
    if not _PATH_CHARS.fullmatch(text):
        raise doc.error(path, f"{text!r} has characters a path holds only percent-encoded")
    if "//" in text:
        raise doc.error(path, f"{text!r} must not contain '//'")
    if "/./" in text or "/../" in text or text.endswith(("/.", "/..")):
        raise doc.error(path, f"{text!r} must not contain '.' or '..' segments")
    if "%2f" in text.lower():
        raise doc.error(path, f"{text!r} must not contain an encoded '/' (%2F)")


def _regex(doc: _Doc, text: str, path: str) -> None:
    try:
        re.compile(text)
    except re.error as error:
        raise doc.error(
            path, f"{text!r} is not a valid regular expression (Python re): {error}"
        ) from None


def _header_matches(
    doc: _Doc, match: Mapping[str, object], key: str, path: str
) -> tuple[HeaderMatch, ...]:
    """Header or query parameter matches. Header names are case-insensitive (kept in lower
    case), query parameter names are not; of entries naming one, Gateway API considers only
    the first, so the others are checked and dropped."""
    headers = key == "headers"
    value_max = _HEADER_VALUE_MAX if headers else _QUERY_VALUE_MAX
    kept: dict[str, HeaderMatch] = {}
    for entry_path, value in _items(doc, match, key, path, most=MAX_HEADER_MATCHES):
        entry = _mapping(doc, value, entry_path)
        _check_keys(doc, entry, _HEADER_MATCH_KEYS, entry_path)
        kind = entry.get("type")
        if kind is None:
            kind = "Exact"
        if kind not in ("Exact", "RegularExpression"):
            raise doc.error(_at(entry_path, "type"), f"{kind!r} must be Exact or RegularExpression")
        what = "HTTP header name" if headers else "query parameter name"
        name = _header_name(doc, entry.get("name"), _at(entry_path, "name"), what)
        if headers:
            name = name.lower()
        value_path = _at(entry_path, "value")
        text = _string(doc, entry.get("value"), value_path, most=value_max)
        if kind == "RegularExpression":
            _regex(doc, text, value_path)
        kept.setdefault(name, HeaderMatch(name, text, regex=kind == "RegularExpression"))
    return tuple(kept.values())


def _header_name(doc: _Doc, value: object, path: str, what: str = "HTTP header name") -> str:
    text = _string(doc, value, path, most=256)
    if not _HEADER_NAME.fullmatch(text):
        raise doc.error(path, f"{text!r} is not a valid {what} (an RFC 7230 token)")
    return text


# --- filters ----------------------------------------------------------------------------------


def _filters(doc: _Doc, rule: Mapping[str, object], rule_path: str) -> HeaderModifier | None:
    modifier: HeaderModifier | None = None
    modifier_path = ""
    for filter_path, value in _items(doc, rule, "filters", rule_path, most=MAX_FILTERS):
        written = _mapping(doc, value, filter_path)
        _check_keys(doc, written, _FILTER_KEYS, filter_path)
        type_path = _at(filter_path, "type")
        kind = written.get("type")
        if kind is None:
            raise doc.error(type_path, "is required")
        if not isinstance(kind, str) or kind not in FILTER_FIELDS:
            raise doc.error(
                type_path,
                f"unknown filter type {kind!r} (expected one of: {', '.join(FILTER_FIELDS)})",
            )
        if kind != SUPPORTED_FILTER:
            raise doc.error(type_path, f"filter type {kind} is not supported by this waypoint")
        for field in FILTER_FIELDS.values():
            if field != _MODIFIER_FIELD and written.get(field) is not None:
                raise doc.error(_at(filter_path, field), f"does not go with filter type {kind}")
        if modifier is not None:
            raise doc.error(
                filter_path,
                f"a rule may have one {SUPPORTED_FILTER} filter; {modifier_path} is one",
            )
        field_path = _at(filter_path, _MODIFIER_FIELD)
        if written.get(_MODIFIER_FIELD) is None:
            raise doc.error(field_path, f"is required with filter type {kind}")
        modifier = _header_modifier(doc, written[_MODIFIER_FIELD], field_path)
        modifier_path = filter_path
    return modifier


def _header_modifier(doc: _Doc, value: object, path: str) -> HeaderModifier:
    """set, add, remove; a header named twice, even across the three, is an error, since
    what would become of it would depend on the order they are applied in."""
    written = _mapping(doc, value, path)
    _check_keys(doc, written, _MODIFIER_KEYS, path)
    seen: dict[str, str] = {}

    def claim(name: str, name_path: str) -> str:
        lowered = name.lower()
        if lowered in seen:
            raise doc.error(
                name_path,
                f"header {lowered!r} is already named at {seen[lowered]}; a header may be "
                "named once across set, add and remove",
            )
        seen[lowered] = name_path
        return lowered

    changes: dict[str, tuple[tuple[str, str], ...]] = {}
    for key in ("set", "add"):
        pairs: list[tuple[str, str]] = []
        for entry_path, entry_value in _items(doc, written, key, path, most=MAX_HEADER_CHANGES):
            entry = _mapping(doc, entry_value, entry_path)
            _check_keys(doc, entry, _HEADER_KEYS, entry_path)
            name_path = _at(entry_path, "name")
            name = claim(_header_name(doc, entry.get("name"), name_path), name_path)
            value_path = _at(entry_path, "value")
            text = _string(doc, entry.get("value"), value_path, most=_HEADER_VALUE_MAX)
            pairs.append((name, _no_control_characters(doc, text, value_path)))
        changes[key] = tuple(pairs)
    removed = tuple(
        claim(_header_name(doc, name, name_path), name_path)
        for name_path, name in _items(doc, written, "remove", path, most=MAX_HEADER_CHANGES)
    )
    return HeaderModifier(set=changes["set"], add=changes["add"], remove=removed)


# --- backendRefs, timeouts, retry -------------------------------------------------------------


def _backend_ref(doc: _Doc, value: object, path: str, namespace: str) -> BackendRef:
    ref = _mapping(doc, value, path)
    _check_keys(doc, ref, _BACKEND_KEYS, path)
    group = "" if ref.get("group") is None else _group(doc, ref["group"], _at(path, "group"))
    kind = (
        "Service"
        if ref.get("kind") is None
        else _patterned(doc, ref["kind"], _at(path, "kind"), _KIND, "kind")
    )
    name = _name(doc, ref.get("name"), _at(path, "name"))
    backend_namespace = namespace
    if ref.get("namespace") is not None:
        backend_namespace = _namespace(doc, ref["namespace"], _at(path, "namespace"))
    port = None
    if ref.get("port") is not None:
        port = _port(doc, ref["port"], _at(path, "port"))
    elif _is_service(group, kind):
        raise doc.error(_at(path, "port"), "is required for a Service backend")
    weight = DEFAULT_WEIGHT
    if ref.get("weight") is not None:
        weight = _int(doc, ref["weight"], _at(path, "weight"), 0, MAX_WEIGHT, "a weight")
    if _list(doc, ref.get("filters"), _at(path, "filters"), most=MAX_FILTERS):
        raise doc.error(
            _at(path, "filters"),
            "filters on a backendRef are not supported by this waypoint; put them on the rule",
        )
    return BackendRef(name, backend_namespace, port, weight, kind=kind, group=group)


def _timeouts(doc: _Doc, value: object, path: str) -> tuple[float | None, float | None]:
    timeouts = _mapping(doc, value, path)
    _check_keys(doc, timeouts, _TIMEOUT_KEYS, path)
    request = backend = None
    if timeouts.get("request") is not None:
        request = _duration(doc, timeouts["request"], _at(path, "request"))
    if timeouts.get("backendRequest") is not None:
        backend = _duration(doc, timeouts["backendRequest"], _at(path, "backendRequest"))
    # Zero disables a timeout, so only a finite request timeout bounds the backend's.
    if request and backend and backend > request:
        raise doc.error(
            _at(path, "backendRequest"),
            f"{timeouts['backendRequest']} is longer than timeouts.request "
            f"({timeouts['request']}); each try must fit in the whole request's time",
        )
    return request, backend


def _retry(doc: _Doc, value: object, path: str) -> Retry:
    retry = _mapping(doc, value, path)
    _check_keys(doc, retry, _RETRY_KEYS, path)
    if retry.get("attempts") is None:
        # Gateway API leaves the number to the implementation then; saying it is clearer.
        raise doc.error(
            _at(path, "attempts"),
            "is required: this waypoint picks no number of retries of its own",
        )
    attempts = _int(doc, retry["attempts"], _at(path, "attempts"), 0, None, "a number of retries")
    codes = tuple(
        _int(doc, code, code_path, 400, 599, "an HTTP status code")
        for code_path, code in _items(doc, retry, "codes", path, most=_RETRY_CODES_MAX)
    )
    backoff = None
    if retry.get("backoff") is not None:
        backoff = _duration(doc, retry["backoff"], _at(path, "backoff"))
    return Retry(attempts, codes, backoff)


# --- back to a document -----------------------------------------------------------------------


def to_document(route: HttpRoute) -> dict[str, Any]:
    """The route as a Kubernetes HTTPRoute (gateway.networking.k8s.io/v1), for config dumps:
    every default written out. Parsing it gives the same route."""
    metadata: dict[str, Any] = {"name": route.name, "namespace": route.namespace}
    if route.created:
        metadata["creationTimestamp"] = route.created
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": metadata,
        "spec": {
            "parentRefs": [_parent_document(parent) for parent in route.parents],
            "rules": [_rule_document(rule) for rule in route.rules],
        },
    }


def _parent_document(parent: ParentRef) -> dict[str, Any]:
    document: dict[str, Any] = {
        "group": parent.group,
        "kind": parent.kind,
        "name": parent.name,
        "namespace": parent.namespace,
    }
    if parent.port is not None:
        document["port"] = parent.port
    return document


def _rule_document(rule: RouteRule) -> dict[str, Any]:
    document: dict[str, Any] = {}
    if rule.matches:
        document["matches"] = [_match_document(match) for match in rule.matches]
    if rule.request_headers is not None:
        modifier = rule.request_headers
        written: dict[str, Any] = {}
        for key, pairs in (("set", modifier.set), ("add", modifier.add)):
            if pairs:
                written[key] = [{"name": name, "value": value} for name, value in pairs]
        if modifier.remove:
            written["remove"] = list(modifier.remove)
        document["filters"] = [{"type": SUPPORTED_FILTER, _MODIFIER_FIELD: written}]
    if rule.backends:
        document["backendRefs"] = [_backend_document(backend) for backend in rule.backends]
    timeouts: dict[str, str] = {}
    if rule.timeout_seconds is not None:
        timeouts["request"] = format_duration(rule.timeout_seconds)
    if rule.backend_timeout_seconds is not None:
        timeouts["backendRequest"] = format_duration(rule.backend_timeout_seconds)
    if timeouts:
        document["timeouts"] = timeouts
    if rule.retry is not None:
        retry: dict[str, Any] = {"attempts": rule.retry.attempts}
        if rule.retry.codes:
            retry["codes"] = list(rule.retry.codes)
        if rule.retry.backoff_seconds is not None:
            retry["backoff"] = format_duration(rule.retry.backoff_seconds)
        document["retry"] = retry
    return document


def _match_document(match: RouteMatch) -> dict[str, Any]:
    document: dict[str, Any] = {}
    if match.path is not None:
        document["path"] = {"type": match.path.kind.value, "value": match.path.value}
    for key, entries in (("headers", match.headers), ("queryParams", match.query_params)):
        if entries:
            document[key] = [
                {
                    "type": "RegularExpression" if entry.regex else "Exact",
                    "name": entry.name,
                    "value": entry.value,
                }
                for entry in entries
            ]
    if match.method is not None:
        document["method"] = match.method
    return document


def _backend_document(backend: BackendRef) -> dict[str, Any]:
    document: dict[str, Any] = {
        "group": backend.group,
        "kind": backend.kind,
        "name": backend.name,
        "namespace": backend.namespace,
    }
    if backend.port is not None:
        document["port"] = backend.port
    document["weight"] = backend.weight
    return document
