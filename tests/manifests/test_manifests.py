"""The DaemonSet install (manifests/), checked offline: no cluster, root or kernel.

Every manifest is validated against the Kubernetes schemas kubernetes-validate ships, in
strict mode (an unknown field fails), and the facts the install depends on are asserted:
least-privilege RBAC, the probes, the mounts, the init container and the agent agreeing on
the CNI socket, the agent's arguments accepted by its real parser, the config loading, and
the image's recipe. The image's entrypoint (kernel headers) runs on temporary directories.

The waypoint (manifests/waypoint/) is checked the same way, and is exactly what
agent/waypoint/manifests.py generates; its Gateway, a custom resource that kubernetes-validate
has no schema for, is checked against the Gateway API's own CRD schema for the fields it uses.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from agent import cli
from agent.waypoint import manifests as waypoint_manifests
from cni import install as cni_install

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "manifests"
CONTAINERFILE = MANIFESTS / "image" / "Containerfile"
ENTRYPOINT = MANIFESTS / "image" / "entrypoint.sh"
WAYPOINT = MANIFESTS / "waypoint"
# The newest Kubernetes the installed kubernetes-validate has schemas for (1.37.0).
KUBERNETES_VERSION = "1.37"
NAMESPACE = "ambient-system"
SERVICE_ACCOUNT = "ambient-agent"
READ_ONLY = {"get", "list", "watch"}
# What the agent's Kubernetes source reads, and nothing else.
RBAC_RESOURCES = {
    ("", "pods"),
    ("", "namespaces"),
    ("", "services"),
    ("discovery.k8s.io", "endpointslices"),
    ("security.istio.io", "authorizationpolicies"),
    ("gateway.networking.k8s.io", "gateways"),
    ("gateway.networking.k8s.io", "httproutes"),
}

Manifest = dict[str, Any]


def _kustomization() -> Manifest:
    data: Manifest = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
    return data


def _load_all() -> list[tuple[str, Manifest]]:
    documents = []
    for name in _kustomization()["resources"]:
        for document in yaml.safe_load_all((MANIFESTS / name).read_text()):
            if document is not None:
                documents.append((name, document))
    return documents


DOCUMENTS = _load_all()


def _one(kind: str, name: str) -> Manifest:
    found = [doc for _, doc in DOCUMENTS if doc["kind"] == kind]
    found = [doc for doc in found if doc["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def _pod_spec() -> Manifest:
    spec: Manifest = _one("DaemonSet", "ambient-agent")["spec"]["template"]["spec"]
    return spec


def _container(name: str, init: bool = False) -> Manifest:
    containers = _pod_spec()["initContainers" if init else "containers"]
    (container,) = [c for c in containers if c["name"] == name]
    return dict(container)


def _host_path_of(container: Manifest, mount_path: str) -> str:
    """The host path a container's mount at `mount_path` comes from."""
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == mount_path]
    (volume,) = [v for v in _pod_spec()["volumes"] if v["name"] == mount["name"]]
    return str(volume["hostPath"]["path"])


def _expanded(container: Manifest, words: list[str]) -> list[str]:
    """`words` with the kubelet's $(NAME) expansion done from the container's env: values,
    ConfigMap keys (which must exist), and the node's name for the fieldRef."""
    values: dict[str, str] = {}
    for var in container.get("env", []):
        source = var.get("valueFrom", {})
        if "value" in var:
            values[var["name"]] = var["value"]
        elif "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            values[var["name"]] = _one("ConfigMap", ref["name"])["data"][ref["key"]]
        elif source.get("fieldRef", {}).get("fieldPath") == "spec.nodeName":
            values[var["name"]] = "node-1"
    expanded = [re.sub(r"\$\((\w+)\)", lambda m: values[m[1]], word) for word in words]
    assert not any("$(" in word for word in expanded), expanded
    return expanded


