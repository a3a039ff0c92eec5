"""Lab network: planning and state without root; building, reaching and tearing down as root."""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lab import network
from lab.network import (
    LabError,
    LabNetwork,
    LabState,
    down,
    exec_argv,
    list_netns,
    load_state,
    status,
)
from lab.topology import PodSpec, default_topology, parse_topology

THREE_NODES = """\
nodeNetwork: 192.168.77.0/28
nodes:
  - {name: a, podCidr: 10.77.1.0/30}
  - {name: b, podCidr: 10.77.2.0/30}
  - {name: c, podCidr: 10.77.3.0/30}
pods:
  - {name: pa, node: a}
  - {name: pb, node: b, namespace: other}
  - {name: pc, node: c, ambient: false}
"""


def planned(name: str = "lab") -> LabState:
    return LabNetwork(name).plan(default_topology())


def test_plan_names_netns_and_interfaces() -> None:
    state = planned("demo")
    assert state.fabric_netns == "demo-fabric"
    assert [(n.name, n.netns, n.ip, n.fabric_interface) for n in state.nodes] == [
        ("node-1", "demo-node-1", "10.239.0.10", "n-0"),
        ("node-2", "demo-node-2", "10.239.0.11", "n-1"),
    ]
    assert [(p.name, p.netns, p.ip, p.node_interface) for p in state.pods] == [
        ("client-a", "demo-client-a", "10.240.1.2", "vp0"),
        ("server-a", "demo-server-a", "10.240.1.3", "vp1"),
        ("server-b", "demo-server-b", "10.240.2.2", "vp2"),
        ("client-b", "demo-client-b", "10.240.2.3", "vp3"),
        ("outsider", "demo-outsider", "10.240.2.4", "vp4"),
        ("waypoint", "demo-waypoint", "10.240.1.4", "vp5"),
    ]
    assert {p.interface for p in state.pods} == {"eth0"}
    assert state.pods[4].ambient is False
    assert state.pods[0].netns_path == Path("/run/netns/demo-client-a")
    assert state.parsed_topology() == default_topology()


def test_state_json_round_trip_keeps_agents() -> None:
    state = planned()
    state.agents["node-1"] = {"pid": 1234, "log": "/run/ambient-lab/lab/agent-node-1.log"}
    text = state.to_json()
    assert LabState.from_json(text) == state
    data = json.loads(text)
    assert data["version"] == 1
    assert set(data) == {
        "version",
        "name",
        "topology",
        "fabric_netns",
        "node_network",
        "nodes",
        "pods",
        "agents",
        "waypoints",
    }
    assert data["agents"]["node-1"]["pid"] == 1234


@pytest.mark.parametrize(
    "text", ["{", "[]", '{"version": 99}', '{"version": 1, "name": "x"}', '{"version": 1}']
)
def test_corrupt_state_is_a_lab_error(text: str) -> None:
    with pytest.raises(LabError, match="invalid lab state"):
        LabState.from_json(text)


def test_exec_argv() -> None:
    state = planned()
    assert exec_argv(state, "client-a", ["ping", "-c1", "10.240.2.2"]) == [
        "ip",
        "netns",
        "exec",
        "lab-client-a",
        "ping",
        "-c1",
        "10.240.2.2",
    ]
    assert exec_argv(state, "node-2", ["ip", "route"])[3] == "lab-node-2"
    assert exec_argv(state, "fabric", ["bridge", "link"])[3] == "lab-fabric"
    with pytest.raises(LabError, match=r"no node or pod 'nope' in lab 'lab'; nodes: node-1"):
        exec_argv(state, "nope", ["true"])
    with pytest.raises(LabError, match="no command"):
        exec_argv(state, "client-a", [])


@pytest.mark.parametrize("name", ["", "Lab", "a-b", "1lab", "thirteenchars", "la b"])
def test_invalid_lab_names(name: str) -> None:
    with pytest.raises(LabError, match="invalid lab name"):
        LabNetwork(name)


