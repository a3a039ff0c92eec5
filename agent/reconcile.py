"""Keep this node's pods as the mesh state wants them, and answer ambient-cni.

On every state change the reconciler puts the policies for the wanted pods into the kernel
first (a pod is never captured without them), then unenrolls pods no longer wanted, updates
in place those whose workload changed (or, when the change moves the pod, enrolls them
afresh) and enrolls the new ones. CNI requests change the CNI pod registry, publish
the state and reconcile at once, so ADD is answered only once the pod is enrolled (or known
to stay out of the mesh): its app never starts uncaptured. One reconcile runs at a time.

The parts it drives are the protocols below; app.py hands in the real ones, unit tests fakes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

import structlog

from agent.inpod.enrollment import EnrollmentError
from agent.policy.live import LiveConnection
from agent.sources.cni_pods import CniPod, CniPods
from agent.state.store import MeshState, StateStore
from agent.state.workload import Workload
from cni.protocol import Answer, Request

log = structlog.get_logger("agent")

# Seconds before a failed reconcile is tried again, doubling up to the maximum.
RETRY_FIRST = 0.1
RETRY_MAX = 10.0


class EnrolledPodView(Protocol):
    @property
    def workload(self) -> Workload: ...


class Enroller(Protocol):
    """agent/inpod/enrollment.py's PodEnroller."""

    @property
    def pods(self) -> Mapping[str, EnrolledPodView]: ...
    async def enroll(self, workload: Workload) -> None: ...
    async def update(self, workload: Workload) -> bool: ...
    async def unenroll(self, uid: str) -> None: ...


class PolicyApplier(Protocol):
    """agent/policy/engine.py's PolicyEngine."""

    async def apply(self, state: MeshState, destinations: Iterable[Workload]) -> None: ...
    def cut_denied(self, connections: Iterable[LiveConnection]) -> int: ...


class WorkloadSeries(Protocol):
    """agent/telemetry/connections.py's ConnectionTelemetry."""

    def forget_workloads(self, known: set[str]) -> int: ...


class Reconciler:
    def __init__(
        self,
        node: str,
        store: StateStore,
        enroller: Enroller,
        policy: PolicyApplier,
        telemetry: WorkloadSeries,
        live_connections: Callable[[], list[LiveConnection]] | None = None,
    ) -> None:
        self.node = node
        self.store = store  # the state it reconciles to
        self._enroller = enroller
        self._policy = policy
        self._telemetry = telemetry
        # With --cut-denied-connections: the live inbound connections to re-check.
        self._live_connections = live_connections
        self._lock = asyncio.Lock()
        self.reconciled = False
        self.failures = 0
        # Failed reconciles (not pods that failed to enroll: those are in enroll_errors).
        self.errors = 0
        self.error: str | None = None
        self.enroll_errors: dict[str, str] = {}

    def wanted(self, state: MeshState) -> list[Workload]:
        return [w for w in state.workloads_on(self.node) if w.captured]

    async def reconcile(self) -> bool:
        """Enroll what the store's state wants on this node, unenroll the rest; a pod whose
        workload changed is updated in place where it can be, else enrolled afresh. The
        state is read when this reconcile's turn comes, so requests queued behind one
        reconcile (a burst of CNI ADDs) share the next.

        An error (a bug, or a state no check caught) is logged with its cause and counted,
        and stays in `error` (readiness shows it) until a reconcile succeeds; False then."""
        async with self._lock:
            try:
                await self._reconcile_locked(self.store.current)
            except Exception as exc:
                self.errors += 1
                self.error = f"{type(exc).__name__}: {exc}"
                log.exception("reconcile failed: the state is not fully in force",
                              error=self.error)  # fmt: skip
                return False
            self.error = None
            return True

    async def follow(self, stop: asyncio.Event) -> None:
        """Reconcile after every change of the store's state, until `stop` is set. A failed
        reconcile is retried with backoff (sooner when the state changes again)."""
        changed = asyncio.Event()
        unsubscribe = self.store.subscribe(lambda old, new: changed.set())
        retry_in = RETRY_FIRST if self.error is not None else None  # the start's failed
        try:
            while not stop.is_set():
                waits = {asyncio.ensure_future(changed.wait()), asyncio.ensure_future(stop.wait())}
                await asyncio.wait(waits, timeout=retry_in, return_when=asyncio.FIRST_COMPLETED)
                for waiting in waits:
                    waiting.cancel()
                if stop.is_set():
                    return
                changed.clear()
                if await self.reconcile():
                    retry_in = None
                else:
                    retry_in = min(RETRY_MAX, (retry_in or RETRY_FIRST / 2) * 2)
        finally:
            unsubscribe()

    async def _update(self, workload: Workload) -> bool:
        try:
            return await self._enroller.update(workload)
        except Exception as exc:  # e.g. no certificate for a new identity: enrolled afresh
            log.warning("pod not updated in place", pod=workload.key, error=str(exc))
            return False

    async def _reconcile_locked(self, state: MeshState) -> None:
        wanted = {w.uid: w for w in self.wanted(state)}
        # Policies first: a pod is never captured without its policies in the kernel.
        await self._policy.apply(state, wanted.values())
        if self._live_connections is not None:
            self._policy.cut_denied(self._live_connections())
        for uid, pod in list(self._enroller.pods.items()):
            workload = wanted.get(uid)
            if workload == pod.workload:
                continue
            if workload is None or not await self._update(workload):
                await self._enroller.unenroll(uid)
        self.enroll_errors = {k: v for k, v in self.enroll_errors.items() if k in wanted}
        for workload in wanted.values():
            if workload.uid in self._enroller.pods:
                continue
            try:
                await self._enroller.enroll(workload)
                self.enroll_errors.pop(workload.uid, None)
            except EnrollmentError as exc:
                self.failures += 1
                self.enroll_errors[workload.uid] = str(exc)
                log.error("pod not enrolled", error=str(exc))
        gone = self._telemetry.forget_workloads({w.uid for w in state.workloads})
        if gone:
            log.info("metric series of removed workloads dropped", series=gone)
        self.reconciled = True


