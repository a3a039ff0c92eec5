"""The agent's view of the mesh: immutable snapshots, and a store that swaps them whole.

Readers take `store.current` once and work on that snapshot; a source builds a complete new
snapshot and hands it to `replace`. Because a snapshot never changes after it is built and
the swap is one reference assignment, no reader can see half of an update.
"""

from __future__ import annotations

import functools
import ipaddress
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import structlog

from agent.state.namespace import Namespace
from agent.state.policy import Policy
from agent.state.route import HttpRoute
from agent.state.service import Service, ServiceEndpoint
from agent.state.waypoint import Waypoint
from agent.state.waypoint_policy import WaypointPolicy
from agent.state.workload import Workload

log = structlog.get_logger("agent.state")

Subscriber = Callable[["MeshState", "MeshState"], None]


@functools.lru_cache(maxsize=16384)  # on every connection's route: ipaddress is slow
def _canonical_ip(ip: str) -> str | None:
    """One spelling per address (IPv6 has many), or None for something that is not one."""
    try:
        return str(ipaddress.ip_address(ip))
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class MeshState:
    workloads: tuple[Workload, ...] = ()
    services: tuple[Service, ...] = ()
    # Parsed by the source that read them (agent/sources/authorization_policy.py).
    policies: tuple[Policy, ...] = ()
    # Namespaces with their labels: what decides whether a pod a CNI plugin announces joins.
    namespaces: tuple[Namespace, ...] = ()
    # What waypoints carry out: Gateway API HTTPRoutes with Service parents, and the
    # AuthorizationPolicies attached by targetRefs.
    routes: tuple[HttpRoute, ...] = ()
    waypoint_policies: tuple[WaypointPolicy, ...] = ()

    # Indexes, built once in __post_init__ so that every lookup on a snapshot is a dict get.
    # Where two entries claim the same key the first wins; the local config parser rejects
    # such configs, so this only settles what other sources might hand over.
    _by_ip: Mapping[str, Workload] = field(init=False, repr=False, compare=False, hash=False)
    _by_node: Mapping[str, tuple[Workload, ...]] = field(
        init=False, repr=False, compare=False, hash=False
    )
    _by_vip_port: Mapping[tuple[str, int], Service] = field(
        init=False, repr=False, compare=False, hash=False
    )
    _by_vip: Mapping[str, Service] = field(init=False, repr=False, compare=False, hash=False)
    _by_service_key: Mapping[str, tuple[Workload, ...]] = field(
        init=False, repr=False, compare=False, hash=False
    )
    _services_by_key: Mapping[str, Service] = field(
        init=False, repr=False, compare=False, hash=False
    )
    _services_by_name: Mapping[str, Service] = field(
        init=False, repr=False, compare=False, hash=False
    )
    _namespaces_by_name: Mapping[str, Namespace] = field(
        init=False, repr=False, compare=False, hash=False
    )
    # ready_endpoints() per (service key, port), worked out at the first connection that
    # asks and kept with the snapshot: connections to a service do not sort its pods again.
    _ready: dict[tuple[str, int], tuple[ServiceEndpoint, ...]] = field(
        init=False, repr=False, compare=False, hash=False
    )

    def __post_init__(self) -> None:
        by_ip: dict[str, Workload] = {}
        by_node: dict[str, list[Workload]] = {}
        by_service_key: dict[str, list[Workload]] = {}
        for workload in self.workloads:
            for ip in workload.ips:
                canonical = _canonical_ip(ip)
                if canonical is not None:
                    by_ip.setdefault(canonical, workload)
            by_node.setdefault(workload.node, []).append(workload)
            for service_key in workload.services:
                by_service_key.setdefault(service_key, []).append(workload)
        by_vip_port: dict[tuple[str, int], Service] = {}
        by_vip: dict[str, Service] = {}
        for service in self.services:
            for vip in service.vips:
                canonical = _canonical_ip(vip)
                if canonical is None:
                    continue
                by_vip.setdefault(canonical, service)
                for port in service.ports:
                    by_vip_port.setdefault((canonical, port), service)
        # object.__setattr__ because the dataclass is frozen: this is construction, not change.
        object.__setattr__(self, "_by_ip", by_ip)
        object.__setattr__(self, "_by_node", {k: tuple(v) for k, v in by_node.items()})
        object.__setattr__(self, "_by_vip_port", by_vip_port)
        object.__setattr__(self, "_by_vip", by_vip)
        object.__setattr__(
            self, "_by_service_key", {k: tuple(v) for k, v in by_service_key.items()}
        )
        services_by_key: dict[str, Service] = {}
        for service in self.services:
            services_by_key.setdefault(service.key, service)
        object.__setattr__(self, "_services_by_key", services_by_key)
        services_by_name: dict[str, Service] = {}
        for service in self.services:
            services_by_name.setdefault(f"{service.namespace}/{service.name}", service)
        object.__setattr__(self, "_services_by_name", services_by_name)
        namespaces_by_name: dict[str, Namespace] = {}
        for namespace in self.namespaces:
            namespaces_by_name.setdefault(namespace.name, namespace)
        object.__setattr__(self, "_namespaces_by_name", namespaces_by_name)
        object.__setattr__(self, "_ready", {})

    def namespace(self, name: str) -> Namespace | None:
        return self._namespaces_by_name.get(name)

    def service(self, key: str) -> Service | None:
        """The service whose key ("namespace/hostname") a workload's `services` names."""
        return self._services_by_key.get(key)

    def service_by_name(self, key: str) -> Service | None:
        """The service Kubernetes objects name ("namespace/name"): a route's parent or
        backend, a policy's target."""
        return self._services_by_name.get(key)

    def workload_by_ip(self, ip: str) -> Workload | None:
        canonical = _canonical_ip(ip)
        return None if canonical is None else self._by_ip.get(canonical)

    def workloads_on(self, node: str) -> tuple[Workload, ...]:
        return self._by_node.get(node, ())

    def service_by_vip(self, ip: str, port: int) -> Service | None:
        """The service a connection to ip:port is for; None also when the VIP is a service's
        but the port is not one it exposes."""
        canonical = _canonical_ip(ip)
        return None if canonical is None else self._by_vip_port.get((canonical, port))

    def service_at_vip(self, ip: str) -> Service | None:
        """The service that owns the VIP `ip`, whatever the port."""
        canonical = _canonical_ip(ip)
        return None if canonical is None else self._by_vip.get(canonical)

    def workloads_of_service(self, service: Service) -> tuple[Workload, ...]:
        return self._by_service_key.get(service.key, ())

    def ready_endpoints(self, service: Service, port: int) -> tuple[ServiceEndpoint, ...]:
        """The service's healthy workloads with their target port for `port`, in a stable
        order (by uid) so that round robin walks them evenly."""
        key = (service.key, port)
        if (known := self._ready.get(key)) is not None:
            return known
        endpoints = []
        for workload in sorted(self.workloads_of_service(service), key=lambda w: w.uid):
            if not workload.healthy or not workload.ips:
                continue
            # The workload's own map wins: a named targetPort resolves per pod, and a pod
            # that does not name it does not serve the port (target_port is None for a name).
            own = workload.services.get(service.key, {}).get(port)
            target = own or service.target_port(port)
            if target is not None:
                endpoints.append(ServiceEndpoint(workload, workload.ips[0], target))
        self._ready[key] = found = tuple(endpoints)
        return found

    def waypoint_workloads(self, waypoint: Waypoint) -> tuple[Workload, ...]:
        """The waypoint's pods, ready or not: the workloads of the Service at its address,
        else the workload at it."""
        if not waypoint.address:
            return ()
        if (service := self.service_at_vip(waypoint.address)) is not None:
            return self.workloads_of_service(service)
        pod = self.workload_by_ip(waypoint.address)
        return (pod,) if pod is not None else ()


