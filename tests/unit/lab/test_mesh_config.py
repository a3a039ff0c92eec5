"""The lab's mesh config (lab/agents.py mesh_config): waypoints' Services, bindings as Istio
makes them, appProtocols, HTTPRoutes and policies; and the waypoint processes' bookkeeping
(command line, readiness wait, finding and stopping them), with a stand-in for the waypoint
and without network namespaces."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.sources.local_config import parse_local_config
from lab import agents, control
from lab.network import LabError, LabNetwork, LabState
from lab.topology import parse_topology

TOPOLOGY = """\
nodeNetwork: 10.239.0.0/24
nodes:
  - {name: node-1, podCidr: 10.240.1.0/24}
  - {name: node-2, podCidr: 10.240.2.0/24}
pods:
  - {name: client, node: node-1, labels: {istio.io/use-waypoint: for-workloads}}
  - {name: server, node: node-1, labels: {app: echo, istio.io/use-waypoint: for-services}}
  - {name: both, node: node-2, labels: {app: echo, istio.io/use-waypoint: for-all}}
  - {name: optout, node: node-2, labels: {istio.io/use-waypoint: none}}
  - {name: unknown, node: node-2, labels: {istio.io/use-waypoint: nope}}
  - {name: idle, node: node-2, labels: {istio.io/use-waypoint: for-nothing}}
  - {name: elsewhere, namespace: apps, node: node-2,
     labels: {istio.io/use-waypoint: for-all, istio.io/use-waypoint-namespace: default}}
  - {name: wp-services, node: node-1, ambient: false, serviceAccount: waypoint-sa,
     labels: {app: echo}}
  - {name: wp-workloads, node: node-1, ambient: false}
  - {name: wp-all, node: node-2, ambient: false, labels: {istio.io/use-waypoint: for-all}}
  - {name: wp-none, node: node-2, ambient: false}
services:
  - name: echo
    labels: {istio.io/use-waypoint: for-services}
    ports:
      - {port: 80, targetPort: 8080, appProtocol: http}
      - {port: 9000}
    selector: {app: echo}
  - {name: plain, ports: [{port: 80}], selector: {app: echo}}
  - {name: by-all, ports: [{port: 80}], selector: {}, labels: {istio.io/use-waypoint: for-all}}
  - {name: by-workloads, ports: [{port: 80}], selector: {},
     labels: {istio.io/use-waypoint: for-workloads}}
  - {name: by-nothing, ports: [{port: 80}], selector: {},
     labels: {istio.io/use-waypoint: for-nothing}}
  - {name: optout, ports: [{port: 80}], selector: {}, labels: {istio.io/use-waypoint: none}}
  - {name: unknown, ports: [{port: 80}], selector: {}, labels: {istio.io/use-waypoint: nope}}
  - {name: same-ns, namespace: apps, ports: [{port: 80}], selector: {},
     labels: {istio.io/use-waypoint: for-services}}
  - {name: other-ns, namespace: apps, ports: [{port: 80}], selector: {},
     labels: {istio.io/use-waypoint: for-services, istio.io/use-waypoint-namespace: default}}
waypoints:
  - {name: for-services, pod: wp-services}
  - {name: for-workloads, pod: wp-workloads, for: workload}
  - {name: for-all, pod: wp-all, for: all, annotations: {ambient.istio.io/x: "y"}}
  - {name: for-nothing, pod: wp-none, for: none}
httpRoutes:
  - apiVersion: gateway.networking.k8s.io/v1
    kind: HTTPRoute
    metadata: {name: echo, namespace: default}
    spec:
      parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
      rules:
        - matches: [{path: {type: PathPrefix, value: /v2}}]
          backendRefs: [{name: echo, port: 80}]
policies:
  - apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {name: deny-post, namespace: default}
    spec:
      targetRefs: [{group: "", kind: Service, name: echo}]
      action: DENY
      rules: [{to: [{operation: {methods: [POST]}}]}]
  - apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {name: deny-outsider, namespace: default}
    spec:
      selector: {matchLabels: {app: echo}}
      action: DENY
      rules: [{from: [{source: {ipBlocks: [10.240.2.4/32]}}]}]