def _agent_args() -> list[str]:
    """The agent's command line as the kubelet runs it."""
    agent = _container("agent")
    return _expanded(agent, agent["args"])


# --- the kustomization and the schemas ------------------------------------------------------


def test_kustomization_lists_every_manifest() -> None:
    resources = _kustomization()["resources"]
    assert len(resources) == len(set(resources))
    on_disk = {path.name for path in MANIFESTS.glob("*.y*ml")} - {"kustomization.yaml"}
    assert set(resources) == on_disk


def test_manifests_are_the_expected_objects() -> None:
    assert sorted((doc["kind"], doc["metadata"]["name"]) for _, doc in DOCUMENTS) == [
        ("ClusterRole", "ambient-agent"),
        ("ClusterRoleBinding", "ambient-agent"),
        ("ConfigMap", "ambient-agent-settings"),
        ("DaemonSet", "ambient-agent"),
        ("Namespace", NAMESPACE),
        ("ServiceAccount", SERVICE_ACCOUNT),
    ]
    for _, doc in DOCUMENTS:
        if doc["kind"] not in ("Namespace", "ClusterRole", "ClusterRoleBinding"):
            assert doc["metadata"]["namespace"] == NAMESPACE
    # The agent's pods are privileged: admitted only at Pod Security level "privileged".
    labels = _one("Namespace", NAMESPACE)["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "privileged"


@pytest.mark.parametrize(
    "document", [doc for _, doc in DOCUMENTS], ids=[f"{f}:{d['kind']}" for f, d in DOCUMENTS]
)
def test_manifest_is_valid_kubernetes_strict(document: Manifest) -> None:
    assert kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True) == (
        KUBERNETES_VERSION
    )


def test_strict_validation_refuses_an_unknown_field() -> None:
    daemonset = copy.deepcopy(_one("DaemonSet", "ambient-agent"))
    daemonset["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(daemonset, KUBERNETES_VERSION, strict=True)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kubectl_kustomize_builds_the_same_objects() -> None:
    built = subprocess.run(
        ["kubectl", "kustomize", str(MANIFESTS)],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    objects = [doc for doc in yaml.safe_load_all(built) if doc is not None]
    assert sorted(objects, key=repr) == sorted((doc for _, doc in DOCUMENTS), key=repr)


# --- RBAC -----------------------------------------------------------------------------------


def test_cluster_role_is_read_only_on_exactly_what_the_source_reads() -> None:
    role = _one("ClusterRole", "ambient-agent")
    granted = set()
    for rule in role["rules"]:
        assert set(rule) == {"apiGroups", "resources", "verbs"}, rule
        assert set(rule["verbs"]) == READ_ONLY, rule
        granted |= {(group, res) for group in rule["apiGroups"] for res in rule["resources"]}
    assert granted == RBAC_RESOURCES
    assert "aggregationRule" not in role


def test_binding_gives_the_role_to_the_agents_service_account() -> None:
    binding = _one("ClusterRoleBinding", "ambient-agent")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "ambient-agent",
    }  # fmt: skip
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": SERVICE_ACCOUNT, "namespace": NAMESPACE}
    ]
    assert _pod_spec()["serviceAccountName"] == SERVICE_ACCOUNT


# --- the DaemonSet --------------------------------------------------------------------------