@pytest.mark.parametrize(
    ("extra_pod", "problem"),
    [
        (
            PodSpec("client-a", "other", "node-2", "client-a"),
            "pod default/client-a and pod other/client-a would share netns lab-client-a",
        ),
        (PodSpec("node-1", "default", "node-2", "x"), "node node-1 and pod default/node-1"),
        (PodSpec("fabric", "default", "node-2", "x"), "the fabric and pod default/fabric"),
    ],
)
def test_netns_name_collisions_are_rejected(extra_pod: PodSpec, problem: str) -> None:
    topology = default_topology()
    topology = dataclasses.replace(topology, pods=(*topology.pods, extra_pod))
    with pytest.raises(LabError, match=problem):
        LabNetwork("lab").plan(topology)


def test_state_file_without_a_lab(tmp_path: Path) -> None:
    assert load_state("nolab", state_root=tmp_path) is None
    path = tmp_path / "nolab" / "state.json"
    path.parent.mkdir()
    path.write_text("not json")
    with pytest.raises(LabError, match=r"nolab/state\.json: invalid lab state"):
        load_state("nolab", state_root=tmp_path)


# Everything below builds real namespaces.

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: builds network namespaces")
needs_ping = pytest.mark.skipif(
    shutil.which("ping") is None, reason="needs ping (Debian package iputils-ping)"
)


@pytest.fixture
def lab_name(request: pytest.FixtureRequest) -> str:
    """A fresh lab name, torn down after the test whatever happened in it."""
    name = f"t{secrets.token_hex(3)}"
    request.addfinalizer(lambda: down(name))
    return name


@pytest.fixture
def lab(lab_name: str) -> Iterator[LabState]:
    yield LabNetwork(lab_name).up(default_topology())


def lab_netns(name: str) -> list[str]:
    return [netns for netns in list_netns() if netns.startswith(f"{name}-")]


def ping(state: LabState, source: str, address: str) -> str | None:
    """None if ``address`` answers from ``source``'s netns, else ping's output."""
    argv = exec_argv(state, source, ["ping", "-c1", "-W2", address])
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    return None if done.returncode == 0 else f"{done.stdout}{done.stderr}"


def ip_json(state: LabState, target: str, *args: str) -> list[dict[str, Any]]:
    argv = exec_argv(state, target, ["ip", "-j", *args])
    result: list[dict[str, Any]] = json.loads(
        subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    )
    return result


def unreachable(state: LabState, pairs: list[tuple[str, str]]) -> dict[str, str]:
    ips = {p.name: p.ip for p in state.pods} | {n.name: n.ip for n in state.nodes}
    failures = {f"{src} -> {dst}": ping(state, src, ips[dst]) for src, dst in pairs}
    return {pair: output for pair, output in failures.items() if output is not None}


@pytest.mark.kernel
@needs_root
@needs_ping
def test_pods_and_nodes_reach_each_other(lab: LabState) -> None:
    pairs = [
        ("client-a", "server-a"),  # same node
        ("client-a", "server-b"),  # across nodes
        ("client-b", "client-a"),
        ("server-b", "client-b"),
        ("outsider", "server-a"),
        ("node-1", "node-2"),
        ("node-2", "node-1"),
        ("node-1", "client-b"),
    ]
    assert unreachable(lab, pairs) == {}


@pytest.mark.kernel
@needs_root
@needs_ping
def test_a_custom_topology_routes_between_all_nodes(lab_name: str) -> None:
    state = LabNetwork(lab_name).up(parse_topology(THREE_NODES, "three.yaml"))
    assert [p.ip for p in state.pods] == ["10.77.1.2", "10.77.2.2", "10.77.3.2"]
    pods = [p.name for p in state.pods]
    assert unreachable(state, [(a, b) for a in pods for b in pods if a != b]) == {}