class CniAnswers:
    """What the CNI plugin asks (cni/protocol.py), answered from the registry of CNI pods
    and the reconciler."""

    def __init__(
        self,
        reconciler: Reconciler,
        enroller: Enroller,
        cni_pods: CniPods,
        publish: Callable[[], None],
        not_ready: Callable[[], list[str]],
    ) -> None:
        self._reconciler = reconciler
        self._enroller = enroller
        self._cni_pods = cni_pods
        self._publish = publish
        self._not_ready = not_ready

    async def answer(self, request: Request) -> Answer:
        if request.op == "status":
            missing = self._not_ready()
            return Answer(ok=not missing, error="; ".join(missing))
        if request.op == "add":
            if not request.ips:
                return Answer(ok=False, error="no pod addresses in the primary plugin's result")
            self._cni_pods.add(CniPod(
                request.container_id, request.netns, request.ifname, request.pod.namespace,
                request.pod.name, request.pod.uid, request.ips,
            ))  # fmt: skip
        elif request.op == "del":
            self._cni_pods.remove(request.container_id)
        elif request.op == "gc":
            released = self._cni_pods.keep_only(request.valid)
            await self._apply()
            return Answer(ok=True, released=tuple(released))
        await self._apply()
        pod = self._cni_pods.get(request.container_id)
        if pod is None and request.op == "del":
            return Answer(ok=True)
        if pod is None:
            return Answer(ok=False, error=f"container {request.container_id} is not known")
        uid = pod.workload_uid
        workload = next((w for w in self._reconciler.store.current.workloads if w.uid == uid), None)
        wanted = workload is not None and workload.captured
        enrolled = uid in self._enroller.pods
        if wanted and not enrolled:
            error = self._reconciler.enroll_errors.get(uid, "pod not enrolled")
            if request.op == "add":
                # The failed ADD leaves nothing behind: the runtime tears the sandbox down
                # (and sends DEL), and the node stays ready for its other pods.
                self._cni_pods.remove(request.container_id)
                await self._apply()
            return Answer(ok=False, error=error)
        return Answer(ok=True, enrolled=enrolled)

    async def _apply(self) -> None:
        self._publish()
        await self._reconciler.reconcile()
