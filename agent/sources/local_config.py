"""Load the local config file (ztunnel's LOCAL_XDS_PATH shape: workloads, services, policies;
plus what waypoints carry out: Gateway API HTTPRoutes, and policies attached by targetRefs).

Errors name the file, the line and the reason. Every section is parsed here, so a broken
entry refuses the whole file and the last good state stays.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from agent.identity.spiffe import SpiffeId
from agent.sources.authorization_policy import PolicyError, parse_policy
from agent.sources.http_route import RouteError, parse_http_route
from agent.sources.waypoint_policy import attaches_to_waypoint, parse_waypoint_policy
from agent.state.names import dns_label_error, dns_subdomain_error, interface_name_error
from agent.state.namespace import Namespace
from agent.state.policy import Policy
from agent.state.route import HttpRoute
from agent.state.service import Service
from agent.state.waypoint import HBONE_PORT, Waypoint
from agent.state.waypoint_policy import WaypointPolicy
from agent.state.workload import DEFAULT_TRUST_DOMAIN, Protocol, Workload


class ConfigError(Exception):
    """A config the agent refuses: where (the file, and the line when known) and why."""

    def __init__(self, source: str, line: int | None, reason: str) -> None:
        self.source = source
        self.line = line
        self.reason = reason
        where = source if line is None else f"{source}:{line}"
        super().__init__(f"{where}: {reason}")


@dataclass(frozen=True, slots=True)
class LocalConfig:
    workloads: tuple[Workload, ...]
    services: tuple[Service, ...]
    policies: tuple[Policy, ...]
    namespaces: tuple[Namespace, ...] = ()
    routes: tuple[HttpRoute, ...] = ()
    waypoint_policies: tuple[WaypointPolicy, ...] = ()


_WORKLOAD_KEYS = {
    "uid", "name", "namespace", "serviceAccount", "workloadIps", "protocol", "node",
    "services", "waypoint", "netns", "interface", "canonicalName", "canonicalRevision", "labels",
    "workloadName", "workloadType", "trustDomain", "clusterId", "status",
}  # fmt: skip

# subjectAltNames, loadBalancer and ipFamilies are ztunnel's and accepted so its configs
# load; nothing here reads them yet.
_SERVICE_KEYS = {
    "name", "namespace", "hostname", "vips", "ports",
    "subjectAltNames", "waypoint", "loadBalancer", "ipFamilies", "appProtocols",
}  # fmt: skip
_SECTIONS = ("workloads", "services", "policies", "namespaces", "httpRoutes")

_NULL_TAG = "tag:yaml.org,2002:null"


def load_local_config(path: Path) -> LocalConfig:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(str(path), None, f"cannot read: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(str(path), None, f"cannot read: not UTF-8 ({exc.reason})") from exc
    return parse_local_config(text, str(path))


def parse_local_config(text: str, source: str) -> LocalConfig:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        line = mark.line + 1 if mark is not None else None
        raise ConfigError(source, line, f"invalid YAML: {problem}") from exc
    if root is None:
        # What an editor or a copy that was cut short leaves: never taken as "no workloads".
        raise ConfigError(source, None, "the file is empty (write `workloads: []` to mean "
                          "no workloads)")  # fmt: skip
    if not isinstance(root, yaml.MappingNode):
        raise _error(source, root, "top level must be a mapping")
    if not root.value:
        raise _error(source, root, f"the config names no section ({', '.join(_SECTIONS)})")
    sections: dict[str, yaml.Node] = {}
    for key_node, value_node in root.value:
        key = key_node.value
        if key not in _SECTIONS:
            raise _error(source, key_node, f"unknown key {key!r} (expected {', '.join(_SECTIONS)})")
        if not isinstance(value_node, yaml.SequenceNode):
            raise _error(source, value_node, f"{key} must be a list")
        sections[key] = value_node

    workload_nodes = _items(sections.get("workloads"))
    workloads = tuple(_workload(node, source) for node in workload_nodes)
    workload_entries = list(zip(workload_nodes, workloads, strict=True))
    _require_unique(source, "workload uid", [(node, [w.uid]) for node, w in workload_entries])
    # One address, one workload: otherwise a lookup by address (policy, telemetry) would
    # pick one of them silently.
    _require_unique(source, "workload IP", [(node, w.ips) for node, w in workload_entries])

    service_nodes = _items(sections.get("services"))
    services = tuple(_service(node, source) for node in service_nodes)
    service_entries = list(zip(service_nodes, services, strict=True))
    _require_unique(source, "service", [(node, [s.key]) for node, s in service_entries])
    # Likewise one VIP and port, one service, or the destination of a connection is ambiguous.
    _require_unique(
        source,
        "service VIP and port",
        [
            (node, [_host_port(vip, port) for vip in s.vips for port in s.ports])
            for node, s in service_entries
        ],
    )

    policy_nodes = _items(sections.get("policies"))
    checked = [_policy(node, source) for node in policy_nodes]
    # One namespace/name, one policy, whichever proxy enforces it (as in Kubernetes).
    _require_unique(
        source,
        "policy",
        [(node, [policy.key]) for node, policy in zip(policy_nodes, checked, strict=True)],
    )
    route_nodes = _items(sections.get("httpRoutes"))
    routes = tuple(_route(node, source) for node in route_nodes)
    _require_unique(
        source, "HTTPRoute", [(node, [r.key]) for node, r in zip(route_nodes, routes, strict=True)]
    )
    namespace_nodes = _items(sections.get("namespaces"))
    namespaces = tuple(_namespace(node, source) for node in namespace_nodes)
    named = zip(namespace_nodes, namespaces, strict=True)
    _require_unique(source, "namespace", [(node, [n.name]) for node, n in named])
    return LocalConfig(
        workloads,
        services,
        tuple(p for p in checked if isinstance(p, Policy)),
        namespaces,
        routes,
        tuple(p for p in checked if isinstance(p, WaypointPolicy)),
    )


def _namespace(node: yaml.Node, source: str) -> Namespace:
    """`{name: default, labels: {istio.io/dataplane-mode: ambient}}`: a Kubernetes namespace
    as the local config writes it (for pods that CNI announces)."""
    if not isinstance(node, yaml.MappingNode):
        raise _error(source, node, "a namespace must be a mapping")
    fields = _fields(node)
    unknown = sorted(set(fields) - {"name", "labels"})
    if unknown:
        raise _error(source, node, f"namespace has unknown keys {unknown}")
    name_node = _present(fields, "name")
    if name_node is None:
        raise _error(source, node, "namespace is missing 'name'")
    labels: dict[str, str] = {}
    if (labels_node := _present(fields, "labels")) is not None:
        raw = _construct(source, labels_node)
        if not isinstance(raw, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in raw.items()
        ):
            raise _error(source, labels_node, "labels must map strings to strings")
        labels = raw
    return Namespace(_string(source, name_node, "namespace name"), labels)


def _require_unique(
    source: str, what: str, entries: Iterable[tuple[yaml.Node, Iterable[str]]]
) -> None:
    first_line: dict[str, int] = {}
    for node, keys in entries:
        for key in keys:
            if key in first_line:
                raise _error(
                    source, node, f"duplicate {what} {key!r} (first at line {first_line[key]})"
                )
            first_line[key] = _line(node)


def _host_port(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


def _error(source: str, node: yaml.Node, reason: str) -> ConfigError:
    return ConfigError(source, _line(node), reason)


def _items(node: yaml.Node | None) -> list[yaml.Node]:
    return list(node.value) if isinstance(node, yaml.SequenceNode) else []


def _fields(node: yaml.MappingNode) -> dict[str, yaml.Node]:
    """A mapping's value nodes by key, so that errors can point at the offending line."""
    return {str(key.value): value for key, value in node.value}


