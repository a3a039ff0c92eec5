from __future__ import annotations

import re
from pathlib import Path

import pytest

from agent.sources.authorization_policy import parse_policy
from agent.sources.local_config import ConfigError, load_local_config, parse_local_config
from agent.state.service import Service
from agent.state.waypoint import Waypoint
from agent.state.workload import Protocol

VALID = """\
workloads:
  - uid: c1//Pod/default/client
    name: client
    namespace: default
    serviceAccount: sleep
    workloadIps: [10.0.0.2]
    protocol: HBONE
    node: node-1
    netns: /run/netns/client
  - name: legacy
    namespace: other
    workloadIps: [10.0.0.9]
    node: node-2
services: []
policies: []
"""


def test_valid_config_gives_workloads_with_defaults() -> None:
    config = parse_local_config(VALID, "mesh.yaml")
    client, legacy = config.workloads
    assert client.uid == "c1//Pod/default/client"
    assert client.captured and client.netns == "/run/netns/client"
    assert client.service_account == "sleep" and client.interface == "eth0"
    assert legacy.protocol is Protocol.TCP and not legacy.captured
    assert legacy.uid == "local//Pod/other/legacy"
    assert legacy.service_account == "default"


@pytest.mark.parametrize("text", ["", "\n", "# nothing yet\n", "{}\n"])
def test_an_empty_file_is_refused_and_an_explicit_empty_mesh_is_not(text: str) -> None:
    # An editor's or a cut-short copy's empty file must not unenroll every pod.
    with pytest.raises(ConfigError, match=r"empty|names no section"):
        parse_local_config(text, "x")
    assert parse_local_config("workloads: []\n", "x").workloads == ()


