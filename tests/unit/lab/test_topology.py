"""Lab topology: the default cluster, address allocation, services and every validation
error."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest
import yaml

from lab.topology import (
    NodeSpec,
    PodSpec,
    ServicePortSpec,
    ServiceSpec,
    Topology,
    TopologyError,
    WaypointSpec,
    default_topology,
    load_topology,
    parse_topology,
)

# Line numbers matter: the error cases below assert the line each problem is reported on.
BASE = """\
nodeNetwork: 10.239.0.0/24
nodes:
  - name: node-1
    podCidr: 10.240.1.0/24
  - name: node-2
    podCidr: 10.240.2.0/24
pods:
  - name: client-a
    namespace: default
    node: node-1
"""


def edited(old: str, new: str) -> str:
    assert old in BASE, old
    return BASE.replace(old, new, 1)


def test_default_topology_shape() -> None:
    topology = default_topology()
    assert topology.name == "default"
    assert topology.node_network == IPv4Network("10.239.0.0/24")
    assert [(n.name, str(n.pod_cidr)) for n in topology.nodes] == [
        ("node-1", "10.240.1.0/24"),
        ("node-2", "10.240.2.0/24"),
    ]
    assert [(p.node, p.name, p.ambient) for p in topology.pods] == [
        ("node-1", "client-a", True),
        ("node-1", "server-a", True),
        ("node-2", "server-b", True),
        ("node-2", "client-b", True),
        ("node-2", "outsider", False),
        ("node-1", "waypoint", False),
    ]
    assert {p.namespace for p in topology.pods} == {"default"}
    assert [w.key for w in topology.waypoints] == ["default/waypoint"]


def test_default_topology_addresses() -> None:
    topology = default_topology()
    assert topology.node_ip("node-1") == IPv4Address("10.239.0.10")
    assert topology.node_ip("node-2") == IPv4Address("10.239.0.11")
    assert topology.gateway("node-1") == IPv4Address("10.240.1.1")
    assert topology.gateway("node-2") == IPv4Address("10.240.2.1")
    ips = {p.name: str(topology.pod_ip(p.namespace, p.name)) for p in topology.pods}
    assert ips == {
        "client-a": "10.240.1.2",
        "server-a": "10.240.1.3",
        "server-b": "10.240.2.2",
        "client-b": "10.240.2.3",
        "outsider": "10.240.2.4",
        "waypoint": "10.240.1.4",
    }
    assert str(topology.waypoint_vip("default", "waypoint")) == "10.96.0.24"


def test_defaults_for_optional_pod_keys() -> None:
    pod = parse_topology(BASE).pods[0]
    assert pod == PodSpec("client-a", "default", "node-1", "client-a", ambient=True, labels=())
    minimal = parse_topology(edited("    namespace: default\n", ""))
    assert minimal.pods[0].namespace == "default"


def test_optional_keys_are_read() -> None:
    text = BASE + "    serviceAccount: sa.one\n    ambient: false\n    labels: {b: '2', a: x}\n"
    pod = parse_topology(text).pods[0]
    assert pod.service_account == "sa.one"
    assert pod.ambient is False
    assert pod.labels == (("a", "x"), ("b", "2"))
    assert pod.label_map == {"a": "x", "b": "2"}
    assert hash(pod) == hash(PodSpec("client-a", "default", "node-1", "sa.one", False, pod.labels))


def test_pods_may_be_absent() -> None:
    assert parse_topology(BASE.split("pods:")[0]).pods == ()


def test_yaml_round_trip_keeps_everything() -> None:
    topology = default_topology()
    assert parse_topology(topology.to_yaml()) == topology


def test_load_topology_names_it_after_the_file(tmp_path: Path) -> None:
    path = tmp_path / "small.yaml"
    path.write_text(BASE)
    assert load_topology(path).name == "small"
    odd = tmp_path / "Odd_Name.yaml"
    odd.write_text(BASE)
    assert load_topology(odd).name == "topology"
    named = tmp_path / "x.yaml"
    named.write_text("name: mine\n" + BASE)
    assert load_topology(named).name == "mine"


def test_load_topology_missing_file(tmp_path: Path) -> None:
    with pytest.raises(TopologyError, match=r"nope\.yaml: cannot read the topology"):
        load_topology(tmp_path / "nope.yaml")


def test_pod_addresses_follow_file_order_per_node() -> None:
    text = BASE + "  - name: b\n    node: node-2\n  - name: c\n    node: node-1\n"
    topology = parse_topology(text)
    assert str(topology.pod_ip("default", "client-a")) == "10.240.1.2"
    assert str(topology.pod_ip("default", "b")) == "10.240.2.2"
    assert str(topology.pod_ip("default", "c")) == "10.240.1.3"
    assert [p.name for p in topology.pods_on("node-1")] == ["client-a", "c"]


def test_lookups_of_unknown_names_raise_key_error() -> None:
    topology = parse_topology(BASE)
    with pytest.raises(KeyError, match="node-9"):
        topology.node_ip("node-9")
    with pytest.raises(KeyError, match="default/nope"):
        topology.pod_ip("default", "nope")


def test_a_full_pod_cidr_is_accepted() -> None:
    topology = parse_topology(edited("10.240.1.0/24", "10.240.1.0/30"))
    assert str(topology.pod_ip("default", "client-a")) == "10.240.1.2"


def test_constructing_a_topology_directly_is_validated() -> None:
    nodes = (NodeSpec("node-1", IPv4Network("10.240.1.0/24")),)
    pod = PodSpec("p", "default", "node-9", "p")
    with pytest.raises(TopologyError, match=r"pods\[0\] \(default/p\): unknown node 'node-9'"):
        Topology("t", IPv4Network("10.239.0.0/24"), nodes, (pod,))


def test_error_names_the_source_and_line() -> None:
    with pytest.raises(TopologyError) as caught:
        parse_topology(edited("node: node-1", "node: node-9"), "lab/mine.yaml")
    assert caught.value.source == "lab/mine.yaml"
    assert caught.value.line == 10
    assert str(caught.value).startswith("lab/mine.yaml:10: pods[0] (default/client-a): unknown")


# ---- services -------------------------------------------------------------------------------

SERVICES = (
    BASE
    + """\
