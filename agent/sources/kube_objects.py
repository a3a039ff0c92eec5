"""Kubernetes objects -> the mesh state, sans-IO.

`KubeObjects` holds what a Kubernetes source has listed and watched, as plain dicts in the
API's JSON shape (camelCase, as `kubectl get -o json` prints them); `apply` and `replace_all`
take watch events and list results. `mesh_state_from` turns the whole of it into a MeshState.
Nothing here talks to an API server or reads a clock: the I/O shell is
agent/sources/kube_source.py, and tests hand dicts in and look at the state that comes out.

The translation follows istiod's for ztunnel (pilot/pkg/serviceregistry/kube/controller/
ambient: workloads.go, services.go), reduced to what this agent models:

- **Pods** become workloads when they are Running or Pending (a pod whose init containers
  still run already has its address and is already enrolled by the CNI plugin) with at least
  one address, and are not on the host network (their address is the node's, which many pods
  share: none of them may claim it). Finished pods (Succeeded, Failed) and pods of unknown
  phase are left out. A workload is HBONE when `ambient_enrolled` says so (the namespace is
  labelled `istio.io/dataplane-mode=ambient` and the pod did not opt out), else TCP.
- **Workload name**: the pod's controller (the owner marked `controller`, else the first
  owner): a ReplicaSet named `<deployment>-<pod-template-hash>` gives the Deployment's name, a
  Job named `<cronjob>-<8 to 10 digits>` the CronJob's, any other owner its own name (a
  StatefulSet's, a DaemonSet's); a pod without owner is its own workload.
- **Canonical service and revision**: the first of `service.istio.io/canonical-name`,
  `app.kubernetes.io/name`, `app` (else the workload name); the first of
  `service.istio.io/canonical-revision`, `app.kubernetes.io/version`, `version` (else
  "latest").
- **Waypoint**: `istio.io/use-waypoint` on the pod (label, then annotation), else on its
  namespace (label); `none` means none, and `istio.io/use-waypoint-namespace` on the same
  object names the waypoint's namespace (else the pod's). It is recorded only when that
  Gateway exists with class `istio-waypoint`, as istiod does: a label naming no waypoint
  sends traffic nowhere else. Waypoint pods themselves
  (`gateway.istio.io/managed=istio.io-mesh-controller`) never get one.
- **Services** in the pod's namespace whose (non-empty) selector matches the pod's labels:
  "namespace/hostname" -> {service port: target port}. A named targetPort is looked up in the
  pod's container ports; a port the pod does not name is left out for that pod (istiod does
  the same). Only TCP ports: the agent carries TCP only.
- **Services without a selector** get their workloads from EndpointSlices (label
  `kubernetes.io/service-name`): every endpoint address that is the address of a pod workload
  of the service's namespace gets the service (a slice cannot enlist another namespace's
  pods), with the slice's port of the same name as the target port. An endpoint whose
  `conditions.ready` is false backs nothing. An address that is no pod's (the API server
  behind `kubernetes.default`, an external database, a VM) becomes a workload outside the
  mesh (protocol TCP, no node) backing the service, as istiod makes one from the slice: a
  connection to the VIP then goes to it as plain TCP, where it would otherwise be refused
  for want of an endpoint.
- **Health**: a workload is healthy (a service may pick it as an endpoint) when its pod's
  `Ready` condition is True and it is not being deleted, as istiod decides it.
- **Service** -> Service: hostname `<name>.<namespace>.svc.cluster.local`; VIPs
  `spec.clusterIPs` (or `clusterIP`) without "None" (headless services have none); ports
  {port: targetPort}, where a named targetPort is `NAMED_TARGET_PORT`: each backing
  workload's own map says its number, and a pod that does not name the port does not serve
  it (it is never picked for that port), as with Kubernetes' endpoints. ExternalName
  services are left out: there is no address to capture.
- **Namespaces** -> Namespace(name, labels).
- **AuthorizationPolicies** pass through as raw dicts in the `security.istio.io/v1` shape the
  policy parser reads (apiVersion, kind, metadata name/namespace and the dry-run annotation,
  spec). Policies with `targetRef(s)` are left out: they attach to a waypoint or gateway and
  are enforced there, which is how istiod splits them too.
- **Gateways and HTTPRoutes** are kept and counted but not turned into state: waypoints and
  L7 routing come later. Gateways are consulted only to check that a waypoint exists.

Where two pods claim one address (a reused IP while the old pod's status lags), the newest
pod is listed first, so lookups by address find it.
"""