def _construct(source: str, node: yaml.Node) -> Any:
    # Composing only checks syntax; turning nodes into values can still fail (an unknown tag,
    # a date like 2024-02-30), and that must be a ConfigError with a line like any other.
    try:
        return yaml.SafeLoader("").construct_document(node)
    except (yaml.YAMLError, ValueError) as exc:
        mark = getattr(exc, "problem_mark", None) or node.start_mark
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(source, mark.line + 1, problem) from exc


def _present(fields: dict[str, yaml.Node], key: str) -> yaml.Node | None:
    """The key's value node, or None when the key is absent or written as null."""
    node = fields.get(key)
    return None if node is None or node.tag == _NULL_TAG else node


def _string(source: str, node: yaml.Node, what: str) -> str:
    value = _construct(source, node)
    if not isinstance(value, str) or not value:
        raise _error(source, node, f"{what} must be a non-empty string")
    return value


def _optional_name(
    source: str, fields: dict[str, yaml.Node], key: str, error_of: Callable[[str], str | None]
) -> str | None:
    """A string field checked by error_of; None when absent. Never coerced: `name: [x]` or
    `node: 2` is an error, not "['x']" or "2"."""
    node = _present(fields, key)
    if node is None:
        return None
    value = _construct(source, node)
    if not isinstance(value, str) or not value:
        raise _error(source, node, f"{key} must be a non-empty string, not {value!r}")
    if (error := error_of(value)) is not None:
        raise _error(source, node, f"{key} {value!r} {error}")
    return value