@pytest.mark.kernel
@needs_root
def test_pod_interfaces(lab: LabState) -> None:
    for pod in lab.pods:
        node = next(n for n in lab.nodes if n.name == pod.node)
        (eth0,) = ip_json(lab, pod.name, "addr", "show", "dev", "eth0")
        addresses = [(a["family"], a["local"], a["prefixlen"]) for a in eth0["addr_info"]]
        assert addresses == [("inet", pod.ip, 24)], pod.name
        routes = ip_json(lab, pod.name, "route", "show")
        assert routes == [
            {"dst": "default", "gateway": node.gateway, "dev": "eth0", "flags": ["onlink"]}
        ]
        (veth,) = ip_json(lab, pod.node, "addr", "show", "dev", pod.node_interface)
        assert [a["local"] for a in veth["addr_info"]] == [node.gateway]


@pytest.mark.kernel
@needs_root
def test_ipv6_is_disabled_everywhere(lab: LabState) -> None:
    for target in ["fabric", *(n.name for n in lab.nodes), *(p.name for p in lab.pods)]:
        assert ip_json(lab, target, "-6", "addr", "show") == [], target


@pytest.mark.kernel
@needs_root
def test_status_and_state_file_describe_the_lab(lab: LabState) -> None:
    assert load_state(lab.name) == lab
    report = status(lab.name)
    assert report["up"] is True
    assert report["missing"] == [] and report["leftovers"] == []
    assert [tuple(node.values()) for node in report["nodes"]] == [
        ("node-1", f"{lab.name}-node-1", "10.239.0.10", "10.240.1.0/24"),
        ("node-2", f"{lab.name}-node-2", "10.239.0.11", "10.240.2.0/24"),
    ]
    assert [(p["name"], p["netns"], p["ip"]) for p in report["pods"]] == [
        (p.name, p.netns, p.ip) for p in lab.pods
    ]
    json.dumps(report)  # `lab status --json` prints it as is


@pytest.mark.kernel
@needs_root
def test_down_removes_everything_and_twice_is_fine(lab: LabState) -> None:
    state_file = LabNetwork(lab.name).state_path
    assert state_file.exists()
    assert sorted(lab_netns(lab.name)) == sorted(lab.all_netns())
    down(lab.name)
    assert lab_netns(lab.name) == []
    assert not state_file.exists()
    assert not state_file.parent.exists()
    down(lab.name)
    assert status(lab.name)["up"] is False


@pytest.mark.kernel
@needs_root
def test_down_after_a_crash_that_lost_the_state(lab: LabState) -> None:
    LabNetwork(lab.name).state_path.unlink()
    report = status(lab.name)
    assert report["up"] is False
    assert sorted(report["leftovers"]) == sorted(lab.all_netns())
    down(lab.name)
    assert lab_netns(lab.name) == []


@pytest.mark.kernel
@needs_root
def test_status_reports_missing_netns(lab: LabState) -> None:
    subprocess.run(["ip", "netns", "delete", f"{lab.name}-outsider"], check=True)
    report = status(lab.name)
    assert report["up"] is False
    assert report["missing"] == [f"{lab.name}-outsider"]


@pytest.mark.kernel
@needs_root
def test_up_twice_is_refused_and_leaves_the_lab_alone(lab: LabState) -> None:
    with pytest.raises(LabError, match=rf"lab '{lab.name}' is already up .*lab down"):
        LabNetwork(lab.name).up(default_topology())
    assert status(lab.name)["up"] is True


@pytest.mark.kernel
@needs_root
def test_a_failed_up_removes_what_it_built(lab_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object) -> None:
        raise LabError("injected failure")

    monkeypatch.setattr(network, "_build_pod", broken)
    with pytest.raises(LabError, match="injected failure"):
        LabNetwork(lab_name).up(default_topology())
    assert lab_netns(lab_name) == []
    assert load_state(lab_name) is None


@pytest.mark.kernel
@needs_root
def test_ip_errors_carry_the_command_and_stderr(lab_name: str) -> None:
    LabNetwork(lab_name).up(default_topology())
    with pytest.raises(LabError, match=r"`ip netns add .*-fabric` failed \(exit 1\): .*exists"):
        network._add_netns(f"{lab_name}-fabric")