"""
# VIPs: the nine services take .20 to .28, then the waypoints .29 to .32, in file order.
VIP = {"for-services": "10.96.0.29", "for-workloads": "10.96.0.30", "for-all": "10.96.0.31"}


def binding(name: str) -> dict[str, str]:
    return {"destination": VIP[name], "name": name, "namespace": "default"}


def lab_state(text: str = TOPOLOGY, name: str = "unit") -> LabState:
    """What `up` would build, planned only: the netns paths name namespaces that do not exist."""
    return LabNetwork(name).plan(parse_topology(text, "test.yaml"))


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    return agents.mesh_config(lab_state())


def service(config: dict[str, Any], key: str) -> dict[str, Any]:
    return next(s for s in config["services"] if f"{s['namespace']}/{s['name']}" == key)


def workload(config: dict[str, Any], name: str) -> dict[str, Any]:
    return next(w for w in config["workloads"] if w["name"] == name)


def test_each_waypoint_has_a_service_its_pod_backs(config: dict[str, Any]) -> None:
    assert service(config, "default/for-services") == {
        "name": "for-services",
        "namespace": "default",
        "hostname": "for-services.default.svc.cluster.local",
        "vips": ["10.96.0.29"],
        "ports": {15008: 15008},
    }
    assert service(config, "default/for-nothing")["vips"] == ["10.96.0.32"]
    # In addition to the services its labels select.
    assert workload(config, "wp-services")["services"] == {
        "default/echo.default.svc.cluster.local": {80: 8080, 9000: 9000},
        "default/plain.default.svc.cluster.local": {80: 80},
        "default/for-services.default.svc.cluster.local": {15008: 15008},
    }
    assert workload(config, "wp-none")["services"] == {
        "default/for-nothing.default.svc.cluster.local": {15008: 15008}
    }
    assert workload(config, "wp-services")["protocol"] == "TCP"  # never captured


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("default/echo", binding("for-services")),  # for: service
        ("default/by-all", binding("for-all")),  # for: all
        ("apps/other-ns", binding("for-services")),  # use-waypoint-namespace
        ("default/plain", None),  # no label
        ("default/by-workloads", None),  # for: workload takes no services
        ("default/by-nothing", None),  # for: none
        ("default/optout", None),  # use-waypoint: none
        ("default/unknown", None),  # no such waypoint
        ("apps/same-ns", None),  # the waypoint is looked for in the service's namespace
        ("default/for-all", None),  # a waypoint's own Service
    ],
)
def test_services_are_bound_as_istio_binds_them(
    config: dict[str, Any], key: str, expected: dict[str, str] | None
) -> None:
    assert service(config, key).get("waypoint") == expected


@pytest.mark.parametrize(
    ("pod", "expected"),
    [
        ("client", binding("for-workloads")),  # for: workload
        ("both", binding("for-all")),  # for: all
        ("elsewhere", binding("for-all")),  # in apps, use-waypoint-namespace: default
        ("server", None),  # for: service takes no workloads
        ("idle", None),  # for: none
        ("optout", None),  # use-waypoint: none
        ("unknown", None),  # no such waypoint
        ("wp-all", None),  # labelled with its own waypoint: never sent to a waypoint
        ("wp-services", None),
    ],
)
def test_pods_are_bound_as_istio_binds_them(
    config: dict[str, Any], pod: str, expected: dict[str, str] | None
) -> None:
    assert workload(config, pod).get("waypoint") == expected


def test_app_protocols_routes_and_policies(config: dict[str, Any]) -> None:
    topology = parse_topology(TOPOLOGY)
    assert service(config, "default/echo")["appProtocols"] == {80: "http"}
    assert "appProtocols" not in service(config, "default/plain")
    assert config["httpRoutes"] == list(topology.http_routes)
    assert config["policies"] == list(topology.policies)
    config = agents.mesh_config(lab_state())
    config["policies"][0]["spec"]["action"] = "ALLOW"  # the next config is made afresh
    assert agents.mesh_config(lab_state())["policies"] == list(topology.policies)


def test_the_agent_loads_the_config(config: dict[str, Any]) -> None:
    loaded = parse_local_config(yaml.safe_dump(config, sort_keys=False), "mesh.yaml")
    echo = next(s for s in loaded.services if (s.namespace, s.name) == ("default", "echo"))
    assert echo.waypoint is not None
    assert (echo.waypoint.address, echo.waypoint.key) == ("10.96.0.29", "default/for-services")
    assert echo.app_protocols == {80: "http"}
    assert [r.key for r in loaded.routes] == ["default/echo"]
    assert [p.key for p in loaded.waypoint_policies] == ["default/deny-post"]
    assert [p.key for p in loaded.policies] == ["default/deny-outsider"]
    client = next(w for w in loaded.workloads if w.name == "client")
    assert client.waypoint is not None and client.waypoint.key == "default/for-workloads"


def test_without_waypoints_the_config_is_as_before() -> None:
    text = TOPOLOGY.split("waypoints:")[0]
    config = agents.mesh_config(lab_state(text))
    assert [s["name"] for s in config["services"]] == [
        "echo", "plain", "by-all", "by-workloads", "by-nothing", "optout", "unknown", "same-ns",
        "other-ns",
    ]  # fmt: skip
    assert not any("waypoint" in entry for entry in config["services"] + config["workloads"])
    assert service(config, "default/echo")["vips"] == ["10.96.0.20"]


# ---- waypoint processes -----------------------------------------------------------------

WAYPOINT_TOPOLOGY = """\
nodeNetwork: 10.239.0.0/24
nodes:
  - {name: node-1, podCidr: 10.240.1.0/24}
