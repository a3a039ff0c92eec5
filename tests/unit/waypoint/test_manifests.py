"""A waypoint's Kubernetes objects (agent/waypoint/manifests.py) and `ambientctl waypoint`.

The objects are checked for what the rest of the project relies on: the node agents' sources
bind a Service to the generated Gateway and find its pods (translated by the real
kube_objects), the RBAC covers exactly what agent/sources/kube_source.py lists and watches,
the container's arguments parse with `ambient-agent waypoint`'s own parser. `generate` and
`status` run as commands; `status` reads a config dump made by the real Waypoint and served
over HTTP; `apply` talks to a small API server in this file that takes server-side apply
PATCHes (tests/support/fake_kube_api.py answers GETs only).
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import kubernetes.client
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from agent import cli, ctl
from agent.sources.kube_objects import Kind, KubeObjects, mesh_state_from
from agent.sources.kube_source import resources_of
from agent.state.route import BackendRef, HttpRoute, ParentRef, RouteRule
from agent.state.service import Service
from agent.state.store import MeshState
from agent.state.waypoint import ALLOW_ONLY_WAYPOINT, Waypoint, WaypointFor
from agent.state.workload import Protocol
from agent.waypoint.manifests import (
    CA_SECRET,
    DEFAULT_IMAGE,
    Manifest,
    cluster_role_name,
    to_yaml,
    waypoint_objects,
)
from agent.waypoint_app import Waypoint as WaypointProcess
from agent.waypoint_app import WaypointConfig

KUBERNETES_VERSION = "1.37"
KINDS = ["ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Deployment", "Service", "Gateway"]
BUILT_IN = KINDS[:-1]
GATEWAY_NAME = "gateway.networking.k8s.io/gateway-name"
_LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")


def _by_kind(objects: list[Manifest]) -> dict[str, Manifest]:
    return {obj["kind"]: obj for obj in objects}


def _container(objects: list[Manifest]) -> Manifest:
    (container,) = _by_kind(objects)["Deployment"]["spec"]["template"]["spec"]["containers"]
    return dict(container)


# --- the objects ---------------------------------------------------------------------------


def test_objects_in_apply_order_named_after_the_gateway() -> None:
    objects = waypoint_objects("shop", "reviews-waypoint")
    assert [obj["kind"] for obj in objects] == KINDS
    for obj in objects:
        if obj["kind"] in ("ClusterRole", "ClusterRoleBinding"):
            assert "namespace" not in obj["metadata"]
            assert obj["metadata"]["name"] == "ambient-waypoint:shop:reviews-waypoint"
        else:
            assert obj["metadata"]["namespace"] == "shop"
            assert obj["metadata"]["name"] == "reviews-waypoint"
        assert obj["metadata"]["labels"][GATEWAY_NAME] == "reviews-waypoint"
        for key, value in obj["metadata"]["labels"].items():
            assert len(value) <= 63 and _LABEL_VALUE.fullmatch(value), (key, value)


def test_defaults() -> None:
    objects = waypoint_objects("default")
    assert objects == waypoint_objects("default", "waypoint", "service", DEFAULT_IMAGE, False)
    assert _by_kind(objects)["Gateway"]["metadata"]["name"] == "waypoint"
    assert _container(objects)["image"] == DEFAULT_IMAGE


def test_no_two_waypoints_share_a_cluster_role() -> None:
    """'-' may be in a namespace and a name; ':' in neither."""
    assert cluster_role_name("a-b", "c") != cluster_role_name("a", "b-c")


@pytest.mark.parametrize("waypoint_for", [w.value for w in WaypointFor])
@pytest.mark.parametrize("allow_only", [False, True])
def test_gateway(waypoint_for: str, allow_only: bool) -> None:
    gateway = _by_kind(
        waypoint_objects("shop", "wp", waypoint_for, allow_only_waypoint=allow_only)
    )["Gateway"]
    assert gateway["apiVersion"] == "gateway.networking.k8s.io/v1"
    assert gateway["spec"] == {
        "gatewayClassName": "istio-waypoint",
        "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}],
    }
    assert gateway["metadata"]["labels"]["istio.io/waypoint-for"] == waypoint_for
    if allow_only:
        assert gateway["metadata"]["annotations"] == {ALLOW_ONLY_WAYPOINT: "true"}
    else:
        assert "annotations" not in gateway["metadata"]


def test_deployment_pods() -> None:
    deployment = _by_kind(waypoint_objects("shop", "wp"))["Deployment"]
    spec = deployment["spec"]
    assert spec["replicas"] == 1
    labels = spec["template"]["metadata"]["labels"]
    assert {GATEWAY_NAME: "wp", "istio.io/dataplane-mode": "none", "app": "wp"}.items() <= (
        labels.items()
    )
    # The sources' mark of a waypoint's own pod (never bound to a waypoint itself).
    assert labels["gateway.istio.io/managed"] == "istio.io-mesh-controller"
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    assert spec["template"]["metadata"]["annotations"] == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": "15020",
        "prometheus.io/path": "/stats/prometheus",
    }
    pod = spec["template"]["spec"]
    assert pod["serviceAccountName"] == "wp"
    assert pod.get("hostNetwork", False) is False


def test_container_ports_probes_and_privileges() -> None:
    container = _container(waypoint_objects("shop", "wp"))
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"mesh": 15008, "http-metrics": 15020, "status-port": 15021}
    assert container["readinessProbe"]["httpGet"] == {"path": "/healthz/ready", "port": 15021}
    liveness = container["livenessProbe"]
    assert liveness["httpGet"]["port"] in ports.values()
    assert liveness["httpGet"]["path"] != "/healthz/ready"
    assert liveness["failureThreshold"] * liveness["periodSeconds"] >= 30
    assert {"requests", "limits"} <= set(container["resources"])
    security = container["securityContext"]
    # Root only to read the CA Secret's 0400 key, and nothing more.
    assert security["runAsUser"] == 0
    assert security["privileged"] is False
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["readOnlyRootFilesystem"] is True


def test_container_arguments_parse_as_a_waypoint_of_its_gateway(tmp_path: Path) -> None:
    objects = waypoint_objects("shop", "wp")
    container = _container(objects)
    assert container["command"] == ["ambient-agent"]
    parsed = cli._parser().parse_args(container["args"])
    assert parsed.command == "waypoint"
    assert parsed.gateway == "shop/wp"
    assert parsed.kubernetes and parsed.kubeconfig is None and parsed.config is None
    assert parsed.log_format == "json"
    assert parsed.admin_address == "127.0.0.1"  # the config dump stays in the pod
    # Its identity is its ServiceAccount's, as the node agents expect of a waypoint pod.
    config = WaypointConfig(gateway=parsed.gateway, run_dir=tmp_path)
    assert config.identity.uri == "spiffe://cluster.local/ns/shop/sa/wp"
    pod = _by_kind(objects)["Deployment"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == (config.service_account or config.name)
    # The CA the node agents share, read-only from the Secret; the run dir writable.
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    ca = mounts[str(parsed.ca_dir)]
    assert ca["readOnly"] is True
    assert volumes[ca["name"]]["secret"] == {"secretName": CA_SECRET, "defaultMode": 0o400}
    run_dir = Path("/run/ambient-waypoint") / "shop-wp"  # cli's default for --run-dir
    assert parsed.run_dir is None
    (run,) = [m for p, m in mounts.items() if run_dir.is_relative_to(p)]
    assert "emptyDir" in volumes[run["name"]]
    assert {m["name"] for m in container["volumeMounts"]} == set(volumes)


def test_service_selects_the_pods_on_the_hbone_port() -> None:
    objects = _by_kind(waypoint_objects("shop", "wp"))
    service = objects["Service"]
    assert service["spec"]["type"] == "ClusterIP"
    pod_labels = objects["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    ports = {port["name"]: port for port in service["spec"]["ports"]}
    assert ports["mesh"]["port"] == ports["mesh"]["targetPort"] == 15008
    assert ports["mesh"]["appProtocol"] == "hbone"  # as Istio's: the listener's protocol
    container_ports = {p["containerPort"] for p in _container(list(objects.values()))["ports"]}
    assert {port["targetPort"] for port in ports.values()} <= container_ports


# --- the RBAC: exactly what the Kubernetes source reads ------------------------------------


def _source_reads() -> set[tuple[str, str]]:
    """(API group, resource) of every collection kube_source follows, from its own table."""
    reads = set()
    for resource in resources_of(kubernetes.client.ApiClient()):
        parts = resource.path.strip("/").split("/")
        group = "" if parts[0] == "api" else parts[1]
        reads.add((group, parts[-1]))
        # It only lists and watches (watch=True on the list call): never a get.
        call = getattr(resource.list_call, "func", resource.list_call)
        assert call.__name__.startswith("list_"), call
    return reads


def test_cluster_role_grants_exactly_list_and_watch_of_what_the_source_reads() -> None:
    role = _by_kind(waypoint_objects("shop", "wp"))["ClusterRole"]
    granted = set()
    for rule in role["rules"]:
        assert set(rule) == {"apiGroups", "resources", "verbs"}, rule
        assert set(rule["verbs"]) == {"list", "watch"}, rule
        granted |= {(group, res) for group in rule["apiGroups"] for res in rule["resources"]}
    assert granted == _source_reads()
    assert {kind.value for kind in Kind} == {resource for _, resource in granted}


def test_binding_gives_the_role_to_the_waypoints_service_account() -> None:
    objects = _by_kind(waypoint_objects("shop", "wp"))
    binding = objects["ClusterRoleBinding"]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": objects["ClusterRole"]["metadata"]["name"],
    }
    account = objects["ServiceAccount"]["metadata"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account["name"], "namespace": account["namespace"]}
    ]


# --- what the node agents make of them ------------------------------------------------------


def _as_the_api_returns(objects: list[Manifest], waypoint_ip: str) -> dict[str, list[Manifest]]:
    """The Service with its ClusterIP and one running, ready pod of the Deployment."""
    by_kind = _by_kind(copy.deepcopy(objects))
    service = by_kind["Service"]
    service["spec"]["clusterIP"] = "10.96.0.50"
    service["spec"]["clusterIPs"] = ["10.96.0.50"]
    template = by_kind["Deployment"]["spec"]["template"]
    namespace = by_kind["Deployment"]["metadata"]["namespace"]
    pod = {
        "metadata": {
            "name": "wp-6d4b9c8f6-x2x9k",
            "namespace": namespace,
            "uid": "uid-waypoint",
            "creationTimestamp": "2026-01-01T00:00:00Z",
            "labels": template["metadata"]["labels"],
        },
        "spec": {**template["spec"], "nodeName": "node-1"},
        "status": {
            "phase": "Running",
            "podIP": waypoint_ip,
            "podIPs": [{"ip": waypoint_ip}],
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }
    return {"services": [service], "pods": [pod], "gateways": [by_kind["Gateway"]]}


@pytest.mark.parametrize(
    ("waypoint_for", "binds_services"),
    [("service", True), ("all", True), ("workload", False), ("none", False)],
)
@pytest.mark.parametrize("allow_only", [False, True])
def test_node_agents_bind_a_labelled_service_to_it(
    waypoint_for: str, binds_services: bool, allow_only: bool
) -> None:
    generated = _as_the_api_returns(
        waypoint_objects("shop", "wp", waypoint_for, allow_only_waypoint=allow_only), "10.244.1.9"
    )
    echo = {
        "metadata": {
            "name": "echo",
            "namespace": "shop",
            "labels": {"istio.io/use-waypoint": "wp"},
        },
        "spec": {
            "type": "ClusterIP",
            "clusterIP": "10.96.0.20",
            "clusterIPs": ["10.96.0.20"],
            "selector": {"app": "echo"},
            "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}],
        },
    }
    kube = KubeObjects()
    kube.replace_all(
        Kind.NAMESPACES,
        [{"metadata": {"name": "shop", "labels": {"istio.io/dataplane-mode": "ambient"}}}],
    )
    kube.replace_all(Kind.SERVICES, [*generated["services"], echo])
    kube.replace_all(Kind.PODS, generated["pods"])
    kube.replace_all(Kind.GATEWAYS, generated["gateways"])
    state = mesh_state_from(kube, "Kubernetes", "cluster.local")

    bound = state.service("shop/echo.shop.svc.cluster.local")
    assert bound is not None
    if binds_services:
        # No Gateway status address (no controller writes one): the waypoint Service's VIP.
        assert bound.waypoint == Waypoint("10.96.0.50", 15008, "wp", "shop", allow_only)
    else:
        assert bound.waypoint is None
    (waypoint_pod,) = state.workloads
    assert waypoint_pod.service_account == "wp"
    assert waypoint_pod.protocol is Protocol.TCP  # never captured
    assert waypoint_pod.waypoint is None
    assert waypoint_pod.healthy
    assert "shop/wp.shop.svc.cluster.local" in waypoint_pod.services


# --- offline schema validation -------------------------------------------------------------


@pytest.mark.parametrize(
    "objects",
    [
        waypoint_objects("default"),
        waypoint_objects("shop", "reviews-waypoint", "all", "registry.example/agent:1", True),
    ],
    ids=["default", "options"],
)
def test_built_in_objects_are_valid_kubernetes_strict(objects: list[Manifest]) -> None:
    for obj in objects:
        if obj["kind"] in BUILT_IN:
            assert kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True) == (
                KUBERNETES_VERSION
            )


# --- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"namespace": "Shop"}, "namespace 'Shop' must be lower-case"),
        ({"namespace": ""}, "namespace '' must be lower-case"),
        ({"namespace": "n" * 64}, "is longer than 63"),
        ({"name": "wp.v1"}, "waypoint name 'wp.v1' must be lower-case"),
        ({"name": "w" * 64}, "is longer than 63"),
        ({"name": "1wp"}, "must start with a letter"),
        ({"waypoint_for": "mesh"}, "waypoint-for 'mesh' must be one of service, workload"),
        ({"image": ""}, "image '' must be"),
        ({"image": "a b"}, "image 'a b' must be"),
    ],
)
def test_bad_input_is_refused_with_its_reason(kwargs: dict[str, Any], message: str) -> None:
    args: dict[str, Any] = {"namespace": "shop", **kwargs}
    with pytest.raises(ValueError, match=re.escape(message)):
        waypoint_objects(**args)


# --- ambientctl waypoint generate ----------------------------------------------------------


def _ctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.ctl", *args], capture_output=True, text=True, timeout=60
    )


def test_generate_prints_the_objects_as_yaml() -> None:
    done = _ctl("waypoint", "generate", "--namespace", "shop")
    assert done.returncode == 0, done.stderr
    documents = list(yaml.safe_load_all(done.stdout))
    assert [doc["kind"] for doc in documents] == KINDS
    assert documents == waypoint_objects("shop")
    assert done.stdout == to_yaml(waypoint_objects("shop"))


def test_generate_options() -> None:
    done = _ctl(
        "waypoint", "generate", "-n", "shop", "--name", "wp", "--for", "workload",
        "--allow-only-waypoint", "--image", "registry.example/agent:1",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    documents = list(yaml.safe_load_all(done.stdout))
    assert documents == waypoint_objects("shop", "wp", "workload", "registry.example/agent:1", True)


def test_generate_refuses_bad_input() -> None:
    done = _ctl("waypoint", "generate", "-n", "Shop")
    assert done.returncode == 2
    assert done.stdout == ""
    assert "ambientctl: namespace 'Shop' must be lower-case" in done.stderr
    done = _ctl("waypoint", "generate", "-n", "shop", "--for", "mesh")
    assert done.returncode == 2 and "invalid choice: 'mesh'" in done.stderr


def test_the_kernel_commands_take_their_options_before_or_after() -> None:
    for args in (["pods", "--pin-dir", "/nonexistent"], ["--pin-dir", "/nonexistent", "pods"]):
        done = _ctl(*args)
        assert done.returncode == 1
        assert "no pinned maps there" in done.stderr


# --- ambientctl waypoint status ------------------------------------------------------------


@dataclass
class _Served:
    """An HTTP server on a thread: GET answers with `body` (a canned admin port)."""

    body: bytes
    status: int = 200
    paths: list[str] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None

    @property
    def address(self) -> str:
        assert self.server is not None
        host, port = self.server.server_address[:2]
        return f"{host!s}:{port}"

    def start(self) -> None:
        served = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                served.paths.append(self.path)
                self.send_response(served.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(served.body)))
                self.end_headers()
                self.wfile.write(served.body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


def _real_dump(tmp_path: Path) -> dict[str, Any]:
    """A config dump made by the waypoint process itself: one bound Service with an HTTP and
    a TCP port, and a route whose second backend does not exist."""
    waypoint = Waypoint("10.96.0.50", 15008, "waypoint", "default")
    echo = Service(
        "echo",
        "default",
        "echo.default.svc.cluster.local",
        ("10.96.0.20",),
        {80: 8080, 9000: 9000},
        waypoint,
        {80: "http"},
    )
    v1 = Service(
        "echo-v1", "default", "echo-v1.default.svc.cluster.local", ("10.96.0.31",), {80: 80}
    )
    route = HttpRoute(
        "split",
        "default",
        (ParentRef("echo", "default", 80),),
        (
            RouteRule(
                (), (BackendRef("echo-v1", "default", 80), BackendRef("nowhere", "default", 80))
            ),
        ),
    )
    process = WaypointProcess(WaypointConfig("default/waypoint", tmp_path / "run"))
    process.rendered = MeshState(services=(echo, v1), routes=(route,))  # as last rendered
    process.latest = "bbbb"
    process.in_force = {"listeners": "aaaa", "clusters": "aaaa"}
    process.rejections = [{"version": "bbbb", "reason": "Unknown field in: {...}"}]
    dump: dict[str, Any] = json.loads(json.dumps(process.config_dump(), default=str))
    return dump


@pytest.fixture
def admin(tmp_path: Path) -> Iterator[_Served]:
    served = _Served(json.dumps(_real_dump(tmp_path)).encode())
    served.start()
    yield served
    served.stop()


def test_status_shows_what_the_waypoint_has_in_force(
    admin: _Served, capsys: pytest.CaptureFixture[str]
) -> None:
    assert ctl.main(["waypoint", "status", "--admin", admin.address]) == 0
    out = capsys.readouterr().out
    assert admin.paths == ["/config_dump"]
    lines = [line.rstrip() for line in out.splitlines()]
    assert "gateway      default/waypoint" in lines
    assert "identity     spiffe://cluster.local/ns/default/sa/waypoint" in lines
    assert any(line.startswith("envoy        not running, not live, 0 restarts") for line in lines)
    assert (
        "config       latest bbbb; in force: listeners aaaa, clusters aaaa "
        "(latest rejected: the last good one stays in force)"
    ) in lines
    assert "  bbbb: Unknown field in: {...}" in lines
    assert "  default/echo.default.svc.cluster.local  VIPs 10.96.0.20" in lines
    assert "    port 80     http" in lines
    assert "    port 9000   tcp" in lines
    assert "    routes     default/split" in lines
    assert "  default/split" in lines
    assert "    parent Service/default/echo" in lines
    (accepted,) = [line for line in lines if line.strip().startswith("Accepted")]
    assert accepted.split()[1] == "True"
    (resolved,) = [line for line in lines if line.strip().startswith("ResolvedRefs")]
    assert resolved.split()[1] == "False" and "nowhere" in resolved


def test_status_json_prints_the_dump(admin: _Served, capsys: pytest.CaptureFixture[str]) -> None:
    assert ctl.main(["waypoint", "status", "--admin", admin.address, "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(admin.body)
    assert printed["gateway"] == "default/waypoint"


def test_status_of_an_up_to_date_waypoint() -> None:
    dump = {
        "gateway": "shop/wp",
        "identity": "spiffe://cluster.local/ns/shop/sa/wp",
        "envoy": {
            "pid": 42,
            "live": True,
            "restarts": 1,
            "latest_version": "cccc",
            "in_force": {"listeners": "cccc", "clusters": "cccc"},
            "warming": 1,
            "rejections": [],
        },
    }
    lines = ctl.format_status(dump).splitlines()
    assert "envoy        pid 42, live, 1 restarts, 1 listener(s) warming" in lines
    assert "config       latest cccc; in force: listeners cccc, clusters cccc (up to date)" in lines
    assert "rejections   none" in lines
    assert "services     0 bound" in lines


def test_status_without_a_waypoint_says_how_to_reach_one(
    capsys: pytest.CaptureFixture[str],
) -> None:
    served = _Served(b"")
    served.start()
    address = served.address
    served.stop()  # nothing listens there any more
    assert ctl.main(["waypoint", "status", "--admin", address]) == 2
    err = capsys.readouterr().err
    assert f"cannot reach the admin port at {address}" in err
    assert "port-forward" in err


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b"not found", 404, "HTTP 404"),
        (b"<html>", 200, "not JSON"),
        (json.dumps({"workloads": []}).encode(), 200, "not a waypoint's config dump"),
    ],
)
def test_status_refuses_what_is_no_waypoint_dump(
    body: bytes, status: int, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    served = _Served(body, status)
    served.start()
    try:
        assert ctl.main(["waypoint", "status", "--admin", served.address]) == 1
    finally:
        served.stop()
    assert message in capsys.readouterr().err


def test_status_refuses_an_address_without_port(capsys: pytest.CaptureFixture[str]) -> None:
    assert ctl.main(["waypoint", "status", "--admin", "localhost"]) == 2
    assert "must be HOST:PORT" in capsys.readouterr().err


# --- ambientctl waypoint apply -------------------------------------------------------------


@dataclass(frozen=True)
class _Patch:
    path: str
    query: dict[str, list[str]]
    content_type: str
    body: Manifest


@dataclass
class _ApplyServer:
    """Takes server-side apply PATCHes and answers with the object; paths in `missing` answer
    404 as an API server without that resource does (a plain text body, no Status)."""

    missing: tuple[str, ...] = ()
    patches: list[_Patch] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> None:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_PATCH(self) -> None:
                split = urlsplit(self.path)
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length))
                fake.patches.append(
                    _Patch(
                        unquote(split.path),
                        parse_qs(split.query),
                        self.headers.get("Content-Type", ""),
                        body,
                    )
                )
                if any(unquote(split.path).startswith(p) for p in fake.missing):
                    self._answer(404, b"404 page not found\n", "text/plain")
                else:
                    self._answer(200, json.dumps(body).encode(), "application/json")

            def _answer(self, code: int, body: bytes, content_type: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


def _kubeconfig(tmp_path: Path, server: str) -> Path:
    path = tmp_path / "kubeconfig"
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "test", "cluster": {"server": server}}],
                "users": [{"name": "test", "user": {"token": "test-token"}}],
                "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}],
                "current-context": "test",
            }
        )
    )
    return path


@pytest.fixture
def api() -> Iterator[_ApplyServer]:
    server = _ApplyServer()
    server.start()
    yield server
    server.stop()


def test_apply_server_side_applies_every_object_in_order(
    api: _ApplyServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kubeconfig = _kubeconfig(tmp_path, api.url)
    code = ctl.main(
        ["waypoint", "apply", "-n", "shop", "--for", "all", "--kubeconfig", str(kubeconfig)]
    )
    assert code == 0, capsys.readouterr().err
    assert [p.path for p in api.patches] == [
        "/api/v1/namespaces/shop/serviceaccounts/waypoint",
        "/apis/rbac.authorization.k8s.io/v1/clusterroles/ambient-waypoint:shop:waypoint",
        "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings/ambient-waypoint:shop:waypoint",
        "/apis/apps/v1/namespaces/shop/deployments/waypoint",
        "/api/v1/namespaces/shop/services/waypoint",
        "/apis/gateway.networking.k8s.io/v1/namespaces/shop/gateways/waypoint",
    ]
    assert [p.body for p in api.patches] == waypoint_objects("shop", waypoint_for="all")
    for patch in api.patches:
        assert patch.content_type == "application/apply-patch+yaml"
        assert patch.query["fieldManager"] == ["ambientctl"]
        assert patch.query["force"] == ["true"]
        assert patch.query["fieldValidation"] == ["Strict"]
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "serviceaccount/waypoint applied"
    assert out[-1] == "waypoint shop/waypoint applied"


def test_apply_without_the_gateway_api_says_to_install_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = _ApplyServer(missing=("/apis/gateway.networking.k8s.io/",))
    server.start()
    try:
        kubeconfig = _kubeconfig(tmp_path, server.url)
        assert ctl.main(["waypoint", "apply", "-n", "shop", "--kubeconfig", str(kubeconfig)]) == 1
    finally:
        server.stop()
    err = capsys.readouterr().err
    assert "gateway/waypoint in shop: the cluster has no Gateway API" in err
    assert "install its CRDs first" in err
    assert len(server.patches) == len(KINDS)  # the others were applied before it


def test_apply_to_an_unreachable_cluster_exits_2(
    api: _ApplyServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = api.url
    api.stop()  # nothing listens there any more
    kubeconfig = _kubeconfig(tmp_path, url)
    assert ctl.main(["waypoint", "apply", "-n", "shop", "--kubeconfig", str(kubeconfig)]) == 2
    assert f"cannot reach the Kubernetes API at {url}" in capsys.readouterr().err


def test_apply_without_any_cluster_configured_exits_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "none"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_PORT", raising=False)
    assert ctl.main(["waypoint", "apply", "-n", "shop"]) == 2
    assert "no cluster configured" in capsys.readouterr().err
    assert ctl.main(["waypoint", "apply", "-n", "shop", "--kubeconfig", str(tmp_path / "x")]) == 2
    assert "cannot use kubeconfig" in capsys.readouterr().err


def test_apply_refuses_bad_input_before_any_request(
    api: _ApplyServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kubeconfig = _kubeconfig(tmp_path, api.url)
    assert ctl.main(["waypoint", "apply", "-n", "shop", "--name", "1wp",
                     "--kubeconfig", str(kubeconfig)]) == 2  # fmt: skip
    assert "must start with a letter" in capsys.readouterr().err
    assert api.patches == []
