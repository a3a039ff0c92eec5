"""Run one node agent per lab node, inside that node's network namespace.

`nsenter --net` rather than `ip netns exec`: the latter also remounts /sys in a new mount
namespace, which would hide bpffs (/sys/fs/bpf) and with it the agent's pins.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from agent.datapath import abi
from agent.datapath.cgroup import PARENT as CGROUP_PARENT
from agent.datapath.cgroup import cgroup2_root, remove_cgroups
from agent.datapath.loader import remove_pins
from agent.identity.ca import CertificateAuthority
from agent.identity.spiffe import DEFAULT_TRUST_DOMAIN
from lab.network import STATE_ROOT, LabError, LabState, PodState

READY_TIMEOUT = 90.0
STOP_TIMEOUT = 15.0


def lab_dir(name: str) -> Path:
    return STATE_ROOT / name


def lab_pin_root(name: str) -> Path:
    return abi.DEFAULT_PIN_DIR / name


def mesh_config(state: LabState) -> dict[str, Any]:
    """The lab's pods and services in the local config shape (ztunnel's), with the netns of
    each pod; a pod backs the services whose selector matches it."""
    topology = state.parsed_topology()
    vips = topology.service_vips()

    def backed(pod: PodState) -> dict[str, dict[int, int]]:
        spec = topology.pod(pod.namespace, pod.name)
        return {
            f"{s.namespace}/{s.hostname}": {p.port: p.target_port for p in s.ports}
            for s in topology.services
            if s.selects(spec)
        }

    return {
        "workloads": [
            {
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
            for pod in state.pods
        ],
        "services": [
            {
                "name": service.name,
                "namespace": service.namespace,
                "hostname": service.hostname,
                "vips": [str(vips[service.key])],
                "ports": {p.port: p.target_port for p in service.ports},
            }
            for service in topology.services
        ],
        "policies": [],
    }


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
    pid = int(state.agents[node]["pid"])
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
    deadline = time.monotonic() + STOP_TIMEOUT
    while _alive([pid]):
        if time.monotonic() > deadline:
            raise LabError(f"the agent of {node} (pid {pid}) did not exit after {sig.name}")
        time.sleep(0.01)


def stop_agents(name: str) -> None:
    """SIGTERM, SIGKILL after a grace period, then remove the pins (an agent leaves them, and
    its pods enrolled, for the next one, unless started with `--on-exit unenroll`)."""
    pids = lab_agent_pids(name)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    while (alive := _alive(pids)) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    while _alive(pids):
        time.sleep(0.05)
    remove_pins(lab_pin_root(name))
    remove_cgroups(cgroup2_root() / CGROUP_PARENT / name)


def _alive(pids: list[int]) -> list[int]:
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
