from __future__ import annotations

import itertools
import threading

from structlog.testing import capture_logs

from agent.sources.local_config import parse_local_config
from agent.state.service import Service
from agent.state.store import MeshState, StateStore
from agent.state.workload import Protocol, Workload

MESH = """\
workloads:
  - name: echo-1
    namespace: default
    workloadIps: [10.0.0.3]
    protocol: HBONE
    node: node-1
    services: {default/echo.default.svc.cluster.local: {80: 8080}}
  - name: echo-2
    namespace: default
    workloadIps: [10.0.1.3, "fd00::3"]
    protocol: HBONE
    node: node-2
    services: {default/echo.default.svc.cluster.local: {80: 8080}}
  - name: client
    namespace: default
    workloadIps: [10.0.0.2]
    node: node-1
services:
  - name: echo
    namespace: default
    vips: [/10.96.0.10]
    ports: {80: 8080}
  - name: idle
    namespace: default
    vips: [10.96.0.11]
    ports: {80: 80}
policies:
  - {name: p, namespace: default, scope: Namespace, action: Allow, rules: []}
"""


def mesh() -> MeshState:
    config = parse_local_config(MESH, "mesh.yaml")
    return MeshState(config.workloads, config.services, config.policies)


def names(workloads: tuple[Workload, ...]) -> list[str]:
    return [w.name for w in workloads]


def test_workload_by_ip() -> None:
    state = mesh()
    assert (w := state.workload_by_ip("10.0.1.3")) is not None and w.name == "echo-2"
    # IPv6 has many spellings of one address; any of them finds the workload.
    assert (w := state.workload_by_ip("fd00:0::0003")) is not None and w.name == "echo-2"
    assert state.workload_by_ip("10.0.0.99") is None
    assert state.workload_by_ip("not an ip") is None


def test_workloads_on_node_keep_config_order() -> None:
    state = mesh()
    assert names(state.workloads_on("node-1")) == ["echo-1", "client"]
    assert names(state.workloads_on("node-2")) == ["echo-2"]
    assert state.workloads_on("node-3") == ()


def test_service_by_vip_needs_a_port_the_service_exposes() -> None:
    state = mesh()
    echo = state.service_by_vip("10.96.0.10", 80)
    assert echo is not None and echo.name == "echo"
    assert state.service_by_vip("10.96.0.10", 81) is None
    assert state.service_by_vip("10.0.0.3", 80) is None


def test_workloads_of_service_by_namespace_and_hostname() -> None:
    state = mesh()
    echo, idle = state.services
    assert names(state.workloads_of_service(echo)) == ["echo-1", "echo-2"]
    assert state.workloads_of_service(idle) == ()


def test_first_entry_wins_when_a_source_hands_over_clashing_entries() -> None:
    # The parser refuses such configs; other sources may not, and lookups must stay defined.
    first = Workload("u1", "a", "ns", "sa", ("10.0.0.1",), Protocol.TCP, "n")
    second = Workload("u2", "b", "ns", "sa", ("10.0.0.1",), Protocol.TCP, "n")
    s1 = Service("s1", "ns", "s1.ns", ("10.96.0.1",), {80: 80})
    s2 = Service("s2", "ns", "s2.ns", ("10.96.0.1",), {80: 80})
    state = MeshState((first, second), (s1, s2))
    assert state.workload_by_ip("10.0.0.1") is first
    assert state.service_by_vip("10.96.0.1", 80) is s1


def test_empty_state() -> None:
    state = MeshState()
    assert state.workloads == () and state.workload_by_ip("10.0.0.1") is None
    assert StateStore().current == state


def test_replace_swaps_the_whole_snapshot_and_tells_subscribers_old_and_new() -> None:
    before, after = MeshState(), mesh()
    store = StateStore(before)
    seen: list[tuple[MeshState, MeshState, MeshState]] = []
    store.subscribe(lambda old, new: seen.append((old, new, store.current)))
    store.replace(after)
    assert store.current is after
    # Called after the swap: a subscriber reading the store already sees the new state.
    assert seen == [(before, after, after)]
    assert seen[0][0] is before and seen[0][1] is after


def test_a_failing_subscriber_is_logged_and_does_not_stop_the_others() -> None:
    store = StateStore()
    calls: list[str] = []

    def broken(old: MeshState, new: MeshState) -> None:
        calls.append("broken")
        raise RuntimeError("subscriber bug")

    store.subscribe(broken)
    store.subscribe(lambda old, new: calls.append("healthy"))
    new = mesh()
    with capture_logs() as logs:
        store.replace(new)
    assert calls == ["broken", "healthy"]
    assert store.current is new
    (event,) = logs
    assert event["event"] == "state subscriber failed"
    assert event["log_level"] == "error" and "broken" in event["subscriber"]


def test_unsubscribe() -> None:
    store = StateStore()
    calls: list[MeshState] = []
    unsubscribe = store.subscribe(lambda old, new: calls.append(new))
    store.replace(MeshState())
    unsubscribe()
    store.replace(MeshState())
    assert len(calls) == 1


def test_readers_never_see_a_half_update() -> None:
    # Each snapshot is internally consistent: its workloads and its indexes agree. A writer
    # thread replaces snapshots as fast as it can while readers check that they always get
    # one snapshot whose index answers for its own workloads.
    def snapshot(generation: int) -> MeshState:
        ip = f"10.1.{generation // 250}.{generation % 250 + 1}"
        workload = Workload(
            f"u{generation}", f"w{generation}", "ns", "sa", (ip,), Protocol.TCP, "n"
        )
        return MeshState((workload,))

    store = StateStore(snapshot(0))
    done = threading.Event()
    torn: list[int] = []

    def reader() -> None:
        while not done.is_set():
            state = store.current
            (workload,) = state.workloads
            if state.workload_by_ip(workload.ips[0]) is not workload:
                torn.append(1)

    readers = [threading.Thread(target=reader) for _ in range(4)]
    for thread in readers:
        thread.start()
    transitions: list[tuple[MeshState, MeshState]] = []
    store.subscribe(lambda old, new: transitions.append((old, new)))
    snapshots = [snapshot(g) for g in range(1, 2000)]
    for state in snapshots:
        store.replace(state)
    done.set()
    for thread in readers:
        thread.join()
    assert torn == []
    assert store.current is snapshots[-1]
    # Every transition starts from the snapshot the previous one ended at.
    assert all(a[1] is b[0] for a, b in itertools.pairwise(transitions))