def _name(
    source: str,
    fields: dict[str, yaml.Node],
    key: str,
    error_of: Callable[[str], str | None],
    default: str | None = None,
) -> str:
    value = _optional_name(source, fields, key, error_of)
    if value is not None:
        return value
    assert default is not None, f"{key} is required and checked before"
    return default


def _uid_error(value: str) -> str | None:
    return "may not hold white space" if any(c.isspace() for c in value) else None


def _netns_error(value: str) -> str | None:
    return None if value.startswith("/") else "must be an absolute path (/run/netns/...)"


def _ip(value: object) -> str | None:
    """The address in canonical form, so that lookups match however it was written."""
    if not isinstance(value, str):
        return None  # ip_address() would also take an int, which no config means
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        return None


def _workload(node: yaml.Node, source: str) -> Workload:
    if not isinstance(node, yaml.MappingNode):
        raise _error(source, node, "a workload must be a mapping")
    data = _construct(source, node)
    unknown = sorted(str(key) for key in set(data) - _WORKLOAD_KEYS)
    if unknown:
        raise _error(source, node, f"workload has unknown keys {unknown}")
    for required in ("name", "namespace", "workloadIps", "node"):
        if required not in data:
            raise _error(source, node, f"workload is missing {required!r}")
    ips = data["workloadIps"]
    if not isinstance(ips, list) or not ips:
        raise _error(source, node, "workloadIps must be a non-empty list")
    canonical_ips: list[str] = []
    for ip in ips:
        canonical = _ip(ip)
        if canonical is None:
            raise _error(source, node, f"{ip!r} in workloadIps is not an IP address")
        canonical_ips.append(canonical)
    try:
        protocol = Protocol(data.get("protocol", "TCP"))
    except ValueError:
        raise _error(
            source, node, f"protocol {data.get('protocol')!r} must be HBONE or TCP"
        ) from None
    fields = _fields(node)
    trust_domain = DEFAULT_TRUST_DOMAIN
    if (trust_domain_node := _present(fields, "trustDomain")) is not None:
        trust_domain = _string(source, trust_domain_node, "trustDomain")
    # ztunnel's names for telemetry; empty means "derive it" (agent/telemetry/istio_labels.py).
    names = {
        key: _string(source, value, key) if (value := _present(fields, key)) is not None else ""
        for key in ("workloadName", "canonicalName", "canonicalRevision", "clusterId")
    }
    services: dict[str, dict[int, int]] = {}
    if (services_node := _present(fields, "services")) is not None:
        services = _workload_services(source, services_node)
    waypoint = _waypoint(source, _present(fields, "waypoint"))
    labels: dict[str, str] = {}
    if (labels_node := _present(fields, "labels")) is not None:
        raw = _construct(source, labels_node) if isinstance(labels_node, yaml.MappingNode) else None
        if not isinstance(raw, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in raw.items()
        ):
            raise _error(source, labels_node, "labels must map strings to strings")
        labels = raw
    name = _name(source, fields, "name", dns_subdomain_error)
    namespace = _name(source, fields, "namespace", dns_label_error)
    service_account = _name(source, fields, "serviceAccount", dns_subdomain_error, "default")
    try:
        SpiffeId(trust_domain, namespace, service_account)
    except ValueError as exc:
        raise _error(source, node, f"no valid identity: {exc}") from None
    netns = _optional_name(source, fields, "netns", _netns_error)
    status = "Healthy"
    if (status_node := _present(fields, "status")) is not None:
        status = _string(source, status_node, "status")
        if status not in ("Healthy", "Unhealthy"):
            raise _error(source, status_node, f"status {status!r} must be Healthy or Unhealthy")
    return Workload(
        uid=_name(source, fields, "uid", _uid_error, f"local//Pod/{namespace}/{name}"),
        name=name,
        namespace=namespace,
        service_account=service_account,
        ips=tuple(canonical_ips),
        protocol=protocol,
        node=_name(source, fields, "node", dns_subdomain_error),
        netns=netns,
        interface=_name(source, fields, "interface", interface_name_error, "eth0"),
        trust_domain=trust_domain,
        services=services,
        waypoint=waypoint,
        labels=labels,
        workload_name=names["workloadName"],
        canonical_name=names["canonicalName"],
        canonical_revision=names["canonicalRevision"],
        cluster_id=names["clusterId"],
        healthy=status == "Healthy",
    )