def test_daemonset_runs_on_every_linux_node_in_the_host_network() -> None:
    daemonset = _one("DaemonSet", "ambient-agent")
    spec = _pod_spec()
    assert spec["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert {"operator": "Exists"} in spec["tolerations"]
    assert spec["hostNetwork"] is True
    assert spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert spec.get("hostPID", False) is False
    assert spec["priorityClassName"] == "system-node-critical"
    assert spec["terminationGracePeriodSeconds"] == 30
    assert daemonset["spec"]["updateStrategy"] == {
        "type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1},
    }  # fmt: skip
    labels = daemonset["spec"]["template"]["metadata"]["labels"]
    assert daemonset["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_agent_probes_readiness_and_liveness_on_15021() -> None:
    agent = _container("agent")
    ports = {port["name"]: port["containerPort"] for port in agent["ports"]}
    assert ports == {"http-metrics": 15020, "http-ready": 15021}
    assert agent["readinessProbe"]["httpGet"] == {"path": "/healthz/ready", "port": 15021}
    liveness = agent["livenessProbe"]
    # Not readiness's URL: one pod failing to enroll must not restart the agent.
    assert liveness["tcpSocket"] == {"port": 15021}
    assert liveness["failureThreshold"] * liveness["periodSeconds"] >= 30
    assert agent["securityContext"]["privileged"] is True
    assert {"requests", "limits"} <= set(agent["resources"])
    assert agent["env"][0] == {
        "name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}
    }  # fmt: skip
    # The rest are the settings ConfigMap's keys (checked by _expanded when the args parse).
    assert all("configMapKeyRef" in var["valueFrom"] for var in agent["env"][1:])


def test_every_mount_has_its_volume_and_every_volume_is_used() -> None:
    spec = _pod_spec()
    volumes = {volume["name"] for volume in spec["volumes"]}
    used = set()
    for container in [*spec["initContainers"], *spec["containers"]]:
        for mount in container["volumeMounts"]:
            assert mount["name"] in volumes, mount
            used.add(mount["name"])
    assert used == volumes


def test_agent_mounts() -> None:
    agent = _container("agent")
    mounts = {m["mountPath"]: m for m in agent["volumeMounts"]}
    # Pins on the host's bpffs, and a bpffs the agent mounts itself reaches the host.
    assert _host_path_of(agent, "/sys/fs/bpf") == "/sys/fs/bpf"
    assert mounts["/sys/fs/bpf"]["mountPropagation"] == "Bidirectional"
    assert _host_path_of(agent, "/sys/fs/cgroup") == "/sys/fs/cgroup"
    # Pod netns appear after the agent starts.
    assert _host_path_of(agent, "/var/run/netns") == "/var/run/netns"
    assert mounts["/var/run/netns"]["mountPropagation"] == "HostToContainer"
    # Kernel headers, read-only, where the entrypoint looks for them.
    for host in ("/lib/modules", "/usr/src"):
        assert _host_path_of(agent, f"/host{host}") == host
        assert mounts[f"/host{host}"]["readOnly"] is True


def test_agent_arguments_are_accepted_by_the_agents_parser() -> None:
    agent = _container("agent")
    args = _agent_args()
    assert args[:2] == ["ambient-agent", "run"]
    parsed = cli._parser().parse_args(args[1:])
    assert parsed.command == "run"
    assert parsed.node == "node-1"
    assert parsed.admin_address == "127.0.0.1"
    # The mesh state comes from the API, in-cluster (no kubeconfig, no local config file).
    assert parsed.kubernetes and parsed.kubeconfig is None and parsed.config is None
    # The socket and the state dir are on the host, at the same path as in the container
    # (the plugin runs on the host), and kept across agent restarts.
    socket_dir = str(Path(parsed.cni_socket).parent)
    assert str(parsed.state_dir) == socket_dir
    assert _host_path_of(agent, socket_dir) == socket_dir


def test_agent_arguments_match_run_help() -> None:
    """The same check through the CLI itself, as an operator would read it."""
    help_text = subprocess.run(
        [sys.executable, "-m", "agent", "run", "--help"],
        capture_output=True, text=True, check=True, cwd=ROOT, timeout=60,
    ).stdout  # fmt: skip
    accepted = set(re.findall(r"--[a-z][a-z-]*", help_text))
    used = {arg for arg in _agent_args() if arg.startswith("--")}
    assert used <= accepted


def test_init_container_installs_the_plugin_for_the_agents_socket() -> None:
    init = _container("install-cni", init=True)
    command = init["command"]
    assert command[:2] == ["ambient-cni", "install"]
    parsed = cni_install._parser().parse_args(_expanded(init, command)[1:])
    assert parsed.exclude_namespaces == ["kube-system"] and parsed.timeout_seconds == 30
    agent_socket = cli._parser().parse_args(_agent_args()[1:]).cni_socket
    assert parsed.agent_socket == agent_socket
    assert _host_path_of(init, str(parsed.cni_bin_dir)) == "/opt/cni/bin"
    assert _host_path_of(init, str(parsed.cni_conf_dir)) == "/etc/cni/net.d"
    # The agent container sees the same dirs, for `ambient-cni uninstall` (docs/install.md).
    agent = _container("agent")
    assert _host_path_of(agent, str(parsed.cni_bin_dir)) == "/opt/cni/bin"
    assert _host_path_of(agent, str(parsed.cni_conf_dir)) == "/etc/cni/net.d"
    assert init["image"] == _container("agent")["image"]


# --- the waypoint (manifests/waypoint/) ------------------------------------------------------

# The Gateway API's v1 Gateway, as its CRD's openAPIV3Schema has it (gateway-api
# config/crd/standard/gateway.networking.k8s.io_gateways.yaml, standard channel), for what a
# waypoint's Gateway writes; the rest of spec is only allowed, and, as kubernetes-validate's
# strict mode, a field the CRD does not have fails. The CEL rule on listener names is checked
# by hand below.
_DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
_LISTENER: dict[str, Any] = {
    "type": "object",
    "required": ["name", "port", "protocol"],
    "additionalProperties": False,
    "properties": {
        "allowedRoutes": {"type": "object"},
        "hostname": {
            "type": "string", "minLength": 1, "maxLength": 253,
            "pattern": r"^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$",
        },
        "name": {"type": "string", "minLength": 1, "maxLength": 253, "pattern": _DNS_SUBDOMAIN},
        "port": {"type": "integer", "minimum": 1, "maximum": 65535},
        "protocol": {
            "type": "string", "minLength": 1, "maxLength": 255,
            "pattern": r"^[a-zA-Z0-9]([-a-zA-Z0-9]*[a-zA-Z0-9])?$|[a-z0-9]([-a-z0-9]*[a-z0-9])?"
            r"(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*\/[A-Za-z0-9]+$",
        },
        "tls": {"type": "object"},
    },
}  # fmt: skip
GATEWAY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "gateway.networking.k8s.io/v1"},
        "kind": {"const": "Gateway"},
        "metadata": {"type": "object"},
        "spec": {
            "type": "object",
            "required": ["gatewayClassName", "listeners"],
            "additionalProperties": False,
            "properties": {
                "addresses": {"type": "array", "maxItems": 16},
                "allowedListeners": {"type": "object"},
                "gatewayClassName": {"type": "string", "minLength": 1, "maxLength": 253},
                "infrastructure": {"type": "object"},
                "listeners": {"type": "array", "minItems": 1, "maxItems": 64, "items": _LISTENER},
                "tls": {"type": "object"},
            },
        },
        "status": {"type": "object"},
    },
}
GENERATED_FROM = ["--namespace", "default"]  # what manifests/waypoint/ is generated with