from __future__ import annotations

import copy
import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeGuard

import structlog

from agent.sources.authorization_policy import DRY_RUN_ANNOTATION, PolicyError, parse_policies
from agent.sources.http_route import RouteError, parse_http_route
from agent.sources.waypoint_policy import attaches_to_waypoint, parse_waypoint_policy
from agent.state.namespace import Namespace, ambient_enrolled
from agent.state.policy import Policy
from agent.state.route import HttpRoute
from agent.state.service import NAMED_TARGET_PORT, Service
from agent.state.store import MeshState
from agent.state.waypoint import ALLOW_ONLY_WAYPOINT, HBONE_PORT, Waypoint, WaypointFor
from agent.state.waypoint_only import allow_only_waypoint_policies
from agent.state.waypoint_policy import WaypointPolicy
from agent.state.workload import Protocol, Workload

log = structlog.get_logger("agent.kubernetes")

# One object as the API returns it in JSON (a dict, camelCase keys).
KubeObject = Mapping[str, Any]

CLUSTER_DOMAIN = "cluster.local"
USE_WAYPOINT = "istio.io/use-waypoint"
USE_WAYPOINT_NAMESPACE = "istio.io/use-waypoint-namespace"
WAYPOINT_FOR_LABEL = "istio.io/waypoint-for"  # on the Gateway
WAYPOINT_GATEWAY_CLASS = "istio-waypoint"
MANAGED_GATEWAY_LABEL = "gateway.istio.io/managed"
MESH_CONTROLLER = "istio.io-mesh-controller"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"  # on an EndpointSlice: whose it is
POD_TEMPLATE_HASH_LABEL = "pod-template-hash"
AUTHORIZATION_POLICY_API_VERSION = "security.istio.io/v1"
HTTP_ROUTE_API_VERSION = "gateway.networking.k8s.io/v1"

CANONICAL_NAME_LABELS = ("service.istio.io/canonical-name", "app.kubernetes.io/name", "app")
CANONICAL_REVISION_LABELS = (
    "service.istio.io/canonical-revision",
    "app.kubernetes.io/version",
    "version",
)
DEFAULT_REVISION = "latest"

# What the CronJob controller names its Jobs: the CronJob's name and the scheduled minute.
_CRONJOB_JOB_NAME = re.compile(r"(.+)-\d{8,10}")
_LIVE_PHASES = ("Running", "Pending")
# Large and never read: not worth keeping for every object of the cluster.
_LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"


class Kind(StrEnum):
    """The resources a Kubernetes source follows, by their REST plural."""

    PODS = "pods"
    NAMESPACES = "namespaces"
    SERVICES = "services"
    ENDPOINT_SLICES = "endpointslices"
    AUTHORIZATION_POLICIES = "authorizationpolicies"
    GATEWAYS = "gateways"
    HTTP_ROUTES = "httproutes"


class WatchEventType(StrEnum):
    ADDED = "ADDED"
    MODIFIED = "MODIFIED"
    DELETED = "DELETED"
    BOOKMARK = "BOOKMARK"  # only a newer resourceVersion: no object changed
    ERROR = "ERROR"


