"""Feed the state store from the Kubernetes API, and follow it.

Every kind the mesh state is made of (agent/sources/kube_objects.py: pods, namespaces, services,
EndpointSlices, AuthorizationPolicies, Gateways, HTTPRoutes) is followed by a loop of its own:

- **list** it (in pages: `limit`, then `continue`), make the list that kind's objects, and
  keep the list's resourceVersion;
- **watch** from that version (`allowWatchBookmarks`, `timeoutSeconds`), applying ADDED,
  MODIFIED and DELETED; a BOOKMARK only moves the version on. When the server ends the watch,
  watch again from the last version seen;
- **410 Gone** (the version is older than the server keeps): list again at once;
- a custom resource whose CRD is **not installed** (404): none of it; logged once, and listed
  again every `missing_retry_interval`;
- **any other error**: try again after an exponential, jittered backoff (0.5 s doubling to
  30 s). The kind's objects stay as last seen, and so does the state in force;
- every `resync_interval` the kind is **listed again**, which repairs whatever a watch missed.

Every change marks the state dirty; a publisher waits `debounce` (so that a burst of events or
a relist becomes one new state), builds the MeshState and hands it to the store when it
differs from the one last published.

The `kubernetes` client is blocking. Each list or watch call runs on a daemon thread of its
own, not on asyncio's default executor: seven watches that each block for minutes would take
that executor's few workers from everyone else, and a thread stuck on a dead connection must
not hold up the agent's exit. Stopping stops each watch (which shuts its socket down), so the
threads end promptly.

Pods: all pods of the cluster are followed, not only this node's, since the mesh needs every
workload's address and identity. A field selector (`spec.nodeName=<node>`) for this node's
full pod objects, next to a lighter cluster-wide view, may come later.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import math
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import kubernetes.client
import kubernetes.config
import kubernetes.watch
import structlog
from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException

from agent.drain import Drain, stopped_within
from agent.sources.kube_errors import KubeSourceError
from agent.sources.kube_objects import (
    Kind,
    KubeObject,
    KubeObjects,
    WatchEventType,
    mesh_state_from,
    resource_version,
)
from agent.state.store import MeshState, StateStore
from agent.state.workload import DEFAULT_TRUST_DOMAIN

log = structlog.get_logger("agent.state")

DEFAULT_CLUSTER_ID = "Kubernetes"  # Istio's default cluster id
HTTP_NOT_FOUND, HTTP_GONE = 404, 410

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class Timings:
    """How often and how long the source waits for what. Tests shorten them."""

    debounce: float = 0.1
    resync_interval: float = 600.0
    # Asked of the server as timeoutSeconds, drawn from its upper half so that the watches of
    # many agents do not all end at once.
    watch_timeout: int = 300
    missing_retry_interval: float = 60.0
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    connect_timeout: float = 10.0
    list_read_timeout: float = 60.0
    # A watch waits for events; the read timeout only catches a connection that died silently.
    watch_read_margin: float = 30.0
    page_size: int = 500
    # load_initial gives up when the API server has not answered every list by then.
    initial_timeout: float = 60.0
    # How long run() waits for the list and watch calls in flight to end once stopped.
    stop_grace: float = 2.0


@dataclass(frozen=True, slots=True)
class Resource:
    """One kind as the client lists it: the bound list function (which also watches, with
    watch=True) and the REST collection it reads, for the logs."""

    kind: Kind
    path: str
    list_call: Callable[..., Any]
    # A custom resource: its CRD may not be installed, and then there is simply none of it.
    custom: bool = False


def resources_of(api: ApiClient) -> tuple[Resource, ...]:
    core = kubernetes.client.CoreV1Api(api)
    discovery = kubernetes.client.DiscoveryV1Api(api)
    custom = kubernetes.client.CustomObjectsApi(api)

    def custom_resource(kind: Kind, group: str, version: str) -> Resource:
        call = functools.partial(custom.list_cluster_custom_object, group, version, kind.value)
        return Resource(kind, f"/apis/{group}/{version}/{kind.value}", call, custom=True)

    return (
        Resource(Kind.NAMESPACES, "/api/v1/namespaces", core.list_namespace),
        Resource(Kind.PODS, "/api/v1/pods", core.list_pod_for_all_namespaces),
        Resource(Kind.SERVICES, "/api/v1/services", core.list_service_for_all_namespaces),
        Resource(
            Kind.ENDPOINT_SLICES,
            "/apis/discovery.k8s.io/v1/endpointslices",
            discovery.list_endpoint_slice_for_all_namespaces,
        ),
        custom_resource(Kind.AUTHORIZATION_POLICIES, "security.istio.io", "v1"),
        custom_resource(Kind.GATEWAYS, "gateway.networking.k8s.io", "v1"),
        custom_resource(Kind.HTTP_ROUTES, "gateway.networking.k8s.io", "v1"),
    )


def api_client_from(kubeconfig: Path | None) -> ApiClient:
    """A client for the cluster the agent runs in (its service account), or for the cluster
    of a kubeconfig file (its current context)."""
    configuration = kubernetes.client.Configuration()
    try:
        # The loaders have no type hints (the generated client has): hence the ignores.
        if kubeconfig is None:
            kubernetes.config.load_incluster_config(  # type: ignore[no-untyped-call]
                client_configuration=configuration
            )
        else:
            kubernetes.config.load_kube_config(  # type: ignore[no-untyped-call]
                config_file=str(kubeconfig), client_configuration=configuration
            )
    except (kubernetes.config.ConfigException, OSError) as exc:
        where = "in-cluster service account" if kubeconfig is None else str(kubeconfig)
        raise KubeSourceError(f"cannot configure the Kubernetes client ({where}): {exc}") from exc
    # Each kind's watch holds a connection for minutes; lists need some more.
    configuration.connection_pool_maxsize = max(
        configuration.connection_pool_maxsize, 2 * len(Kind)
    )
    return kubernetes.client.ApiClient(configuration)


class Backoff:
    """Exponential backoff with jitter, sans-IO: each step doubles from `initial` up to
    `maximum`, and the delay is drawn from the upper half of the step (never below
    `initial`), so that agents that failed together do not retry together."""

    def __init__(self, initial: float, maximum: float, rng: random.Random) -> None:
        self.initial = initial
        self.maximum = maximum
        self._rng = rng
        self._step = initial

    def next_delay(self) -> float:
        step = self._step
        self._step = min(self.maximum, step * 2)
        return max(self.initial, self._rng.uniform(step / 2, step))

    def reset(self) -> None:
        self._step = self.initial


class _RawWatch(kubernetes.watch.Watch):
    """A Watch that yields the objects as the API sent them (event["raw_object"], a dict):
    no model classes, which the translation does not read and which cost time per event.
    (The client's own deserialize=False path breaks on ERROR events.) Watch has no type
    hints; its calls are typed here, once."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]

    def get_return_type(self, func: object) -> None:
        return None

    def events(self, list_call: Callable[..., Any], **options: Any) -> Iterator[Any]:
        """The watch's events: dicts with "type" and "raw_object", None for a blank line."""
        events: Iterator[Any] = self.stream(list_call, **options)  # type: ignore[no-untyped-call]
        return events

    def stop(self) -> None:
        super().stop()  # type: ignore[no-untyped-call]


class _Follower:
    """One kind's place in its list/watch cycle, shared by its loop and its worker thread."""

    def __init__(self, resource: Resource) -> None:
        self.resource = resource
        self.resource_version: str | None = None
        self.listed_at = -math.inf  # time.monotonic() of the last complete list
        self.missing = False  # a custom resource found not installed
        self._watch: _RawWatch | None = None
        self._watch_lock = threading.Lock()

    @property
    def kind(self) -> Kind:
        return self.resource.kind

    def must_list(self, now: float, resync_interval: float) -> bool:
        return self.resource_version is None or now - self.listed_at >= resync_interval

    def watching(self, watch: _RawWatch | None) -> None:
        with self._watch_lock:
            self._watch = watch

    def interrupt(self) -> None:
        """End the watch in flight, if any (from any thread): Watch.stop() shuts its socket
        down, which wakes the thread blocked reading it."""
        with self._watch_lock:
            watch = self._watch
        if watch is not None:
            watch.stop()


class KubeSource:
    """The Kubernetes API as a source of mesh state, with LocalConfigSource's interface:
    load_initial() once at start (blocking), then run(stop) until the agent stops. `node`
    is this agent's node, used in the logs (how many workloads are local)."""

    def __init__(
        self,
        store: StateStore,
        node: str,
        api: ApiClient,
        *,
        cluster_id: str = DEFAULT_CLUSTER_ID,
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
        timings: Timings | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.store = store
        self.node = node
        self.cluster_id = cluster_id
        self.trust_domain = trust_domain
        self.timings = timings if timings is not None else Timings()
        self._rng = rng if rng is not None else random.Random()
        self._followers = tuple(_Follower(resource) for resource in resources_of(api))
        # Written by the worker threads, read by the publisher: always under this lock.
        self._objects = KubeObjects()
        # Why the newest state is not in force (readiness shows it), or None.
        self.rejected: str | None = None
        self._objects_lock = threading.Lock()
        self._stopping = threading.Event()  # what the worker threads look at
        self._published: MeshState | None = None

    def load_initial(self) -> MeshState:
        """List every kind and put the state they make in the store, so that the agent starts
        on the whole mesh. Blocking. Each list is retried with backoff; raises KubeSourceError
        when one still fails after initial_timeout. A custom resource that is not installed
        counts as none of it."""
        deadline = time.monotonic() + self.timings.initial_timeout
        for follower in self._followers:
            backoff = self._backoff()
            while True:
                try:
                    self._list_or_missing(follower, _nothing)
                    break
                except Exception as exc:
                    delay = backoff.next_delay()
                    if time.monotonic() + delay > deadline:
                        raise KubeSourceError(
                            f"cannot list {follower.resource.path}: {_describe(exc)}"
                        ) from exc
                    log.warning(
                        "kubernetes list failed; retrying",
                        kind=follower.kind.value,
                        error=_describe(exc),
                        retry_in=round(delay, 2),
                    )
                    time.sleep(delay)
        state = self._translate()
        self._publish(state)
        log.info("kubernetes state loaded", node=self.node, **_counts(state, self.node))
        return state

    async def run(self, stop: asyncio.Event) -> None:
        """Follow every kind until `stop` is set, publishing each change. Kinds that
        load_initial listed are watched from where the list left off; others are listed
        first."""
        loop = asyncio.get_running_loop()
        changed = asyncio.Event()

        def notify() -> None:
            # A closed loop: the source has stopped, and nobody publishes any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(changed.set)

        self._stopping.clear()
        followers = Drain("kubernetes followers")
        for follower in self._followers:
            followers.spawn(
                self._follow(follower, stop, notify), name=f"kube-{follower.kind.value}"
            )
        publisher = asyncio.create_task(self._publish_changes(changed), name="kube-publish")
        try:
            await stop.wait()
        finally:
            await self._end(followers)
            publisher.cancel()
            await asyncio.gather(publisher, return_exceptions=True)

    # --- the loop of one kind ---------------------------------------------------------------

    async def _follow(
        self, follower: _Follower, stop: asyncio.Event, notify: Callable[[], None]
    ) -> None:
        backoff = self._backoff()
        expired_in_a_row = 0
        thread_name = f"kube-{follower.kind.value}"
        # _stopping too: run() may be cancelled without `stop` being set.
        while not (stop.is_set() or self._stopping.is_set()):
            delay = 0.0
            try:
                if follower.must_list(time.monotonic(), self.timings.resync_interval):
                    list_call = functools.partial(self._list_or_missing, follower, notify)
                    await _in_thread(list_call, thread_name)
                if follower.missing:
                    delay = self.timings.missing_retry_interval
                else:
                    timeout = self._watch_timeout(follower)
                    watch_call = functools.partial(self._watch, follower, notify, timeout)
                    await _in_thread(watch_call, thread_name)
                    backoff.reset()
                    expired_in_a_row = 0
            except Exception as exc:
                if stop.is_set() or self._stopping.is_set():
                    break  # a watch cut short by stopping: not an error
                status = _status_of(exc)
                if status == HTTP_NOT_FOUND and follower.resource.custom:
                    self._mark_missing(follower, notify)
                    delay = self.timings.missing_retry_interval
                elif status == HTTP_GONE:
                    follower.resource_version = None
                    expired_in_a_row += 1
                    # At once, as client-go does; but a server that answers every fresh list
                    # with a 410 again must not be hammered.
                    delay = 0.0 if expired_in_a_row == 1 else backoff.next_delay()
                    log.info(
                        "kubernetes resource version expired; listing again",
                        kind=follower.kind.value,
                    )
                else:
                    delay = backoff.next_delay()
                    log.warning(
                        "kubernetes list or watch failed; retrying",
                        kind=follower.kind.value,
                        error=_describe(exc),
                        retry_in=round(delay, 2),
                    )
            if delay > 0 and await stopped_within(stop, delay):
                break

    def _list_or_missing(self, follower: _Follower, notify: Callable[[], None]) -> None:
        """Blocking. A custom resource answering 404 is marked missing instead of failing."""
        try:
            self._list(follower, notify)
        except ApiException as exc:
            if exc.status != HTTP_NOT_FOUND or not follower.resource.custom:
                raise
            self._mark_missing(follower, notify)

    def _list(self, follower: _Follower, notify: Callable[[], None]) -> None:
        """Blocking: every page of the list, then the kind's objects are exactly those."""
        items: list[KubeObject] = []
        version: str | None = None
        continue_token: str | None = None
        while True:
            response = follower.resource.list_call(
                limit=self.timings.page_size,
                _continue=continue_token,
                _preload_content=False,
                _request_timeout=(self.timings.connect_timeout, self.timings.list_read_timeout),
            )
            try:
                body = json.loads(response.data)
            finally:
                response.release_conn()
            page_items = body.get("items") if isinstance(body, dict) else None
            if not isinstance(page_items, list):
                raise KubeSourceError(f"{follower.resource.path}: the answer is not a list")
            items.extend(item for item in page_items if isinstance(item, dict))
            metadata = body.get("metadata") or {}
            version = metadata.get("resourceVersion") or version
            continue_token = metadata.get("continue") or None
            if continue_token is None:
                break
        with self._objects_lock:
            changed = self._objects.replace_all(follower.kind, items)
        follower.resource_version = version or "0"
        follower.listed_at = time.monotonic()
        if follower.missing:
            follower.missing = False
            log.info("kubernetes resource installed", kind=follower.kind.value)
        if changed:
            notify()

    def _mark_missing(self, follower: _Follower, notify: Callable[[], None]) -> None:
        with self._objects_lock:
            changed = self._objects.replace_all(follower.kind, ())
        follower.resource_version = None
        if not follower.missing:
            follower.missing = True
            log.warning(
                "kubernetes resource not installed; taken as none",
                kind=follower.kind.value,
                path=follower.resource.path,
                retry_every=self.timings.missing_retry_interval,
            )
        if changed:
            notify()

    def _watch(self, follower: _Follower, notify: Callable[[], None], timeout: int) -> None:
        """Blocking: one watch, until the server ends it, it fails, or the source stops."""
        watch = _RawWatch()
        follower.watching(watch)
        started, events = time.monotonic(), 0
        try:
            if self._stopping.is_set():
                return
            stream = watch.events(
                follower.resource.list_call,
                resource_version=follower.resource_version,
                allow_watch_bookmarks=True,
                timeout_seconds=timeout,
                _request_timeout=(
                    self.timings.connect_timeout,
                    timeout + self.timings.watch_read_margin,
                ),
            )
            for event in stream:
                if self._stopping.is_set():
                    return
                if isinstance(event, dict):  # blank keep-alive lines come as None
                    self._apply(follower, event, notify)
                    events += 1
        finally:
            follower.watching(None)
        # client-go's guard: a server that ends every watch at once would otherwise be asked
        # again and again without pause.
        if events == 0 and time.monotonic() - started < 1.0 and timeout > 1:
            raise KubeSourceError(f"{follower.resource.path}: the watch ended at once")

    def _apply(
        self, follower: _Follower, event: dict[str, Any], notify: Callable[[], None]
    ) -> None:
        event_type = event.get("type")
        obj = event.get("raw_object")
        if not isinstance(obj, dict):
            return
        if event_type != WatchEventType.BOOKMARK:
            with self._objects_lock:
                changed = self._objects.apply(follower.kind, str(event_type), obj)
            if changed:
                notify()
        version = resource_version(obj)
        if version is not None:
            follower.resource_version = version

    def _watch_timeout(self, follower: _Follower) -> int:
        """The watch's timeoutSeconds: jittered, and ending in time for the next resync."""
        jittered = self.timings.watch_timeout * self._rng.uniform(0.5, 1.0)
        until_resync = follower.listed_at + self.timings.resync_interval - time.monotonic()
        return max(1, int(min(jittered, until_resync)))

    async def _end(self, followers: Drain) -> None:
        """Stop the followers: interrupt their watches until their threads let go, up to
        stop_grace, then cancel (a thread ends on its own; it is a daemon either way)."""
        self._stopping.set()

        def interrupt() -> None:
            for follower in self._followers:
                follower.interrupt()

        await followers.close(self.timings.stop_grace, nudge=interrupt)

    # --- publishing ---------------------------------------------------------------------------

    async def _publish_changes(self, changed: asyncio.Event) -> None:
        while True:
            await changed.wait()
            await asyncio.sleep(self.timings.debounce)  # let the rest of the burst arrive
            changed.clear()
            try:
                # The translation is CPU work over the whole cluster: off the event loop.
                state = await asyncio.to_thread(self._translate)
            except Exception as exc:
                # Keep the last good state; the next change tries again.
                self.rejected = f"translating the cluster's objects failed: {exc}"
                log.exception("kubernetes state translation failed", error=str(exc))
                continue
            self.rejected = None
            if self._publish(state):
                log.debug("kubernetes state updated", **_counts(state, self.node))

    def _translate(self) -> MeshState:
        with self._objects_lock:
            objects = self._objects.snapshot()
        published = self._published or MeshState()
        return mesh_state_from(
            objects,
            self.cluster_id,
            self.trust_domain,
            published.policies,
            published.waypoint_policies,
        )

    def _publish(self, state: MeshState) -> bool:
        if state == self._published:
            return False  # e.g. a pod's status changed in a way the mesh does not see
        self._published = state
        self.store.replace(state)
        return True

    def _backoff(self) -> Backoff:
        return Backoff(self.timings.backoff_initial, self.timings.backoff_max, self._rng)


async def _in_thread(func: Callable[[], _T], name: str) -> _T:
    """func() on a daemon thread of its own. The awaiting task may be cancelled; the thread
    then finishes on its own and its outcome is dropped."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[_T] = loop.create_future()

    def work() -> None:
        deliver: Callable[[], None]
        try:
            result = func()
        except Exception as exc:
            deliver = functools.partial(_set_exception, future, exc)
        else:
            deliver = functools.partial(_set_result, future, result)
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
            loop.call_soon_threadsafe(deliver)

    threading.Thread(target=work, name=name, daemon=True).start()
    return await future


def _set_result(future: asyncio.Future[_T], result: _T) -> None:
    if not future.done():  # done: the awaiting task was cancelled
        future.set_result(result)


def _set_exception(future: asyncio.Future[Any], error: Exception) -> None:
    if not future.done():
        future.set_exception(error)


def _status_of(exc: BaseException) -> int | None:
    status = getattr(exc, "status", None) if isinstance(exc, ApiException) else None
    return status if isinstance(status, int) else None


def _describe(exc: BaseException) -> str:
    """One line: the client's ApiException text carries the headers and body."""
    if isinstance(exc, ApiException):
        return f"HTTP {exc.status} {exc.reason}".strip()
    return f"{type(exc).__name__}: {exc}".splitlines()[0]


def _nothing() -> None:
    pass


def _counts(state: MeshState, node: str) -> dict[str, int]:
    return {
        "workloads": len(state.workloads),
        "on_node": len(state.workloads_on(node)),
        "services": len(state.services),
        "policies": len(state.policies),
        "namespaces": len(state.namespaces),
    }
