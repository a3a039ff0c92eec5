"""Lab topology: the nodes, pods, services and waypoints of a local cluster, read from YAML
and validated. It also carries the Kubernetes documents the mesh config passes on as they are
(Gateway API HTTPRoutes, Istio AuthorizationPolicies): the agent validates those.

Files hold no addresses. They follow from the order of nodes, pods, services and waypoints, so
a topology always gives the same addresses:

- node i (0-based, file order) is ``node_network[10 + i]``;
- a node's gateway, seen by its pods, is ``pod_cidr[1]``;
- the pods of a node, in file order, are ``pod_cidr[2]``, ``pod_cidr[3]``, ...
- the cluster DNS address (the pods' nameserver, answered by the agents) is
  ``service_network[10]``; a service without a ``vip`` takes the next free address from
  ``service_network[20]`` on, in file order, and then each waypoint's Service, in file order.

``Topology.node_ip``, ``Topology.gateway``, ``Topology.pod_ip``, ``Topology.dns_ip`` and
``Topology.service_vip`` (``Topology.waypoint_vip``) compute them. The format is described
in docs/lab.md.
"""

from __future__ import annotations

import difflib
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass, field
from importlib import resources
from ipaddress import AddressValueError, IPv4Address, IPv4Network, NetmaskValueError
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import yaml

NODE_HOST_OFFSET = 10
"""Node i takes node_network[NODE_HOST_OFFSET + i]; the addresses below stay free for routers
or test hosts that a lab may add later."""

FIRST_POD_HOST = 2
"""Address 1 of a pod CIDR is the node's gateway; pods start at 2."""

DNS_HOST = 10
"""The cluster DNS address is service_network[DNS_HOST], as kube-dns's is by convention."""

FIRST_VIP_HOST = 20
"""Services without a written VIP take addresses from service_network[FIRST_VIP_HOST] on."""

WAYPOINT_FOR = ("service", "workload", "all", "none")
"""The values of a waypoint's ``for`` (Istio's istio.io/waypoint-for); ``service`` is the
default."""

WAYPOINT_PORT = 15008
"""The HBONE port of a waypoint, and the only port of its Service."""

DEFAULT_TOPOLOGY_FILE = "default-topology.yaml"
DEFAULT_NAMESPACE = "default"
DEFAULT_SERVICE_NETWORK = IPv4Network("10.96.0.0/16")
CLUSTER_DOMAIN = "cluster.local"

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(rf"{_DNS_LABEL.pattern}(\.{_DNS_LABEL.pattern})*")
_LABEL_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")

_STR_TAG = "tag:yaml.org,2002:str"
_BOOL_TAG = "tag:yaml.org,2002:bool"
_NULL_TAG = "tag:yaml.org,2002:null"
_INT_TAG = "tag:yaml.org,2002:int"

_T = TypeVar("_T")

Location = tuple[str | int, ...]
"""Where a value sits in the document, e.g. ("pods", 3, "node"): used to find its line."""


class TopologyError(ValueError):
    """A topology that cannot be read or is inconsistent; str() gives "source:line: problem"."""

    def __init__(
        self,
        problem: str,
        *,
        path: Location = (),
        source: str | None = None,
        line: int | None = None,
    ) -> None:
        self.problem = problem
        self.path = path
        self.source = source
        self.line = line
        super().__init__(self._render())

    def _render(self) -> str:
        where = ":".join(str(part) for part in (self.source, self.line) if part is not None)
        return f"{where}: {self.problem}" if where else self.problem

    def located(self, source: str, line: int | None) -> TopologyError:
        return TopologyError(self.problem, path=self.path, source=source, line=line)


@dataclass(frozen=True, slots=True)
class NodeSpec:
    name: str
    pod_cidr: IPv4Network

    @property
    def gateway(self) -> IPv4Address:
        return self.pod_cidr[1]

    @property
    def pod_capacity(self) -> int:
        """How many pods fit: the CIDR minus network, gateway and broadcast addresses."""
        return max(self.pod_cidr.num_addresses - 3, 0)


@dataclass(frozen=True, slots=True)
class PodSpec:
    name: str
    namespace: str
    node: str
    service_account: str
    ambient: bool = True
    labels: tuple[tuple[str, str], ...] = ()
    """Sorted (key, value) pairs: a tuple keeps the spec hashable; see ``label_map``."""

    def __post_init__(self) -> None:
        # Labels are a set of pairs: the order they were written in must not affect equality.
        object.__setattr__(self, "labels", tuple(sorted(self.labels)))

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def label_map(self) -> dict[str, str]:
        return dict(self.labels)


