"""Run one node agent per lab node, inside that node's network namespace, and one
`ambient-agent waypoint` per waypoint of the topology, inside its pod's.

`nsenter --net` rather than `ip netns exec`: the latter also remounts /sys in a new mount
namespace, which would hide bpffs (/sys/fs/bpf) and with it the agent's pins.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml

from agent.datapath import abi
from agent.datapath.cgroup import PARENT as CGROUP_PARENT
from agent.datapath.cgroup import cgroup2_root, remove_cgroups
from agent.datapath.loader import remove_pins
from agent.identity.ca import CertificateAuthority
from agent.identity.spiffe import DEFAULT_TRUST_DOMAIN
from agent.netns import NetnsWorker
from agent.state.waypoint import ALLOW_ONLY_WAYPOINT
from lab.network import STATE_ROOT, LabError, LabState, PodState
from lab.topology import WAYPOINT_PORT, Topology, WaypointSpec

READY_TIMEOUT = 90.0
STOP_TIMEOUT = 15.0
WAYPOINT_READY_TIMEOUT = 60.0
WAYPOINT_READINESS_PORT = 15021

USE_WAYPOINT = "istio.io/use-waypoint"
USE_WAYPOINT_NAMESPACE = "istio.io/use-waypoint-namespace"


def lab_dir(name: str) -> Path:
    return STATE_ROOT / name


def lab_pin_root(name: str) -> Path:
    return abi.DEFAULT_PIN_DIR / name


def mesh_config(state: LabState) -> dict[str, Any]:
    """The lab's pods, services and waypoints in the local config shape (ztunnel's), with the
    netns of each pod, and the topology's HTTPRoutes and policies as written.

    A pod backs the services whose selector matches it, and a waypoint's pod its waypoint's
    Service (port 15008). A Service or pod labelled `istio.io/use-waypoint` is bound to that
    waypoint as Istio binds it (see `waypoint_binding`)."""
    topology = state.parsed_topology()
    vips = topology.service_vips()

    def backed(pod: PodState) -> dict[str, dict[int, int]]:
        spec = topology.pod(pod.namespace, pod.name)
        services = {
            f"{s.namespace}/{s.hostname}": {p.port: p.target_port for p in s.ports}
            for s in topology.services
            if s.selects(spec)
        }
        if (runs := topology.waypoint_of_pod(pod.namespace, pod.name)) is not None:
            services[f"{runs.namespace}/{runs.hostname}"] = {WAYPOINT_PORT: WAYPOINT_PORT}
        return services

    def workload(pod: PodState) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "uid": f"{state.name}//Pod/{pod.namespace}/{pod.name}",
            "name": pod.name,
            "namespace": pod.namespace,
            "serviceAccount": pod.service_account,
            "workloadIps": [pod.ip],
            "protocol": "HBONE" if pod.ambient else "TCP",
            "node": pod.node,
            "netns": str(pod.netns_path),
            "interface": pod.interface,
            "labels": dict(pod.labels),
            "services": backed(pod),
        }
        # A waypoint's own pod is never sent to a waypoint: that would loop.
        if topology.waypoint_of_pod(pod.namespace, pod.name) is None:
            binding = waypoint_binding(topology, pod.labels, pod.namespace, "workload")
            if binding is not None:
                entry["waypoint"] = binding
        return entry

    services: list[dict[str, Any]] = []
    for service in topology.services:
        entry: dict[str, Any] = {
            "name": service.name,
            "namespace": service.namespace,
            "hostname": service.hostname,
            "vips": [str(vips[service.key])],
            "ports": {p.port: p.target_port for p in service.ports},
        }
        protocols = {p.port: p.app_protocol for p in service.ports if p.app_protocol}
        if protocols:
            entry["appProtocols"] = protocols
        binding = waypoint_binding(topology, service.label_map, service.namespace, "service")
        if binding is not None:
            entry["waypoint"] = binding
        services.append(entry)
    services += [
        {
            "name": waypoint.name,
            "namespace": waypoint.namespace,
            "hostname": waypoint.hostname,
            "vips": [str(vips[waypoint.key])],
            "ports": {WAYPOINT_PORT: WAYPOINT_PORT},
        }
        for waypoint in topology.waypoints
    ]
    return {
        "workloads": [workload(pod) for pod in state.pods],
        "services": services,
        "httpRoutes": list(topology.http_routes),
        "policies": list(topology.policies),
    }


def waypoint_binding(
    topology: Topology,
    labels: Mapping[str, str],
    namespace: str,
    kind: Literal["service", "workload"],
) -> dict[str, Any] | None:
    """The `waypoint` of a Service (kind "service") or pod ("workload") in `namespace` with
    these labels, as Istio binds it: `istio.io/use-waypoint: W` (and
    `istio.io/use-waypoint-namespace: NS`, default the object's own namespace) names a
    waypoint whose `for` takes that kind. None when the label is absent or `none`, W is not a
    waypoint of the topology, or W does not take that kind: traffic goes direct, as in
    Istio."""
    name = labels.get(USE_WAYPOINT)
    if not name or name == "none":
        return None
    waypoint_namespace = labels.get(USE_WAYPOINT_NAMESPACE) or namespace
    try:
        waypoint = topology.waypoint(waypoint_namespace, name)
    except KeyError:
        return None
    takes = waypoint.takes_services if kind == "service" else waypoint.takes_workloads
    if not takes:
        return None
    binding: dict[str, Any] = {
        "destination": str(topology.waypoint_vip(waypoint.namespace, waypoint.name)),
        "name": waypoint.name,
        "namespace": waypoint.namespace,
    }
    if waypoint.annotation_map.get(ALLOW_ONLY_WAYPOINT, "").lower() == "true":
        binding["allowOnlyWaypoint"] = True
    return binding


AGENT_COMMAND = (sys.executable, "-m", "agent")


def start_agents(
    state: LabState, agent_args: tuple[str, ...] = (), command: tuple[str, ...] = AGENT_COMMAND
) -> None:
    """Start every node's agent (with agent_args added to `agent run`), wait until each has
    enrolled its pods, record their pids. `command` runs the agent's CLI (a test may wrap
    it)."""
    base = lab_dir(state.name)
    config = base / "mesh.yaml"
    config.write_text(yaml.safe_dump(mesh_config(state), sort_keys=False))
    # One CA for the lab, made before the agents start so they do not race to create it.
    CertificateAuthority.load_or_create(base / "ca", DEFAULT_TRUST_DOMAIN)
    started = [_spawn(state, node.name, agent_args, command) for node in state.nodes]
    state.save()
    deadline = time.monotonic() + READY_TIMEOUT
    for node, proc in zip(state.nodes, started, strict=True):
        _wait_ready(state, node.name, proc, deadline)


def restart_agent(
    state: LabState,
    node: str,
    agent_args: tuple[str, ...] = (),
    command: tuple[str, ...] = AGENT_COMMAND,
) -> subprocess.Popen[bytes]:
    """Start the node's agent again (the earlier one has exited or was killed) with the lab's
    config as it is now; returns once it is ready."""  # fmt: skip
    proc = _spawn(state, node, agent_args, command)
    state.save()
    _wait_ready(state, node, proc, time.monotonic() + READY_TIMEOUT)
    return proc


def ready_file(state: LabState, node: str) -> Path:
    return lab_dir(state.name) / f"agent-{node}.ready"


def _spawn(
    state: LabState, node: str, agent_args: tuple[str, ...], command: tuple[str, ...]
) -> subprocess.Popen[bytes]:
    base = lab_dir(state.name)
    log_path = base / f"agent-{node}.log"
    ready = ready_file(state, node)
    ready.unlink(missing_ok=True)
    netns = next(n.netns_path for n in state.nodes if n.name == node)
    argv = [
        "nsenter", f"--net={netns}", "--", *command, "run",
        "--node", node,
        "--config", str(base / "mesh.yaml"),
        "--pin-dir", str(lab_pin_root(state.name) / node),
        "--state-dir", str(base / "agent-state"),
        "--ready-file", str(ready),
        "--ca-dir", str(base / "ca"),
        # Each node's own ambient-cni socket: the lab's nodes share one filesystem.
        "--cni-socket", str(base / f"cni-{node}.sock"),
        *agent_args,
    ]  # fmt: skip
    with open(log_path, "ab") as log:  # appended: a restarted agent's log follows the first's
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
    state.agents[node] = {"pid": proc.pid, "log": str(log_path)}
    return proc


def _wait_ready(state: LabState, node: str, proc: subprocess.Popen[bytes], deadline: float) -> None:
    log_path = lab_dir(state.name) / f"agent-{node}.log"
    while not ready_file(state, node).exists():
        if proc.poll() is not None:
            raise LabError(f"agent for {node} exited with {proc.returncode}:\n{_tail(log_path)}")
        if time.monotonic() > deadline:
            raise LabError(f"agent for {node} not ready after {READY_TIMEOUT:.0f}s")
        time.sleep(0.01)


def _tail(path: Path, lines: int = 15) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return "(no log)"


def lab_agent_pids(name: str) -> list[int]:
    """Agents of this lab, found by their --pin-dir, so a lost state file loses nothing."""
    prefix = f"{lab_pin_root(name)}/".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"--pin-dir" in argv and any(arg.startswith(prefix) for arg in argv):
            found.append(int(proc.name))
    return found


def stop_agent(state: LabState, node: str, sig: signal.Signals = signal.SIGTERM) -> None:
    """Send the node's agent `sig` and wait until it has exited (to restart_agent it)."""
    _stop_one(int(state.agents[node]["pid"]), f"the agent of {node}", sig)


