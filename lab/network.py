"""The lab network: builds a Topology as network namespaces with iproute2, and tears it down.

Everything lives in namespaces named ``<lab>-...``; the host's root namespace is not touched:

- ``<lab>-fabric`` holds bridge br0, the node network;
- ``<lab>-<node>`` is a node: eth0 on the bridge, IP forwarding, routes to the other nodes'
  pod CIDRs, and one veth ``vp<i>`` per pod carrying the gateway address;
- ``<lab>-<pod>`` is a pod: eth0 with its address and a default route via its node.

``down`` finds namespaces by prefix with ``ip netns list``, so it works after a crash that left
no state file. The layout is described in docs/lab.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

from lab.topology import CLUSTER_DOMAIN, Topology, parse_topology

DEFAULT_LAB_NAME = "lab"
STATE_ROOT = Path("/run/ambient-lab")
STATE_FILE = "state.json"
NETNS_RUN_DIR = Path("/run/netns")
# Per-netns files `ip netns exec` mounts over /etc (resolv.conf).
NETNS_ETC_DIR = Path("/etc/netns")
STATE_VERSION = 1
FABRIC = "fabric"
BRIDGE = "br0"
INTERFACE = "eth0"

# No '-': it separates the lab name from node and pod names in netns names, so with it one
# lab's prefix ("a-") could match another lab's namespaces ("a-b-fabric").
_LAB_NAME = re.compile(r"[a-z][a-z0-9]{0,11}")


class LabError(RuntimeError):
    """The lab cannot be built, found or torn down; the message says what to do."""


@dataclass(slots=True)
class NodeState:
    name: str
    netns: str
    ip: str
    pod_cidr: str
    gateway: str
    interface: str
    fabric_interface: str

    @property
    def netns_path(self) -> Path:
        return netns_path(self.netns)


@dataclass(slots=True)
class PodState:
    name: str
    namespace: str
    node: str
    netns: str
    ip: str
    ambient: bool
    service_account: str
    interface: str
    node_interface: str
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def netns_path(self) -> Path:
        return netns_path(self.netns)


@dataclass(slots=True)
class LabState:
    """What ``up`` built. ``agents`` (node name -> free-form info) and ``waypoints``
    ("namespace/name" -> free-form info) are for the agent runner."""

    name: str
    topology: str
    fabric_netns: str
    node_network: str
    nodes: list[NodeState]
    pods: list[PodState]
    agents: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Absent from state files written before waypoints: the default reads them.
    waypoints: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"version": STATE_VERSION, **asdict(self)}, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> LabState:
        try:
            data = json.loads(text)
            if data.pop("version", None) != STATE_VERSION:
                raise ValueError(f"unsupported version (expected {STATE_VERSION})")
            data["nodes"] = [NodeState(**node) for node in data["nodes"]]
            data["pods"] = [PodState(**pod) for pod in data["pods"]]
            return cls(**data)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise LabError(f"invalid lab state: {exc}") from exc

    def save(self, *, state_root: Path = STATE_ROOT) -> Path:
        return save_state(self, state_root=state_root)

    def parsed_topology(self) -> Topology:
        return parse_topology(self.topology, f"<state of lab {self.name}>")

    def all_netns(self) -> list[str]:
        return [self.fabric_netns, *(n.netns for n in self.nodes), *(p.netns for p in self.pods)]

    def netns_of(self, target: str) -> str:
        """The netns of a node or pod (by name; pod names are unique in a lab), or "fabric"."""
        if target == FABRIC:
            return self.fabric_netns
        members: list[NodeState | PodState] = [*self.nodes, *self.pods]
        for member in members:
            if member.name == target:
                return member.netns
        raise LabError(
            f"no node or pod {target!r} in lab {self.name!r}; nodes: "
            f"{', '.join(n.name for n in self.nodes)}; pods: "
            f"{', '.join(p.name for p in self.pods)}"
        )


class LabNetwork:
    """One named lab. Several labs can be up at once if their addresses do not matter to each
    other: every lab's namespaces are separate, only their names share the host."""

    def __init__(self, name: str = DEFAULT_LAB_NAME, *, state_root: Path = STATE_ROOT) -> None:
        check_lab_name(name)
        self.name = name
        self.state_root = state_root

    @property
    def state_path(self) -> Path:
        return self.state_root / self.name / STATE_FILE

    def plan(self, topology: Topology) -> LabState:
        """The state ``up`` would build, without touching the kernel."""
        nodes = [
            NodeState(
                name=node.name,
                netns=self._netns_name(node.name),
                ip=str(topology.node_ip(node.name)),
                pod_cidr=str(node.pod_cidr),
                gateway=str(node.gateway),
                interface=INTERFACE,
                fabric_interface=f"n-{index}",
            )
            for index, node in enumerate(topology.nodes)
        ]
        pods = [
            PodState(
                name=pod.name,
                namespace=pod.namespace,
                node=pod.node,
                netns=self._netns_name(pod.name),
                ip=str(topology.pod_ip(pod.namespace, pod.name)),
                ambient=pod.ambient,
                service_account=pod.service_account,
                interface=INTERFACE,
                node_interface=f"vp{index}",
                labels=pod.label_map,
            )
            for index, pod in enumerate(topology.pods)
        ]
        state = LabState(
            name=self.name,
            topology=topology.to_yaml(),
            fabric_netns=self._netns_name(FABRIC),
            node_network=str(topology.node_network),
            nodes=nodes,
            pods=pods,
        )
        _check_unique_netns(state)
        return state

    def up(self, topology: Topology) -> LabState:
        """Build the lab and write its state file; on failure, remove what was built."""
        state = self.plan(topology)
        present = self.present_netns()
        if present:
            option = "" if self.name == DEFAULT_LAB_NAME else f" --name {self.name}"
            raise LabError(
                f"lab {self.name!r} is already up (netns: {', '.join(present)}); "
                f"run `ambient-agent lab down{option}` first"
            )
        try:
            _build(state)
            save_state(state, state_root=self.state_root)
        except BaseException as exc:
            try:
                self.down()
            except LabError as cleanup:
                exc.add_note(f"cleaning up the half-built lab also failed: {cleanup}")
            raise
        return state

    def down(self) -> None:
        """Delete every ``<lab>-*`` netns and the state file; a no-op when nothing is left.

        Deleting a netns destroys its veths, qdiscs and tc filters. Processes still running in
        it keep it alive, unreachable by name: stop them first.
        """
        for netns in sorted(self.present_netns(), reverse=True):
            _delete_netns(netns)
        self.state_path.unlink(missing_ok=True)
        # Files others put beside the state (agent logs) are not ours: keep a non-empty dir.
        with contextlib.suppress(OSError):
            self.state_path.parent.rmdir()

    def load_state(self) -> LabState | None:
        try:
            text = self.state_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        try:
            return LabState.from_json(text)
        except LabError as exc:
            raise LabError(f"{self.state_path}: {exc}") from exc

    def present_netns(self) -> list[str]:
        prefix = f"{self.name}-"
        return [netns for netns in list_netns() if netns.startswith(prefix)]

    def status(self) -> dict[str, Any]:
        """A JSON-ready summary: up only if the state file exists and all its netns do."""
        state = self.load_state()
        present = self.present_netns()
        expected = state.all_netns() if state is not None else []
        missing = [netns for netns in expected if netns not in present]
        return {
            "name": self.name,
            "up": state is not None and not missing,
            "state_file": str(self.state_path) if state is not None else None,
            "fabric_netns": state.fabric_netns if state is not None else None,
            "node_network": state.node_network if state is not None else None,
            "nodes": [_node_status(node) for node in state.nodes] if state is not None else [],
            "pods": [_pod_status(pod) for pod in state.pods] if state is not None else [],
            "agents": state.agents if state is not None else {},
            "waypoints": state.waypoints if state is not None else {},
            "missing": missing,
            "leftovers": [netns for netns in present if netns not in expected],
        }

    def _netns_name(self, member: str) -> str:
        return f"{self.name}-{member}"