@dataclass(frozen=True, slots=True)
class ServicePortSpec:
    port: int
    target_port: int
    app_protocol: str = ""  # Kubernetes' appProtocol (http, kubernetes.io/h2c, ...); "": none


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    """A Service: the pods of its namespace whose labels match every selector pair back it."""

    name: str
    namespace: str
    ports: tuple[ServicePortSpec, ...]
    selector: tuple[tuple[str, str], ...]
    vip: IPv4Address | None = None  # None: allocated (see the module docstring)
    labels: tuple[tuple[str, str], ...] = ()
    """The Service's own labels (istio.io/use-waypoint), sorted pairs as PodSpec.labels."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "selector", tuple(sorted(self.selector)))
        object.__setattr__(self, "labels", tuple(sorted(self.labels)))

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def hostname(self) -> str:
        return f"{self.name}.{self.namespace}.svc.{CLUSTER_DOMAIN}"

    @property
    def label_map(self) -> dict[str, str]:
        return dict(self.labels)

    def selects(self, pod: PodSpec) -> bool:
        labels = pod.label_map
        return (
            bool(self.selector)
            and pod.namespace == self.namespace
            and all(labels.get(key) == value for key, value in self.selector)
        )


@dataclass(frozen=True, slots=True)
class WaypointSpec:
    """A waypoint Gateway (gatewayClassName istio-waypoint) run by one pod of its namespace.

    Its Service, ``<name>.<namespace>.svc.cluster.local`` port 15008 backed by that pod, takes
    a VIP after the services'. Everything but ``name`` is keyword-only.
    """

    name: str
    _: KW_ONLY
    pod: str
    """The pod, in the same namespace, that runs the waypoint; it must be out of the mesh."""
    namespace: str = DEFAULT_NAMESPACE
    for_: str = "service"
    """Which traffic it takes (topology key ``for``): one of WAYPOINT_FOR."""
    annotations: tuple[tuple[str, str], ...] = ()
    """The Gateway's annotations, sorted pairs, passed on to the waypoint."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "annotations", tuple(sorted(self.annotations)))

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def hostname(self) -> str:
        return f"{self.name}.{self.namespace}.svc.{CLUSTER_DOMAIN}"

    @property
    def annotation_map(self) -> dict[str, str]:
        return dict(self.annotations)

    @property
    def takes_services(self) -> bool:
        return self.for_ in ("service", "all")

    @property
    def takes_workloads(self) -> bool:
        return self.for_ in ("workload", "all")


