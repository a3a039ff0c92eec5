"""The local config's `namespaces:` section: Kubernetes namespaces and their labels, which
decide whether a pod the CNI plugin announces joins the mesh."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.sources.local_config import ConfigError, load_local_config, parse_local_config
from agent.sources.local_source import mesh_state_of
from agent.state.namespace import DATAPLANE_MODE_LABEL, Namespace, ambient_enrolled
from agent.state.store import MeshState

NAMESPACES = """\
namespaces:
  - name: shop
    labels:
      istio.io/dataplane-mode: ambient
      team: payments
  - name: legacy
  - {name: empty-labels, labels: {}}
  - name: null-labels
    labels:
"""

WORKLOAD = """\
workloads:
  - name: cart
    namespace: shop
    workloadIps: [10.0.0.2]
    node: node-1
"""


def test_namespaces_are_parsed_in_order_with_their_labels() -> None:
    config = parse_local_config(NAMESPACES, "mesh.yaml")
    assert [n.name for n in config.namespaces] == ["shop", "legacy", "empty-labels", "null-labels"]
    shop, legacy, empty, null = config.namespaces
    assert dict(shop.labels) == {DATAPLANE_MODE_LABEL: "ambient", "team": "payments"}
    assert dict(legacy.labels) == {} and dict(empty.labels) == {} and dict(null.labels) == {}
    assert ambient_enrolled(shop, {}) and not ambient_enrolled(legacy, {})


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(WORKLOAD, id="no-namespaces-section"),
        pytest.param("namespaces: []\n", id="empty-section"),
    ],
)
def test_without_namespaces_there_are_none(text: str) -> None:
    assert parse_local_config(text, "mesh.yaml").namespaces == ()


def test_namespaces_sit_beside_the_other_sections() -> None:
    config = parse_local_config(WORKLOAD + "services: []\npolicies: []\n" + NAMESPACES, "m")
    assert [w.name for w in config.workloads] == ["cart"]
    assert config.namespaces == parse_local_config(NAMESPACES, "m").namespaces


def test_workloads_may_live_in_a_declared_namespace() -> None:
    config = parse_local_config(WORKLOAD + "namespaces:\n  - name: shop\n", "m")
    assert config.namespaces == (Namespace("shop"),)


def test_mesh_state_carries_the_namespaces_and_finds_them_by_name() -> None:
    state = mesh_state_of(parse_local_config(WORKLOAD + NAMESPACES, "mesh.yaml"))
    shop = state.namespace("shop")
    assert shop is not None and dict(shop.labels)[DATAPLANE_MODE_LABEL] == "ambient"
    assert state.namespace("legacy") == Namespace("legacy")
    assert state.namespace("nowhere") is None
    assert state.namespace("") is None
    assert MeshState().namespace("shop") is None


def test_load_local_config_reads_namespaces_from_the_file(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text(NAMESPACES)
    assert len(load_local_config(path).namespaces) == 4


def test_errors_in_a_file_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text("namespaces:\n  - name: a\n  - name: a\n")
    with pytest.raises(ConfigError) as caught:
        load_local_config(path)
    assert (caught.value.source, caught.value.line) == (str(path), 3)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param("namespaces: {}\n", "mesh.yaml:1: namespaces must be a list", id="not-a-list"),
        pytest.param(
            "namespaces: shop\n", "mesh.yaml:1: namespaces must be a list", id="scalar-section"
        ),
        pytest.param(
            "namespace: []\n",
            "mesh.yaml:1: unknown key 'namespace' (expected workloads, services, policies, "
            "namespaces, httpRoutes)",
            id="misspelt-section",
        ),
        pytest.param(
            "namespaces:\n  - shop\n", "mesh.yaml:2: a namespace must be a mapping", id="scalar"
        ),
        pytest.param(
            "namespaces:\n  - [shop]\n", "mesh.yaml:2: a namespace must be a mapping", id="list"
        ),
        pytest.param(
            "namespaces:\n  - name: a\n\n  - {name: b, label: {x: y}, extra: 1}\n",
            "mesh.yaml:4: namespace has unknown keys ['extra', 'label']",
            id="unknown-keys",
        ),
        pytest.param(
            "namespaces:\n  - labels: {x: y}\n",
            "mesh.yaml:2: namespace is missing 'name'",
            id="missing-name",
        ),
        pytest.param(
            "namespaces:\n  - name:\n", "mesh.yaml:2: namespace is missing 'name'", id="null-name"
        ),
        pytest.param(
            "namespaces:\n  - name: ''\n",
            "mesh.yaml:2: namespace name must be a non-empty string",
            id="empty-name",
        ),
        pytest.param(
            "namespaces:\n  - name: 42\n",
            "mesh.yaml:2: namespace name must be a non-empty string",
            id="numeric-name",
        ),
        pytest.param(
            "namespaces:\n  - name: [a]\n",
            "mesh.yaml:2: namespace name must be a non-empty string",
            id="list-name",
        ),
        pytest.param(
            "namespaces:\n  - name: a\n    labels: [ambient]\n",
            "mesh.yaml:3: labels must map strings to strings",
            id="labels-a-list",
        ),
        pytest.param(
            "namespaces:\n  - name: a\n    labels: ambient\n",
            "mesh.yaml:3: labels must map strings to strings",
            id="labels-a-scalar",
        ),
        pytest.param(
            "namespaces:\n  - name: a\n    labels: {enabled: true}\n",
            "mesh.yaml:3: labels must map strings to strings",
            id="bool-label-value",
        ),
        pytest.param(
            # The block mapping starts at its first key: that is the line named.
            "namespaces:\n  - name: a\n    labels:\n      app: a\n      version: 1.0\n",
            "mesh.yaml:4: labels must map strings to strings",
            id="float-label-value",
        ),
        pytest.param(
            "namespaces:\n  - name: a\n    labels: {x: null}\n",
            "mesh.yaml:3: labels must map strings to strings",
            id="null-label-value",
        ),
        pytest.param(
            "namespaces:\n  - name: a\n    labels: {1: a}\n",
            "mesh.yaml:3: labels must map strings to strings",
            id="numeric-label-key",
        ),
        pytest.param(
            "namespaces:\n  - name: a\n    labels: {x: !pod y}\n",
            "mesh.yaml:3: could not determine a constructor",
            id="unknown-tag",
        ),
        pytest.param(
            "namespaces:\n  - name: a\n  - name: b\n  - name: a\n",
            "mesh.yaml:4: duplicate namespace 'a' (first at line 2)",
            id="duplicate",
        ),
        pytest.param(
            "namespaces:\n  - name: a\n    labels: {x: y}\n  - {name: a}\n",
            "mesh.yaml:4: duplicate namespace 'a' (first at line 2)",
            id="duplicate-with-different-labels",
        ),
    ],
)
def test_invalid_namespaces_name_file_line_and_reason(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_local_config(text, "mesh.yaml")
    assert str(caught.value).startswith(message), str(caught.value)
    assert caught.value.source == "mesh.yaml" and caught.value.line is not None


def test_config_error_carries_line_and_reason_apart() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_local_config("namespaces:\n  - name: shop\n    labels: {x: 1}\n", "mesh.yaml")
    assert (caught.value.line, caught.value.reason) == (3, "labels must map strings to strings")