def object_key(obj: KubeObject) -> str:
    """The object's "namespace/name", or the bare name of a cluster-scoped object (a Namespace)."""
    metadata = _mapping(obj.get("metadata"))
    name, namespace = _text(metadata.get("name")), _text(metadata.get("namespace"))
    return f"{namespace}/{name}" if namespace else name


def resource_version(obj: KubeObject) -> str | None:
    return _text(_mapping(obj.get("metadata")).get("resourceVersion")) or None


@dataclass(slots=True)
class KubeObjects:
    """The current objects of each kind, keyed by `object_key`. Not thread-safe: a source
    that applies events from several threads guards it with one lock."""

    pods: dict[str, KubeObject] = field(default_factory=dict)
    namespaces: dict[str, KubeObject] = field(default_factory=dict)
    services: dict[str, KubeObject] = field(default_factory=dict)
    endpoint_slices: dict[str, KubeObject] = field(default_factory=dict)
    authorization_policies: dict[str, KubeObject] = field(default_factory=dict)
    gateways: dict[str, KubeObject] = field(default_factory=dict)
    http_routes: dict[str, KubeObject] = field(default_factory=dict)

    def of(self, kind: Kind) -> dict[str, KubeObject]:
        objects: dict[str, KubeObject] = getattr(self, _ATTRIBUTE_OF[kind])
        return objects

    def replace_all(self, kind: Kind, items: Iterable[KubeObject]) -> bool:
        """A list result: these are now all the objects of `kind`. True if anything changed."""
        fresh = {object_key(item): _trimmed(item) for item in items}
        objects = self.of(kind)
        if fresh == objects:
            return False
        objects.clear()
        objects.update(fresh)
        return True

    def apply(self, kind: Kind, event_type: str, obj: KubeObject) -> bool:
        """One watch event. True if the objects changed (a BOOKMARK, an unknown event type or
        an update that changes nothing kept do not)."""
        objects = self.of(kind)
        key = object_key(obj)
        if event_type in (WatchEventType.ADDED, WatchEventType.MODIFIED):
            trimmed = _trimmed(obj)
            if objects.get(key) == trimmed:
                return False
            objects[key] = trimmed
            return True
        if event_type == WatchEventType.DELETED:
            return objects.pop(key, None) is not None
        return False

    def snapshot(self) -> KubeObjects:
        """A copy to translate while the original takes more events. Shallow: objects are
        replaced by events, never changed in place."""
        return KubeObjects(*(dict(self.of(kind)) for kind in Kind))

    def counts(self) -> dict[str, int]:
        return {kind.value: len(self.of(kind)) for kind in Kind}


_ATTRIBUTE_OF = {
    Kind.PODS: "pods",
    Kind.NAMESPACES: "namespaces",
    Kind.SERVICES: "services",
    Kind.ENDPOINT_SLICES: "endpoint_slices",
    Kind.AUTHORIZATION_POLICIES: "authorization_policies",
    Kind.GATEWAYS: "gateways",
    Kind.HTTP_ROUTES: "http_routes",
}