def _workload_services(source: str, node: yaml.Node) -> dict[str, dict[int, int]]:
    """ztunnel's "namespace/hostname" -> {service port: target port}. A malformed key would
    silently match no service, and a port map is where a VIP's connection is sent: both are
    checked. An empty port map means the service's own target ports."""
    if not isinstance(node, yaml.MappingNode):
        raise _error(source, node, "workload services must be a mapping of namespace/hostname")
    services: dict[str, dict[int, int]] = {}
    for key_node, ports_node in node.value:
        key = _construct(source, key_node)
        namespace, slash, hostname = key.partition("/") if isinstance(key, str) else ("", "", "")
        if not (namespace and slash and hostname):
            raise _error(
                source, key_node, f"workload service {key!r} must be written namespace/hostname"
            )
        services[key] = {} if ports_node.tag == _NULL_TAG else _ports(source, ports_node)
    return services


def _service(node: yaml.Node, source: str) -> Service:
    if not isinstance(node, yaml.MappingNode):
        raise _error(source, node, "a service must be a mapping")
    fields = _fields(node)
    unknown = sorted(set(fields) - _SERVICE_KEYS)
    if unknown:
        raise _error(source, node, f"service has unknown keys {unknown}")
    for required in ("name", "namespace"):
        if required not in fields:
            raise _error(source, node, f"service is missing {required!r}")
    name = _string(source, fields["name"], "service name")
    namespace = _string(source, fields["namespace"], "service namespace")
    hostname = f"{name}.{namespace}.svc.cluster.local"
    if (hostname_node := _present(fields, "hostname")) is not None:
        hostname = _string(source, hostname_node, "service hostname")
    return Service(
        name=name,
        namespace=namespace,
        hostname=hostname,
        vips=_vips(source, _present(fields, "vips")),
        ports=_ports(source, _present(fields, "ports")),
        waypoint=_waypoint(source, _present(fields, "waypoint")),
        app_protocols=_app_protocols(source, _present(fields, "appProtocols")),
    )


def _app_protocols(source: str, node: yaml.Node | None) -> dict[int, str]:
    """{service port: appProtocol}, as Kubernetes writes a port's appProtocol."""
    if node is None:
        return {}
    if not isinstance(node, yaml.MappingNode):
        raise _error(source, node, "appProtocols must be a mapping of service port to protocol")
    protocols: dict[int, str] = {}
    for port_node, protocol_node in node.value:
        port, protocol = _construct(source, port_node), _construct(source, protocol_node)
        if not _is_port(port):
            raise _error(source, port_node, f"appProtocols port {port!r} must be 1..65535")
        if not isinstance(protocol, str) or not protocol:
            raise _error(source, protocol_node, f"appProtocol {protocol!r} must be a string")
        protocols[port] = protocol.lower()
    return protocols


