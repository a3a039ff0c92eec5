"""Istio's TCP metric labels for one connection: their names and order, how each end's
values are derived from its Workload, the dataplane mode and the destination service."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from agent.state.service import Service
from agent.state.store import MeshState
from agent.state.waypoint import Waypoint
from agent.state.workload import Protocol, Workload
from agent.telemetry.istio_labels import (
    DEFAULT_CLUSTER,
    PEER_LABELS,
    TCP_LABELS,
    UNKNOWN,
    ConnectionLabels,
    DataplaneMode,
    Reporter,
    SecurityPolicy,
    connection_labels,
    dataplane_mode,
    destination_service,
    peer_labels,
)

CART_ID = "spiffe://cluster.local/ns/shop/sa/cart"
PAYMENTS_ID = "spiffe://cluster.local/ns/shop/sa/payments"
WAYPOINT = Waypoint("10.96.0.50", name="waypoint", namespace="shop")

# Istio's standard TCP labels, in the order Istio documents them.
ISTIO_TCP_LABELS = (
    "reporter",
    "source_workload", "source_canonical_service", "source_canonical_revision",
    "source_workload_namespace", "source_principal", "source_app", "source_version",
    "source_cluster",
    "destination_service", "destination_service_namespace", "destination_service_name",
    "destination_workload", "destination_canonical_service", "destination_canonical_revision",
    "destination_workload_namespace", "destination_principal", "destination_app",
    "destination_version", "destination_cluster",
    "request_protocol", "response_flags", "connection_security_policy",
)  # fmt: skip


def workload(
    name: str = "cart-7d9f-abcde",
    *,
    namespace: str = "shop",
    protocol: Protocol = Protocol.HBONE,
    labels: Mapping[str, str] | None = None,
    services: Mapping[str, Any] | None = None,
    waypoint: Waypoint | None = None,
    workload_name: str = "",
    canonical_name: str = "",
    canonical_revision: str = "",
    cluster_id: str = "",
) -> Workload:
    return Workload(
        uid=f"uid-{namespace}-{name}", name=name, namespace=namespace,
        service_account=name.split("-")[0], ips=("10.0.0.2",), protocol=protocol,
        node="node-1", labels=labels or {}, services=services or {}, waypoint=waypoint,
        workload_name=workload_name, canonical_name=canonical_name,
        canonical_revision=canonical_revision, cluster_id=cluster_id,
    )  # fmt: skip


def peer(w: Workload | None, principal: str | None = CART_ID) -> dict[str, str]:
    return dict(zip(PEER_LABELS, peer_labels(w, principal), strict=True))


# -- names and order -------------------------------------------------------------------------


def test_tcp_labels_are_istios_in_istios_order_then_dataplane_mode() -> None:
    assert list(TCP_LABELS) == [*ISTIO_TCP_LABELS, "dataplane_mode"]


def test_tcp_labels_have_no_duplicates() -> None:
    assert len(set(TCP_LABELS)) == len(TCP_LABELS)


# -- peer labels -----------------------------------------------------------------------------


def test_peer_labels_use_the_workloads_own_telemetry_fields_over_its_labels() -> None:
    w = workload(
        labels={
            "app": "label-app", "version": "v9",
            "service.istio.io/canonical-name": "label-canonical",
            "service.istio.io/canonical-revision": "label-revision",
        },
        workload_name="cart", canonical_name="cart-svc", canonical_revision="v2",
        cluster_id="east",
    )  # fmt: skip
    assert peer(w) == {
        "workload": "cart", "canonical_service": "cart-svc", "canonical_revision": "v2",
        "workload_namespace": "shop", "principal": CART_ID, "app": "label-app",
        "version": "v9", "cluster": "east",
    }  # fmt: skip


def test_peer_labels_of_a_bare_pod_fall_back_to_its_name_latest_and_kubernetes() -> None:
    assert peer(workload("cart-7d9f-abcde")) == {
        "workload": "cart-7d9f-abcde", "canonical_service": "cart-7d9f-abcde",
        "canonical_revision": "latest", "workload_namespace": "shop", "principal": CART_ID,
        "app": UNKNOWN, "version": UNKNOWN, "cluster": DEFAULT_CLUSTER,
    }  # fmt: skip
    assert DEFAULT_CLUSTER == "Kubernetes"


def test_canonical_labels_win_over_app_and_version_labels() -> None:
    w = workload(labels={
        "app": "cart-app", "app.kubernetes.io/name": "cart-k8s",
        "version": "v1", "app.kubernetes.io/version": "v1-k8s",
        "service.istio.io/canonical-name": "cart-canonical",
        "service.istio.io/canonical-revision": "rev-canonical",
    })  # fmt: skip
    labels = peer(w)
    assert labels["canonical_service"] == "cart-canonical"
    assert labels["canonical_revision"] == "rev-canonical"
    # app and version are the plain labels, not the canonical ones.
    assert labels["app"] == "cart-app"
    assert labels["version"] == "v1"


def test_kubernetes_recommended_labels_come_before_app_and_version_for_canonical() -> None:
    w = workload(labels={
        "app": "cart-app", "app.kubernetes.io/name": "cart-k8s",
        "version": "v1", "app.kubernetes.io/version": "v1-k8s",
    })  # fmt: skip
    labels = peer(w)
    assert labels["canonical_service"] == "cart-k8s"
    assert labels["canonical_revision"] == "v1-k8s"
    assert labels["app"] == "cart-app"
    assert labels["version"] == "v1"


def test_app_and_version_labels_alone_give_canonical_service_and_revision() -> None:
    labels = peer(workload(labels={"app": "cart", "version": "v3"}))
    assert (labels["canonical_service"], labels["canonical_revision"]) == ("cart", "v3")
    assert (labels["app"], labels["version"]) == ("cart", "v3")


def test_kubernetes_recommended_labels_stand_in_for_missing_app_and_version() -> None:
    labels = peer(
        workload(labels={"app.kubernetes.io/name": "cart", "app.kubernetes.io/version": "v4"})
    )
    assert (labels["app"], labels["version"]) == ("cart", "v4")
    assert (labels["canonical_service"], labels["canonical_revision"]) == ("cart", "v4")


def test_empty_label_values_are_skipped_like_missing_ones() -> None:
    labels = peer(workload(labels={"app": "", "app.kubernetes.io/name": "cart", "version": ""}))
    assert labels["app"] == "cart"
    assert labels["canonical_service"] == "cart"
    assert labels["version"] == UNKNOWN
    assert labels["canonical_revision"] == "latest"


def test_canonical_service_falls_back_to_the_workload_name_not_the_pod_name() -> None:
    labels = peer(workload("cart-7d9f-abcde", workload_name="cart"))
    assert labels["workload"] == "cart"
    assert labels["canonical_service"] == "cart"


def test_unknown_peer_is_unknown_everywhere_but_its_principal() -> None:
    assert peer(None, CART_ID) == {
        **dict.fromkeys(PEER_LABELS, UNKNOWN), "principal": CART_ID
    }  # fmt: skip
    assert peer_labels(None, None) == (UNKNOWN,) * len(PEER_LABELS)
    assert UNKNOWN == "unknown"


def test_known_peer_without_principal_has_unknown_principal() -> None:
    assert peer(workload(), principal=None)["principal"] == UNKNOWN


# -- dataplane mode --------------------------------------------------------------------------

IN_MESH = workload("cart", protocol=Protocol.HBONE)
OUT_OF_MESH = workload("legacy", protocol=Protocol.TCP)
SERVER = workload("payments", protocol=Protocol.HBONE)
SERVER_TCP = workload("payments", protocol=Protocol.TCP)
SERVER_WITH_WAYPOINT = workload("payments", protocol=Protocol.HBONE, waypoint=WAYPOINT)


@pytest.mark.parametrize(
    ("tunnelled", "destination", "mode"),
    [
        (False, None, DataplaneMode.OUT_OF_MESH),
        (False, SERVER_TCP, DataplaneMode.OUT_OF_MESH),
        (False, SERVER, DataplaneMode.OUT_OF_MESH),
        (False, SERVER_WITH_WAYPOINT, DataplaneMode.OUT_OF_MESH),
        (True, None, DataplaneMode.AMBIENT_L4),
        (True, SERVER, DataplaneMode.AMBIENT_L4),
        (True, SERVER_WITH_WAYPOINT, DataplaneMode.AMBIENT_WAYPOINT),
    ],
    ids=[
        "plain-unknown",
        "plain-tcp",
        "plain-hbone",
        "plain-waypoint",
        "hbone-unknown",
        "hbone-hbone",
        "hbone-waypoint",
    ],
)
def test_dataplane_mode_is_ambient_only_over_hbone(
    tunnelled: bool, destination: Workload | None, mode: DataplaneMode
) -> None:
    assert dataplane_mode(tunnelled, destination) is mode


def test_a_verified_peer_this_node_cannot_name_is_still_in_the_mesh() -> None:
    labels = connection_labels(
        Reporter.DESTINATION, None, CART_ID, SERVER, PAYMENTS_ID, None, SecurityPolicy.MUTUAL_TLS
    )
    assert labels.as_dict()["source_workload"] == UNKNOWN
    assert labels.as_dict()["source_principal"] == CART_ID
    assert labels.dataplane_mode == "ambient-l4"


def test_dataplane_mode_values_are_the_dashboard_strings() -> None:
    assert [m.value for m in DataplaneMode] == ["out-of-mesh", "ambient-l4", "ambient-waypoint"]


# -- destination service ---------------------------------------------------------------------

PAYMENTS_SVC = Service("payments", "shop", "payments.shop.svc.cluster.local",
                       ("10.96.0.10",), {80: 8080})  # fmt: skip
PAYMENTS_ADMIN_SVC = Service("payments-admin", "shop", "payments-admin.shop.svc.cluster.local",
                             ("10.96.0.11",), {9090: 9090})  # fmt: skip
# Same hostname in another namespace: not the service a "shop/..." key names.
IMPOSTOR_SVC = Service("payments", "other", "payments.shop.svc.cluster.local",
                       ("10.96.0.12",), {7000: 7000})  # fmt: skip
BACKEND = workload(
    "payments-1",
    services={
        "shop/payments.shop.svc.cluster.local": {80: 8080},
        "shop/payments-admin.shop.svc.cluster.local": {9090: 9090},
    },
)


def state() -> MeshState:
    return MeshState((BACKEND,), (IMPOSTOR_SVC, PAYMENTS_SVC, PAYMENTS_ADMIN_SVC))


@pytest.mark.parametrize(("port", "service"), [(8080, PAYMENTS_SVC), (9090, PAYMENTS_ADMIN_SVC)])
def test_destination_service_is_the_one_whose_port_maps_to_the_target_port(
    port: int, service: Service
) -> None:
    assert destination_service(state(), BACKEND, port) == service


def test_destination_service_matches_target_ports_not_service_ports() -> None:
    # 80 is payments' service port; the pod itself is reached on 8080.
    assert destination_service(state(), BACKEND, 80) is None


def test_destination_service_is_none_for_a_pod_port_no_service_exposes() -> None:
    assert destination_service(state(), BACKEND, 7000) is None


def test_destination_service_is_none_for_an_unknown_workload() -> None:
    assert destination_service(state(), None, 8080) is None


def test_destination_service_is_none_for_a_workload_backing_no_service() -> None:
    assert destination_service(state(), workload("loner"), 8080) is None


def test_destination_service_ignores_services_missing_from_the_state() -> None:
    only_admin = MeshState((BACKEND,), (PAYMENTS_ADMIN_SVC,))
    assert destination_service(only_admin, BACKEND, 8080) is None
    assert destination_service(only_admin, BACKEND, 9090) == PAYMENTS_ADMIN_SVC


# -- connection labels -----------------------------------------------------------------------


def test_connection_labels_of_a_meshed_connection() -> None:
    source = workload("cart-1", labels={"app": "cart", "version": "v1"}, workload_name="cart")
    destination = workload("payments-1", labels={"app": "payments"}, workload_name="payments")
    labels = connection_labels(
        Reporter.SOURCE, source, CART_ID, destination, PAYMENTS_ID, PAYMENTS_SVC,
        SecurityPolicy.MUTUAL_TLS,
    )  # fmt: skip
    assert labels.as_dict() == {
        "reporter": "source",
        "source_workload": "cart", "source_canonical_service": "cart",
        "source_canonical_revision": "v1", "source_workload_namespace": "shop",
        "source_principal": CART_ID, "source_app": "cart", "source_version": "v1",
        "source_cluster": "Kubernetes",
        "destination_service": "payments.shop.svc.cluster.local",
        "destination_service_namespace": "shop", "destination_service_name": "payments",
        "destination_workload": "payments", "destination_canonical_service": "payments",
        "destination_canonical_revision": "latest", "destination_workload_namespace": "shop",
        "destination_principal": PAYMENTS_ID, "destination_app": "payments",
        "destination_version": "unknown", "destination_cluster": "Kubernetes",
        "request_protocol": "tcp", "response_flags": "-",
        "connection_security_policy": "mutual_tls", "dataplane_mode": "ambient-l4",
    }  # fmt: skip
    assert labels.values == tuple(labels.as_dict().values())
    assert labels.dataplane_mode == "ambient-l4"
    assert (labels.source_uid, labels.destination_uid) == (source.uid, destination.uid)


def test_connection_labels_of_a_connection_out_of_the_mesh_to_an_unknown_peer() -> None:
    source = workload("legacy", protocol=Protocol.TCP)
    labels = connection_labels(
        Reporter.DESTINATION, None, None, source, None, None, SecurityPolicy.NONE, "DC"
    )
    as_dict = labels.as_dict()
    assert as_dict["reporter"] == "destination"
    assert all(as_dict[f"source_{name}"] == UNKNOWN for name in PEER_LABELS)
    assert as_dict["destination_service"] == UNKNOWN
    assert as_dict["destination_service_namespace"] == UNKNOWN
    assert as_dict["destination_service_name"] == UNKNOWN
    assert as_dict["response_flags"] == "DC"
    assert as_dict["connection_security_policy"] == "none"
    assert labels.dataplane_mode == "out-of-mesh"


@pytest.mark.parametrize(
    ("source", "destination", "uids"),
    [
        (IN_MESH, SERVER, (IN_MESH.uid, SERVER.uid)),
        (IN_MESH, None, (IN_MESH.uid, None)),
        (None, SERVER, (None, SERVER.uid)),
        (None, None, (None, None)),
    ],
    ids=["both-known", "source-known", "destination-known", "none-known"],
)
def test_connection_labels_carry_the_uids_of_the_known_ends(
    source: Workload | None, destination: Workload | None, uids: tuple[str | None, str | None]
) -> None:
    labels = connection_labels(
        Reporter.SOURCE, source, CART_ID, destination, PAYMENTS_ID, None, SecurityPolicy.NONE
    )
    assert (labels.source_uid, labels.destination_uid) == uids
    assert isinstance(labels, ConnectionLabels)
    assert len(labels.values) == len(TCP_LABELS)