def mesh_state_from(
    objects: KubeObjects,
    cluster_id: str,
    trust_domain: str,
    policies_in_force: tuple[Policy, ...] = (),
    waypoint_policies_in_force: tuple[WaypointPolicy, ...] = (),
) -> MeshState:
    """The mesh state the objects describe (the rules are in the module docstring). When an
    AuthorizationPolicy does not parse, the set stays `policies_in_force` as a whole: dropping
    the broken one alone could lift a DENY."""
    namespaces = tuple(
        sorted((_namespace(obj) for obj in objects.namespaces.values()), key=lambda n: n.name)
    )
    namespace_by_name = {namespace.name: namespace for namespace in namespaces}
    services = [
        service for obj in objects.services.values() if (service := _kube_service(obj)) is not None
    ]
    services.sort(key=lambda s: (s.namespace, s.name))
    selecting: dict[str, list[_KubeService]] = {}
    for service in services:
        if service.selector:
            selecting.setdefault(service.namespace, []).append(service)

    pods = [pod for obj in objects.pods.values() if (pod := _kube_pod(obj)) is not None]
    # Newest first (ties by namespace/name): see the module docstring on shared addresses.
    pods.sort(key=lambda p: (p.namespace, p.name))
    pods.sort(key=lambda p: p.created, reverse=True)

    memberships: dict[str, dict[str, dict[int, int]]] = {}
    for pod in pods:
        memberships[pod.key] = {
            service.key: _pod_ports(service, pod)
            for service in selecting.get(pod.namespace, ())
            if _selects(service.selector, pod.labels)
        }
    external = _add_endpoint_slice_members(objects, services, pods, memberships)

    waypoints = _Waypoints(objects.gateways, {f"{s.namespace}/{s.name}": s.vips for s in services})
    workloads = tuple(
        _workload(pod, memberships[pod.key], namespace_by_name, waypoints, cluster_id, trust_domain)
        for pod in pods
    ) + tuple(_external_workload(e, cluster_id, trust_domain) for e in external.values())
    documents = [
        _authorization_policy(obj) for _, obj in sorted(objects.authorization_policies.items())
    ]
    try:
        policies = parse_policies(d for d in documents if not attaches_to_waypoint(d))
    except PolicyError as exc:
        log.error("policies rejected, the previous set stays in force", error=str(exc))
        policies = policies_in_force
    # Likewise for the waypoints' policies (attached by targetRefs).
    try:
        waypoint_policies = tuple(
            parse_waypoint_policy(d) for d in documents if attaches_to_waypoint(d)
        )
    except PolicyError as exc:
        log.error("waypoint policies rejected, the previous set stays in force", error=str(exc))
        waypoint_policies = waypoint_policies_in_force
    mesh_services = tuple(
        _service(s, _service_waypoint(s, namespace_by_name.get(s.namespace), waypoints))
        for s in services
    )
    return MeshState(
        workloads=workloads,
        services=mesh_services,
        policies=policies + allow_only_waypoint_policies(workloads, mesh_services),
        namespaces=namespaces,
        routes=_http_routes(objects),
        waypoint_policies=waypoint_policies,
    )


def _http_routes(objects: KubeObjects) -> tuple[HttpRoute, ...]:
    """Every HTTPRoute that parses; a broken one is left out (its traffic takes the Service's
    default route, which no policy depends on) and logged."""
    routes = []
    for key, obj in sorted(objects.http_routes.items()):
        metadata = _mapping(obj.get("metadata"))
        document = {
            "apiVersion": obj.get("apiVersion") or HTTP_ROUTE_API_VERSION,
            "kind": obj.get("kind") or "HTTPRoute",
            "metadata": {
                k: metadata[k] for k in ("name", "namespace", "creationTimestamp") if k in metadata
            },
            "spec": copy.deepcopy(dict(_mapping(obj.get("spec")))),
        }
        try:
            routes.append(parse_http_route(document))
        except RouteError as exc:
            log.error("HTTPRoute rejected: not applied", route=key, error=str(exc))
    return tuple(routes)


# --- pods ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _KubePod:
    """What the translation reads of a pod that becomes a workload."""

    name: str
    namespace: str
    uid: str
    created: str  # RFC 3339 in UTC, so it sorts as text
    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    owners: tuple[Mapping[str, Any], ...]
    service_account: str
    node: str
    ips: tuple[str, ...]
    phase: str
    port_names: Mapping[str, int]  # container port name -> number
    ready: bool  # the Ready condition is True and the pod is not being deleted

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