def _stop_one(pid: int, what: str, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
    deadline = time.monotonic() + STOP_TIMEOUT
    while _alive([pid]):
        if time.monotonic() > deadline:
            raise LabError(f"{what} (pid {pid}) did not exit after {sig.name}")
        time.sleep(0.01)


def stop_agents(name: str) -> None:
    """SIGTERM, SIGKILL after a grace period, then remove the pins (an agent leaves them, and
    its pods enrolled, for the next one, unless started with `--on-exit unenroll`)."""
    terminate(lab_agent_pids(name))
    remove_pins(lab_pin_root(name))
    remove_cgroups(cgroup2_root() / CGROUP_PARENT / name)


def terminate(pids: Sequence[int], timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM, SIGKILL to those left after `timeout`; returns once all have exited."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while (alive := _alive(pids)) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    while _alive(pids):
        time.sleep(0.05)


def _alive(pids: Sequence[int]) -> list[int]:
    """Reaps our own exited children too, so they do not linger as zombies."""
    alive = []
    for pid in pids:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        try:
            status = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if status != "Z":
            alive.append(pid)
    return alive


# ---- waypoints ------------------------------------------------------------------------------


def waypoint_run_dir(name: str, waypoint: WaypointSpec) -> Path:
    """Envoy's config, secrets and admin socket; its path is how `lab_waypoint_pids` finds
    the process."""
    return lab_dir(name) / f"waypoint-{waypoint.namespace}-{waypoint.name}"


def waypoint_log(name: str, waypoint: WaypointSpec) -> Path:
    return lab_dir(name) / f"waypoint-{waypoint.namespace}-{waypoint.name}.log"


def waypoint_argv(
    state: LabState,
    gateway_key: str,
    command: tuple[str, ...] = AGENT_COMMAND,
    extra_args: tuple[str, ...] = (),
) -> list[str]:
    """The command that runs the waypoint `gateway_key` ("namespace/name") in its pod, with
    `extra_args` added to `ambient-agent waypoint`."""
    waypoint, pod = _waypoint_and_pod(state, gateway_key)
    base = lab_dir(state.name)
    return [
        "nsenter", f"--net={pod.netns_path}", "--", *command, "waypoint",
        "--gateway", waypoint.key,
        "--config", str(base / "mesh.yaml"),
        "--run-dir", str(waypoint_run_dir(state.name, waypoint)),
        "--ca-dir", str(base / "ca"),
        "--service-account", pod.service_account,
        *extra_args,
    ]  # fmt: skip


def start_waypoints(state: LabState, command: tuple[str, ...] = AGENT_COMMAND) -> None:
    """Start a waypoint process per waypoint of the topology, in its pod's netns, wait until
    each is ready (its :15021/healthz/ready answers 200 in the pod), record their pids in
    `state.waypoints`. Run after `start_agents`, which writes the config and the CA."""
    keys = [waypoint.key for waypoint in state.parsed_topology().waypoints]
    started = [_spawn_waypoint(state, key, command) for key in keys]
    if keys:
        state.save()
    deadline = time.monotonic() + WAYPOINT_READY_TIMEOUT
    for key, proc in zip(keys, started, strict=True):
        _wait_waypoint_ready(state, key, proc, deadline)


def start_waypoint(
    state: LabState,
    gateway_key: str,
    command: tuple[str, ...] = AGENT_COMMAND,
    extra_args: tuple[str, ...] = (),
) -> subprocess.Popen[bytes]:
    """Start the waypoint `gateway_key` again (the earlier one has exited or was stopped)
    with the lab's config as it is now; returns once it is ready."""
    proc = _spawn_waypoint(state, gateway_key, command, extra_args)
    state.save()
    _wait_waypoint_ready(state, gateway_key, proc, time.monotonic() + WAYPOINT_READY_TIMEOUT)
    return proc


def stop_waypoint(state: LabState, gateway_key: str, sig: signal.Signals = signal.SIGTERM) -> None:
    """Send the waypoint `sig` and wait until it has exited (to start_waypoint it again)."""
    _stop_one(int(state.waypoints[gateway_key]["pid"]), f"the waypoint {gateway_key}", sig)


def lab_waypoint_pids(name: str) -> list[int]:
    """Waypoints of this lab, found by their --run-dir under the lab's directory, so a lost
    state file loses nothing."""
    return pids_with_argument("--run-dir", f"{lab_dir(name)}/waypoint-")


def pids_with_argument(flag: str, prefix: str) -> list[int]:
    """Processes whose command line has `flag` followed by a value starting with `prefix`."""
    wanted, start = flag.encode(), prefix.encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        values = [value for name, value in itertools.pairwise(argv) if name == wanted]
        if any(value.startswith(start) for value in values):
            found.append(int(proc.name))
    return found


def stop_waypoints(name: str) -> None:
    """SIGTERM every waypoint of the lab, SIGKILL those left after a grace period."""
    terminate(lab_waypoint_pids(name))


def _waypoint_and_pod(state: LabState, gateway_key: str) -> tuple[WaypointSpec, PodState]:
    namespace, _, name = gateway_key.partition("/")
    topology = state.parsed_topology()
    try:
        waypoint = topology.waypoint(namespace, name)
    except KeyError:
        declared = ", ".join(w.key for w in topology.waypoints) or "none"
        raise LabError(
            f"no waypoint {gateway_key!r} in lab {state.name!r}; waypoints: {declared}"
        ) from None
    pod = next(p for p in state.pods if (p.namespace, p.name) == (namespace, waypoint.pod))
    return waypoint, pod


def _spawn_waypoint(
    state: LabState, gateway_key: str, command: tuple[str, ...], extra_args: tuple[str, ...] = ()
) -> subprocess.Popen[bytes]:
    waypoint, pod = _waypoint_and_pod(state, gateway_key)
    config = lab_dir(state.name) / "mesh.yaml"
    if not config.exists():
        raise LabError(f"{config} does not exist: start the lab's agents first")
    run_dir = waypoint_run_dir(state.name, waypoint)
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = waypoint_log(state.name, waypoint)
    with open(log_path, "ab") as log:  # appended: a restarted waypoint's log follows the first's
        proc = subprocess.Popen(
            waypoint_argv(state, gateway_key, command, extra_args),
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
    state.waypoints[waypoint.key] = {
        "pid": proc.pid,
        "log": str(log_path),
        "pod": f"{pod.namespace}/{pod.name}",
        "run_dir": str(run_dir),
    }
    return proc


def _wait_waypoint_ready(
    state: LabState, gateway_key: str, proc: subprocess.Popen[bytes], deadline: float
) -> None:
    waypoint, pod = _waypoint_and_pod(state, gateway_key)
    log_path = waypoint_log(state.name, waypoint)
    url = f"http://{pod.ip}:{WAYPOINT_READINESS_PORT}/healthz/ready"
    worker = NetnsWorker(str(pod.netns_path))
    try:
        while not worker.call(lambda: _answers_200(url)):
            if proc.poll() is not None:
                raise LabError(
                    f"waypoint {gateway_key} exited with {proc.returncode}:\n{_tail(log_path)}"
                )
            if time.monotonic() > deadline:
                raise LabError(
                    f"waypoint {gateway_key} not ready after {WAYPOINT_READY_TIMEOUT:.0f}s "
                    f"({url}):\n{_tail(log_path)}"
                )
            time.sleep(0.1)
    finally:
        worker.close()


def _answers_200(url: str) -> bool:
    # No proxy: one named in the environment is not in the pod's netns.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=1) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False
