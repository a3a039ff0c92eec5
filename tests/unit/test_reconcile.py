"""agent/reconcile.py without root: the reconciler and the CNI answers against fakes of the
enroller (the pods' side), the policy engine (the kernel's maps) and the telemetry."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from agent.inpod.enrollment import EnrollmentError
from agent.policy.live import LiveConnection
from agent.reconcile import CniAnswers, Reconciler
from agent.sources.cni_pods import CniPods, with_cni_pods
from agent.state.namespace import DATAPLANE_MODE_LABEL, Namespace
from agent.state.store import MeshState, StateStore
from agent.state.workload import Protocol, Workload
from cni.protocol import PodRef, Request

NODE = "node-1"


def workload(name: str, *, node: str = NODE, protocol: Protocol = Protocol.HBONE) -> Workload:
    return Workload(
        uid=f"uid-{name}", name=name, namespace="shop", service_account=f"{name}-sa",
        ips=(f"10.1.0.{len(name)}",), protocol=protocol, node=node, netns=f"/run/netns/{name}",
    )  # fmt: skip


@dataclass
class FakePod:
    workload: Workload


class FakeEnroller:
    def __init__(self, journal: list[str]) -> None:
        self.pods: dict[str, FakePod] = {}
        self.journal = journal
        self.failing: dict[str, str] = {}  # uid -> why enrolling fails

    async def enroll(self, w: Workload) -> None:
        if w.uid in self.failing:
            raise EnrollmentError(f"{w.key}: {self.failing[w.uid]}")
        self.journal.append(f"enroll {w.name}")
        self.pods[w.uid] = FakePod(w)

    async def update(self, w: Workload) -> bool:
        """In place unless the pod moved (the real rule is in enrollment)."""
        old = self.pods[w.uid].workload
        if (old.netns, old.ips) != (w.netns, w.ips):
            return False
        self.journal.append(f"update {w.name}")
        self.pods[w.uid] = FakePod(w)
        return True

    async def unenroll(self, uid: str) -> None:
        pod = self.pods.pop(uid)
        self.journal.append(f"unenroll {pod.workload.name}")


class FakePolicy:
    def __init__(self, journal: list[str]) -> None:
        self.journal = journal
        self.checked: list[list[LiveConnection]] = []
        self.failing = 0  # the next applies that raise, as a bug would

    async def apply(self, state: MeshState, destinations: Iterable[Workload]) -> None:
        await asyncio.sleep(0.01)  # as a kernel write takes its time: others queue meanwhile
        if self.failing:
            self.failing -= 1
            raise ValueError("a value nothing checked")
        self.journal.append("policies for " + ",".join(sorted(w.name for w in destinations)))

    def cut_denied(self, connections: Iterable[LiveConnection]) -> int:
        self.checked.append(list(connections))
        return 0


class FakeSeries:
    def __init__(self) -> None:
        self.known: list[set[str]] = []

    def forget_workloads(self, known: set[str]) -> int:
        self.known.append(known)
        return 0


@pytest.fixture
def journal() -> list[str]:
    return []


@pytest.fixture
def enroller(journal: list[str]) -> FakeEnroller:
    return FakeEnroller(journal)


@pytest.fixture
def policy(journal: list[str]) -> FakePolicy:
    return FakePolicy(journal)


@pytest.fixture
def store() -> StateStore:
    return StateStore()


@pytest.fixture
def reconciler(store: StateStore, enroller: FakeEnroller, policy: FakePolicy) -> Reconciler:
    return Reconciler(NODE, store, enroller, policy, FakeSeries())


def reconcile(reconciler: Reconciler, *workloads: Workload) -> None:
    """Put the workloads in the reconciler's store, then reconcile."""
    reconciler.store.replace(MeshState(workloads))
    asyncio.run(reconciler.reconcile())


def test_enrolls_the_captured_pods_of_its_node_with_their_policies_first(
    reconciler: Reconciler, enroller: FakeEnroller, journal: list[str]
) -> None:
    plain = workload("legacy", protocol=Protocol.TCP)
    elsewhere = workload("remote", node="node-2")
    reconcile(reconciler, workload("cart"), workload("web"), plain, elsewhere)
    assert journal == ["policies for cart,web", "enroll cart", "enroll web"]
    assert sorted(enroller.pods) == ["uid-cart", "uid-web"]
    assert reconciler.reconciled and reconciler.failures == 0