class StateStore:
    """Holds the current MeshState and tells subscribers when it is replaced."""

    def __init__(self, initial: MeshState | None = None) -> None:
        self._current = initial if initial is not None else MeshState()
        self._subscribers: tuple[Subscriber, ...] = ()
        # Makes read-old-then-write-new one step, so that each (old, new) pair handed to
        # subscribers is a real transition even if two threads replace at once; also guards
        # the subscriber list. Readers do not take it: reading one reference is atomic.
        self._swap_lock = threading.Lock()

    @property
    def current(self) -> MeshState:
        return self._current

    def replace(self, new: MeshState) -> None:
        with self._swap_lock:
            old, self._current = self._current, new
        # Outside the lock, so that a subscriber may itself read or replace the state.
        for subscriber in self._subscribers:
            try:
                subscriber(old, new)
            except Exception:
                # One broken consumer must not keep the others on stale state.
                log.exception("state subscriber failed", subscriber=_name(subscriber))

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Call `callback(old, new)` after every replace. Returns a function that undoes it."""
        # Copy-on-write: a replace already iterating keeps the tuple it started with.
        with self._swap_lock:
            self._subscribers = (*self._subscribers, callback)

        def unsubscribe() -> None:
            with self._swap_lock:
                self._subscribers = tuple(s for s in self._subscribers if s is not callback)

        return unsubscribe


def _name(callback: Callable[..., object]) -> str:
    return getattr(callback, "__qualname__", None) or repr(callback)