def check_lab_name(name: str) -> None:
    if _LAB_NAME.fullmatch(name) is None:
        raise LabError(
            f"invalid lab name {name!r}: use 1 to 12 lowercase letters and digits, starting "
            "with a letter (no '-': it separates the lab name in netns names)"
        )


def down(name: str = DEFAULT_LAB_NAME, *, state_root: Path = STATE_ROOT) -> None:
    LabNetwork(name, state_root=state_root).down()


def load_state(name: str = DEFAULT_LAB_NAME, *, state_root: Path = STATE_ROOT) -> LabState | None:
    return LabNetwork(name, state_root=state_root).load_state()


def status(name: str = DEFAULT_LAB_NAME, *, state_root: Path = STATE_ROOT) -> dict[str, Any]:
    return LabNetwork(name, state_root=state_root).status()


def save_state(state: LabState, *, state_root: Path = STATE_ROOT) -> Path:
    """Write the state atomically (readers never see half a file); also for the agent runner
    after it fills ``agents``."""
    path = state_root / state.name / STATE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{STATE_FILE}.{os.getpid()}")
    partial.write_text(state.to_json(), encoding="utf-8")
    os.replace(partial, path)
    return path


def exec_argv(state: LabState, target: str, argv: list[str]) -> list[str]:
    """The command that runs ``argv`` inside a node's or pod's netns."""
    if not argv:
        raise LabError("no command to run")
    return ["ip", "netns", "exec", state.netns_of(target), *argv]