def test_a_moved_workload_is_enrolled_afresh_and_a_removed_one_released(
    reconciler: Reconciler, journal: list[str]
) -> None:
    cart, web = workload("cart"), workload("web")
    reconcile(reconciler, cart, web)
    journal.clear()
    reconcile(reconciler, replace(cart, netns="/run/netns/cart-2"))
    assert journal == ["policies for cart", "unenroll cart", "unenroll web", "enroll cart"]


def test_a_relabelled_workload_is_updated_in_place(
    reconciler: Reconciler, journal: list[str]
) -> None:
    cart = workload("cart")
    reconcile(reconciler, cart)
    journal.clear()
    reconcile(reconciler, replace(cart, labels={"version": "v2"}))
    assert journal == ["policies for cart", "update cart"]


def test_an_unchanged_state_changes_nothing(reconciler: Reconciler, journal: list[str]) -> None:
    reconcile(reconciler, workload("cart"))
    journal.clear()
    reconcile(reconciler, workload("cart"))
    assert journal == ["policies for cart"]


def test_a_failed_enrollment_is_remembered_until_it_succeeds_or_is_not_wanted(
    reconciler: Reconciler, enroller: FakeEnroller
) -> None:
    cart, web = workload("cart"), workload("web")
    enroller.failing[cart.uid] = "cannot open network namespace"
    reconcile(reconciler, cart, web)
    assert reconciler.failures == 1
    assert reconciler.enroll_errors == {cart.uid: "shop/cart: cannot open network namespace"}
    assert list(enroller.pods) == [web.uid]  # one pod's failure does not stop the others

    del enroller.failing[cart.uid]
    reconcile(reconciler, cart, web)
    assert reconciler.enroll_errors == {} and cart.uid in enroller.pods

    enroller.failing[web.uid] = "gone"
    reconcile(reconciler, cart)  # web is no longer wanted: no error kept for it
    assert reconciler.enroll_errors == {}


def test_live_connections_are_rechecked_only_when_asked_for(
    enroller: FakeEnroller, policy: FakePolicy
) -> None:
    reconcile(Reconciler(NODE, StateStore(), enroller, policy, FakeSeries()), workload("cart"))
    assert policy.checked == []
    live = LiveConnection("shop/cart", "10.1.0.9", "10.1.0.4", 8080, None, lambda: None)
    recheck = Reconciler(NODE, StateStore(), enroller, policy, FakeSeries(),
                         live_connections=lambda: [live])  # fmt: skip
    reconcile(recheck, workload("cart"))
    assert policy.checked == [[live]]


def test_series_of_workloads_gone_from_the_state_are_dropped(
    enroller: FakeEnroller, policy: FakePolicy
) -> None:
    series = FakeSeries()
    reconciler = Reconciler(NODE, StateStore(), enroller, policy, series)
    reconcile(reconciler, workload("cart"), workload("remote"))
    assert series.known == [{"uid-cart", "uid-remote"}]


def test_follow_reconciles_each_change_until_stopped(
    reconciler: Reconciler, store: StateStore, journal: list[str]
) -> None:
    async def scenario() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(reconciler.follow(stop))
        await asyncio.sleep(0)
        store.replace(MeshState((workload("cart"),)))
        for _ in range(100):
            await asyncio.sleep(0.01)
            if "enroll cart" in journal:
                break
        stop.set()
        await asyncio.wait_for(task, 1.0)
        store.replace(MeshState())  # after the stop: not followed any more

    asyncio.run(scenario())
    assert journal == ["policies for cart", "enroll cart"]


def test_a_failing_reconcile_is_logged_shown_and_retried_until_it_succeeds(
    reconciler: Reconciler, store: StateStore, policy: FakePolicy, journal: list[str]
) -> None:
    policy.failing = 3

    async def scenario() -> list[str | None]:
        stop = asyncio.Event()
        task = asyncio.create_task(reconciler.follow(stop))
        await asyncio.sleep(0)
        store.replace(MeshState((workload("cart"),)))
        seen: list[str | None] = []
        for _ in range(300):
            await asyncio.sleep(0.01)
            seen.append(reconciler.error)
            if "enroll cart" in journal:
                break
        stop.set()
        await asyncio.wait_for(task, 1.0)  # the task lived through every failure
        return seen

    seen = asyncio.run(scenario())
    assert "ValueError: a value nothing checked" in seen
    assert reconciler.errors == 3 and reconciler.error is None
    assert journal == ["policies for cart", "enroll cart"]


# --- CNI answers ------------------------------------------------------------------------------