def _kube_pod(obj: KubeObject) -> _KubePod | None:
    """The pod, or None when it is no workload (see the module docstring)."""
    metadata, spec, status = (_mapping(obj.get(k)) for k in ("metadata", "spec", "status"))
    phase = _text(status.get("phase"))
    if phase not in _LIVE_PHASES or spec.get("hostNetwork") is True:
        return None
    ips = _pod_ips(status)
    if not ips:
        return None
    port_names: dict[str, int] = {}
    for container in (*_list(spec.get("containers")), *_list(spec.get("initContainers"))):
        for port in _list(_mapping(container).get("ports")):
            name, number = _mapping(port).get("name"), _mapping(port).get("containerPort")
            if isinstance(name, str) and name and _is_port(number):
                port_names.setdefault(name, number)
    return _KubePod(
        name=_text(metadata.get("name")),
        namespace=_text(metadata.get("namespace")) or "default",
        uid=_text(metadata.get("uid")),
        created=_text(metadata.get("creationTimestamp")),
        labels=_string_map(metadata.get("labels")),
        annotations=_string_map(metadata.get("annotations")),
        owners=tuple(_mapping(o) for o in _list(metadata.get("ownerReferences"))),
        service_account=(
            _text(spec.get("serviceAccountName")) or _text(spec.get("serviceAccount")) or "default"
        ),
        node=_text(spec.get("nodeName")),
        ips=ips,
        phase=phase,
        port_names=port_names,
        ready=metadata.get("deletionTimestamp") is None
        and any(
            _mapping(c).get("type") == "Ready" and _mapping(c).get("status") == "True"
            for c in _list(status.get("conditions"))
        ),
    )


def _pod_ips(status: Mapping[str, Any]) -> tuple[str, ...]:
    written = [_mapping(entry).get("ip") for entry in _list(status.get("podIPs"))]
    if not written:
        written = [status.get("podIP")]
    ips: list[str] = []
    for ip in written:
        canonical = _canonical_ip(ip)
        if canonical is not None and canonical not in ips:
            ips.append(canonical)
    return tuple(ips)


def _workload(
    pod: _KubePod,
    services: Mapping[str, Mapping[int, int]],
    namespaces: Mapping[str, Namespace],
    waypoints: _Waypoints,
    cluster_id: str,
    trust_domain: str,
) -> Workload:
    workload_name = _workload_name(pod)
    enrolled = ambient_enrolled(namespaces.get(pod.namespace), pod.labels)
    return Workload(
        # Istio's own uid form when the API gave none (it always does for a stored pod).
        uid=pod.uid or f"{cluster_id}//Pod/{pod.namespace}/{pod.name}",
        name=pod.name,
        namespace=pod.namespace,
        service_account=pod.service_account,
        ips=pod.ips,
        protocol=Protocol.HBONE if enrolled else Protocol.TCP,
        node=pod.node,
        trust_domain=trust_domain,
        services=services,
        waypoint=_pod_waypoint(pod, namespaces.get(pod.namespace), waypoints),
        labels=pod.labels,
        workload_name=workload_name,
        canonical_name=_first_label(pod.labels, CANONICAL_NAME_LABELS) or workload_name,
        canonical_revision=_first_label(pod.labels, CANONICAL_REVISION_LABELS) or DEFAULT_REVISION,
        cluster_id=cluster_id,
        healthy=pod.ready,
    )


def _pod_waypoint(
    pod: _KubePod, namespace: Namespace | None, waypoints: _Waypoints
) -> Waypoint | None:
    if pod.labels.get(MANAGED_GATEWAY_LABEL) == MESH_CONTROLLER:
        return None  # a waypoint's own pod: its traffic must not loop back into it
    namespace_labels: Mapping[str, str] = namespace.labels if namespace is not None else {}
    deciders = (pod.labels, pod.annotations, namespace_labels)
    return waypoints.bound(deciders, pod.namespace, lambda w: w.takes_workloads)


