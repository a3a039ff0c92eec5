"""The one shutdown path, with agent processes in the lab: undo steps that fail do not stop
the others, and an agent killed in the middle of its shutdown loses nothing that a restart
cannot undo. With `--on-exit unenroll`, afterwards every pod's netns is as it was before the
agent came (tc, routing, sysctls, listeners), and no pin, cgroup or cgroup program of the
agent is left. With the default exit, the pods stay captured for the next agent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.datapath.cgroup import PARENT, cgroup2_root
from lab import agents
from lab.network import LabState, load_state

pytestmark = pytest.mark.kernel

FAILING_STEPS = ("proxy.release", "proxy.close", "identities.close", "ring.stop", "cni.close")
DRIVER = (sys.executable, "-m", "tests.support.faulty_agent")


def cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "agent", *args], check=True, capture_output=True,
                   timeout=300)  # fmt: skip


@pytest.fixture
def lab() -> Iterator[LabState]:
    name = "sd" + uuid.uuid4().hex[:6]
    try:
        cli("lab", "up", "--name", name, "--no-agents")
        state = load_state(name)
        assert state is not None
        yield state
    finally:
        cli("lab", "down", "--name", name)


def pod_netns_state(state: LabState) -> dict[str, list[str]]:
    """What enrollment changes in each pod's netns, as the tools print it."""
    seen: dict[str, list[str]] = {}
    for pod in state.pods:
        seen[pod.name] = [
            _in_netns(pod.netns, "tc", "qdisc", "show", "dev", pod.interface),
            _in_netns(pod.netns, "tc", "filter", "show", "dev", pod.interface, "ingress"),
            _in_netns(pod.netns, "tc", "filter", "show", "dev", pod.interface, "egress"),
            _in_netns(pod.netns, "ip", "rule", "show"),
            _in_netns(pod.netns, "ip", "route", "show", "table", "all"),
            _in_netns(pod.netns, "sysctl", f"net.ipv4.conf.{pod.interface}.accept_local",
                      f"net.ipv4.conf.{pod.interface}.rp_filter", "net.ipv4.conf.all.rp_filter"),
            _in_netns(pod.netns, "ss", "-Hltn"),
        ]  # fmt: skip
    return seen


def _in_netns(netns: str, *argv: str) -> str:
    return subprocess.run(["ip", "netns", "exec", netns, *argv], check=True,
                          capture_output=True, text=True).stdout  # fmt: skip


def agent_leftovers(state: LabState) -> list[str]:
    cgroups = cgroup2_root() / PARENT / state.name
    left = [str(p) for p in (agents.lab_pin_root(state.name), cgroups) if p.exists()]
    records = agents.lab_dir(state.name) / "agent-state"
    left += [str(p) for p in records.glob("*/pods/*.json")]
    return left


def start(state: LabState, faults: str) -> dict[str, int]:
    # Unenrolling at exit: the mesh leaves the node, and everything it did is undone.
    agents.start_agents(state, ("--on-exit", "unenroll"), command=(*DRIVER, faults))
    return {node: int(info["pid"]) for node, info in state.agents.items()}


def wait_for_exit(pid: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        # The agent is not our child (nsenter is): reap nothing, just look.
        if Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
            return
        time.sleep(0.1)
    assert not Path(f"/proc/{pid}").exists(), f"agent {pid} did not exit"


def log_of(state: LabState, node: str) -> str:
    return (agents.lab_dir(state.name) / f"agent-{node}.log").read_text()


def test_failing_undo_steps_do_not_stop_the_others(lab: LabState) -> None:
    before = pod_netns_state(lab)
    pids = start(lab, ",".join(f"raise:{step}" for step in FAILING_STEPS))
    assert pod_netns_state(lab) != before  # enrolled: clsact, filters, rules, listeners
    for pid in pids.values():
        os.kill(pid, signal.SIGTERM)
    for pid in pids.values():
        wait_for_exit(pid)
    for node in pids:
        log = log_of(lab, node)
        for step in FAILING_STEPS:
            assert f"injected failure: {step}" in log, f"{node}: {step} did not fail"
        assert '"event": "agent stopped"' in log
    assert pod_netns_state(lab) == before
    assert agent_leftovers(lab) == []


def test_an_agent_killed_during_its_shutdown_loses_nothing(lab: LabState) -> None:
    before = pod_netns_state(lab)
    # The CNI socket closes first: hanging there, the agent is killed with everything held.
    pids = start(lab, "hang:cni.close")
    for node, pid in pids.items():
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while "hanging in cni.close" not in log_of(lab, node):
            assert time.monotonic() < deadline, log_of(lab, node)
            time.sleep(0.1)
        os.kill(pid, signal.SIGKILL)
        wait_for_exit(pid)
    assert agent_leftovers(lab) != []  # pins, cgroup and pods as the kill left them

    # A new agent takes over what the killed one held, and its own shutdown undoes it all.
    pids = start(lab, "")
    for pid in pids.values():
        os.kill(pid, signal.SIGTERM)
    for pid in pids.values():
        wait_for_exit(pid)
    assert pod_netns_state(lab) == before
    assert agent_leftovers(lab) == []


def test_the_default_exit_leaves_the_pods_captured_for_the_next_agent(lab: LabState) -> None:
    before = pod_netns_state(lab)
    agents.start_agents(lab)
    enrolled = pod_netns_state(lab)
    for node, info in lab.agents.items():
        os.kill(int(info["pid"]), signal.SIGTERM)
        wait_for_exit(int(info["pid"]))
        assert '"event": "agent stopped"' in log_of(lab, node)
    after = pod_netns_state(lab)
    for pod in lab.pods:
        listeners = -1  # ss: the agent's listeners are gone with it, the rest is as it was
        assert after[pod.name][:listeners] == enrolled[pod.name][:listeners]
        assert after[pod.name][listeners] == before[pod.name][listeners]
    assert agents.lab_pin_root(lab.name).exists()
