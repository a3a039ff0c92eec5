"""The lab as users drive it: the network (network.py) plus a node agent per node and a
waypoint process per waypoint of the topology."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Any

from lab import agents
from lab.network import LabError, LabNetwork, LabState, check_lab_name
from lab.network import exec_argv as _argv
from lab.topology import default_topology, load_topology


def up(
    name: str,
    topology_file: Path | None,
    agents_too: bool = True,
    agent_args: tuple[str, ...] = (),
) -> LabState:
    check_lab_name(name)
    topology = load_topology(topology_file) if topology_file else default_topology()
    state = LabNetwork(name).up(topology)
    if agents_too:
        try:
            agents.start_agents(state, agent_args)
            agents.start_waypoints(state)
        except BaseException:
            down(name)
            raise
    return state


def down(name: str) -> None:
    """Idempotent, and works after a crash: agents are found by their pins' directory,
    waypoints by their run directory, namespaces by their name prefix."""
    check_lab_name(name)
    # Waypoints first: they are the pods' processes, and they keep their netns alive.
    agents.stop_waypoints(name)
    agents.stop_agents(name)
    LabNetwork(name).down()
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(agents.lab_dir(name))


def status(name: str) -> dict[str, Any]:
    check_lab_name(name)
    report = LabNetwork(name).status()
    running = set(agents.lab_agent_pids(name))
    for info in report["agents"].values():
        info["running"] = info.get("pid") in running
    running_waypoints = set(agents.lab_waypoint_pids(name))
    for info in report["waypoints"].values():
        info["running"] = info.get("pid") in running_waypoints
    return report


def exec_argv(name: str, target: str, command: list[str]) -> list[str]:
    state = LabNetwork(name).load_state()
    if state is None:
        raise LabError(f"lab {name!r} is not up: run `ambient-agent lab up` first")
    return _argv(state, target, command)


def describe(report: dict[str, Any]) -> str:
    if not report["up"]:
        extra = f"; leftovers: {', '.join(report['leftovers'])}" if report["leftovers"] else ""
        return f"lab {report['name']}: down{extra}"
    lines = [f"lab {report['name']}: up (node network {report['node_network']})"]
    for node in report["nodes"]:
        agent = report["agents"].get(node["name"], {})
        running = "running" if agent.get("running") else "not running"
        lines.append(
            f"  node {node['name']:<10} {node['ip']:<15} netns {node['netns']:<18} "
            f"agent {running} (pid {agent.get('pid', '-')})"
        )
        for pod in report["pods"]:
            if pod["node"] == node["name"]:
                mesh = "ambient" if pod["ambient"] else "out of mesh"
                lines.append(
                    f"    pod {pod['namespace']}/{pod['name']:<12} {pod['ip']:<15} "
                    f"netns {pod['netns']:<18} {mesh}"
                )
    for key, waypoint in report.get("waypoints", {}).items():
        running = "running" if waypoint.get("running") else "not running"
        lines.append(
            f"  waypoint {key:<20} pod {waypoint.get('pod', '-'):<20} "
            f"{running} (pid {waypoint.get('pid', '-')})"
        )
    return "\n".join(lines)