def _workload_name(pod: _KubePod) -> str:
    owner = next((o for o in pod.owners if o.get("controller") is True), None)
    if owner is None and pod.owners:
        owner = pod.owners[0]
    owner_name = _text(owner.get("name")) if owner is not None else ""
    if owner is None or not owner_name:
        return pod.name
    kind = owner.get("kind")
    template_hash = pod.labels.get(POD_TEMPLATE_HASH_LABEL)
    if kind == "ReplicaSet" and template_hash and owner_name.endswith(f"-{template_hash}"):
        return owner_name[: -len(template_hash) - 1]
    if kind == "Job" and (cronjob := _CRONJOB_JOB_NAME.fullmatch(owner_name)) is not None:
        return cronjob.group(1)
    return owner_name


@dataclass(frozen=True, slots=True)
class _Waypoints:
    """What binding to a waypoint looks at: the Gateways, and the waypoints' Services (whose
    VIP is the waypoint's address when the Gateway's status has none yet)."""

    gateways: Mapping[str, KubeObject]
    service_vips: Mapping[str, tuple[str, ...]]  # "namespace/name" -> VIPs

    def bound(
        self,
        deciders: Sequence[Mapping[str, str]],
        own_namespace: str,
        takes: Callable[[WaypointFor], bool],
    ) -> Waypoint | None:
        """The waypoint the first of `deciders` (label maps, most specific first) that names
        one binds to, if it exists, is a waypoint and takes this kind of traffic."""
        # The first object that says anything decides: a pod's or Service's "none" overrides
        # its namespace.
        deciding = next((m for m in deciders if m.get(USE_WAYPOINT)), None)
        if deciding is None or deciding[USE_WAYPOINT] == "none":
            return None
        name = deciding[USE_WAYPOINT]
        namespace = deciding.get(USE_WAYPOINT_NAMESPACE) or own_namespace
        gateway = self.gateways.get(f"{namespace}/{name}")
        if gateway is None:
            return None
        if _mapping(gateway.get("spec")).get("gatewayClassName") != WAYPOINT_GATEWAY_CLASS:
            return None
        labels = _string_map(_mapping(gateway.get("metadata")).get("labels"))
        try:
            waypoint_for = WaypointFor(labels.get(WAYPOINT_FOR_LABEL, WaypointFor.SERVICE))
        except ValueError:
            waypoint_for = WaypointFor.SERVICE  # istiod's reading of a value it does not know
        if not takes(waypoint_for):
            return None
        annotations = _string_map(_mapping(gateway.get("metadata")).get("annotations"))
        allow_only = annotations.get(ALLOW_ONLY_WAYPOINT, "").lower() == "true"
        address = self._address(gateway, f"{namespace}/{name}")
        return Waypoint(address, HBONE_PORT, name, namespace, allow_only)

    def _address(self, gateway: KubeObject, key: str) -> str:
        """The Gateway's first status address that is an IP, else its Service's VIP; "" for
        a waypoint that is not ready (bound, but with nowhere to send traffic yet)."""
        for entry in map(_mapping, _list(_mapping(gateway.get("status")).get("addresses"))):
            if (address := _canonical_ip(entry.get("value"))) is not None:
                return address
        return next(iter(self.service_vips.get(key, ())), "")


# --- services -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _ServicePort:
    name: str
    port: int
    target: int | str  # a number, or the name of a container port
    app_protocol: str = ""  # appProtocol, else what Istio reads from a name ("http-web")


@dataclass(frozen=True, slots=True)
class _KubeService:
    name: str
    namespace: str
    labels: Mapping[str, str]
    selector: Mapping[str, str]  # empty: the service picks its endpoints some other way
    vips: tuple[str, ...]
    ports: tuple[_ServicePort, ...]

    @property
    def hostname(self) -> str:
        return f"{self.name}.{self.namespace}.svc.{CLUSTER_DOMAIN}"

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.hostname}"