pods:
  - {name: wp, node: node-1, ambient: false, serviceAccount: wp-sa}
  - {name: wp2, namespace: apps, node: node-1, ambient: false}
waypoints:
  - {name: waypoint, pod: wp}
  - {name: second, namespace: apps, pod: wp2}
"""

# A stand-in for `ambient-agent waypoint`: says hello, then is ready (a file in its run dir,
# which the patched readiness check reads) unless told to fail, until it is signalled.
STAND_IN = """\
import os, signal, sys, time
args = sys.argv[1:]
ready = os.path.join(args[args.index("--run-dir") + 1], "ready")
print("waypoint", args[args.index("--gateway") + 1], "starting", flush=True)
if os.environ.get("STAND_IN_FAIL"):
    print("cannot start: broken on purpose", flush=True)
    sys.exit(3)
def stop(*_):
    os.remove(ready)
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
open(ready, "w").close()
time.sleep(60)
"""


@pytest.fixture
def lab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[LabState]:
    """A planned lab whose directory is under tmp_path, with the netns parts stubbed out:
    waypoints run in this netns, and are ready when their stand-in says so."""
    name = "ut" + os.urandom(3).hex()
    monkeypatch.setattr(agents, "lab_dir", lambda lab_name: tmp_path / lab_name)
    (tmp_path / name).mkdir()
    (tmp_path / name / "mesh.yaml").write_text("workloads: []\n")
    unwrapped = agents.waypoint_argv
    monkeypatch.setattr(agents, "waypoint_argv", lambda *a: unwrapped(*a)[3:])  # no nsenter

    class Here:
        def __init__(self, path: str) -> None:
            self.path = path

        def call(self, fn: Callable[[], Any]) -> Any:
            return fn()

        def close(self) -> None:
            pass

    monkeypatch.setattr(agents, "NetnsWorker", Here)
    saved: list[dict[str, Any]] = []
    monkeypatch.setattr(LabState, "save", lambda self: saved.append(dict(self.waypoints)))
    ready_dirs = {
        f"http://{ip}:15021/healthz/ready": tmp_path / name / run_dir
        for ip, run_dir in (("10.240.1.2", "waypoint-default-waypoint"),
                            ("10.240.1.3", "waypoint-apps-second"))
    }  # fmt: skip
    monkeypatch.setattr(agents, "_answers_200", lambda url: (ready_dirs[url] / "ready").exists())
    state = lab_state(WAYPOINT_TOPOLOGY, name)
    try:
        yield state
    finally:
        agents.stop_waypoints(name)


STAND_IN_COMMAND = (sys.executable, "-c", STAND_IN)


def test_the_waypoint_command_line() -> None:
    state = lab_state(WAYPOINT_TOPOLOGY, "lab")
    assert agents.waypoint_argv(state, "default/waypoint") == [
        "nsenter", "--net=/run/netns/lab-wp", "--", sys.executable, "-m", "agent", "waypoint",
        "--gateway", "default/waypoint",
        "--config", "/run/ambient-lab/lab/mesh.yaml",
        "--run-dir", "/run/ambient-lab/lab/waypoint-default-waypoint",
        "--ca-dir", "/run/ambient-lab/lab/ca",
        "--service-account", "wp-sa",
    ]  # fmt: skip
    assert agents.waypoint_argv(state, "apps/second")[-2:] == ["--service-account", "wp2"]
    with pytest.raises(LabError, match="no waypoint 'default/nope' in lab 'lab'; waypoints: "
                       "default/waypoint, apps/second"):  # fmt: skip
        agents.waypoint_argv(state, "default/nope")


def test_start_waypoints_waits_until_ready_and_records_them(lab: LabState) -> None:
    agents.start_waypoints(lab, STAND_IN_COMMAND)
    assert set(lab.waypoints) == {"default/waypoint", "apps/second"}
    base = agents.lab_dir(lab.name)
    info = lab.waypoints["default/waypoint"]
    assert info == {
        "pid": info["pid"],
        "log": str(base / "waypoint-default-waypoint.log"),
        "pod": "default/wp",
        "run_dir": str(base / "waypoint-default-waypoint"),
    }
    assert (base / "waypoint-apps-second" / "ready").exists()
    pids = {info["pid"] for info in lab.waypoints.values()}
    assert set(agents.lab_waypoint_pids(lab.name)) == pids
    log = Path(info["log"]).read_text()
    assert "waypoint default/waypoint starting" in log

    agents.stop_waypoint(lab, "default/waypoint")
    assert agents.lab_waypoint_pids(lab.name) == [lab.waypoints["apps/second"]["pid"]]
    agents.start_waypoint(lab, "default/waypoint", STAND_IN_COMMAND)
    assert lab.waypoints["default/waypoint"]["pid"] not in pids
    assert Path(info["log"]).read_text().count("starting") == 2  # appended

    agents.stop_waypoints(lab.name)
    assert agents.lab_waypoint_pids(lab.name) == []


def test_a_waypoint_that_exits_is_reported_with_its_log(
    lab: LabState, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STAND_IN_FAIL", "1")
    with pytest.raises(LabError) as caught:
        agents.start_waypoint(lab, "apps/second", STAND_IN_COMMAND)
    assert str(caught.value).startswith("waypoint apps/second exited with 3:\n")
    assert "cannot start: broken on purpose" in str(caught.value)


def test_a_waypoint_that_never_gets_ready_times_out(
    lab: LabState, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(agents, "WAYPOINT_READY_TIMEOUT", 0.3)
    monkeypatch.setattr(agents, "_answers_200", lambda url: False)
    with pytest.raises(LabError, match=r"waypoint default/waypoint not ready after 0s"):
        agents.start_waypoint(lab, "default/waypoint", STAND_IN_COMMAND)


def test_a_waypoint_needs_the_config(lab: LabState) -> None:
    (agents.lab_dir(lab.name) / "mesh.yaml").unlink()
    with pytest.raises(LabError, match="start the lab's agents first"):
        agents.start_waypoints(lab, STAND_IN_COMMAND)


def test_waypoints_are_found_by_their_run_dir_only(lab: LabState, tmp_path: Path) -> None:
    """A process of another lab, or with the lab's path in another argument, is not ours."""
    sleeper = "import time; time.sleep(60)"
    others = [
        [sys.executable, "-c", sleeper, "--run-dir", str(tmp_path / "other" / "waypoint-x")],
        [sys.executable, "-c", sleeper, "--config", str(tmp_path / lab.name / "waypoint-x")],
    ]
    ours = [sys.executable, "-c", sleeper, "--run-dir", str(tmp_path / lab.name / "waypoint-y")]
    procs = [subprocess.Popen(argv) for argv in [*others, ours]]
    try:
        deadline = time.monotonic() + 5
        while not agents.lab_waypoint_pids(lab.name) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert agents.lab_waypoint_pids(lab.name) == [procs[-1].pid]
        agents.stop_waypoints(lab.name)  # returns once they have exited (and reaps them)
        assert procs[-1].poll() is not None
        assert all(proc.poll() is None for proc in procs[:-1])
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()