def _waypoint_files() -> list[str]:
    kustomization = yaml.safe_load((WAYPOINT / "kustomization.yaml").read_text())
    resources: list[str] = kustomization["resources"]
    return resources


def _waypoint_documents() -> list[Manifest]:
    return [
        document
        for name in _waypoint_files()
        for document in yaml.safe_load_all((WAYPOINT / name).read_text())
        if document is not None
    ]


def _validate_gateway(gateway: Manifest) -> None:
    jsonschema.validate(gateway, GATEWAY_SCHEMA)
    names = [listener["name"] for listener in gateway["spec"]["listeners"]]
    assert len(names) == len(set(names)), "Listener name must be unique within the Gateway"
    # ObjectMeta as any object's: through kubernetes-validate, strict, on a ConfigMap.
    carrier = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": gateway["metadata"]}
    kubernetes_validate.validate(carrier, KUBERNETES_VERSION, strict=True)


def test_waypoint_kustomization_lists_every_manifest() -> None:
    resources = _waypoint_files()
    assert len(resources) == len(set(resources))
    on_disk = {path.name for path in WAYPOINT.glob("*.y*ml")} - {"kustomization.yaml"}
    assert set(resources) == on_disk
    # Not part of the node agents' install: a waypoint is per namespace.
    assert "waypoint" not in " ".join(_kustomization()["resources"])