def _kube_service(obj: KubeObject) -> _KubeService | None:
    metadata, spec = _mapping(obj.get("metadata")), _mapping(obj.get("spec"))
    if spec.get("type") == "ExternalName":
        return None
    written_vips = _list(spec.get("clusterIPs")) or [spec.get("clusterIP")]
    vips = tuple(ip for ip in map(_canonical_ip, written_vips) if ip is not None)
    ports: list[_ServicePort] = []
    for raw in map(_mapping, _list(spec.get("ports"))):
        port = raw.get("port")
        if raw.get("protocol", "TCP") != "TCP" or not _is_port(port):
            continue
        written_target = raw.get("targetPort")
        target: int | str = port  # Kubernetes' default: the service port
        if _is_port(written_target) or (isinstance(written_target, str) and written_target):
            target = written_target
        name = _text(raw.get("name"))
        protocol = _text(raw.get("appProtocol")).lower() or name.partition("-")[0].lower()
        ports.append(_ServicePort(name, port, target, protocol))
    return _KubeService(
        name=_text(metadata.get("name")),
        namespace=_text(metadata.get("namespace")) or "default",
        labels=_string_map(metadata.get("labels")),
        selector=_string_map(spec.get("selector")),
        vips=vips,
        ports=tuple(ports),
    )


def _selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def _pod_ports(service: _KubeService, pod: _KubePod) -> dict[int, int]:
    ports: dict[int, int] = {}
    for port in service.ports:
        target = port.target if isinstance(port.target, int) else pod.port_names.get(port.target)
        if target is not None:
            ports[port.port] = target
    return ports


@dataclass(slots=True)
class _ExternalEndpoint:
    """An EndpointSlice address that is no pod's, with the services it backs."""

    namespace: str
    address: str
    name: str  # the first service's name, for telemetry
    services: dict[str, dict[int, int]]


def _add_endpoint_slice_members(
    objects: KubeObjects,
    services: Iterable[_KubeService],
    pods: Iterable[_KubePod],
    memberships: dict[str, dict[str, dict[int, int]]],
) -> dict[tuple[str, str], _ExternalEndpoint]:
    """Services without a selector: their EndpointSlices say which addresses back them. Pods'
    addresses join the pods' memberships; the others are returned, by (namespace, address)."""
    external: dict[tuple[str, str], _ExternalEndpoint] = {}
    selectorless = {(s.namespace, s.name): s for s in services if not s.selector}
    if not selectorless:
        return external
    pod_by_ip: dict[str, _KubePod] = {}
    for pod in pods:  # newest first, so a shared address goes to the newest pod
        for ip in pod.ips:
            pod_by_ip.setdefault(ip, pod)
    for _, slice_ in sorted(objects.endpoint_slices.items()):
        metadata = _mapping(slice_.get("metadata"))
        namespace = _text(metadata.get("namespace")) or "default"
        owner = _string_map(metadata.get("labels")).get(SERVICE_NAME_LABEL, "")
        service = selectorless.get((namespace, owner))
        if service is None:
            continue
        slice_ports = {
            _text(_mapping(p).get("name")): _mapping(p).get("port")
            for p in _list(slice_.get("ports"))
        }
        ports = {
            port.port: target
            for port in service.ports
            if _is_port(target := slice_ports.get(port.name))
        }
        for endpoint in map(_mapping, _list(slice_.get("endpoints"))):
            # Absent means ready (the API's own reading of a missing condition).
            if _mapping(endpoint.get("conditions")).get("ready") is False:
                continue
            for address in map(_canonical_ip, _list(endpoint.get("addresses"))):
                if address is None:
                    continue
                member = pod_by_ip.get(address)
                if member is None:
                    entry = external.setdefault(
                        (namespace, address),
                        _ExternalEndpoint(namespace, address, service.name, {}),
                    )
                    entry.services.setdefault(service.key, {}).update(ports)
                elif member.namespace == namespace:
                    memberships[member.key].setdefault(service.key, {}).update(ports)
    return external