WORKLOAD = "workloads:\n  - name: a\n    namespace: b\n    node: n\n    workloadIps: [10.0.0.1]\n"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("    serviceAccount: bad sa\n", "serviceAccount 'bad sa' must be lower-case"),
        ("    serviceAccount: {a: 1}\n", "serviceAccount must be a non-empty string"),
        ("    uid: [x]\n", "uid must be a non-empty string, not ['x']"),
        ("    netns: 12\n", "netns must be a non-empty string, not 12"),
        ("    netns: run/netns/a\n", "netns 'run/netns/a' must be an absolute path"),
        ("    interface: eth0/1\n", "interface 'eth0/1' may not be"),
        ("    interface: a-very-long-ifname\n", "interface 'a-very-long-ifname' is longer"),
        ("    trustDomain: Cluster.Local\n", "no valid identity: trust domain"),
    ],
)
def test_workload_values_are_typed_and_validated_never_coerced(extra: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_local_config(WORKLOAD + extra, "x")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("name", "[x]", "name must be a non-empty string, not ['x']"),
        ("name", "Web_1", "name 'Web_1' must be lower-case"),
        ("namespace", "a.b", "namespace 'a.b' must be lower-case letters, digits and '-'"),
        ("node", "2", "node must be a non-empty string, not 2"),
    ],
)
def test_required_workload_names_follow_kubernetes_rules(
    field: str, value: str, message: str
) -> None:
    text = WORKLOAD.replace(f"{field}: {dict(name='a', namespace='b', node='n')[field]}\n",
                            f"{field}: {value}\n")  # fmt: skip
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_local_config(text, "x")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("workloads: [\n", "mesh.yaml:2: invalid YAML"),
        ("- a\n", "mesh.yaml:1: top level must be a mapping"),
        ("workload: []\n", "mesh.yaml:1: unknown key 'workload'"),
        ("workloads: {}\n", "mesh.yaml:1: workloads must be a list"),
        ("workloads:\n  - 3\n", "mesh.yaml:2: a workload must be a mapping"),
        (
            "workloads:\n  - name: a\n    namespace: b\n    node: n\n",
            "mesh.yaml:2: workload is missing 'workloadIps'",
        ),
        (
            "workloads:\n\n  - name: a\n    namespace: b\n    node: n\n    workloadIps: [x]\n",
            "mesh.yaml:3: 'x' in workloadIps is not an IP address",
        ),
        (
            "workloads:\n  - {name: a, namespace: b, node: n, workloadIps: [1.2.3.4], "
            "protocol: UDP}\n",
            "mesh.yaml:2: protocol 'UDP' must be HBONE or TCP",
        ),
        (
            "workloads:\n  - {name: a, namespace: b, node: n, workloadIps: [1.2.3.4], ip: 1}\n",
            "mesh.yaml:2: workload has unknown keys ['ip']",
        ),
        (
            "workloads:\n  - {uid: u, name: a, namespace: b, node: n, workloadIps: [1.2.3.4]}\n"
            "  - {uid: u, name: c, namespace: b, node: n, workloadIps: [1.2.3.5]}\n",
            "mesh.yaml:3: duplicate workload uid 'u' (first at line 2)",
        ),
    ],
)
def test_invalid_config_names_file_line_and_reason(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_local_config(text, "mesh.yaml")
    assert str(caught.value).startswith(message)


def test_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_local_config(tmp_path / "missing.yaml")


MESH = """\
workloads:
  - name: server
    namespace: default
    workloadIps: [10.0.0.3]
    protocol: HBONE
    node: node-1
    trustDomain: example.org
    services:
      default/echo.example.com: {80: 8080}
    waypoint: {destination: "/10.0.0.50", hboneMtlsPort: 15008}
services:
  - name: echo
    namespace: default
    hostname: echo.example.com
    vips: ["/10.96.0.10", "net1/10.96.0.11"]
    ports:
      80: 8080
      443: 8443
  - name: plain
    namespace: other
policies:
  - {name: allow-sleep, namespace: default, scope: Namespace, action: Allow, rules: []}
"""


def test_services_are_parsed_with_vips_reduced_to_the_ip() -> None:
    echo, plain = parse_local_config(MESH, "mesh.yaml").services
    assert echo == Service(
        name="echo",
        namespace="default",
        hostname="echo.example.com",
        vips=("10.96.0.10", "10.96.0.11"),
        ports={80: 8080, 443: 8443},
    )
    assert echo.key == "default/echo.example.com"
    assert echo.target_port(443) == 8443 and echo.target_port(8080) is None
    assert plain.hostname == "plain.other.svc.cluster.local"
    assert plain.vips == () and dict(plain.ports) == {}


def test_workload_keeps_trust_domain_services_and_waypoint() -> None:
    (server,) = parse_local_config(MESH, "mesh.yaml").workloads
    assert server.trust_domain == "example.org"
    assert dict(server.services) == {"default/echo.example.com": {80: 8080}}
    assert server.waypoint == Waypoint("10.0.0.50", 15008)


def test_workload_defaults_for_new_fields() -> None:
    _, legacy = parse_local_config(VALID, "mesh.yaml").workloads
    assert legacy.trust_domain == "cluster.local"
    assert dict(legacy.services) == {} and legacy.waypoint is None


def test_policies_are_parsed_once_by_the_source() -> None:
    (policy,) = parse_local_config(MESH, "mesh.yaml").policies
    assert policy == parse_policy({
        "name": "allow-sleep", "namespace": "default", "scope": "Namespace", "action": "Allow",
        "rules": [],
    })  # fmt: skip


def test_service_ports_are_read_only() -> None:
    ports = {80: 8080}
    service = Service("a", "b", "a.b", ("10.0.0.1",), ports)
    ports[81] = 1  # the caller's dict is copied, so this does not reach the service
    assert dict(service.ports) == {80: 8080}
    with pytest.raises(TypeError):
        service.ports[81] = 1  # type: ignore[index]


SERVICE = "services:\n  - name: s\n    namespace: n\n"
WORKLOAD = "workloads:\n  - name: a\n    namespace: b\n    node: n\n    workloadIps: [1.2.3.4]\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("services:\n  - 3\n", "mesh.yaml:2: a service must be a mapping"),
        ("services:\n  - {name: s}\n", "mesh.yaml:2: service is missing 'namespace'"),
        (
            "services:\n  - {name: s, namespace: n, vip: []}\n",
            "mesh.yaml:2: service has unknown keys ['vip']",
        ),
        (SERVICE + "    hostname: 7\n", "mesh.yaml:4: service hostname must be a non-empty string"),
        (
            "services:\n  - {name: '', namespace: n}\n",
            "mesh.yaml:2: service name must be a non-empty string",
        ),
        (SERVICE + "    vips: 10.0.0.1\n", "mesh.yaml:4: vips must be a list"),
        (
            SERVICE + "    vips:\n      - /10.0.0.1\n      - net/10.0.0.x\n",
            "mesh.yaml:6: 'net/10.0.0.x' in vips is not an IP address",
        ),
        (SERVICE + "    ports: [80]\n", "mesh.yaml:4: ports must be a mapping"),
        (
            SERVICE + "    ports:\n      80: 8080\n      '81': 8081\n",
            "mesh.yaml:6: service port '81' must be an integer 1..65535",
        ),
        (
            SERVICE + "    ports:\n      80: 8080\n      81: 70000\n",
            "mesh.yaml:6: target port 70000 must be an integer 1..65535",
        ),
        (SERVICE + "    ports:\n      80: yes\n", "mesh.yaml:5: target port True must be"),
        (
            SERVICE + "    ports:\n      80: 1\n      80: 2\n",
            "mesh.yaml:6: duplicate service port 80",
        ),
        (
            "services:\n  - {name: s, namespace: n}\n  - {name: s, namespace: n}\n",
            "mesh.yaml:3: duplicate service 'n/s.n.svc.cluster.local' (first at line 2)",
        ),
        (
            "services:\n  - {name: s, namespace: n, vips: [10.0.0.1], ports: {80: 1}}\n"
            "  - {name: t, namespace: n, vips: [/10.0.0.1], ports: {80: 2}}\n",
            "mesh.yaml:3: duplicate service VIP and port '10.0.0.1:80' (first at line 2)",
        ),
        (WORKLOAD + "    services: [a]\n", "mesh.yaml:6: workload services must be a mapping"),
        (
            WORKLOAD + "    services:\n      echo: {80: 8080}\n",
            "mesh.yaml:7: workload service 'echo' must be written namespace/hostname",
        ),
        (WORKLOAD + "    waypoint: [x]\n", "mesh.yaml:6: waypoint must be a mapping"),
        (WORKLOAD + "    trustDomain: {}\n", "mesh.yaml:6: trustDomain must be a non-empty string"),
        (
            WORKLOAD + "  - {name: c, namespace: b, node: n, workloadIps: [1.2.3.4]}\n",
            "mesh.yaml:6: duplicate workload IP '1.2.3.4' (first at line 2)",
        ),
        ("policies:\n  - []\n", "mesh.yaml:2: a policy must be a mapping"),
        ("policies:\n  - {name: p}\n", "mesh.yaml:2: policy ?/p: namespace: is required"),
        (
            "policies:\n  - {name: p, namespace: n, scope: Namespace, action: Deny,\n"
            "     rules: [{clauses: [{matches: [{destinationPorts: [70000]}]}]}]}\n",
            "mesh.yaml:2: policy n/p: rules[0].clauses[0].matches[0].destinationPorts[0]",
        ),
        (
            "policies:\n  - {name: p, namespace: n, scope: Namespace, action: Allow, rules: []}\n"
            "  - {name: p, namespace: n, scope: Namespace, action: Deny, rules: []}\n",
            "mesh.yaml:3: duplicate policy 'n/p' (first at line 2)",
        ),
        # Well-formed YAML whose values cannot be built is still a line-numbered error (for a
        # bad date, the line of the entry holding it).
        ("workloads:\n  - !pod {name: a}\n", "mesh.yaml:2: could not determine a constructor"),
        (
            "policies:\n  - {name: p, namespace: n,\n     since: 2024-02-30}\n",
            "mesh.yaml:2: day is out of range",
        ),
    ],
)
def test_invalid_services_workload_fields_and_policies(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_local_config(text, "mesh.yaml")
    assert str(caught.value).startswith(message)
    assert caught.value.source == "mesh.yaml" and caught.value.line is not None


def test_null_optional_fields_mean_absent() -> None:
    config = parse_local_config(
        WORKLOAD + "    services:\n    waypoint: null\n" + SERVICE + "    vips:\n    ports:\n",
        "mesh.yaml",
    )
    assert config.workloads[0].waypoint is None and dict(config.workloads[0].services) == {}
    assert config.services[0].vips == () and dict(config.services[0].ports) == {}


def test_config_error_carries_file_line_and_reason() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_local_config("services:\n  - {name: s}\n", "mesh.yaml")
    error = caught.value
    assert (error.source, error.line, error.reason) == (
        "mesh.yaml",
        2,
        "service is missing 'namespace'",
    )


def test_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_bytes(b"workloads: [\xff]\n")
    with pytest.raises(ConfigError, match="not UTF-8") as caught:
        load_local_config(path)
    assert caught.value.line is None
