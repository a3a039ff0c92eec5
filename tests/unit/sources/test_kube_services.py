"""Services and EndpointSlices from the Kubernetes API, all the way to a routable state.

The Kubernetes source (agent/sources/kube_source.py) runs against the fake API server of
tests/support/fake_kube_api.py, which serves a small ambient cluster recorded under
tests/support/kube_recorded/services/: list responses, then watch streams (one event a line,
per kind, in the order the API server sends them: the pod change, then the EndpointSlice
controller's follow-up). What the source publishes is then routed with
agent/proxy/destination.py, as the outbound proxy would route it.

The recorded cluster, namespace `ambient` (enrolled):

- Service `web` (10.96.40.10, port 80 -> targetPort "http") over a Deployment mid-rollout:
  web-6d8f7c9b5-4xk2p and -9mz7q name "http" 8080, the new template's web-5c7b9d8f4-t6wq8
  (its container renamed) names it 9090; the controller's slices group them by port.
- `web-headless`: the same pods, clusterIP None.
- `api-backend` (10.96.40.20:7000): no selector; a hand-written slice lists api-backend-0
  (ready) and api-backend-1 (`ready: false`) on the slice port "api" 7443.
- `idle` (10.96.40.30:80): selects no pod.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import kubernetes.client
import pytest

from agent.proxy.destination import (
    EndpointPicker,
    RefusalReason,
    Refused,
    Route,
    route,
)
from agent.sources.kube_source import KubeSource
from agent.state.service import NAMED_TARGET_PORT
from agent.state.store import MeshState, StateStore
from agent.state.workload import Protocol, Workload
from tests.support.fake_kube_api import (
    AUTHORIZATION_POLICIES,
    ENDPOINT_SLICES,
    FAST,
    NAMESPACES,
    NODE,
    PODS,
    RECORDED,
    SERVICES,
    FakeApiServer,
)
from tests.support.waiting import until

CLUSTER = RECORDED / "services"

WEB_VIP, API_VIP, IDLE_VIP = "10.96.40.10", "10.96.40.20", "10.96.40.30"
WEB_KEY = "ambient/web.ambient.svc.cluster.local"
API_KEY = "ambient/api-backend.ambient.svc.cluster.local"
HEADLESS_KEY = "ambient/web-headless.ambient.svc.cluster.local"
# Pod IP -> pod, and the upstream each is reached on through web's port 80 (its own "http").
WEB_A, WEB_B, WEB_C = "10.244.1.21", "10.244.2.17", "10.244.1.22"
WEB_UPSTREAMS = [(WEB_A, 8080), (WEB_B, 8080), (WEB_C, 9090)]  # in uid order: the turns
API_0, API_1 = "10.244.1.31", "10.244.2.32"


def recorded(path: str) -> Any:
    return json.loads((CLUSTER / path).read_text())


def recorded_events(name: str) -> list[dict[str, Any]]:
    text = (CLUSTER / "watch" / name).read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.fixture
def server() -> Iterator[FakeApiServer]:
    # Istio's CRDs are installed (no AuthorizationPolicy yet), the Gateway API's are not.
    lists = {
        NAMESPACES: "namespaces.json",
        PODS: "pods.json",
        SERVICES: "services.json",
        ENDPOINT_SLICES: "endpointslices.json",
        AUTHORIZATION_POLICIES: "authorizationpolicies.json",
    }
    fake = FakeApiServer(lists={path: recorded(f"lists/{name}") for path, name in lists.items()})
    fake.start()
    yield fake
    fake.stop()


@pytest.fixture
def store() -> StateStore:
    return StateStore()


@pytest.fixture
def source(server: FakeApiServer, store: StateStore) -> Iterator[KubeSource]:
    configuration = kubernetes.client.Configuration(host=server.url)
    configuration.connection_pool_maxsize = 20  # a watch per kind holds a connection
    api = kubernetes.client.ApiClient(configuration)
    yield KubeSource(store, NODE, api, timings=FAST, rng=random.Random(7))
    api.close()  # type: ignore[no-untyped-call]


def following(
    source: KubeSource, server: FakeApiServer, scenario: Callable[[], Awaitable[None]]
) -> None:
    """Run the source's watches (after its initial list) while `scenario` sends events."""

    async def main() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(source.run(stop))
        try:
            await until(lambda: all(server.watching(p) for p in (PODS, SERVICES, ENDPOINT_SLICES)))
            await scenario()
        finally:
            stop.set()
            await asyncio.wait_for(task, 5)

    source.load_initial()
    asyncio.run(main())


def routed(state: MeshState, dst: tuple[str, int], picker: EndpointPicker) -> Route:
    decided = route(state, dst, picker)
    assert isinstance(decided, Route), decided
    return decided


def upstreams(state: MeshState, dst: tuple[str, int], turns: int) -> list[tuple[str, int]]:
    """`turns` connections in a row to dst, through one picker: where each went."""
    picker = EndpointPicker()
    return [routed(state, dst, picker).upstream for _ in range(turns)]


def refused(state: MeshState, dst: tuple[str, int]) -> Refused:
    decided = route(state, dst, EndpointPicker())
    assert isinstance(decided, Refused), decided
    return decided