def _external_workload(endpoint: _ExternalEndpoint, cluster_id: str, trust_domain: str) -> Workload:
    return Workload(
        uid=f"{cluster_id}/discovery.k8s.io/EndpointSlice/{endpoint.namespace}/{endpoint.address}",
        name=endpoint.name,
        namespace=endpoint.namespace,
        service_account="default",
        ips=(endpoint.address,),
        protocol=Protocol.TCP,
        node="",
        trust_domain=trust_domain,
        services=endpoint.services,
        workload_name=endpoint.name,
        canonical_name=endpoint.name,
        canonical_revision=DEFAULT_REVISION,
        cluster_id=cluster_id,
    )


def _service_waypoint(
    service: _KubeService, namespace: Namespace | None, waypoints: _Waypoints
) -> Waypoint | None:
    namespace_labels: Mapping[str, str] = namespace.labels if namespace is not None else {}
    deciders = (service.labels, namespace_labels)
    return waypoints.bound(deciders, service.namespace, lambda w: w.takes_services)


def _service(service: _KubeService, waypoint: Waypoint | None) -> Service:
    ports = {
        port.port: port.target if isinstance(port.target, int) else NAMED_TARGET_PORT
        for port in service.ports
    }
    return Service(
        name=service.name,
        namespace=service.namespace,
        hostname=service.hostname,
        vips=service.vips,
        ports=ports,
        waypoint=waypoint,
        app_protocols={p.port: p.app_protocol for p in service.ports if p.app_protocol},
    )


# --- namespaces and policies --------------------------------------------------------------


def _namespace(obj: KubeObject) -> Namespace:
    metadata = _mapping(obj.get("metadata"))
    return Namespace(_text(metadata.get("name")), _string_map(metadata.get("labels")))


def _authorization_policy(obj: KubeObject) -> dict[str, Any]:
    spec = _mapping(obj.get("spec"))
    metadata = _mapping(obj.get("metadata"))
    kept_metadata: dict[str, Any] = {
        "name": metadata.get("name"),
        "namespace": metadata.get("namespace"),
    }
    dry_run = _mapping(metadata.get("annotations")).get(DRY_RUN_ANNOTATION)
    if dry_run is not None:
        kept_metadata["annotations"] = {DRY_RUN_ANNOTATION: dry_run}
    return {
        # List items of a custom resource carry both; a watch event's object too.
        "apiVersion": obj.get("apiVersion") or AUTHORIZATION_POLICY_API_VERSION,
        "kind": obj.get("kind") or "AuthorizationPolicy",
        "metadata": kept_metadata,
        # A copy: the state is shared by every reader and must not alias the source's objects.
        "spec": copy.deepcopy(dict(spec)),
    }


# --- helpers ------------------------------------------------------------------------------


def _trimmed(obj: KubeObject) -> KubeObject:
    """The object without what is large and never read (managed fields, kubectl's copy of the
    last applied object), so that keeping every pod of a cluster stays cheap."""
    metadata = _mapping(obj.get("metadata"))
    annotations = _mapping(metadata.get("annotations"))
    if "managedFields" not in metadata and _LAST_APPLIED not in annotations:
        return obj
    kept = {k: v for k, v in metadata.items() if k != "managedFields"}
    if _LAST_APPLIED in annotations:
        kept["annotations"] = {k: v for k, v in annotations.items() if k != _LAST_APPLIED}
    return {**obj, "metadata": kept}


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _list(value: object) -> list[Any]:
    return value if isinstance(value, list) else []


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


def _string_map(value: object) -> dict[str, str]:
    return {k: v for k, v in _mapping(value).items() if isinstance(k, str) and isinstance(v, str)}


def _first_label(labels: Mapping[str, str], keys: Iterable[str]) -> str:
    return next((labels[key] for key in keys if labels.get(key)), "")


def _is_port(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 65535


def _canonical_ip(value: object) -> str | None:
    if not isinstance(value, str):
        return None
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        return None