@dataclass(frozen=True, slots=True)
class Topology:
    """A validated cluster: constructing one with inconsistent parts raises TopologyError."""

    name: str
    node_network: IPv4Network
    nodes: tuple[NodeSpec, ...]
    pods: tuple[PodSpec, ...]
    services: tuple[ServiceSpec, ...] = ()
    service_network: IPv4Network = DEFAULT_SERVICE_NETWORK
    waypoints: tuple[WaypointSpec, ...] = ()
    # Kubernetes documents, as written: checked by the agent when it loads the mesh config.
    # Not hashed (dicts are not hashable); compared like every other field.
    http_routes: tuple[dict[str, Any], ...] = field(default=(), hash=False)
    policies: tuple[dict[str, Any], ...] = field(default=(), hash=False)

    def __post_init__(self) -> None:
        _check_topology(self)

    @property
    def dns_ip(self) -> IPv4Address:
        return self.service_network[DNS_HOST]

    def service_vips(self) -> dict[str, IPv4Address]:
        """Every service's VIP by key: written ones, then allocated ones in file order, then
        each waypoint's Service's (keyed by the waypoint's namespace/name) in file order."""
        taken = {s.vip for s in self.services if s.vip is not None}
        candidates = (
            self.service_network[i]
            for i in range(FIRST_VIP_HOST, self.service_network.num_addresses - 1)
        )
        free = (address for address in candidates if address not in taken)
        vips = {s.key: s.vip if s.vip is not None else next(free) for s in self.services}
        vips.update((w.key, next(free)) for w in self.waypoints)
        return vips

    def service_vip(self, namespace: str, name: str) -> IPv4Address:
        return self.service_vips()[f"{namespace}/{name}"]

    def waypoint_vip(self, namespace: str, name: str) -> IPv4Address:
        """The VIP of the waypoint's Service."""
        self.waypoint(namespace, name)  # a KeyError that says "no waypoint"
        return self.service_vips()[f"{namespace}/{name}"]

    def waypoint(self, namespace: str, name: str) -> WaypointSpec:
        for waypoint in self.waypoints:
            if (waypoint.namespace, waypoint.name) == (namespace, name):
                return waypoint
        raise KeyError(f"no waypoint {namespace}/{name} in topology {self.name!r}")

    def waypoint_of_pod(self, namespace: str, name: str) -> WaypointSpec | None:
        """The waypoint the pod runs, if any."""
        return next((w for w in self.waypoints if (w.namespace, w.pod) == (namespace, name)), None)

    def node(self, name: str) -> NodeSpec:
        return self.nodes[self.node_index(name)]

    def node_index(self, name: str) -> int:
        for index, node in enumerate(self.nodes):
            if node.name == name:
                return index
        raise KeyError(f"no node {name!r} in topology {self.name!r}")

    def pod(self, namespace: str, name: str) -> PodSpec:
        for pod in self.pods:
            if (pod.namespace, pod.name) == (namespace, name):
                return pod
        raise KeyError(f"no pod {namespace}/{name} in topology {self.name!r}")

    def pods_on(self, node_name: str) -> tuple[PodSpec, ...]:
        return tuple(pod for pod in self.pods if pod.node == node_name)

    def node_ip(self, node_name: str) -> IPv4Address:
        return self.node_network[NODE_HOST_OFFSET + self.node_index(node_name)]

    def gateway(self, node_name: str) -> IPv4Address:
        return self.node(node_name).gateway

    def pod_ip(self, namespace: str, name: str) -> IPv4Address:
        pod = self.pod(namespace, name)
        position = self.pods_on(pod.node).index(pod)
        return self.node(pod.node).pod_cidr[FIRST_POD_HOST + position]

    def to_yaml(self) -> str:
        """The topology in its file format with every default written out; parses back equal."""
        document = {
            "name": self.name,
            "nodeNetwork": str(self.node_network),
            "nodes": [{"name": n.name, "podCidr": str(n.pod_cidr)} for n in self.nodes],
            "pods": [_pod_document(pod) for pod in self.pods],
            "serviceNetwork": str(self.service_network),
            "services": [_service_document(service) for service in self.services],
            "waypoints": [_waypoint_document(waypoint) for waypoint in self.waypoints],
            "httpRoutes": list(self.http_routes),
            "policies": list(self.policies),
        }
        return yaml.safe_dump(document, sort_keys=False, default_flow_style=False)


def _service_document(service: ServiceSpec) -> dict[str, object]:
    document: dict[str, object] = {
        "name": service.name,
        "namespace": service.namespace,
        "ports": [_port_document(port) for port in service.ports],
        "selector": dict(service.selector),
    }
    if service.vip is not None:
        document["vip"] = str(service.vip)
    if service.labels:
        document["labels"] = service.label_map
    return document


def _port_document(port: ServicePortSpec) -> dict[str, object]:
    document: dict[str, object] = {"port": port.port, "targetPort": port.target_port}
    if port.app_protocol:
        document["appProtocol"] = port.app_protocol
    return document


def _waypoint_document(waypoint: WaypointSpec) -> dict[str, object]:
    document: dict[str, object] = {
        "name": waypoint.name,
        "namespace": waypoint.namespace,
        "pod": waypoint.pod,
        "for": waypoint.for_,
    }
    if waypoint.annotations:
        document["annotations"] = waypoint.annotation_map
    return document


def _pod_document(pod: PodSpec) -> dict[str, object]:
    document: dict[str, object] = {
        "name": pod.name,
        "namespace": pod.namespace,
        "node": pod.node,
        "serviceAccount": pod.service_account,
        "ambient": pod.ambient,
    }
    if pod.labels:
        document["labels"] = pod.label_map
    return document


def load_topology(path: Path) -> Topology:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TopologyError(f"cannot read the topology: {exc}", source=str(path)) from exc
    return parse_topology(text, str(path))


def default_topology() -> Topology:
    resource = resources.files("lab").joinpath(DEFAULT_TOPOLOGY_FILE)
    return parse_topology(resource.read_text(encoding="utf-8"), f"lab/{DEFAULT_TOPOLOGY_FILE}")