def pod_at(state: MeshState, ip: str) -> Workload:
    workload = state.workload_by_ip(ip)
    assert workload is not None, ip
    return workload


# --- a selector Service with a named targetPort -------------------------------------------


def test_named_target_port_resolves_per_pod_and_round_robin_covers_every_pod(
    source: KubeSource,
) -> None:
    state = source.load_initial()
    web = state.service(WEB_KEY)
    assert web is not None and web.vips == (WEB_VIP,)
    # Each pod's own number for "http"; the Service leaves it to them.
    assert {ip: dict(pod_at(state, ip).services[WEB_KEY]) for ip, _ in WEB_UPSTREAMS} == {
        WEB_A: {80: 8080},
        WEB_B: {80: 8080},
        WEB_C: {80: 9090},
    }
    assert dict(web.ports) == {80: NAMED_TARGET_PORT}
    assert all(pod_at(state, ip).protocol is Protocol.HBONE for ip, _ in WEB_UPSTREAMS)

    assert upstreams(state, (WEB_VIP, 80), 6) == WEB_UPSTREAMS * 2
    decided = routed(state, (WEB_VIP, 80), EndpointPicker())
    assert (decided.workload, decided.service, decided.by_vip) == (pod_at(state, WEB_A), web, True)
    assert decided.tunnelled
    assert decided.workload is not None
    assert decided.workload.workload_name == "web"  # the Deployment, through its ReplicaSet


def test_a_selected_pod_that_does_not_name_the_target_port_is_never_picked(
    source: KubeSource, server: FakeApiServer, store: StateStore
) -> None:
    async def scenario() -> None:
        server.send(PODS, recorded_events("pods-web-debug-added.jsonl"))
        await until(lambda: store.current.workload_by_ip("10.244.2.40") is not None)
        debug = pod_at(store.current, "10.244.2.40")
        assert dict(debug.services[WEB_KEY]) == {}  # selected, but port 80 left out for it
        assert sorted(set(upstreams(store.current, (WEB_VIP, 80), 8))) == sorted(WEB_UPSTREAMS)

    following(source, server, scenario)


# --- readiness ------------------------------------------------------------------------------


def test_readiness_changes_from_the_watch_decide_which_pods_are_picked(
    source: KubeSource, server: FakeApiServer, store: StateStore
) -> None:
    def healthy(ip: str) -> bool:
        return pod_at(store.current, ip).healthy

    async def scenario() -> None:
        # web-9mz7q fails its readiness probe: the kubelet's pod update, then the slices'.
        server.send(PODS, recorded_events("pods-web-9mz7q-not-ready.jsonl"))
        server.send(ENDPOINT_SLICES, recorded_events("endpointslices-web-9mz7q-not-ready.jsonl"))
        await until(lambda: not healthy(WEB_B))
        state = store.current
        assert pod_at(state, WEB_B).services[WEB_KEY] == {80: 8080}  # still a member
        assert upstreams(state, (WEB_VIP, 80), 6) == [(WEB_A, 8080), (WEB_C, 9090)] * 3
        # A pod addressed directly is reached whatever its readiness, as in Kubernetes.
        assert routed(state, (WEB_B, 8080), EndpointPicker()).upstream == (WEB_B, 8080)

        server.send(PODS, recorded_events("pods-web-9mz7q-ready-again.jsonl"))
        server.send(ENDPOINT_SLICES, recorded_events("endpointslices-web-9mz7q-ready-again.jsonl"))
        await until(lambda: healthy(WEB_B))
        assert upstreams(store.current, (WEB_VIP, 80), 3) == WEB_UPSTREAMS

        # web-4xk2p is being deleted: still Ready in its status, but terminating.
        server.send(PODS, recorded_events("pods-web-4xk2p-terminating.jsonl"))
        server.send(ENDPOINT_SLICES, recorded_events("endpointslices-web-4xk2p-terminating.jsonl"))
        await until(lambda: not healthy(WEB_A))
        state = store.current
        # Still a workload, with its address and its membership, until DELETED.
        assert pod_at(state, WEB_A).services[WEB_KEY] == {80: 8080}
        assert upstreams(state, (WEB_VIP, 80), 4) == [(WEB_B, 8080), (WEB_C, 9090)] * 2

    following(source, server, scenario)


# --- a selectorless Service and its hand-written EndpointSlice ----------------------------


def test_selectorless_service_routes_to_the_ready_slice_endpoints_on_the_slice_port(
    source: KubeSource,
) -> None:
    state = source.load_initial()
    api = state.service(API_KEY)
    assert api is not None and api.vips == (API_VIP,)
    # Both addresses are pods of the namespace; only the ready endpoint backs the service,
    # on the slice's "api" port (7443), not the Service's targetPort (7000).
    assert dict(pod_at(state, API_0).services) == {API_KEY: {7000: 7443}}
    assert dict(pod_at(state, API_1).services) == {}
    assert [(e.ip, e.port) for e in state.ready_endpoints(api, 7000)] == [(API_0, 7443)]
    assert set(upstreams(state, (API_VIP, 7000), 4)) == {(API_0, 7443)}
    decided = routed(state, (API_VIP, 7000), EndpointPicker())
    assert (decided.workload, decided.service) == (pod_at(state, API_0), api)
    assert decided.workload is not None and decided.workload.workload_name == "api-backend"


