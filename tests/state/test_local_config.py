from __future__ import annotations

from pathlib import Path

import pytest

from agent.state.local_config import ConfigError, load_local_config, parse_local_config
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


def test_empty_file_is_an_empty_mesh() -> None:
    assert parse_local_config("", "x").workloads == ()


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