services:
  - name: echo
    ports:
      - port: 80
        targetPort: 8080
    selector: {app: echo}
"""
)
"""BASE with one service: `services:` is line 11, its `- port: 80` line 14."""


def with_service(old: str, new: str) -> str:
    assert old in SERVICES, old
    return SERVICES.replace(old, new, 1)


def test_default_topology_service() -> None:
    topology = default_topology()
    echo, web, web_v1, web_v2 = topology.services
    assert (web.name, web_v1.name, web_v2.name) == ("web", "web-v1", "web-v2")
    assert web.label_map == {"istio.io/use-waypoint": "waypoint"}
    assert echo == ServiceSpec(
        "echo", "default", (ServicePortSpec(80, 8080),), (("service", "echo"),)
    )
    assert echo.hostname == "echo.default.svc.cluster.local"
    assert topology.service_network == IPv4Network("10.96.0.0/16")
    assert topology.dns_ip == IPv4Address("10.96.0.10")
    assert topology.service_vip("default", "echo") == IPv4Address("10.96.0.20")
    assert [p.name for p in topology.pods if echo.selects(p)] == ["server-a", "server-b"]


def test_defaults_for_optional_service_keys() -> None:
    text = with_service("        targetPort: 8080\n", "")
    topology = parse_topology(text + "  - name: other\n    ports: [{port: 9}]\n    selector: {}\n")
    echo, other = topology.services
    assert echo == ServiceSpec("echo", "default", (ServicePortSpec(80, 80),), (("app", "echo"),))
    assert echo.vip is None
    assert topology.service_network == IPv4Network("10.96.0.0/16")
    assert topology.service_vips() == {
        "default/echo": IPv4Address("10.96.0.20"),
        "default/other": IPv4Address("10.96.0.21"),
    }
    assert other.selector == ()
    assert not any(other.selects(pod) for pod in topology.pods)  # no selector: no endpoints


def test_a_selector_matches_every_pair_in_the_same_namespace() -> None:
    spec = ServiceSpec("s", "default", (ServicePortSpec(80, 80),), (("b", "2"), ("a", "1")))
    assert spec.selector == (("a", "1"), ("b", "2"))
    assert spec.key == "default/s"
    assert spec.selects(
        PodSpec("p", "default", "n", "p", labels=(("a", "1"), ("b", "2"), ("c", "3")))
    )
    assert not spec.selects(PodSpec("p", "default", "n", "p", labels=(("a", "1"),)))
    assert not spec.selects(PodSpec("p", "other", "n", "p", labels=(("a", "1"), ("b", "2"))))


def test_allocated_vips_follow_file_order_and_skip_written_ones() -> None:
    text = SERVICES + "".join(
        f"  - name: s{i}\n    ports: [{{port: 80}}]\n    selector: {{app: s{i}}}\n{vip}"
        for i, vip in enumerate(["", "    vip: 10.96.0.20\n", "", "    vip: 10.96.0.5\n"])
    )
    assert {key: str(vip) for key, vip in parse_topology(text).service_vips().items()} == {
        "default/echo": "10.96.0.21",  # .20 is written below
        "default/s0": "10.96.0.22",
        "default/s1": "10.96.0.20",
        "default/s2": "10.96.0.23",
        "default/s3": "10.96.0.5",
    }


def test_service_network_sets_the_dns_address_and_the_vips() -> None:
    topology = parse_topology(SERVICES + "serviceNetwork: 10.100.8.0/27\n")
    assert topology.dns_ip == IPv4Address("10.100.8.10")
    assert topology.service_vip("default", "echo") == IPv4Address("10.100.8.20")
    with pytest.raises(KeyError, match="default/nope"):
        topology.service_vip("default", "nope")


def test_the_smallest_service_network_holds_one_vip_per_service() -> None:
    # A /27 has hosts .20 to .30 for VIPs: 11 services fit, a 12th does not.
    services = "".join(
        f"  - name: s{i}\n    ports: [{{port: 80}}]\n    selector: {{app: s{i}}}\n"
        for i in range(12)
    )
    text = BASE + "serviceNetwork: 10.100.8.0/27\nservices:\n" + services
    with pytest.raises(TopologyError, match=r"10\.100\.8\.0/27 is too small for 12 service"):
        parse_topology(text)
    eleven = parse_topology(text.rsplit("  - name: s11", 1)[0])
    assert str(max(eleven.service_vips().values())) == "10.100.8.30"


def test_yaml_round_trip_keeps_services() -> None:
    text = (
        SERVICES.replace("      - port: 80\n", "      - port: 53\n      - port: 80\n", 1)
        + "  - name: db\n    namespace: data\n    vip: 10.100.0.99\n"
        + "    ports: [{port: 5432}]\n    selector: {app: db, tier: store}\n"
        + "serviceNetwork: 10.100.0.0/24\n"
    )
    topology = parse_topology(text)
    assert len(topology.services) == 2
    again = parse_topology(topology.to_yaml())
    assert again == topology
    assert again.service_vips() == topology.service_vips()
    assert again.services[0].ports == (ServicePortSpec(53, 53), ServicePortSpec(80, 8080))


def test_constructing_a_topology_with_a_bad_service_is_validated() -> None:
    nodes = (NodeSpec("node-1", IPv4Network("10.240.1.0/24")),)
    service = ServiceSpec("s", "default", (), (("app", "s"),))
    with pytest.raises(TopologyError, match=r"services\[0\] \(default/s\): a service needs a port"):
        Topology("t", IPv4Network("10.239.0.0/24"), nodes, (), (service,))


def test_a_vip_may_be_any_other_host_of_the_service_network() -> None:
    topology = parse_topology(SERVICES + "    vip: 10.96.0.11\n")
    assert topology.service_vip("default", "echo") == IPv4Address("10.96.0.11")


def test_the_service_networks_broadcast_address_is_no_vip() -> None:
    with pytest.raises(TopologyError, match="must be a host of serviceNetwork"):
        parse_topology(SERVICES + "    vip: 10.96.255.255\n")


@pytest.mark.parametrize("written", ["0x50", "0b1010000", "1:20"])
def test_a_non_decimal_port_is_a_topology_error(written: str) -> None:
    with pytest.raises(TopologyError, match=r"services\[0\]\.ports\[0\]\.port"):
        parse_topology(with_service("port: 80", f"port: {written}"))


THREE_PODS_ON_A_30 = edited("10.240.1.0/24", "10.240.1.0/30") + "  - name: two\n    node: node-1\n"
SIX_NODES = "nodeNetwork: 10.239.0.0/28\nnodes:\n" + "".join(
    f"  - name: n{i}\n    podCidr: 10.240.{i}.0/24\n" for i in range(6)
)

ERRORS = {
    "yaml syntax": ("nodeNetwork: [10.239.0.0/24\nnodes: []\n", "invalid YAML", 2),
    "tab indentation": ("nodes:\n\t- name: x\n", "invalid YAML", 2),
    "two documents": (
        BASE + "---\n" + BASE,
        "invalid YAML: expected a single document in the stream, but found another document",
        11,
    ),
    "empty document": ("# nothing\n", "empty document", None),
    "not a mapping": ("- a\n- b\n", "the document must be a mapping, not a list", 1),
    "unknown top key": (BASE + "extra: 1\n", "unknown key 'extra'", 11),
    "unknown node key": (
        edited("podCidr: 10.240.2.0/24", "podCIDR: 10.240.2.0/24"),
        "nodes[1]: unknown key 'podCIDR'; did you mean 'podCidr'?",
        6,
    ),
    "unknown pod key": (BASE + "    color: red\n", "pods[0]: unknown key 'color'", 11),
    "duplicate key": (BASE + "    node: node-2\n", "pods[0]: duplicate key 'node'", 11),
    "missing nodeNetwork": (
        BASE.replace("nodeNetwork: 10.239.0.0/24\n", ""),
        "missing required key 'nodeNetwork'",
        1,
    ),
    "missing nodes": (
        "nodeNetwork: 10.239.0.0/24\n",
        "the document: missing required key 'nodes'",
        1,
    ),
    "missing podCidr": (
        edited("    podCidr: 10.240.1.0/24\n", ""),
        "nodes[0]: missing required key 'podCidr'",
        3,
    ),
    "missing pod node": (edited("    node: node-1\n", ""), "missing required key 'node'", 8),
    "nodes not a list": (
        "nodeNetwork: 10.239.0.0/24\nnodes: {name: n}\n",
        "nodes must be a list, not a mapping",
        2,
    ),
    "empty node list": (
        "nodeNetwork: 10.239.0.0/24\nnodes: []\n",
        "nodes: the topology needs at least one node",
        2,
    ),
    "name not a string": (
        edited("name: node-1", "name: 12"),
        "nodes[0].name must be a string, not int '12' (quote it: '12')",
        3,
    ),
    "ambient not a bool": (
        BASE + "    ambient: maybe\n",
        "pods[0].ambient must be true or false, not str 'maybe'",
        11,
    ),
    "label not a string": (
        BASE + "    labels: {version: 2}\n",
        "pods[0].labels.version must be a string",
        11,
    ),
    "bad label value": (
        BASE + "    labels: {app: -x-}\n",
        "invalid value '-x-' of label 'app'",
        11,
    ),
    "bad label key": (BASE + "    labels: {'a b': x}\n", "invalid label key 'a b'", 11),
    "cidr without prefix": (
        edited("10.240.1.0/24", "10.240.1.0"),
        "nodes[0].podCidr: '10.240.1.0' is not a CIDR",
        4,
    ),
    "cidr bad prefix": (
        edited("10.240.1.0/24", "10.240.1.0/33"),
        "nodes[0].podCidr: '10.240.1.0/33' is not an IPv4 CIDR",
        4,
    ),
    "cidr ipv6": (edited("10.239.0.0/24", "fd00::/64"), "nodeNetwork: 'fd00::/64' is not", 1),
    "cidr garbage": (edited("10.240.2.0/24", "ten/8"), "nodes[1].podCidr: 'ten/8' is not", 6),
    "cidr host bits": (
        edited("10.240.1.0/24", "10.240.1.5/24"),
        "has host bits set; did you mean 10.240.1.0/24?",
        4,
    ),
    "pod cidr too small": (
        edited("10.240.1.0/24", "10.240.1.0/31"),
        "nodes[0] (node-1): podCidr 10.240.1.0/31 is too small",
        4,
    ),
    "overlapping pod cidrs": (
        edited("10.240.2.0/24", "10.240.1.128/25"),
        "nodes[1] (node-2): podCidr 10.240.1.128/25 overlaps podCidr 10.240.1.0/24 of "
        "nodes[0] (node-1)",
        6,
    ),
    "pod cidr overlaps node network": (
        edited("10.240.2.0/24", "10.239.0.0/16"),
        "nodes[1] (node-2): podCidr 10.239.0.0/16 overlaps nodeNetwork 10.239.0.0/24",
        6,
    ),
    "duplicate node name": (
        edited("name: node-2", "name: node-1"),
        "nodes[1] (node-1): duplicate node name (also nodes[0])",
        5,
    ),
    "node name not a label": (
        edited("name: node-1", "name: Node_1"),
        "nodes[0] (Node_1): node name 'Node_1' is not a DNS-1123 label",
        3,
    ),
    "node name too long": (
        edited("name: node-2", f"name: {'n' * 64}"),
        "is not a DNS-1123 label",
        5,
    ),
    "pod name not a label": (
        edited("name: client-a", "name: client.a"),
        "pod name 'client.a' is not a DNS-1123 label",
        8,
    ),
    "namespace not a label": (
        edited("namespace: default", "namespace: -x"),
        "namespace '-x' is not a DNS-1123 label",
        9,
    ),
    "topology name not a label": ("name: My Lab\n" + BASE, "name 'My Lab' is not a DNS", 1),
    "service account invalid": (
        BASE + "    serviceAccount: Bad_SA\n",
        "serviceAccount 'Bad_SA' is not a DNS-1123 subdomain",
        11,
    ),
    "duplicate pod": (
        BASE + "  - name: client-a\n    node: node-2\n",
        "pods[1] (default/client-a): duplicate pod (also pods[0])",
        11,
    ),
    "unknown node": (
        edited("node: node-1", "node: node-9"),
        "unknown node 'node-9'; nodes are: node-1, node-2",
        10,
    ),
    "too many pods on a node": (
        THREE_PODS_ON_A_30,
        "pods[1] (default/two): node node-1 is full: its podCidr 10.240.1.0/30 holds 1 pod(s)",
        12,
    ),
    "too many nodes": (
        SIX_NODES,
        "nodes[4] (n4): nodeNetwork 10.239.0.0/28 holds 4 node(s)",
        11,
    ),
}


ONE_MORE_SERVICE = "  - name: other\n    ports: [{port: 80}]\n    selector: {app: o}\n"

SERVICE_ERRORS = {
    "services not a list": (BASE + "services: {name: echo}\n", "services must be a list", 11),
    "service not a mapping": (BASE + "services: [echo]\n", "services[0] must be a mapping", 11),
    "unknown service key": (
        with_service("selector:", "selectr:"),
        "services[0]: unknown key 'selectr'; did you mean 'selector'?",
        16,
    ),
    "unknown port key": (
        with_service("targetPort:", "target_port:"),
        "services[0].ports[0]: unknown key 'target_port'; did you mean 'targetPort'?",
        15,
    ),
    "missing selector": (
        with_service("    selector: {app: echo}\n", ""),
        "services[0]: missing required key 'selector'",
        12,
    ),
    "missing port": (
        with_service("      - port: 80\n        targetPort: 8080\n", "      - targetPort: 8080\n"),
        "services[0].ports[0]: missing required key 'port'",
        14,
    ),
    "no ports": (
        with_service("    ports:\n      - port: 80\n        targetPort: 8080\n", "    ports: []\n"),
        "services[0] (default/echo): a service needs a port",
        13,
    ),
    "port zero": (
        with_service("port: 80", "port: 0"),
        "services[0].ports[0].port must be a port number 1..65535, not int '0'",
        14,
    ),
    "port too large": (
        with_service("port: 80", "port: 65536"),
        "services[0].ports[0].port must be a port number 1..65535, not int '65536'",
        14,
    ),
    "port quoted": (
        with_service("port: 80", "port: '80'"),
        "services[0].ports[0].port must be a port number 1..65535, not str '80'",
        14,
    ),
    "named target port": (
        with_service("targetPort: 8080", "targetPort: http"),
        "services[0].ports[0].targetPort must be a port number 1..65535, not str 'http'",
        15,
    ),
    "duplicate port": (
        with_service("        targetPort: 8080\n", "        targetPort: 8080\n      - port: 80\n"),
        "services[0] (default/echo): duplicate port",
        14,
    ),
    "duplicate service": (
        SERVICES + ONE_MORE_SERVICE.replace("other", "echo"),
        "services[1] (default/echo): duplicate service (also services[0])",
        17,
    ),
    "service name not a label": (
        with_service("name: echo", "name: Echo"),
        "services[0] (default/Echo): service name 'Echo' is not a DNS-1123 label",
        12,
    ),
    "service namespace not a label": (
        SERVICES + "    namespace: my_ns\n",
        "services[0] (my_ns/echo): namespace 'my_ns' is not a DNS-1123 label",
        17,
    ),
    "vip not an address": (
        SERVICES + "    vip: 10.96.0.300\n",
        "services[0].vip: '10.96.0.300' is not an IPv4 address",
        17,
    ),
    "vip outside the service network": (
        SERVICES + "    vip: 10.97.0.1\n",
        "services[0] (default/echo): vip 10.97.0.1 must be a host of serviceNetwork "
        "10.96.0.0/16 other than the DNS address 10.96.0.10",
        17,
    ),
    "vip is the dns address": (
        SERVICES + "    vip: 10.96.0.10\n",
        "vip 10.96.0.10 must be a host of serviceNetwork 10.96.0.0/16 other than the DNS",
        17,
    ),
    "vip is the network address": (
        SERVICES + "    vip: 10.96.0.0\n",
        "vip 10.96.0.0 must be a host of serviceNetwork",
        17,
    ),
    "vip written twice": (
        SERVICES + "    vip: 10.96.0.50\n" + ONE_MORE_SERVICE + "    vip: 10.96.0.50\n",
        "services[1] (default/other): vip 10.96.0.50 is also services[0]'s",
        21,
    ),
    "service network overlaps the node network": (
        SERVICES + "serviceNetwork: 10.239.0.0/16\n",
        "serviceNetwork 10.239.0.0/16 overlaps nodeNetwork 10.239.0.0/24",
        17,
    ),
    "service network overlaps a pod cidr": (
        SERVICES + "serviceNetwork: 10.240.2.128/25\n",
        "serviceNetwork 10.240.2.128/25 overlaps the podCidr of node-2 10.240.2.0/24",
        17,
    ),
    "default service network overlaps the node network": (
        edited("10.239.0.0/24", "10.96.0.0/24"),
        "serviceNetwork 10.96.0.0/16 overlaps nodeNetwork 10.96.0.0/24",
        1,  # not written: the document's line
    ),
    "service network not a cidr": (
        SERVICES + "serviceNetwork: 10.96.0.0\n",
        "serviceNetwork: '10.96.0.0' is not a CIDR",
        17,
    ),
    "service network too small": (
        SERVICES + "serviceNetwork: 10.96.0.0/28\n",
        "serviceNetwork 10.96.0.0/28 is too small for 1 service(s)",
        17,
    ),
}


@pytest.mark.parametrize(
    ("text", "problem", "line"),
    [*ERRORS.values(), *SERVICE_ERRORS.values()],
    ids=[*ERRORS, *SERVICE_ERRORS],
)
def test_invalid_topology(text: str, problem: str, line: int | None) -> None:
    with pytest.raises(TopologyError) as caught:
        parse_topology(text, "bad.yaml")
    error = caught.value
    assert problem in str(error)
    assert error.source == "bad.yaml"
    assert error.line == line
    prefix = "bad.yaml:" if line is None else f"bad.yaml:{line}:"
    assert str(error).startswith(prefix)


# ---- waypoints, service labels, appProtocol, HTTPRoutes and policies ------------------------

MESH = (
    BASE
    + """\
  - name: wp
    node: node-1
    ambient: false