def test_waypoint_manifests_are_what_the_generator_makes() -> None:
    """Everything below the leading comments is `ambientctl waypoint generate --namespace
    default`, byte for byte: regenerate rather than edit."""
    (name,) = _waypoint_files()
    lines = (WAYPOINT / name).read_text().splitlines(keepends=True)
    header = 0
    while lines[header].startswith("#"):
        header += 1
    assert header > 0, "the file says where it comes from"
    assert " ".join(GENERATED_FROM) in "".join(lines[:header])
    objects = waypoint_manifests.waypoint_objects("default")
    assert "".join(lines[header:]) == waypoint_manifests.to_yaml(objects)
    assert _waypoint_documents() == objects


def test_waypoint_manifests_are_the_expected_objects() -> None:
    assert [(doc["kind"], doc["metadata"]["name"]) for doc in _waypoint_documents()] == [
        ("ServiceAccount", "waypoint"),
        ("ClusterRole", "ambient-waypoint:default:waypoint"),
        ("ClusterRoleBinding", "ambient-waypoint:default:waypoint"),
        ("Deployment", "waypoint"),
        ("Service", "waypoint"),
        ("Gateway", "waypoint"),
    ]


@pytest.mark.parametrize(
    "document",
    [doc for doc in _waypoint_documents() if doc["kind"] != "Gateway"],
    ids=lambda doc: str(doc["kind"]),
)
def test_waypoint_manifest_is_valid_kubernetes_strict(document: Manifest) -> None:
    assert kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True) == (
        KUBERNETES_VERSION
    )