def parse_topology(text: str, source: str = "<string>") -> Topology:
    """Parse and validate; errors name ``source`` and the line of the offending value."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark is not None else None
        problem = ", ".join(part for part in (exc.context, exc.problem) if part) or "syntax error"
        raise TopologyError(f"invalid YAML: {problem}", source=source, line=line) from exc
    except yaml.YAMLError as exc:
        raise TopologyError(f"invalid YAML: {exc}", source=source) from exc
    if root is None:
        raise TopologyError("empty document: expected nodeNetwork, nodes and pods", source=source)
    reader = _Reader(source)
    try:
        return reader.topology(root)
    except TopologyError as exc:
        if exc.source is not None:
            raise
        raise exc.located(source, _line_of(root, exc.path)) from None


def _default_name(source: str) -> str:
    stem = Path(source).stem
    return stem if _is_dns_label(stem) else "topology"


class _Reader:
    """Turns the YAML node tree into specs, failing at the line of the first bad value.

    Working on nodes rather than on ``yaml.safe_load`` output keeps every value's line.
    """

    def __init__(self, source: str) -> None:
        self.source = source

    def topology(self, root: yaml.Node) -> Topology:
        optional = {
            "name", "pods", "services", "serviceNetwork", "waypoints", "httpRoutes", "policies",
        }  # fmt: skip
        fields = self.mapping(root, "the document", {"nodeNetwork", "nodes"}, optional)
        name = self.string(fields["name"], "name") if "name" in fields else None

        def each(key: str, parse: Callable[[yaml.Node, str], _T]) -> tuple[_T, ...]:
            found = self.sequence(fields[key], key) if key in fields else []
            return tuple(parse(item, f"{key}[{i}]") for i, item in enumerate(found))

        service_network = DEFAULT_SERVICE_NETWORK
        if "serviceNetwork" in fields:
            service_network = self.network(fields["serviceNetwork"], "serviceNetwork")
        return Topology(
            name=name if name is not None else _default_name(self.source),
            node_network=self.network(fields["nodeNetwork"], "nodeNetwork"),
            nodes=each("nodes", self.node),
            pods=each("pods", self.pod),
            services=each("services", self.service),
            service_network=service_network,
            waypoints=each("waypoints", self.waypoint),
            http_routes=each("httpRoutes", self.document),
            policies=each("policies", self.document),
        )

    def service(self, item: yaml.Node, what: str) -> ServiceSpec:
        optional = {"namespace", "vip", "labels"}
        fields = self.mapping(item, what, {"name", "ports", "selector"}, optional)
        ports = []
        for i, port_item in enumerate(self.sequence(fields["ports"], f"{what}.ports")):
            where = f"{what}.ports[{i}]"
            port_fields = self.mapping(port_item, where, {"port"}, {"targetPort", "appProtocol"})
            port = self.port(port_fields["port"], f"{where}.port")
            target = port_fields.get("targetPort")
            ports.append(
                ServicePortSpec(
                    port,
                    port if target is None else self.port(target, f"{where}.targetPort"),
                    self.optional_string(port_fields, "appProtocol", where, ""),
                )
            )
        vip = None
        if "vip" in fields:
            text = self.string(fields["vip"], f"{what}.vip")
            try:
                vip = IPv4Address(text)
            except AddressValueError:
                self.fail(fields["vip"], f"{what}.vip: {text!r} is not an IPv4 address")
        return ServiceSpec(
            name=self.string(fields["name"], f"{what}.name"),
            namespace=self.optional_string(fields, "namespace", what, DEFAULT_NAMESPACE),
            ports=tuple(ports),
            selector=self.labels(fields["selector"], f"{what}.selector"),
            vip=vip,
            labels=self.labels(fields["labels"], f"{what}.labels") if "labels" in fields else (),
        )

    def waypoint(self, item: yaml.Node, what: str) -> WaypointSpec:
        fields = self.mapping(item, what, {"name", "pod"}, {"namespace", "for", "annotations"})
        annotations = fields.get("annotations")
        return WaypointSpec(
            self.string(fields["name"], f"{what}.name"),
            pod=self.string(fields["pod"], f"{what}.pod"),
            namespace=self.optional_string(fields, "namespace", what, DEFAULT_NAMESPACE),
            for_=self.optional_string(fields, "for", what, "service"),
            annotations=(
                () if annotations is None else self.labels(annotations, f"{what}.annotations")
            ),
        )

    def document(self, node: yaml.Node, what: str) -> dict[str, Any]:
        """A Kubernetes document kept as written; only its shape (a mapping without duplicate
        keys) is checked here."""
        if not isinstance(node, yaml.MappingNode):
            self.fail(node, f"{what} must be a mapping, not {_kind(node)}")
        self.no_duplicate_keys(node, what, set())
        try:
            value = yaml.SafeLoader("").construct_document(node)
        except (yaml.YAMLError, ValueError) as exc:
            mark = getattr(exc, "problem_mark", None) or node.start_mark
            problem = getattr(exc, "problem", None) or str(exc)
            line = mark.line + 1
            raise TopologyError(f"{what}: {problem}", source=self.source, line=line) from exc
        assert isinstance(value, dict)
        return value

    def no_duplicate_keys(self, node: yaml.Node, what: str, visited: set[int]) -> None:
        # YAML would keep the last value of a repeated key, silently. `visited`: an alias
        # repeats a node, and may even point back at its ancestor.
        if id(node) in visited:
            return
        visited.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            for child in node.value:
                self.no_duplicate_keys(child, what, visited)
        elif isinstance(node, yaml.MappingNode):
            seen: set[tuple[str, str]] = set()
            for key_node, value_node in node.value:
                if isinstance(key_node, yaml.ScalarNode):
                    if (key_node.tag, key_node.value) in seen:
                        self.fail(key_node, f"{what}: duplicate key {key_node.value!r}")
                    seen.add((key_node.tag, key_node.value))
                self.no_duplicate_keys(key_node, what, visited)
                self.no_duplicate_keys(value_node, what, visited)

    def port(self, node: yaml.Node, what: str) -> int:
        # Decimal only: YAML 1.1 also reads 0x50, 0b1010000 and 1:20 as ints, and 010 as 8.
        if isinstance(node, yaml.ScalarNode) and node.tag == _INT_TAG and node.value.isdecimal():
            value = int(node.value)
            if 1 <= value <= 65535 and not (len(node.value) > 1 and node.value[0] == "0"):
                return value
        self.fail(node, f"{what} must be a port number 1..65535, not {_kind(node)}")

    def node(self, item: yaml.Node, what: str) -> NodeSpec:
        fields = self.mapping(item, what, {"name", "podCidr"}, set())
        return NodeSpec(
            name=self.string(fields["name"], f"{what}.name"),
            pod_cidr=self.network(fields["podCidr"], f"{what}.podCidr"),
        )

    def pod(self, item: yaml.Node, what: str) -> PodSpec:
        optional = {"namespace", "serviceAccount", "ambient", "labels"}
        fields = self.mapping(item, what, {"name", "node"}, optional)
        name = self.string(fields["name"], f"{what}.name")
        ambient = fields.get("ambient")
        labels = fields.get("labels")
        return PodSpec(
            name=name,
            namespace=self.optional_string(fields, "namespace", what, DEFAULT_NAMESPACE),
            node=self.string(fields["node"], f"{what}.node"),
            service_account=self.optional_string(fields, "serviceAccount", what, name),
            ambient=True if ambient is None else self.boolean(ambient, f"{what}.ambient"),
            labels=() if labels is None else self.labels(labels, f"{what}.labels"),
        )

    def labels(self, node: yaml.Node, what: str) -> tuple[tuple[str, str], ...]:
        if _is_null(node):
            return ()
        pairs = self.pairs(node, what)
        return tuple(
            (key, self.string(value, f"{what}.{key}")) for key, (_, value) in pairs.items()
        )

    def mapping(
        self, node: yaml.Node, what: str, required: set[str], optional: set[str]
    ) -> dict[str, yaml.Node]:
        pairs = self.pairs(node, what)
        allowed = required | optional
        for key, (key_node, _) in pairs.items():
            if key not in allowed:
                self.fail(key_node, f"{what}: unknown key {key!r}{_suggest(key, allowed)}")
        for key in sorted(required - pairs.keys()):
            self.fail(node, f"{what}: missing required key {key!r}")
        return {key: value for key, (_, value) in pairs.items()}

    def pairs(self, node: yaml.Node, what: str) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        if not isinstance(node, yaml.MappingNode):
            self.fail(node, f"{what} must be a mapping, not {_kind(node)}")
        pairs: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for key_node, value_node in node.value:
            key = self.string(key_node, f"a key of {what}")
            if key in pairs:
                self.fail(key_node, f"{what}: duplicate key {key!r}")
            pairs[key] = (key_node, value_node)
        return pairs

    def sequence(self, node: yaml.Node, what: str) -> list[yaml.Node]:
        if _is_null(node):
            return []
        if not isinstance(node, yaml.SequenceNode):
            self.fail(node, f"{what} must be a list, not {_kind(node)}")
        return list(node.value)

    def string(self, node: yaml.Node, what: str) -> str:
        if isinstance(node, yaml.ScalarNode) and node.tag == _STR_TAG:
            return str(node.value)
        hint = f" (quote it: '{node.value}')" if isinstance(node, yaml.ScalarNode) else ""
        self.fail(node, f"{what} must be a string, not {_kind(node)}{hint}")

    def optional_string(
        self, fields: dict[str, yaml.Node], key: str, what: str, default: str
    ) -> str:
        node = fields.get(key)
        return default if node is None else self.string(node, f"{what}.{key}")

    def boolean(self, node: yaml.Node, what: str) -> bool:
        if isinstance(node, yaml.ScalarNode) and node.tag == _BOOL_TAG:
            return yaml.constructor.SafeConstructor.bool_values[str(node.value).lower()]
        self.fail(node, f"{what} must be true or false, not {_kind(node)}")

    def network(self, node: yaml.Node, what: str) -> IPv4Network:
        text = self.string(node, what)
        if "/" not in text:
            self.fail(node, f"{what}: {text!r} is not a CIDR: write it as a.b.c.d/prefix")
        try:
            return IPv4Network(text)
        except (AddressValueError, NetmaskValueError) as exc:
            self.fail(node, f"{what}: {text!r} is not an IPv4 CIDR: {exc}")
        except ValueError:
            fixed = IPv4Network(text, strict=False)
            self.fail(node, f"{what}: {text!r} has host bits set; did you mean {fixed}?")

    def fail(self, node: yaml.Node, problem: str) -> NoReturn:
        raise TopologyError(problem, source=self.source, line=node.start_mark.line + 1)


def _kind(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    if _is_null(node):
        return "empty"
    return f"{node.tag.rsplit(':', 1)[-1]} {node.value!r}"


def _is_null(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag == _NULL_TAG


def _suggest(key: str, allowed: set[str]) -> str:
    # Compared in lower case so that a wrong capital (podCIDR) still finds its key.
    by_lower = {name.lower(): name for name in allowed}
    close = difflib.get_close_matches(key.lower(), sorted(by_lower), n=1)
    if close:
        return f"; did you mean {by_lower[close[0]]!r}?"
    return f"; expected one of: {', '.join(sorted(allowed))}"


def _line_of(root: yaml.Node, path: Location) -> int:
    """The line of the value at ``path``, or of its nearest ancestor present in the file
    (a defaulted key such as serviceAccount has no line of its own)."""
    node = root
    for step in path:
        child = _child(node, step)
        if child is None:
            break
        node = child
    return int(node.start_mark.line) + 1


def _child(node: yaml.Node, step: str | int) -> yaml.Node | None:
    if isinstance(step, str) and isinstance(node, yaml.MappingNode):
        return next((value for key, value in node.value if key.value == step), None)
    if isinstance(step, int) and isinstance(node, yaml.SequenceNode) and step < len(node.value):
        child: yaml.Node = node.value[step]
        return child
    return None


def _is_dns_label(text: str) -> bool:
    return len(text) <= 63 and _DNS_LABEL.fullmatch(text) is not None


def _check_dns_label(text: str, what: str, path: Location) -> None:
    if not _is_dns_label(text):
        raise TopologyError(
            f"{what} {text!r} is not a DNS-1123 label "
            "(at most 63 lowercase letters, digits and '-', starting and ending alphanumeric)",
            path=path,
        )


def _check_topology(topology: Topology) -> None:
    _check_dns_label(topology.name, "name", ("name",))
    if not topology.nodes:
        raise TopologyError("nodes: the topology needs at least one node", path=("nodes",))
    _check_nodes(topology)
    _check_pods(topology)
    _check_services(topology)
    _check_waypoints(topology)


def _check_nodes(topology: Topology) -> None:
    capacity = max(topology.node_network.num_addresses - 2 - NODE_HOST_OFFSET, 0)
    seen: dict[str, int] = {}
    for index, node in enumerate(topology.nodes):
        what = f"nodes[{index}] ({node.name})"
        _check_dns_label(node.name, f"{what}: node name", ("nodes", index, "name"))
        if node.name in seen:
            raise TopologyError(
                f"{what}: duplicate node name (also nodes[{seen[node.name]}])",
                path=("nodes", index, "name"),
            )
        seen[node.name] = index
        if index >= capacity:
            raise TopologyError(
                f"{what}: nodeNetwork {topology.node_network} holds {capacity} node(s) "
                f"(nodes take host addresses from .{NODE_HOST_OFFSET} up); use a larger network",
                path=("nodes", index),
            )
        _check_pod_cidr(topology, index)


def _check_pod_cidr(topology: Topology, index: int) -> None:
    node = topology.nodes[index]
    what = f"nodes[{index}] ({node.name})"
    path: Location = ("nodes", index, "podCidr")
    if node.pod_capacity < 1:
        raise TopologyError(
            f"{what}: podCidr {node.pod_cidr} is too small: it needs a gateway and a pod (/30 "
            "or larger)",
            path=path,
        )
    if node.pod_cidr.overlaps(topology.node_network):
        raise TopologyError(
            f"{what}: podCidr {node.pod_cidr} overlaps nodeNetwork {topology.node_network}",
            path=path,
        )
    for other_index, other in enumerate(topology.nodes[:index]):
        if node.pod_cidr.overlaps(other.pod_cidr):
            raise TopologyError(
                f"{what}: podCidr {node.pod_cidr} overlaps podCidr {other.pod_cidr} of "
                f"nodes[{other_index}] ({other.name})",
                path=path,
            )


def _check_pods(topology: Topology) -> None:
    node_names = [node.name for node in topology.nodes]
    seen: dict[tuple[str, str], int] = {}
    per_node: Counter[str] = Counter()
    for index, pod in enumerate(topology.pods):
        what = f"pods[{index}] ({pod.key})"
        _check_dns_label(pod.name, f"{what}: pod name", ("pods", index, "name"))
        _check_dns_label(pod.namespace, f"{what}: namespace", ("pods", index, "namespace"))
        _check_service_account(pod, what, ("pods", index, "serviceAccount"))
        _check_labels(pod.labels, what, ("pods", index, "labels"))
        if (pod.namespace, pod.name) in seen:
            raise TopologyError(
                f"{what}: duplicate pod (also pods[{seen[pod.namespace, pod.name]}])",
                path=("pods", index, "name"),
            )
        seen[pod.namespace, pod.name] = index
        if pod.node not in node_names:
            raise TopologyError(
                f"{what}: unknown node {pod.node!r}; nodes are: {', '.join(node_names)}",
                path=("pods", index, "node"),
            )
        per_node[pod.node] += 1
        node = topology.node(pod.node)
        if per_node[pod.node] > node.pod_capacity:
            raise TopologyError(
                f"{what}: node {node.name} is full: its podCidr {node.pod_cidr} holds "
                f"{node.pod_capacity} pod(s) (.1 is the gateway)",
                path=("pods", index, "node"),
            )


def _check_service_account(pod: PodSpec, what: str, path: Location) -> None:
    account = pod.service_account
    if len(account) > 253 or _DNS_SUBDOMAIN.fullmatch(account) is None:
        raise TopologyError(
            f"{what}: serviceAccount {account!r} is not a DNS-1123 subdomain "
            "(lowercase letters, digits, '-' and '.', at most 253)",
            path=path,
        )


def _is_qualified_name(text: str) -> bool:
    """A Kubernetes qualified name: [DNS-subdomain prefix/]name, as label keys are."""
    prefix, _, name = text.rpartition("/")
    bad_prefix = bool(prefix) and (len(prefix) > 253 or not _DNS_SUBDOMAIN.fullmatch(prefix))
    return not bad_prefix and len(name) <= 63 and _LABEL_NAME.fullmatch(name) is not None


def _check_labels(labels: tuple[tuple[str, str], ...], what: str, path: Location) -> None:
    for key, value in labels:
        if not _is_qualified_name(key):
            raise TopologyError(f"{what}: invalid label key {key!r}", path=(*path, key))
        if len(value) > 63 or (value and not _LABEL_NAME.fullmatch(value)):
            raise TopologyError(
                f"{what}: invalid value {value!r} of label {key!r} (at most 63 letters, digits, "
                "'-', '_' and '.', starting and ending alphanumeric)",
                path=(*path, key),
            )


def _check_services(topology: Topology) -> None:
    network = topology.service_network
    others = [(topology.node_network, "nodeNetwork")]
    others += [(node.pod_cidr, f"the podCidr of {node.name}") for node in topology.nodes]
    for other, what in others:
        if network.overlaps(other):
            raise TopologyError(
                f"serviceNetwork {network} overlaps {what} {other}", path=("serviceNetwork",)
            )
    if (
        network.num_addresses
        < FIRST_VIP_HOST + len(topology.services) + len(topology.waypoints) + 1
    ):
        waypoints = f" and {len(topology.waypoints)} waypoint(s)" if topology.waypoints else ""
        raise TopologyError(
            f"serviceNetwork {network} is too small for {len(topology.services)} service(s)"
            f"{waypoints}",
            path=("serviceNetwork",),
        )
    seen: dict[str, int] = {}
    vips: dict[IPv4Address, int] = {}
    for index, service in enumerate(topology.services):
        what = f"services[{index}] ({service.key})"
        _check_dns_label(service.name, f"{what}: service name", ("services", index, "name"))
        _check_dns_label(service.namespace, f"{what}: namespace", ("services", index, "namespace"))
        if service.key in seen:
            raise TopologyError(
                f"{what}: duplicate service (also services[{seen[service.key]}])",
                path=("services", index, "name"),
            )
        seen[service.key] = index
        if not service.ports:
            raise TopologyError(
                f"{what}: a service needs a port", path=("services", index, "ports")
            )
        ports = [p.port for p in service.ports]
        if len(set(ports)) != len(ports):
            raise TopologyError(f"{what}: duplicate port", path=("services", index, "ports"))
        _check_labels(service.labels, what, ("services", index, "labels"))
        for port_index, port in enumerate(service.ports):
            if port.app_protocol and not _is_qualified_name(port.app_protocol):
                raise TopologyError(
                    f"{what}: appProtocol {port.app_protocol!r} of port {port.port} is not a "
                    "protocol name (such as http, or a prefixed one: kubernetes.io/h2c)",
                    path=("services", index, "ports", port_index, "appProtocol"),
                )
        if service.vip is None:
            continue
        path: Location = ("services", index, "vip")
        if service.vip not in network or service.vip in (
            network.network_address,
            network.broadcast_address,
            topology.dns_ip,
        ):
            raise TopologyError(
                f"{what}: vip {service.vip} must be a host of serviceNetwork {network} other "
                f"than the DNS address {topology.dns_ip}",
                path=path,
            )
        if service.vip in vips:
            raise TopologyError(
                f"{what}: vip {service.vip} is also services[{vips[service.vip]}]'s", path=path
            )
        vips[service.vip] = index


def _check_waypoints(topology: Topology) -> None:
    services = {service.key: index for index, service in enumerate(topology.services)}
    seen: dict[str, int] = {}
    pods: dict[tuple[str, str], int] = {}
    for index, waypoint in enumerate(topology.waypoints):
        what = f"waypoints[{index}] ({waypoint.key})"
        path: Location = ("waypoints", index)
        _check_dns_label(waypoint.name, f"{what}: waypoint name", (*path, "name"))
        _check_dns_label(waypoint.namespace, f"{what}: namespace", (*path, "namespace"))
        if waypoint.key in seen:
            raise TopologyError(
                f"{what}: duplicate waypoint (also waypoints[{seen[waypoint.key]}])",
                path=(*path, "name"),
            )
        seen[waypoint.key] = index
        if waypoint.key in services:
            raise TopologyError(
                f"{what}: services[{services[waypoint.key]}] has the same namespace and name: "
                "the waypoint's own Service takes that name",
                path=(*path, "name"),
            )
        if waypoint.for_ not in WAYPOINT_FOR:
            raise TopologyError(
                f"{what}: for {waypoint.for_!r} must be one of {', '.join(WAYPOINT_FOR)}",
                path=(*path, "for"),
            )
        for key, _ in waypoint.annotations:
            if not _is_qualified_name(key):
                raise TopologyError(
                    f"{what}: invalid annotation key {key!r}", path=(*path, "annotations", key)
                )
        _check_waypoint_pod(topology, index, pods)


def _check_waypoint_pod(topology: Topology, index: int, pods: dict[tuple[str, str], int]) -> None:
    waypoint = topology.waypoints[index]
    what = f"waypoints[{index}] ({waypoint.key})"
    path: Location = ("waypoints", index, "pod")
    try:
        pod = topology.pod(waypoint.namespace, waypoint.pod)
    except KeyError:
        there = [p.name for p in topology.pods if p.namespace == waypoint.namespace]
        raise TopologyError(
            f"{what}: unknown pod {waypoint.pod!r} in namespace {waypoint.namespace} (a "
            f"waypoint runs in a pod of its own namespace); pods there: "
            f"{', '.join(there) or 'none'}",
            path=path,
        ) from None
    if pod.ambient:
        raise TopologyError(
            f"{what}: pod {pod.key}: a waypoint's pod is never captured: set ambient: false",
            path=path,
        )
    if (pod.namespace, pod.name) in pods:
        raise TopologyError(
            f"{what}: pod {pod.key} already runs waypoints[{pods[pod.namespace, pod.name]}]",
            path=path,
        )
    pods[pod.namespace, pod.name] = index
