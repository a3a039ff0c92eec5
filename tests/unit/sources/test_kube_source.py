"""The Kubernetes source (agent/sources/kube_source.py) against recorded API answers.

No API server can run on these machines, so a small fake one on 127.0.0.1 serves recorded
answers (tests/support/kube_recorded/: list responses, and watch events one JSON object per line) on
the REST paths the real client calls. They are written in the shape a kind cluster's API
server answers in (list items without kind, watch objects with it, managedFields, Status
bodies for errors), not captured from one, since none could run here. A real
`kubernetes.client.ApiClient` talks to it over HTTP: the paging, the watch parameters, the
chunked watch streams, the ERROR events and the error statuses all go through the client's
own code. The server records every request, so the tests can check what the source asked.

Watches stay open until a test sends them events (`send`), ends them (`end_watches`), or the
server stops; after an ERROR event the server ends the watch, as the API server does.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, MutableMapping, Sequence
from dataclasses import replace
from typing import Any

import kubernetes.client
import pytest
from structlog.testing import capture_logs

from agent.sources.kube_errors import KubeSourceError
from agent.sources.kube_source import Backoff, KubeSource, Timings
from agent.state.store import MeshState, StateStore
from agent.state.workload import Protocol, Workload
from tests.support.fake_kube_api import (
    AUTHORIZATION_POLICIES,
    ENDPOINT_SLICES,
    FAST,
    GATEWAYS,
    NAMESPACES,
    NODE,
    PODS,
    SERVICES,
    FakeApiServer,
    recorded_events,
    recorded_list,
)
from tests.support.waiting import until


@pytest.fixture
def server() -> Iterator[FakeApiServer]:
    fake = FakeApiServer.recorded()
    fake.start()
    yield fake
    fake.stop()


@pytest.fixture
def api(server: FakeApiServer) -> Iterator[kubernetes.client.ApiClient]:
    configuration = kubernetes.client.Configuration(host=server.url)
    configuration.connection_pool_maxsize = 20  # a watch per kind holds a connection
    client = kubernetes.client.ApiClient(configuration)
    yield client
    client.close()  # type: ignore[no-untyped-call]


def source_for(
    api: kubernetes.client.ApiClient, store: StateStore, timings: Timings = FAST
) -> KubeSource:
    return KubeSource(store, NODE, api, timings=timings, rng=random.Random(7))


def run_alongside(source: KubeSource, scenario: Callable[[], Awaitable[None]]) -> None:
    async def main() -> None:
        stop = asyncio.Event()
        following = asyncio.create_task(source.run(stop))
        try:
            await scenario()
        finally:
            stop.set()
            await asyncio.wait_for(following, 5)

    asyncio.run(main())


async def all_watching(server: FakeApiServer, *paths: str) -> None:
    await until(lambda: all(server.watching(path) for path in paths))


def workload(state: MeshState, name: str) -> Workload:
    return next(w for w in state.workloads if w.name == name)


def names(state: MeshState) -> list[str]:
    return sorted(w.key for w in state.workloads)


def logged(logs: Sequence[MutableMapping[str, Any]], event: str) -> list[MutableMapping[str, Any]]:
    return [entry for entry in logs if entry["event"] == event]


# The kubernetes Service's endpoint (the API server, no pod), as a workload of its own.
API_SERVER = "default/kubernetes"
SHOP_PODS = [
    "shop/productpage-v1-5f8d7b9c4-jz6tn",
    "shop/ratings-v1-6c9d8b7f5-lk4vd",
    "shop/reviews-v1-7d4b9c8f6-q8m2p",
    "shop/reviews-v1-7d4b9c8f6-x2x9k",
]


# --- the initial list -----------------------------------------------------------------------


def test_load_initial_builds_the_state_from_every_list(
    server: FakeApiServer, api: kubernetes.client.ApiClient
) -> None:
    store = StateStore()
    with capture_logs() as logs:
        state = source_for(api, store).load_initial()
    assert store.current is state
    # kube-proxy (host network) and the finished migration Job are no workloads; the API
    # server's address in the kubernetes Service's slice is one, outside the mesh.
    assert names(state) == [API_SERVER, "kube-system/coredns-668d6bf9bc-7xq2w", *SHOP_PODS]
    assert {w.key for w in state.workloads_on(NODE)} == {
        "kube-system/coredns-668d6bf9bc-7xq2w",
        "shop/productpage-v1-5f8d7b9c4-jz6tn",
        "shop/reviews-v1-7d4b9c8f6-x2x9k",
    }
    reviews = workload(state, "reviews-v1-7d4b9c8f6-x2x9k")
    assert reviews.protocol is Protocol.HBONE
    assert (reviews.uid, reviews.service_account, reviews.ips) == (
        "a1b2c3d4-0002-4e5f-8a9b-0c1d2e3f4a02",
        "bookinfo-reviews",
        ("10.244.1.12",),
    )
    assert (reviews.workload_name, reviews.canonical_name, reviews.canonical_revision) == (
        "reviews-v1",
        "reviews",
        "v1",
    )
    assert dict(reviews.services) == {"shop/reviews.shop.svc.cluster.local": {9080: 9080}}
    assert reviews.waypoint is None  # the namespace names one, but no Gateway exists
    assert workload(state, "coredns-668d6bf9bc-7xq2w").protocol is Protocol.TCP
    api_server = workload(state, "kubernetes")
    assert (api_server.protocol, api_server.node) == (Protocol.TCP, "")
    assert list(api_server.services) == ["default/kubernetes.default.svc.cluster.local"]
    assert sorted(s.key for s in state.services) == [
        "default/kubernetes.default.svc.cluster.local",
        "kube-system/kube-dns.kube-system.svc.cluster.local",
        "shop/productpage.shop.svc.cluster.local",
        "shop/ratings.shop.svc.cluster.local",
        "shop/reviews.shop.svc.cluster.local",
    ]
    # The waypoint-attached policy is for the waypoint; the other passes through as written.
    assert [p.key for p in state.policies] == ["shop/productpage-viewer"]
    assert [n.name for n in state.namespaces] == ["default", "istio-system", "kube-system", "shop"]

    (loaded,) = logged(logs, "kubernetes state loaded")
    assert (loaded["workloads"], loaded["on_node"], loaded["policies"]) == (6, 3, 1)
    missing = logged(logs, "kubernetes resource not installed; taken as none")
    assert sorted(entry["kind"] for entry in missing) == ["gateways", "httproutes"]


def test_lists_are_read_page_by_page(
    server: FakeApiServer, api: kubernetes.client.ApiClient
) -> None:
    store = StateStore()
    source_for(api, store, replace(FAST, page_size=3)).load_initial()
    pages = server.requests_to(PODS)
    assert [(r.query["limit"], r.query.get("continue")) for r in pages] == [
        ("3", None),
        ("3", "3"),
        ("3", "6"),
    ]
    assert len(store.current.workloads) == 6


def test_load_initial_gives_up_on_a_broken_server(
    server: FakeApiServer, api: kubernetes.client.ApiClient
) -> None:
    server.failing = 500
    before = MeshState()
    store = StateStore(before)
    with capture_logs() as logs, pytest.raises(KubeSourceError, match="/api/v1/namespaces"):
        source_for(api, store, replace(FAST, initial_timeout=0.5)).load_initial()
    assert store.current is before
    assert logged(logs, "kubernetes list failed; retrying")
    assert len(server.requests) >= 3  # it did retry before giving up


# --- following the watches ------------------------------------------------------------------


def test_watches_start_from_the_listed_version_with_bookmarks(
    server: FakeApiServer, api: kubernetes.client.ApiClient
) -> None:
    store = StateStore()
    source = source_for(api, store)
    source.load_initial()

    async def scenario() -> None:
        await all_watching(server, NAMESPACES, PODS, SERVICES, AUTHORIZATION_POLICIES)

    run_alongside(source, scenario)
    (watch,) = server.requests_to(PODS, watch=True)
    assert watch.query["resourceVersion"] == "48213"
    assert watch.query["allowWatchBookmarks"] == "true"
    assert 15 <= int(watch.query["timeoutSeconds"]) <= 30  # the upper half of watch_timeout
    # load_initial listed everything; run() only watched.
    assert len(server.requests_to(PODS, watch=False)) == 1


def test_namespace_relabel_releases_then_enrolls_its_pods(
    server: FakeApiServer, api: kubernetes.client.ApiClient
) -> None:
    store = StateStore()
    source = source_for(api, store)
    enrolled = source.load_initial()

    def protocols() -> dict[str, Protocol]:
        return {w.key: w.protocol for w in store.current.workloads if w.namespace == "shop"}

    async def scenario() -> None:
        await all_watching(server, NAMESPACES)
        server.send(NAMESPACES, recorded_events("namespaces-shop-released.jsonl"))
        await until(lambda: set(protocols().values()) == {Protocol.TCP})
        released = store.current
        # Nothing but the protocol changed.
        assert [replace(w, protocol=Protocol.HBONE) for w in released.workloads] == [
            replace(w, protocol=Protocol.HBONE) for w in enrolled.workloads
        ]
        assert released.services == enrolled.services
        assert released.policies == enrolled.policies
        server.send(NAMESPACES, recorded_events("namespaces-shop-enrolled.jsonl"))
        await until(lambda: set(protocols().values()) == {Protocol.HBONE})
        assert store.current.workloads == enrolled.workloads

    run_alongside(source, scenario)


def test_pod_opting_out_and_pod_deleted(
    server: FakeApiServer, api: kubernetes.client.ApiClient
) -> None:
    store = StateStore()
    source = source_for(api, store)
    source.load_initial()

    async def scenario() -> None:
        await all_watching(server, PODS)
        server.send(PODS, recorded_events("pods-ratings-opts-out.jsonl"))
        await until(
            lambda: workload(store.current, "ratings-v1-6c9d8b7f5-lk4vd").protocol is Protocol.TCP
        )
        # Being deleted (deletionTimestamp) still has its address: it stays until DELETED.
        server.send(PODS, recorded_events("pods-productpage-deleted.jsonl"))
        await until(lambda: "shop/productpage-v1-5f8d7b9c4-jz6tn" not in names(store.current))

    run_alongside(source, scenario)
    assert names(store.current) == [
        API_SERVER,
        "kube-system/coredns-668d6bf9bc-7xq2w",
        "shop/ratings-v1-6c9d8b7f5-lk4vd",
        "shop/reviews-v1-7d4b9c8f6-q8m2p",
        "shop/reviews-v1-7d4b9c8f6-x2x9k",
    ]
    productpage = store.current.services[2]
    assert productpage.name == "productpage"
    assert store.current.workloads_of_service(productpage) == ()


def test_expired_version_leads_to_a_relist_and_a_watch_from_the_new_version(
    server: FakeApiServer, api: kubernetes.client.ApiClient
) -> None:
    store = StateStore()
    source = source_for(api, store)
    source.load_initial()

    async def scenario() -> None:
        await all_watching(server, PODS)
        # Meanwhile the cluster moved on: the next list shows a new pod, at a new version.
        server.lists[PODS] = recorded_list("pods-after-expiry.json")
        server.send(PODS, recorded_events("pods-expired.jsonl"))
        await until(lambda: "shop/reviews-v2-84c7d6f59b-m4nzx" in names(store.current))
        await until(lambda: len(server.requests_to(PODS, watch=True)) == 2)

    with capture_logs() as logs:
        run_alongside(source, scenario)
    first_list, expired_watch, relist, new_watch = server.requests_to(PODS)
    assert not first_list.watch and "resourceVersion" not in first_list.query
    assert expired_watch.watch and expired_watch.query["resourceVersion"] == "48213"
    assert not relist.watch and "resourceVersion" not in relist.query
    assert new_watch.watch and new_watch.query["resourceVersion"] == "49000"
    assert new_watch.query["allowWatchBookmarks"] == "true"
    assert relist.at - expired_watch.at < 1.0  # at once, not after a backoff
    assert logged(logs, "kubernetes resource version expired; listing again")
    assert not logged(logs, "kubernetes list or watch failed; retrying")


def test_bookmark_moves_the_next_watch_on(
    server: FakeApiServer, api: kubernetes.client.ApiClient
) -> None:
    store = StateStore()
    source = source_for(api, store)
    before = source.load_initial()

    async def scenario() -> None:
        await all_watching(server, PODS)
        server.send(PODS, recorded_events("pods-bookmark.jsonl"))
        server.end_watches(PODS)  # as when timeoutSeconds runs out
        await until(lambda: len(server.requests_to(PODS, watch=True)) == 2)

    run_alongside(source, scenario)
    first, second = server.requests_to(PODS, watch=True)
    assert (first.query["resourceVersion"], second.query["resourceVersion"]) == ("48213", "49107")
    assert len(server.requests_to(PODS, watch=False)) == 1  # no relist
    assert store.current is before  # a bookmark changes no object


def test_missing_crd_is_tolerated_logged_once_and_picked_up_when_installed(
    server: FakeApiServer, api: kubernetes.client.ApiClient
) -> None:
    store = StateStore()
    source = source_for(api, store)

    def has_waypoint() -> bool:
        reviews = store.current.service("shop/reviews.shop.svc.cluster.local")
        return reviews is not None and reviews.waypoint is not None

    async def scenario() -> None:
        await all_watching(server, PODS)
        # Several more tries (missing_retry_interval is 0.1 s here), all 404.
        await until(lambda: len(server.requests_to(GATEWAYS)) >= 4)
        assert not has_waypoint()
        # The Gateway API CRDs get installed, with the waypoint the namespace names.
        server.lists[GATEWAYS] = recorded_list("gateways.json")
        await until(has_waypoint)

    with capture_logs() as logs:
        source.load_initial()
        run_alongside(source, scenario)
    missing = logged(logs, "kubernetes resource not installed; taken as none")
    assert sorted(entry["kind"] for entry in missing) == ["gateways", "httproutes"]
    assert [entry["kind"] for entry in logged(logs, "kubernetes resource installed")] == [
        "gateways"
    ]
    assert not logged(logs, "kubernetes list or watch failed; retrying")
    # The Gateway says nothing of waypoint-for: Istio's default, Services only.
    waypoints = {s.key: s.waypoint for s in store.current.services if s.namespace == "shop"}
    assert {(w.name, w.namespace) for w in waypoints.values() if w} == {("waypoint", "shop")}
    assert len(waypoints) == 3 and all(waypoints.values())
    assert all(w.waypoint is None for w in store.current.workloads if w.namespace == "shop")
    watched = server.requests_to(GATEWAYS, watch=True)
    assert watched and watched[0].query["resourceVersion"] == "49020"


def test_broken_server_keeps_the_last_good_state_and_backs_off(
    server: FakeApiServer, api: kubernetes.client.ApiClient
) -> None:
    store = StateStore()
    source = source_for(api, store)
    good = source.load_initial()
    broke_at = 0.0

    async def scenario() -> None:
        nonlocal broke_at
        await all_watching(server, PODS, NAMESPACES)
        server.failing = 500
        broke_at = time.monotonic()
        server.end_watches(PODS, NAMESPACES)
        await asyncio.sleep(1.2)
        assert store.current is good
        # Back to health: the watch resumes from where it was, and events flow again.
        server.failing = None
        server.send(PODS, recorded_events("pods-ratings-opts-out.jsonl"))
        await until(
            lambda: workload(store.current, "ratings-v1-6c9d8b7f5-lk4vd").protocol is Protocol.TCP
        )

    with capture_logs() as logs:
        run_alongside(source, scenario)
    failed = [r for r in server.requests_to(PODS, watch=True) if broke_at < r.at < broke_at + 1.2]
    gaps = [later.at - earlier.at for earlier, later in itertools.pairwise(failed)]
    # Backoff 0.05 s doubling to 0.4 s, each drawn from the upper half of its step: a handful
    # of tries in 1.2 s, not a hot loop, each wait at least half the step before it.
    assert 3 <= len(failed) <= 9, gaps
    assert all(gap >= 0.04 for gap in gaps), gaps
    assert max(gaps) >= 0.2, gaps
    assert server.requests_to(PODS, watch=True)[-1].query["resourceVersion"] == "48213"
    retries = logged(logs, "kubernetes list or watch failed; retrying")
    # (The first may be the watch the test ended at once, which client-go also counts as one.)
    assert "HTTP 500 Internal Server Error" in {entry["error"] for entry in retries}


def test_periodic_resync_relists_and_repairs_what_a_watch_missed(
    server: FakeApiServer, api: kubernetes.client.ApiClient
) -> None:
    store = StateStore()
    source = source_for(api, store, replace(FAST, resync_interval=0.5))
    first = source.load_initial()

    async def scenario() -> None:
        await until(lambda: len(server.requests_to(PODS, watch=False)) == 2)
        assert store.current is first  # the same objects again: nothing is published
        # A deletion whose event never came: the next list sets it right.
        pods = recorded_list("pods.json")
        pods["items"] = [
            p for p in pods["items"] if p["metadata"]["name"] != "coredns-668d6bf9bc-7xq2w"
        ]
        server.lists[PODS] = pods
        await until(lambda: "kube-system/coredns-668d6bf9bc-7xq2w" not in names(store.current))

    run_alongside(source, scenario)
    # Each watch asked to end in time for the next resync.
    assert {r.query["timeoutSeconds"] for r in server.requests_to(PODS, watch=True)} == {"1"}


def test_run_without_load_initial_lists_first(
    server: FakeApiServer, api: kubernetes.client.ApiClient
) -> None:
    store = StateStore()
    source = source_for(api, store)

    async def scenario() -> None:
        await until(lambda: len(store.current.workloads) == 6)
        await all_watching(server, PODS)

    run_alongside(source, scenario)
    first, watch = server.requests_to(PODS)
    assert (first.watch, watch.watch) == (False, True)


def test_stop_ends_the_loop_promptly(
    server: FakeApiServer, api: kubernetes.client.ApiClient
) -> None:
    store = StateStore()
    source = source_for(api, store)
    source.load_initial()

    async def main() -> float:
        stop = asyncio.Event()
        following = asyncio.create_task(source.run(stop))
        await all_watching(server, NAMESPACES, PODS, SERVICES, ENDPOINT_SLICES)
        stopped_at = time.monotonic()
        stop.set()
        await asyncio.wait_for(following, 5)
        return time.monotonic() - stopped_at

    took = asyncio.run(main())
    assert took < 0.5
    # The watches were cut, not left to run out their timeoutSeconds.
    deadline = time.monotonic() + 2
    while any(t.name.startswith("kube-") for t in threading.enumerate()):
        assert time.monotonic() < deadline, "worker threads still running"
        time.sleep(0.01)


# --- backoff --------------------------------------------------------------------------------


def test_backoff_doubles_with_jitter_up_to_the_maximum_and_resets() -> None:
    backoff = Backoff(0.5, 30.0, random.Random(1))
    delays = [backoff.next_delay() for _ in range(10)]
    steps = [min(30.0, 0.5 * 2**n) for n in range(10)]
    assert all(
        max(0.5, step / 2) <= delay <= step for delay, step in zip(delays, steps, strict=True)
    )
    assert delays[-1] >= 15.0
    backoff.reset()
    assert backoff.next_delay() == 0.5