def test_waypoint_gateway_is_valid_against_the_gateway_api_schema() -> None:
    (gateway,) = [doc for doc in _waypoint_documents() if doc["kind"] == "Gateway"]
    _validate_gateway(gateway)
    # The options too (allow-only-waypoint's annotation, other values of waypoint-for).
    for objects in (
        waypoint_manifests.waypoint_objects("shop", "wp", "all", allow_only_waypoint=True),
        waypoint_manifests.waypoint_objects("shop", "wp", "none"),
    ):
        _validate_gateway(objects[-1])


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda gw: gw["spec"].update(listner=[]), "listner"),
        (lambda gw: gw["spec"]["listeners"][0].update(portt=1), "portt"),
        (lambda gw: gw["spec"]["listeners"][0].update(protocol="HBONE!"), "HBONE!"),
        (lambda gw: gw["spec"]["listeners"][0].update(port=0), "0"),
        (lambda gw: gw["spec"].pop("gatewayClassName"), "gatewayClassName"),
    ],
)
def test_gateway_schema_refuses_what_the_crd_refuses(change: Any, field: str) -> None:
    (gateway,) = [doc for doc in _waypoint_documents() if doc["kind"] == "Gateway"]
    gateway = copy.deepcopy(gateway)
    change(gateway)
    with pytest.raises(jsonschema.ValidationError, match=re.escape(field)):
        _validate_gateway(gateway)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kubectl_kustomize_builds_the_waypoint() -> None:
    built = subprocess.run(
        ["kubectl", "kustomize", str(WAYPOINT)],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    objects = [doc for doc in yaml.safe_load_all(built) if doc is not None]
    assert sorted(objects, key=repr) == sorted(_waypoint_documents(), key=repr)


def test_waypoint_is_trusted_by_the_node_agents() -> None:
    """The node agents' image, CA directory and trust domain: a waypoint's certificate is
    issued by the CA they load (the Secret of docs/install.md, the same files) for the trust
    domain they check."""
    (deployment,) = [doc for doc in _waypoint_documents() if doc["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == _container("agent")["image"]
    waypoint = cli._parser().parse_args(container["args"])
    agent = cli._parser().parse_args(_agent_args()[1:])
    assert waypoint.ca_dir == agent.ca_dir
    assert waypoint.trust_domain == agent.trust_domain
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == str(waypoint.ca_dir)]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["secret"]["secretName"] == "ambient-agent-ca"  # as docs/install.md names it
    assert mount["readOnly"] is True


def test_waypoint_arguments_match_waypoint_help() -> None:
    help_text = subprocess.run(
        [sys.executable, "-m", "agent", "waypoint", "--help"],
        capture_output=True, text=True, check=True, cwd=ROOT, timeout=60,
    ).stdout  # fmt: skip
    accepted = set(re.findall(r"--[a-z][a-z-]*", help_text))
    (deployment,) = [doc for doc in _waypoint_documents() if doc["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["ambient-agent"]
    used = {arg for arg in container["args"] if arg.startswith("--")}
    assert used <= accepted


# --- the image ------------------------------------------------------------------------------


def _instructions() -> list[tuple[str, str]]:
    """The Containerfile's instructions (continuations joined, comments dropped)."""
    lines = [line for line in CONTAINERFILE.read_text().splitlines() if not line.startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    result = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            result.append((keyword.upper(), rest.strip()))
    return result


def _shipped_packages() -> set[str]:
    """The top-level packages pyproject.toml's package discovery includes."""
    with (ROOT / "pyproject.toml").open("rb") as pyproject:
        setuptools = tomllib.load(pyproject)["tool"]["setuptools"]
    include = setuptools["packages"]["find"]["include"]
    return {pattern.rstrip("*").split(".")[0] for pattern in include}


def test_containerfile_recipe() -> None:
    instructions = _instructions()
    assert instructions[0] == ("FROM", "debian:bookworm-slim")
    runs = [rest for keyword, rest in instructions if keyword == "RUN"]
    (apt,) = [run for run in runs if "apt-get install" in run]
    for package in ("python3", "python3-venv", "python3-bpfcc", "bpftool", "iproute2",
                    "linux-headers-amd64"):  # fmt: skip
        assert re.search(rf"(?<![\w-]){re.escape(package)}(?![\w-])", apt), package
    assert any("-m venv --system-site-packages" in run for run in runs)
    # The project is installed as a wheel built from /src: every package pyproject.toml ships
    # is copied there, bpf/ included, whose C sources travel in the wheel as package data.
    assert any(re.search(r"pip install .*/src(\s|$)", run) for run in runs)
    copies = [rest.split() for keyword, rest in instructions if keyword == "COPY"]
    assert ["pyproject.toml", "README.md", "/src/"] in copies
    for package in _shipped_packages():
        assert [package, f"/src/{package}"] in copies, package
    assert "bpf" in _shipped_packages()
    # ... so nothing copies the C sources anywhere else, and no variable says where they are.
    assert [copy for copy in copies if copy[0] == "bpf"] == [["bpf", "/src/bpf"]]
    assert not any("AMBIENT_BPF_DIR" in rest for _, rest in instructions)
    # The DaemonSet runs the agent through the image's entrypoint (kernel headers).
    entrypoint = _container("agent")["command"]
    assert ("ENTRYPOINT", f'["{entrypoint[0]}"]') in instructions
    assert ("COPY", f"manifests/image/{ENTRYPOINT.name} {entrypoint[0]}") in instructions


# --- the entrypoint's kernel headers ---------------------------------------------------------

RELEASE = os.uname().release


@pytest.fixture
def roots(tmp_path: Path) -> Iterator[dict[str, Path]]:
    paths = {name: tmp_path / name for name in ("host", "modules", "headers")}
    for path in paths.values():
        path.mkdir()
    yield paths


def _entrypoint(roots: dict[str, Path]) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "AMBIENT_HOST_ROOT": str(roots["host"]),
        "AMBIENT_MODULES_DIR": str(roots["modules"]),
        "AMBIENT_HEADERS_DIR": str(roots["headers"]),
    }
    return subprocess.run(
        ["sh", str(ENTRYPOINT), "sh", "-c", "echo ran"],
        capture_output=True, text=True, env=env, timeout=30,
    )  # fmt: skip


def _headers(directory: Path) -> Path:
    directory.mkdir(parents=True)
    (directory / "Makefile").write_text("")
    return directory


def test_entrypoint_prefers_the_nodes_headers(roots: dict[str, Path]) -> None:
    host = roots["host"]
    # As on a Debian or Ubuntu node: absolute links to /usr/src, which are host paths.
    build = _headers(host / "usr/src" / f"linux-headers-{RELEASE}")
    source = _headers(host / "usr/src" / "linux-headers-common")
    host_kdir = host / "lib/modules" / RELEASE
    host_kdir.mkdir(parents=True)
    (host_kdir / "build").symlink_to(f"/usr/src/linux-headers-{RELEASE}")
    (host_kdir / "source").symlink_to("/usr/src/linux-headers-common")
    _headers(roots["headers"] / "linux-headers-6.1.0-99-amd64")  # the fallback, unused
    _headers(roots["headers"] / "linux-headers-6.1.0-99-common")

    done = _entrypoint(roots)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "ran"
    kdir = roots["modules"] / RELEASE
    assert (kdir / "build").resolve() == build.resolve()
    assert (kdir / "source").resolve() == source.resolve()


def test_entrypoint_follows_a_relative_node_link(roots: dict[str, Path]) -> None:
    build = _headers(roots["host"] / "usr/src/kernels" / RELEASE)
    host_kdir = roots["host"] / "lib/modules" / RELEASE
    host_kdir.mkdir(parents=True)
    (host_kdir / "build").symlink_to(f"../../../usr/src/kernels/{RELEASE}")

    done = _entrypoint(roots)
    assert done.returncode == 0, done.stderr
    kdir = roots["modules"] / RELEASE
    assert (kdir / "build").resolve() == build.resolve()
    assert (kdir / "source").resolve() == build.resolve()  # no source link: build


def test_entrypoint_falls_back_to_debian_headers(roots: dict[str, Path]) -> None:
    # The node's link dangles (its headers package was removed): not usable.
    host_kdir = roots["host"] / "lib/modules" / RELEASE
    host_kdir.mkdir(parents=True)
    (host_kdir / "build").symlink_to(f"/usr/src/linux-headers-{RELEASE}")
    for version in ("6.1.0-9", "6.1.0-10"):
        _headers(roots["headers"] / f"linux-headers-{version}-amd64")
        _headers(roots["headers"] / f"linux-headers-{version}-common")

    done = _entrypoint(roots)
    assert done.returncode == 0, done.stderr
    assert "has no headers" in done.stdout
    kdir = roots["modules"] / RELEASE
    # The newest, in version order (6.1.0-10 after 6.1.0-9).
    assert os.readlink(kdir / "build") == str(roots["headers"] / "linux-headers-6.1.0-10-amd64")
    assert os.readlink(kdir / "source") == str(roots["headers"] / "linux-headers-6.1.0-10-common")


def test_entrypoint_refuses_without_any_headers(roots: dict[str, Path]) -> None:
    done = _entrypoint(roots)
    assert done.returncode == 1
    assert "no kernel headers" in done.stderr
    assert "ran" not in done.stdout