services:
  - name: echo
    labels: {istio.io/use-waypoint: waypoint}
    ports:
      - {port: 80, targetPort: 8080, appProtocol: http}
      - {port: 9000}
    selector: {app: echo}
waypoints:
  - name: waypoint
    pod: wp
"""
)
"""BASE with an out-of-mesh pod `wp` (line 11), a service bound to a waypoint (`services:`
line 14, its first port line 18) and the waypoint run by `wp` (`waypoints:` line 21)."""

ROUTE = {
    "apiVersion": "gateway.networking.k8s.io/v1",
    "kind": "HTTPRoute",
    "metadata": {"name": "echo", "namespace": "default"},
    "spec": {
        "parentRefs": [{"group": "", "kind": "Service", "name": "echo", "port": 80}],
        "rules": [{"matches": [{"path": {"type": "PathPrefix", "value": "/v2"}}]}],
    },
}
POLICY = {
    "apiVersion": "security.istio.io/v1",
    "kind": "AuthorizationPolicy",
    "metadata": {"name": "deny-post", "namespace": "default"},
    "spec": {
        "targetRefs": [{"group": "", "kind": "Service", "name": "echo"}],
        "action": "DENY",
        "rules": [{"to": [{"operation": {"methods": ["POST"]}}]}],
    },
}


def with_mesh(old: str, new: str) -> str:
    assert old in MESH, old
    return MESH.replace(old, new, 1)


def test_waypoint_defaults_service_labels_and_app_protocol() -> None:
    topology = parse_topology(MESH)
    assert topology.waypoints == (WaypointSpec("waypoint", pod="wp"),)
    (waypoint,) = topology.waypoints
    assert (waypoint.namespace, waypoint.for_, waypoint.annotations) == ("default", "service", ())
    assert waypoint.key == "default/waypoint"
    assert waypoint.hostname == "waypoint.default.svc.cluster.local"
    assert (waypoint.takes_services, waypoint.takes_workloads) == (True, False)
    (echo,) = topology.services
    assert echo.labels == (("istio.io/use-waypoint", "waypoint"),)
    assert echo.label_map == {"istio.io/use-waypoint": "waypoint"}
    assert echo.ports == (ServicePortSpec(80, 8080, "http"), ServicePortSpec(9000, 9000))
    assert topology.waypoint("default", "waypoint") is waypoint
    assert topology.waypoint_of_pod("default", "wp") is waypoint
    assert topology.waypoint_of_pod("default", "client-a") is None
    assert (topology.http_routes, topology.policies) == ((), ())


def test_waypoint_keys_are_read() -> None:
    text = MESH + (
        "    namespace: default\n    for: all\n"
        "    annotations: {ambient.istio.io/allow-only-waypoint: 'true', b: x}\n"
    )
    (waypoint,) = parse_topology(text).waypoints
    assert waypoint == WaypointSpec(
        "waypoint",
        pod="wp",
        for_="all",
        annotations=(("b", "x"), ("ambient.istio.io/allow-only-waypoint", "true")),
    )
    assert waypoint.annotation_map == {"ambient.istio.io/allow-only-waypoint": "true", "b": "x"}
    assert (waypoint.takes_services, waypoint.takes_workloads) == (True, True)


@pytest.mark.parametrize(
    ("written", "services", "workloads"),
    [
        ("service", True, False),
        ("workload", False, True),
        ("all", True, True),
        ("none", False, False),
    ],
)
def test_what_a_waypoint_takes(written: str, services: bool, workloads: bool) -> None:
    (waypoint,) = parse_topology(MESH + f"    for: {written}\n").waypoints
    assert (waypoint.for_, waypoint.takes_services, waypoint.takes_workloads) == (
        written,
        services,
        workloads,
    )


def test_waypoint_vips_follow_the_services_in_file_order() -> None:
    text = BASE + (
        "  - {name: wp, node: node-1, ambient: false}\n"
        "  - {name: wp2, node: node-2, ambient: false}\n"
        "  - {name: wp3, node: node-2, ambient: false}\n"
        "services:\n"
        "  - {name: echo, ports: [{port: 80}], selector: {app: echo}, vip: 10.96.0.21}\n"
        "  - {name: other, ports: [{port: 80}], selector: {}}\n"
        "waypoints:\n"
        "  - {name: waypoint, pod: wp}\n"
        "  - {name: second, pod: wp2}\n"
        "  - {name: third, pod: wp3}\n"
    )
    topology = parse_topology(text)
    assert {key: str(vip) for key, vip in topology.service_vips().items()} == {
        "default/echo": "10.96.0.21",  # written
        "default/other": "10.96.0.20",  # allocated, as without waypoints
        "default/waypoint": "10.96.0.22",  # skips the written .21
        "default/second": "10.96.0.23",
        "default/third": "10.96.0.24",
    }
    assert topology.waypoint_vip("default", "second") == IPv4Address("10.96.0.23")
    with pytest.raises(KeyError, match="no waypoint default/echo"):
        topology.waypoint_vip("default", "echo")  # a service, not a waypoint
    with pytest.raises(KeyError, match="no waypoint default/nope"):
        topology.waypoint("default", "nope")


def test_waypoints_leave_the_services_vips_alone() -> None:
    without = parse_topology(MESH.split("waypoints:")[0]).service_vips()
    assert without == {"default/echo": IPv4Address("10.96.0.20")}
    assert parse_topology(MESH).service_vips() == {
        **without,
        "default/waypoint": IPv4Address("10.96.0.21"),
    }


def test_http_routes_and_policies_are_kept_as_written() -> None:
    documents = yaml.safe_dump({"httpRoutes": [ROUTE], "policies": [POLICY, {"any": [1, {}]}]})
    topology = parse_topology(MESH + documents)
    assert topology.http_routes == (ROUTE,)
    assert topology.policies == (POLICY, {"any": [1, {}]})
    assert parse_topology(MESH + "httpRoutes:\npolicies: []\n").http_routes == ()


def test_yaml_round_trip_keeps_waypoints_labels_routes_and_policies() -> None:
    text = (
        with_mesh(
            "services:\n",
            "  - {name: wp2, namespace: other, node: node-2, ambient: false}\nservices:\n",
        )
        + "    for: workload\n    annotations: {a.io/b: c}\n"
        + "  - {name: w2, namespace: other, pod: wp2, for: all}\n"
        + yaml.safe_dump({"httpRoutes": [ROUTE, ROUTE], "policies": [POLICY]})
    )
    topology = parse_topology(text)
    assert len(topology.waypoints) == 2
    again = parse_topology(topology.to_yaml())
    assert again == topology
    assert again.service_vips() == topology.service_vips()
    assert again.http_routes == (ROUTE, ROUTE)
    assert again.policies == (POLICY,)
    assert hash(again) == hash(topology)  # the documents are compared, not hashed


def test_the_default_topology_has_the_labs_waypoint_route_and_policy() -> None:
    topology = default_topology()
    assert [w.key for w in topology.waypoints] == ["default/waypoint"]
    assert [r["metadata"]["name"] for r in topology.http_routes] == ["web"]
    assert [p["metadata"]["name"] for p in topology.policies] == ["web-no-admin"]


def test_constructing_a_topology_with_a_bad_waypoint_is_validated() -> None:
    nodes = (NodeSpec("node-1", IPv4Network("10.240.1.0/24")),)
    pods = (PodSpec("wp", "default", "node-1", "wp", ambient=False),)
    good = Topology(
        "t", IPv4Network("10.239.0.0/24"), nodes, pods, (), waypoints=(WaypointSpec("w", pod="wp"),)
    )
    assert good.waypoint_vip("default", "w") == IPv4Address("10.96.0.20")
    with pytest.raises(TopologyError, match=r"waypoints\[0\] \(default/w\): for 'some'"):
        Topology(
            "t",
            IPv4Network("10.239.0.0/24"),
            nodes,
            pods,
            waypoints=(WaypointSpec("w", pod="wp", for_="some"),),
        )


ONE_MORE_WAYPOINT = "  - name: second\n    pod: wp\n"

WAYPOINT_ERRORS = {
    "waypoints not a list": (
        MESH.split("waypoints:")[0] + "waypoints: {name: w}\n",
        "waypoints must be a list, not a mapping",
        21,
    ),
    "unknown waypoint key": (
        MESH + "    For: all\n",
        "waypoints[0]: unknown key 'For'; did you mean 'for'?",
        24,
    ),
    "missing waypoint pod": (
        with_mesh("    pod: wp\n", ""),
        "waypoints[0]: missing required key 'pod'",
        22,
    ),
    "waypoint for not a string": (
        MESH + "    for: 1\n",
        "waypoints[0].for must be a string, not int '1'",
        24,
    ),
    "unknown waypoint for": (
        MESH + "    for: services\n",
        "waypoints[0] (default/waypoint): for 'services' must be one of service, workload, "
        "all, none",
        24,
    ),
    "unknown waypoint pod": (
        with_mesh("pod: wp", "pod: nope"),
        "waypoints[0] (default/waypoint): unknown pod 'nope' in namespace default (a waypoint "
        "runs in a pod of its own namespace); pods there: client-a, wp",
        23,
    ),
    "waypoint pod in another namespace": (
        MESH + "    namespace: other\n",
        "waypoints[0] (other/waypoint): unknown pod 'wp' in namespace other (a waypoint runs in "
        "a pod of its own namespace); pods there: none",
        23,
    ),
    "waypoint pod in the mesh": (
        with_mesh("pod: wp", "pod: client-a"),
        "waypoints[0] (default/waypoint): pod default/client-a: a waypoint's pod is never "
        "captured: set ambient: false",
        23,
    ),
    "two waypoints in a pod": (
        MESH + ONE_MORE_WAYPOINT,
        "waypoints[1] (default/second): pod default/wp already runs waypoints[0]",
        25,
    ),
    "duplicate waypoint": (
        MESH + ONE_MORE_WAYPOINT.replace("second", "waypoint"),
        "waypoints[1] (default/waypoint): duplicate waypoint (also waypoints[0])",
        24,
    ),
    "waypoint named like a service": (
        with_mesh("  - name: waypoint\n", "  - name: echo\n"),
        "waypoints[0] (default/echo): services[0] has the same namespace and name: the "
        "waypoint's own Service takes that name",
        22,
    ),
    "waypoint name not a label": (
        with_mesh("  - name: waypoint\n", "  - name: Way\n"),
        "waypoints[0] (default/Way): waypoint name 'Way' is not a DNS-1123 label",
        22,
    ),
    "waypoint namespace not a label": (
        MESH + "    namespace: a.b\n",
        "waypoints[0] (a.b/waypoint): namespace 'a.b' is not a DNS-1123 label",
        24,
    ),
    "bad annotation key": (
        MESH + "    annotations: {'a b': x}\n",
        "waypoints[0] (default/waypoint): invalid annotation key 'a b'",
        24,
    ),
    "annotation not a string": (
        MESH + "    annotations: {a: 1}\n",
        "waypoints[0].annotations.a must be a string",
        24,
    ),
    "service labels not a mapping": (
        with_mesh("labels: {istio.io/use-waypoint: waypoint}", "labels: [a]"),
        "services[0].labels must be a mapping, not a list",
        16,
    ),
    "bad service label": (
        with_mesh("{istio.io/use-waypoint: waypoint}", "{istio.io/use-waypoint: -w}"),
        "services[0] (default/echo): invalid value '-w' of label 'istio.io/use-waypoint'",
        16,
    ),
    "app protocol not a string": (
        with_mesh("appProtocol: http", "appProtocol: 2"),
        "services[0].ports[0].appProtocol must be a string, not int '2'",
        18,
    ),
    "bad app protocol": (
        with_mesh("appProtocol: http", "appProtocol: 'h t t p'"),
        "services[0] (default/echo): appProtocol 'h t t p' of port 80 is not a protocol name",
        18,
    ),
    "routes not a list": (MESH + "httpRoutes: {a: b}\n", "httpRoutes must be a list", 24),
    "route not a mapping": (
        MESH + "httpRoutes:\n  - a\n",
        "httpRoutes[0] must be a mapping, not str 'a'",
        25,
    ),
    "policy not a mapping": (
        MESH + "policies: [[]]\n",
        "policies[0] must be a mapping, not a list",
        24,
    ),
    "duplicate key in a route": (
        MESH + "httpRoutes:\n  - kind: HTTPRoute\n    spec: {rules: [{a: 1, a: 2}]}\n",
        "httpRoutes[0]: duplicate key 'a'",
        26,
    ),
    "bad value in a policy": (
        MESH + "policies:\n  - metadata: {created: 2024-02-30}\n",
        "policies[0]: day is out of range for month",
        25,
    ),
}


@pytest.mark.parametrize(
    ("text", "problem", "line"), list(WAYPOINT_ERRORS.values()), ids=list(WAYPOINT_ERRORS)
)
def test_invalid_waypoint_topology(text: str, problem: str, line: int | None) -> None:
    test_invalid_topology(text, problem, line)


def test_the_service_network_holds_the_waypoints_vips_too() -> None:
    # A /27 has hosts .20 to .30 for VIPs: echo, 9 more services and the waypoint fit; one
    # more service does not.
    services = "".join(
        f"  - name: s{i}\n    ports: [{{port: 80}}]\n    selector: {{app: s{i}}}\n"
        for i in range(9)
    )
    text = with_mesh("waypoints:\n", services + "waypoints:\n") + "serviceNetwork: 10.96.0.0/27\n"
    assert str(parse_topology(text).waypoint_vip("default", "waypoint")) == "10.96.0.30"
    eleven = text.replace("waypoints:\n", ONE_MORE_SERVICE + "waypoints:\n")
    with pytest.raises(TopologyError, match=r"too small for 11 service\(s\) and 1 waypoint\(s\)"):
        parse_topology(eleven)