def test_a_slice_with_no_ready_endpoint_left_refuses(
    source: KubeSource, server: FakeApiServer, store: StateStore
) -> None:
    async def scenario() -> None:
        server.send(ENDPOINT_SLICES, recorded_events("endpointslices-api-backend-drained.jsonl"))
        await until(lambda: API_KEY not in pod_at(store.current, API_0).services)
        decided = refused(store.current, (API_VIP, 7000))
        assert decided.reason is RefusalReason.NO_READY_ENDPOINT
        assert decided.service.key == API_KEY

    following(source, server, scenario)


# --- refusals and headless services ---------------------------------------------------------


def test_refusals_and_the_headless_service(source: KubeSource) -> None:
    state = source.load_initial()
    # Selects no pod: its VIP is known, and refused for want of an endpoint.
    idle = refused(state, (IDLE_VIP, 80))
    assert (idle.reason, idle.service.name) == (RefusalReason.NO_READY_ENDPOINT, "idle")
    # A port web does not define.
    other_port = refused(state, (WEB_VIP, 8080))
    assert (other_port.reason, other_port.service.key) == (
        RefusalReason.UNKNOWN_SERVICE_PORT,
        WEB_KEY,
    )
    # Headless: the pods back it, but it has no VIP ("None" is not an address), so a pod
    # address, on any port, is reached as dialled and never refused on its behalf.
    headless = state.service(HEADLESS_KEY)
    assert headless is not None and headless.vips == ()
    assert dict(pod_at(state, WEB_C).services[HEADLESS_KEY]) == {80: 9090}
    for dst in [(WEB_C, 9090), (WEB_C, 80), (WEB_A, 8080)]:
        decided = routed(state, dst, EndpointPicker())
        assert (decided.upstream, decided.by_vip) == (dst, False)
        assert decided.workload is pod_at(state, dst[0])
    assert state.service_at_vip("None") is None


# --- Service changes through the watch ------------------------------------------------------


def test_service_edits_and_deletion_from_the_watch(
    source: KubeSource, server: FakeApiServer, store: StateStore
) -> None:
    def web_ports() -> dict[int, int] | None:
        web = store.current.service(WEB_KEY)
        return None if web is None else dict(web.ports)

    async def scenario() -> None:
        # Port 80 becomes 8000 (still targetPort "http"); a numeric metrics port is added.
        server.send(SERVICES, recorded_events("services-web-ports-changed.jsonl"))
        server.send(ENDPOINT_SLICES, recorded_events("endpointslices-web-ports-changed.jsonl"))
        await until(lambda: web_ports() == {8000: NAMED_TARGET_PORT, 9100: 9100})
        state = store.current
        assert refused(state, (WEB_VIP, 80)).reason is RefusalReason.UNKNOWN_SERVICE_PORT
        assert upstreams(state, (WEB_VIP, 8000), 3) == WEB_UPSTREAMS
        assert upstreams(state, (WEB_VIP, 9100), 3) == [(ip, 9100) for ip, _ in WEB_UPSTREAMS]

        # kubectl delete service web (and the garbage collector takes its slices).
        server.send(SERVICES, recorded_events("services-web-deleted.jsonl"))
        server.send(ENDPOINT_SLICES, recorded_events("endpointslices-web-deleted.jsonl"))
        await until(lambda: web_ports() is None)
        state = store.current
        # The address is no service's any more: reached as dialled, known to no one.
        assert routed(state, (WEB_VIP, 8000), EndpointPicker()) == Route(
            (WEB_VIP, 8000), None, None, by_vip=False
        )
        assert state.service_at_vip(WEB_VIP) is None
        assert all(WEB_KEY not in pod_at(state, ip).services for ip, _ in WEB_UPSTREAMS)
        # The headless service still has the pods.
        assert all(HEADLESS_KEY in pod_at(state, ip).services for ip, _ in WEB_UPSTREAMS)

    following(source, server, scenario)


def test_the_recorded_lists_are_the_whole_cluster(source: KubeSource) -> None:
    """What the other tests stand on: every pod is a workload, every Service is in the state
    (with the API server behind `kubernetes` as a workload outside the mesh)."""
    state = source.load_initial()
    assert sorted(w.key for w in state.workloads) == [
        "ambient/api-backend-0",
        "ambient/api-backend-1",
        "ambient/web-5c7b9d8f4-t6wq8",
        "ambient/web-6d8f7c9b5-4xk2p",
        "ambient/web-6d8f7c9b5-9mz7q",
        "default/kubernetes",
    ]
    assert sorted(s.key for s in state.services) == [
        API_KEY,
        "ambient/idle.ambient.svc.cluster.local",
        HEADLESS_KEY,
        WEB_KEY,
        "default/kubernetes.default.svc.cluster.local",
    ]
    assert upstreams(state, ("10.96.0.1", 443), 1) == [("172.18.0.2", 6443)]