def _waypoint(source: str, node: yaml.Node | None) -> Waypoint | None:
    """ztunnel's GatewayAddress: {destination: "network/ip", hboneMtlsPort: 15008}, plus the
    Gateway's name and namespace (ours, for logs and telemetry) and its allow-only-waypoint
    option (agent/state/waypoint_only.py). An empty destination is a
    bound waypoint that is not ready."""
    if node is None:
        return None
    if not isinstance(node, yaml.MappingNode):
        raise _error(source, node, "waypoint must be a mapping")
    fields = _fields(node)
    unknown = sorted(
        set(fields) - {"destination", "hboneMtlsPort", "name", "namespace", "allowOnlyWaypoint"}
    )
    if unknown:
        raise _error(source, node, f"waypoint has unknown keys {unknown}")
    address = ""
    if (destination := _present(fields, "destination")) is not None:
        written = _string(source, destination, "waypoint destination")
        address = (_ip(written.rpartition("/")[2]) or "") if written else ""
        if written and not address:
            problem = f"waypoint destination {written!r} is not an IP address (ip or network/ip)"
            raise _error(source, destination, problem)
    port = HBONE_PORT
    if (port_node := _present(fields, "hboneMtlsPort")) is not None:
        port = _construct(source, port_node)
        if not _is_port(port):
            raise _error(source, port_node, f"hboneMtlsPort {port!r} must be an integer 1..65535")
    names = {
        key: _string(source, value, f"waypoint {key}")
        for key in ("name", "namespace")
        if (value := _present(fields, key)) is not None
    }
    allow_only = False
    if (allow_node := _present(fields, "allowOnlyWaypoint")) is not None:
        allow_only = _construct(source, allow_node)
        if not isinstance(allow_only, bool):
            problem = f"allowOnlyWaypoint {allow_only!r} must be true or false"
            raise _error(source, allow_node, problem)
    return Waypoint(address, port, names.get("name", ""), names.get("namespace", ""), allow_only)


def _vips(source: str, node: yaml.Node | None) -> tuple[str, ...]:
    if node is None:
        return ()  # headless: reached by its workloads' addresses only
    if not isinstance(node, yaml.SequenceNode):
        raise _error(source, node, "vips must be a list")
    vips: list[str] = []
    for item in node.value:
        written = _construct(source, item)
        # ztunnel writes "network/ip" ("/10.0.0.1" on the default network). Networks are not
        # modelled, so only the address is kept.
        ip = _ip(written.rpartition("/")[2]) if isinstance(written, str) else None
        if ip is None:
            raise _error(
                source, item, f"{written!r} in vips is not an IP address (ip or network/ip)"
            )
        vips.append(ip)
    return tuple(vips)


def _ports(source: str, node: yaml.Node | None) -> dict[int, int]:
    if node is None:
        return {}
    if not isinstance(node, yaml.MappingNode):
        raise _error(source, node, "ports must be a mapping of service port to target port")
    ports: dict[int, int] = {}
    for port_node, target_node in node.value:
        port, target = _construct(source, port_node), _construct(source, target_node)
        if not _is_port(port):
            raise _error(source, port_node, f"service port {port!r} must be an integer 1..65535")
        if not _is_port(target):
            raise _error(source, target_node, f"target port {target!r} must be an integer 1..65535")
        if port in ports:
            # YAML would silently keep the last one; a repeated port is a mistake.
            raise _error(source, port_node, f"duplicate service port {port}")
        ports[port] = target
    return ports


def _is_port(value: object) -> bool:
    # bool is an int subclass, and `80: yes` is not a port.
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 65535


def _policy(node: yaml.Node, source: str) -> Policy | WaypointPolicy:
    """Parsed here, once, in either shape (local or Kubernetes); a policy with targetRefs is
    a waypoint's (L7), any other the node agents' (L4)."""
    if not isinstance(node, yaml.MappingNode):
        raise _error(source, node, "a policy must be a mapping")
    policy: dict[str, Any] = _construct(source, node)
    try:
        if attaches_to_waypoint(policy):
            return parse_waypoint_policy(policy)
        return parse_policy(policy)
    except PolicyError as exc:
        raise _error(source, node, f"policy {exc}") from None


def _route(node: yaml.Node, source: str) -> HttpRoute:
    if not isinstance(node, yaml.MappingNode):
        raise _error(source, node, "an HTTPRoute must be a mapping")
    try:
        return parse_http_route(_construct(source, node))
    except RouteError as exc:
        raise _error(source, node, f"HTTPRoute {exc}") from None