def test_describe_lists_the_waypoints() -> None:
    report = {
        "name": "lab",
        "up": True,
        "node_network": "10.239.0.0/24",
        "nodes": [],
        "pods": [],
        "agents": {},
        "waypoints": {
            "default/waypoint": {"pid": 42, "pod": "default/wp", "running": True},
            "apps/second": {"pid": 43, "pod": "apps/wp2", "running": False},
        },
    }
    lines = control.describe(report).splitlines()
    assert lines[1].split() == ["waypoint", "default/waypoint", "pod", "default/wp", "running",
                                "(pid", "42)"]  # fmt: skip
    assert lines[2].split()[-4:] == ["not", "running", "(pid", "43)"]


def test_the_readiness_check_wants_a_200() -> None:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/healthz/ready" else 503)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    with http.server.HTTPServer(("127.0.0.1", 0), Handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        base = f"http://127.0.0.1:{server.server_address[1]}"
        try:
            assert agents._answers_200(f"{base}/healthz/ready")
            assert not agents._answers_200(f"{base}/other")  # 503
        finally:
            server.shutdown()
    assert not agents._answers_200(base + "/healthz/ready")  # nothing listens


def test_the_state_file_keeps_the_waypoints_and_reads_older_files() -> None:
    state = lab_state(WAYPOINT_TOPOLOGY, "lab")
    state.waypoints["default/waypoint"] = {"pid": 7, "pod": "default/wp"}
    assert LabState.from_json(state.to_json()) == state
    older = json.loads(state.to_json())
    del older["waypoints"]
    assert LabState.from_json(json.dumps(older)).waypoints == {}