def netns_path(netns: str) -> Path:
    """Where `ip netns add` mounts a namespace: for nsenter --net=, setns(2) or pyroute2."""
    return NETNS_RUN_DIR / netns


def list_netns() -> list[str]:
    # Lines look like "lab-node-1 (id: 3)"; the id is absent until the netns has a peer.
    return [line.split()[0] for line in _ip("netns", "list").splitlines() if line.strip()]


def _node_status(node: NodeState) -> dict[str, Any]:
    return {"name": node.name, "netns": node.netns, "ip": node.ip, "pod_cidr": node.pod_cidr}


def _pod_status(pod: PodState) -> dict[str, Any]:
    return {
        "name": pod.name,
        "namespace": pod.namespace,
        "node": pod.node,
        "netns": pod.netns,
        "ip": pod.ip,
        "ambient": pod.ambient,
        "service_account": pod.service_account,
    }


def _check_unique_netns(state: LabState) -> None:
    owners: dict[str, str] = {state.fabric_netns: "the fabric"}
    members = [(n.netns, f"node {n.name}") for n in state.nodes]
    members += [(p.netns, f"pod {p.namespace}/{p.name}") for p in state.pods]
    for netns, owner in members:
        if netns in owners:
            raise LabError(
                f"{owners[netns]} and {owner} would share netns {netns}: a lab names each "
                f"netns {state.name}-<name>, so node and pod names must be unique across "
                f"namespaces and differ from {FABRIC!r}"
            )
        owners[netns] = owner


def _build(state: LabState) -> None:
    _build_fabric(state)
    for node in state.nodes:
        _build_node(state, node)
    nodes = {node.name: node for node in state.nodes}
    dns_ip = state.parsed_topology().dns_ip
    for pod in state.pods:
        _build_pod(pod, nodes[pod.node])
        _write_resolv_conf(pod, str(dns_ip))


def _build_fabric(state: LabState) -> None:
    _add_netns(state.fabric_netns)
    _ip_in(state.fabric_netns, "link", "add", BRIDGE, "type", "bridge")
    _ip_in(state.fabric_netns, "link", "set", BRIDGE, "up")


def _build_node(state: LabState, node: NodeState) -> None:
    fabric = state.fabric_netns
    prefix = IPv4Network(state.node_network).prefixlen
    _add_netns(node.netns)
    _sysctl(node.netns, "net.ipv4.ip_forward", "1")
    temporary = f"t{node.fabric_interface}"
    _ip_in(fabric, "link", "add", node.fabric_interface, "type", "veth", "peer", "name", temporary)
    _ip_in(fabric, "link", "set", node.fabric_interface, "master", BRIDGE, "up")
    _move_and_rename(fabric, temporary, node.netns, node.interface)
    _ip_in(node.netns, "addr", "add", f"{node.ip}/{prefix}", "dev", node.interface)
    _ip_in(node.netns, "link", "set", node.interface, "up")
    for other in state.nodes:
        if other.name != node.name:
            _ip_in(node.netns, "route", "add", other.pod_cidr, "via", other.ip)


