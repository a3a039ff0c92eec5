"""ambient-cni chained after Debian's real reference plugins (bridge + host-local), executed
as a runtime executes a conflist, with a node agent process listening on its socket.

A node is a network namespace with the agent in it; pods are namespaces the plugins wire to
the node's bridge. What must hold: a pod in an ambient namespace gets its address from
host-local and is enrolled before ADD returns (its traffic then goes through the agent); a
pod in another namespace is left alone; DEL removes every trace (enrollment, pins' entries,
the veth, the address lease)."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.ctl import read_pods
from agent.datapath import abi
from agent.datapath.loader import remove_pins
from agent.netns import NetnsWorker
from cni.install import build_zipapp
from tests.support.cni_runtime import Attachment, CniRuntime, PluginFailed
from tests.support.fake_kube_api import NAMESPACES, NODE, FakeApiServer, recorded_events

pytestmark = pytest.mark.kernel

REFERENCE_PLUGINS = Path("/usr/lib/cni")
SUBNET = "10.242.7.0/24"


@dataclass
class Node:
    name: str
    netns: Path
    tmp: Path
    pin_dir: Path
    runtime: CniRuntime
    argv: list[str]
    agent: subprocess.Popen[bytes] | None
    pods: list[str]

    def start_agent(self) -> None:
        ready = self.tmp / "ready"
        with open(self.tmp / "agent.log", "ab") as log:
            self.agent = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT,
                                          cwd=Path(__file__).parents[2])  # fmt: skip
        deadline = time.monotonic() + 60
        while not (ready.exists() and (self.tmp / "cni.sock").exists()):
            assert self.agent.poll() is None, (self.tmp / "agent.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "agent not ready"
            time.sleep(0.1)

    def stop_agent(self) -> None:
        if self.agent is None:
            return
        self.agent.terminate()
        try:
            self.agent.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.agent.kill()
            self.agent.wait()
        self.agent = None

    def pod_netns(self, pod: str) -> Path:
        path = Path(f"/run/netns/{self.name}-{pod}")
        if not path.exists():
            subprocess.run(["ip", "netns", "add", path.name], check=True)
            self.pods.append(path.name)
        return path

    def log(self) -> list[dict[str, Any]]:
        events = []
        for line in (self.tmp / "agent.log").read_text().splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:
                continue
        return events


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    config = tmp_path / "mesh.yaml"
    config.write_text(yaml.safe_dump({
        "namespaces": [{"name": "default", "labels": {"istio.io/dataplane-mode": "ambient"}},
                       {"name": "legacy"}],
    }))  # fmt: skip
    with _node(tmp_path, "node", ["--config", str(config)]) as made:
        yield made


@contextlib.contextmanager
def _node(
    tmp_path: Path,
    node_name: str,
    source: list[str],
    before_agent: Callable[[Path], None] | None = None,
) -> Iterator[Node]:
    """A node netns with an agent process for `node_name`, its state from `source`."""
    if not (REFERENCE_PLUGINS / "bridge").exists():
        pytest.fail("containernetworking-plugins is not installed (scripts/bootstrap-host.sh)")
    name = "cn" + uuid.uuid4().hex[:6]
    subprocess.run(["ip", "netns", "add", name], check=True)
    netns = Path(f"/run/netns/{name}")
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
    plugin_dir = tmp_path / "bin"
    plugin_dir.mkdir()
    for plugin in ("bridge", "host-local", "loopback"):
        (plugin_dir / plugin).symlink_to(REFERENCE_PLUGINS / plugin)
    build_zipapp(plugin_dir / "ambient-cni", sys.executable)
    socket_path = tmp_path / "cni.sock"
    conflist = {
        "cniVersion": "1.0.0", "name": "ambient-test",
        "plugins": [
            {"type": "bridge", "bridge": "cni0", "isGateway": True, "ipMasq": False,
             "ipam": {"type": "host-local", "ranges": [[{"subnet": SUBNET}]],
                      "dataDir": str(tmp_path / "ipam")}},
            {"type": "ambient-cni", "agentSocket": str(socket_path), "timeoutSeconds": 30},
        ],
    }  # fmt: skip
    pin_dir = abi.DEFAULT_PIN_DIR / name / "node"
    argv = [
        "nsenter", f"--net={netns}", "--", sys.executable, "-m", "agent", "run",
        "--node", node_name, *source, "--pin-dir", str(pin_dir),
        "--state-dir", str(tmp_path / "state"), "--ready-file", str(tmp_path / "ready"),
        "--ca-dir", str(tmp_path / "ca"), "--cni-socket", str(socket_path),
    ]  # fmt: skip
    made = Node(name, netns, tmp_path, pin_dir, CniRuntime(conflist, plugin_dir, netns), argv,
                None, [])  # fmt: skip
    try:
        if before_agent is not None:
            before_agent(netns)
        made.start_agent()
        yield made
    finally:
        made.stop_agent()
        for pod in made.pods:
            subprocess.run(["ip", "netns", "del", pod], check=False)
        subprocess.run(["ip", "netns", "del", name], check=False)
        remove_pins(abi.DEFAULT_PIN_DIR / name)
        shutil.rmtree(tmp_path / "ipam", ignore_errors=True)


def pod_address(result: dict[str, Any]) -> str:
    return str(result["ips"][0]["address"]).split("/")[0]


def enrolled(node: Node) -> set[str]:
    return {p["ip"] for p in read_pods(node.pin_dir) if p["capture"]}


def test_a_pod_added_through_the_chain_is_enrolled_and_its_traffic_meshed(node: Node) -> None:
    client = Attachment("c" * 64, str(node.pod_netns("client")), name="client", uid="uid-c")
    server = Attachment("s" * 64, str(node.pod_netns("server")), name="server", uid="uid-s")
    outsider = Attachment("o" * 64, str(node.pod_netns("outsider")), namespace="legacy",
                          name="outsider", uid="uid-o")  # fmt: skip
    results = {pod.name: node.runtime.add(pod) for pod in (client, server, outsider)}
    addresses = {name: pod_address(result) for name, result in results.items()}
    assert all(a.startswith("10.242.7.") for a in addresses.values())  # host-local's
    # Enrolled before ADD returned: the pods map already holds both ambient pods.
    assert enrolled(node) == {addresses["client"], addresses["server"]}
    node.runtime.check(client, results["client"])

    served = _serve_once(Path(server.netns), 8080, b"pong")
    answer = _call(Path(client.netns), addresses["server"], 8080, b"ping")
    assert answer == b"pong" and served() == b"ping"
    line = _wait_for(node, lambda e: e.get("event") == "connection complete"
                     and e.get("direction") == "inbound")  # fmt: skip
    # Both pods are on this node: the agent delivers the connection itself (no HBONE).
    assert line["route"] == "local" and line["src.workload"] == "client"
    assert line["dst.workload"] == "server" and line["bytes_source"] == "kernel"

    for pod in (client, server, outsider):
        node.runtime.delete(pod, results[pod.name])
    assert enrolled(node) == set()
    links = subprocess.run(["ip", "-n", node.name, "-o", "link", "show", "type", "veth"],
                           capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert links.strip() == "", links
    leases = [p.name for p in (node.tmp / "ipam" / "ambient-test").iterdir()
              if p.name.startswith("10.242.7.")]  # fmt: skip
    assert leases == []
    assert json.loads((node.tmp / "state" / "node" / "cni-pods.json").read_text()) == []


def test_a_namespace_relabel_releases_and_enrolls_a_running_pod(tmp_path: Path) -> None:
    """The agent follows the Kubernetes API (recorded answers, tests/support/fake_kube_api.py,
    served from a netns of its own, reached through a veth); the pod came through the CNI
    chain."""
    name = "cn" + uuid.uuid4().hex[:6]
    api = FakeApiServer.recorded()
    api.host = API_ADDRESS
    api_netns = Path(f"/run/netns/{name}-api")
    subprocess.run(["ip", "netns", "add", api_netns.name], check=True)
    try:
        subprocess.run(["ip", "-n", api_netns.name, "link", "set", "lo", "up"], check=True)
        with _node(tmp_path, NODE, ["--kubernetes", "--kubeconfig", str(tmp_path / "kubeconfig")],
                   before_agent=lambda netns: _serve_api(api, netns, api_netns, tmp_path)
                   ) as node:  # fmt: skip
            pod = Attachment("p" * 64, str(node.pod_netns("productpage")), namespace="shop",
                             name="productpage-v1-5f8d7b9c4-jz6tn",
                             uid="7a1c2e3f-4b5d-4c6e-8f90-a1b2c3d4e5f6")  # fmt: skip
            address = pod_address(node.runtime.add(pod))
            assert enrolled(node) == {address}  # namespace shop is ambient in the API
            api.send(NAMESPACES, recorded_events("namespaces-shop-released.jsonl"))
            _until(lambda: enrolled(node) == set(), "released after the label went")
            api.send(NAMESPACES, recorded_events("namespaces-shop-enrolled.jsonl"))
            _until(lambda: enrolled(node) == {address}, "enrolled again when the label came back")
            node.runtime.delete(pod)
    finally:
        api.stop()
        subprocess.run(["ip", "netns", "del", api_netns.name], check=False)


API_ADDRESS = "10.243.0.1"


def _serve_api(api: FakeApiServer, node_netns: Path, api_netns: Path, tmp_path: Path) -> None:
    """A veth between the node and the API's netns, the server listening there, and a
    kubeconfig pointing at it."""
    veth = "ka" + uuid.uuid4().hex[:8]
    subprocess.run(["ip", "link", "add", veth, "netns", node_netns.name, "type", "veth",
                    "peer", "name", "api0", "netns", api_netns.name], check=True)  # fmt: skip
    for netns, dev, address in ((node_netns, veth, "10.243.0.2/30"),
                                (api_netns, "api0", f"{API_ADDRESS}/30")):  # fmt: skip
        subprocess.run(["ip", "-n", netns.name, "addr", "add", address, "dev", dev], check=True)
        subprocess.run(["ip", "-n", netns.name, "link", "set", dev, "up"], check=True)
    worker = NetnsWorker(str(api_netns))  # the listening socket is made in that netns
    try:
        worker.call(api.start)
    finally:
        worker.close()
    (tmp_path / "kubeconfig").write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "test", "cluster": {"server": api.url}}],
        "users": [{"name": "test", "user": {}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}],
    }))  # fmt: skip


def _until(condition: Callable[[], bool], what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not {what} within {timeout:.0f}s"
        time.sleep(0.1)


def test_del_is_idempotent_and_unknown_containers_are_fine(node: Node) -> None:
    pod = Attachment("d" * 64, str(node.pod_netns("ghost")), name="ghost")
    node.runtime.delete(pod)  # never added
    result = node.runtime.add(pod)
    node.runtime.delete(pod, result)
    node.runtime.delete(pod, result)
    assert enrolled(node) == set()


def test_a_restarted_agent_keeps_its_pods_and_lets_go_of_the_gone(node: Node) -> None:
    staying = Attachment("k" * 64, str(node.pod_netns("staying")), name="staying", uid="u-k")
    leaving = Attachment("l" * 64, str(node.pod_netns("leaving")), name="leaving", uid="u-l")
    addresses = {p.name: pod_address(node.runtime.add(p)) for p in (staying, leaving)}
    assert enrolled(node) == set(addresses.values())
    node.stop_agent()  # its pods stay captured while it is away, for the next agent...
    assert enrolled(node) == set(addresses.values())
    # ...and one of them is deleted meanwhile: its DEL found no agent, its netns is gone.
    subprocess.run(["ip", "netns", "del", Path(leaving.netns).name], check=True)
    node.start_agent()
    assert enrolled(node) == {addresses["staying"]}
    records = json.loads((node.tmp / "state" / "node" / "cni-pods.json").read_text())
    assert [r["name"] for r in records] == ["staying"]


def test_a_failed_add_into_an_enrolled_pods_netns_leaves_that_pod_as_it_was(
    node: Node,
) -> None:
    victim = Attachment("v" * 64, str(node.pod_netns("victim")), name="victim", uid="u-v")
    address = pod_address(node.runtime.add(victim))
    filters = tc_filters(victim.netns)
    assert "ambient_pod_egress" in filters
    # A second sandbox handed the same netns (a runtime bug, or an attack on the agent).
    intruder = Attachment("i" * 64, victim.netns, ifname="eth1", name="intruder", uid="u-i")
    with pytest.raises(PluginFailed) as failed:
        node.runtime.add(intruder)
    assert failed.value.plugin == "ambient-cni"
    assert "belongs to the enrolled pod default/victim" in failed.value.error["msg"]
    node.runtime.delete(intruder)
    assert enrolled(node) == {address}
    assert tc_filters(victim.netns) == filters
    # A missing netns fails only its own ADD: the node stays ready for the others.
    ghost = Attachment("g" * 64, "/run/netns/no-such-netns", name="ghost", uid="u-g")
    ambient_cni = node.runtime.conflist["plugins"][-1]
    prev = {"cniVersion": "1.0.0", "ips": [{"address": "10.242.7.250/24"}]}
    done = node.runtime.run_one(ambient_cni, "ADD", ghost, prev)
    assert done.returncode != 0 and "no-such-netns" in done.stdout
    status = node.runtime.run_one(ambient_cni, "STATUS", None, extra={"cniVersion": "1.1.0"})
    assert status.returncode == 0, status.stdout
    assert enrolled(node) == {address}


def tc_filters(netns: str) -> str:
    return subprocess.run(
        ["ip", "netns", "exec", Path(netns).name, "tc", "filter", "show", "dev", "eth0",
         "egress"], capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip


def test_add_fails_clearly_and_leaves_nothing_when_the_agent_is_gone(node: Node) -> None:
    node.stop_agent()
    pod = Attachment("e" * 64, str(node.pod_netns("early")), name="early")
    with pytest.raises(PluginFailed) as failed:
        node.runtime.add(pod)
    assert failed.value.plugin == "ambient-cni" and failed.value.error["code"] == 11
    # The runtime then deletes the sandbox's network: the chain's DEL must succeed.
    node.runtime.delete(pod)


def _serve_once(netns: Path, port: int, reply: bytes) -> Any:
    worker = NetnsWorker(str(netns))
    try:
        listener = worker.call(lambda: socket.create_server(("0.0.0.0", port)))
    finally:
        worker.close()
    got: list[bytes] = []

    def serve() -> None:
        with listener:
            listener.settimeout(10)
            conn, _ = listener.accept()
            with conn:
                got.append(conn.recv(100))
                conn.sendall(reply)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()

    def wait() -> bytes:
        thread.join(10)
        return got[0] if got else b""

    return wait


def _call(netns: Path, host: str, port: int, message: bytes) -> bytes:
    def inside() -> bytes:
        with socket.create_connection((host, port), timeout=10) as sock:
            sock.sendall(message)
            return sock.recv(100)

    worker = NetnsWorker(str(netns))
    try:
        return worker.call(inside)
    finally:
        worker.close()


def _wait_for(node: Node, match: Any, timeout: float = 10) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for event in node.log():
            if match(event):
                return event
        time.sleep(0.1)
    raise AssertionError("agent never logged the expected event")


def test_gc_and_status_through_the_plugin(node: Node) -> None:
    """GC and STATUS are spec 1.1; Debian's reference plugins (1.1.1) stop at 1.0.0, so the
    runtime's GC reaches only ambient-cni here, with a 1.1.0 config as libcni sends it."""
    kept = Attachment("g" * 64, str(node.pod_netns("kept")), name="kept")
    dropped = Attachment("h" * 64, str(node.pod_netns("dropped")), name="dropped")
    addresses = {p.name: pod_address(node.runtime.add(p)) for p in (kept, dropped)}
    ambient_cni = node.runtime.conflist["plugins"][-1]
    status = node.runtime.run_one(ambient_cni, "STATUS", None, extra={"cniVersion": "1.1.0"})
    assert status.returncode == 0, status.stdout
    valid = [{"containerID": kept.container_id, "ifname": "eth0"}]
    done = node.runtime.run_one(ambient_cni, "GC", None, extra={
        "cniVersion": "1.1.0", "cni.dev/valid-attachments": valid})  # fmt: skip
    assert done.returncode == 0, done.stdout
    assert enrolled(node) == {addresses["kept"]}
    node.runtime.delete(kept)
    node.runtime.delete(dropped)  # its sandbox's network is still the runtime's to remove