class Node:
    """The CNI side of an agent: the registry, the state it publishes, the answers."""

    def __init__(
        self, tmp_path: Path, store: StateStore, reconciler: Reconciler, enroller: FakeEnroller
    ) -> None:
        ambient = Namespace("shop", {DATAPLANE_MODE_LABEL: "ambient"})
        self.config = MeshState(namespaces=(ambient, Namespace("legacy")))
        self.cni_pods = CniPods(tmp_path / "cni-pods.json")
        self.store = store
        store.replace(self.config)
        self.missing: list[str] = []
        self.answers = CniAnswers(reconciler, enroller, self.cni_pods, self.publish,
                                  lambda: self.missing)  # fmt: skip

    def publish(self) -> None:
        self.store.replace(with_cni_pods(self.config, self.cni_pods.all(), NODE))

    def ask(self, request: Request) -> tuple[bool, str, bool]:
        answer = asyncio.run(self.answers.answer(request))
        return answer.ok, answer.error, answer.enrolled


def add(
    container: str = "c1",
    namespace: str = "shop",
    name: str = "cart",
    ips: tuple[str, ...] = ("10.1.0.5",),
) -> Request:
    pod = PodRef(namespace, name, f"uid-{name}")
    return Request("add", container, f"/run/netns/{name}", "eth0", pod, ips)


@pytest.fixture
def node(tmp_path: Path, store: StateStore, reconciler: Reconciler, enroller: FakeEnroller) -> Node:
    return Node(tmp_path, store, reconciler, enroller)


def test_add_answers_once_the_pod_is_enrolled(node: Node, enroller: FakeEnroller) -> None:
    assert node.ask(add()) == (True, "", True)
    (pod,) = enroller.pods.values()
    assert (pod.workload.name, pod.workload.netns) == ("cart", "/run/netns/cart")
    assert node.ask(Request("check", "c1")) == (True, "", True)


def test_add_in_a_namespace_out_of_the_mesh_is_not_enrolled(
    node: Node, enroller: FakeEnroller
) -> None:
    assert node.ask(add(namespace="legacy")) == (True, "", False)
    assert enroller.pods == {}


def test_add_fails_with_the_reason_the_pod_could_not_be_enrolled(
    node: Node, enroller: FakeEnroller
) -> None:
    enroller.failing["uid-cart"] = "cannot listen on 15001 in the pod"
    assert node.ask(add()) == (
        False,
        "shop/cart: cannot listen on 15001 in the pod",
        False,
    )


def test_add_without_addresses_is_refused(node: Node) -> None:
    ok, error, _ = node.ask(add(ips=()))
    assert not ok and error == "no pod addresses in the primary plugin's result"
    assert node.cni_pods.all() == ()


def test_del_releases_the_pod_and_is_idempotent(node: Node, enroller: FakeEnroller) -> None:
    node.ask(add())
    assert node.ask(Request("del", "c1")) == (True, "", False)
    assert enroller.pods == {} and node.cni_pods.all() == ()
    assert node.ask(Request("del", "c1")) == (True, "", False)


def test_check_of_an_unknown_container_fails(node: Node) -> None:
    assert node.ask(Request("check", "nope")) == (False, "container nope is not known", False)


def test_gc_releases_containers_no_longer_valid(node: Node, enroller: FakeEnroller) -> None:
    node.ask(add("c1", name="cart"))
    node.ask(add("c2", name="web", ips=("10.1.0.6",)))
    answer = asyncio.run(node.answers.answer(Request("gc", valid=("c2",))))
    assert answer.ok and answer.released == ("c1",)
    assert [p.workload.name for p in enroller.pods.values()] == ["web"]


def test_requests_queued_behind_a_reconcile_share_the_next(
    node: Node, enroller: FakeEnroller, journal: list[str]
) -> None:
    """A burst of ADDs: each waiting request reconciles to the newest state, not its own."""

    async def burst() -> list[bool]:
        answers = await asyncio.gather(
            node.answers.answer(add("c1", name="cart")),
            node.answers.answer(add("c2", name="web", ips=("10.1.0.6",))),
            node.answers.answer(add("c3", name="db", ips=("10.1.0.7",))),
        )
        return [answer.ok and answer.enrolled for answer in answers]

    assert asyncio.run(burst()) == [True, True, True]
    applied = [line for line in journal if line.startswith("policies")]
    assert applied == ["policies for cart", "policies for cart,db,web", "policies for cart,db,web"]


def test_status_is_the_readiness(node: Node) -> None:
    assert node.ask(Request("status")) == (True, "", False)
    node.missing = ["eBPF programs not loaded", "pods not enrolled yet"]
    assert node.ask(Request("status")) == (
        False,
        "eBPF programs not loaded; pods not enrolled yet",
        False,
    )
