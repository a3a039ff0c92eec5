"""Lab topology: the default cluster, address allocation and every validation error."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from lab.topology import (
    NodeSpec,
    PodSpec,
    Topology,
    TopologyError,
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
    ]
    assert {p.namespace for p in topology.pods} == {"default"}


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
    }


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


@pytest.mark.parametrize(("text", "problem", "line"), ERRORS.values(), ids=ERRORS.keys())
def test_invalid_topology(text: str, problem: str, line: int | None) -> None:
    with pytest.raises(TopologyError) as caught:
        parse_topology(text, "bad.yaml")
    error = caught.value
    assert problem in str(error)
    assert error.source == "bad.yaml"
    assert error.line == line
    prefix = "bad.yaml:" if line is None else f"bad.yaml:{line}:"
    assert str(error).startswith(prefix)