def _build_pod(pod: PodState, node: NodeState) -> None:
    prefix = IPv4Network(node.pod_cidr).prefixlen
    veth = pod.node_interface
    _add_netns(pod.netns)
    temporary = f"t{veth}"
    _ip_in(node.netns, "link", "add", veth, "type", "veth", "peer", "name", temporary)
    _move_and_rename(node.netns, temporary, pod.netns, pod.interface)
    # noprefixroute: without it the pod would take its whole CIDR as on-link and ARP for its
    # neighbours, which nothing on a point-to-point veth answers; the default route sends
    # same-node traffic through the node too, where the datapath sees it.
    address = f"{pod.ip}/{prefix}"
    _ip_in(pod.netns, "addr", "add", address, "dev", pod.interface, "noprefixroute")
    _ip_in(pod.netns, "link", "set", pod.interface, "up")
    gateway = node.gateway
    _ip_in(pod.netns, "route", "add", "default", "via", gateway, "dev", pod.interface, "onlink")
    # The same gateway/32 sits on every pod veth of the node: each pod ARPs for it on its own
    # link, and no node-side subnet route competes with the per-pod /32 routes.
    _ip_in(node.netns, "addr", "add", f"{gateway}/32", "dev", veth)
    _ip_in(node.netns, "link", "set", veth, "up")
    _ip_in(node.netns, "route", "add", f"{pod.ip}/32", "dev", veth, "scope", "link")


def _write_resolv_conf(pod: PodState, nameserver: str) -> None:
    """What `ip netns exec` (so `lab exec`) mounts over /etc/resolv.conf in the pod: the
    cluster DNS address, answered by the pod's agent, and Kubernetes' search path."""
    path = NETNS_ETC_DIR / pod.netns / "resolv.conf"
    path.parent.mkdir(parents=True, exist_ok=True)
    search = f"{pod.namespace}.svc.{CLUSTER_DOMAIN} svc.{CLUSTER_DOMAIN} {CLUSTER_DOMAIN}"
    path.write_text(f"nameserver {nameserver}\nsearch {search}\noptions ndots:5\n")


def _add_netns(netns: str) -> None:
    _ip("netns", "add", netns)
    _ip_in(netns, "link", "set", "lo", "up")
    # The datapath handles IPv4 only: no IPv6 addresses, router solicitations or MLD noise.
    # "default" covers interfaces created or moved in later, "all" those already there.
    for scope in ("all", "default"):
        _sysctl(netns, f"net.ipv6.conf.{scope}.disable_ipv6", "1")


def _move_and_rename(from_netns: str, temporary: str, to_netns: str, name: str) -> None:
    # The temporary name only has to be unique in from_netns; eth0 exists once per netns.
    _ip_in(from_netns, "link", "set", temporary, "netns", to_netns)
    _ip_in(to_netns, "link", "set", temporary, "name", name)


def _delete_netns(netns: str) -> None:
    try:
        _ip("netns", "delete", netns)
    except LabError:
        if netns in list_netns():
            raise  # a concurrent `down` may have won the race; anything else is real
    shutil.rmtree(NETNS_ETC_DIR / netns, ignore_errors=True)


def _sysctl(netns: str, key: str, value: str) -> None:
    _run(["ip", "netns", "exec", netns, "sysctl", "-q", "-w", f"{key}={value}"])


def _ip(*args: str) -> str:
    return _run(["ip", *args])


def _ip_in(netns: str, *args: str) -> str:
    return _ip("-n", netns, *args)


def _run(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, check=True, capture_output=True, text=True)
    except FileNotFoundError as exc:
        raise LabError(f"{argv[0]}: command not found (the lab needs iproute2 and procps)") from exc
    except subprocess.CalledProcessError as exc:
        raise LabError(
            f"`{shlex.join(argv)}` failed (exit {exc.returncode}): {exc.stderr.strip()}"
        ) from exc
    return done.stdout
