"""The CNI pod registry (agent/sources/cni_pods.py) and the namespace rule it relies on."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from agent.sources.authorization_policy import parse_policy
from agent.sources.cni_pods import CniPod, CniPods, with_cni_pods
from agent.state.namespace import DATAPLANE_MODE_LABEL, Namespace, ambient_enrolled
from agent.state.service import Service
from agent.state.store import MeshState
from agent.state.workload import DEFAULT_TRUST_DOMAIN, Protocol, Workload

NODE = "node-1"
CONTAINER_ID = "3f2a9c1d7e5b4a6c8d9e0f1a2b3c4d5e"
AMBIENT = {DATAPLANE_MODE_LABEL: "ambient"}
OPTED_OUT = {DATAPLANE_MODE_LABEL: "none"}


def cni_pod(
    container_id: str = CONTAINER_ID,
    *,
    netns: str = "/var/run/netns/cni-1",
    interface: str = "eth0",
    namespace: str = "shop",
    name: str = "cart",
    uid: str = "0b5d2c1e-uid",
    ips: tuple[str, ...] = ("10.1.0.5",),
) -> CniPod:
    return CniPod(container_id, netns, interface, namespace, name, uid, ips)


def declared(
    namespace: str = "shop",
    name: str = "cart",
    *,
    protocol: Protocol = Protocol.TCP,
    labels: Mapping[str, str] | None = None,
) -> Workload:
    """A workload a config source declared for the pod, with everything CNI cannot know."""
    return Workload(
        uid=f"local//Pod/{namespace}/{name}",
        name=name,
        namespace=namespace,
        service_account="cart-sa",
        ips=("10.9.9.9",),
        protocol=protocol,
        node="somewhere-else",
        netns="/run/netns/declared",
        interface="veth-declared",
        trust_domain="example.org",
        services={"shop/cart.shop.svc.cluster.local": {80: 8080}},
        labels=labels if labels is not None else {"app": "cart"},
    )


def joined(state: MeshState, *pods: CniPod) -> Workload:
    """The workload the (last) pod became."""
    result = with_cni_pods(state, pods, NODE)
    uid = pods[-1].workload_uid
    (workload,) = (w for w in result.workloads if w.uid == uid)
    return workload


# --- ambient_enrolled: Istio's rule ---------------------------------------------------------


@pytest.mark.parametrize(
    ("namespace", "pod_labels", "enrolled"),
    [
        (None, {}, False),
        (Namespace("shop"), {}, False),
        (Namespace("shop", {"app": "x"}), {}, False),
        (Namespace("shop", AMBIENT), {}, True),
        (Namespace("shop", AMBIENT), {"app": "cart"}, True),
        (Namespace("shop", AMBIENT), AMBIENT, True),
        (Namespace("shop", AMBIENT), OPTED_OUT, False),
        (Namespace("shop", AMBIENT), {DATAPLANE_MODE_LABEL: "sidecar"}, True),
        (Namespace("shop", OPTED_OUT), {}, False),
        (Namespace("shop", OPTED_OUT), AMBIENT, False),  # a pod cannot opt in alone
        (Namespace("shop", {DATAPLANE_MODE_LABEL: "Ambient"}), {}, False),  # case matters
        (Namespace("shop", {DATAPLANE_MODE_LABEL: ""}), {}, False),
        (None, AMBIENT, False),
    ],
)
def test_ambient_enrolled_truth_table(
    namespace: Namespace | None, pod_labels: dict[str, str], enrolled: bool
) -> None:
    assert ambient_enrolled(namespace, pod_labels) is enrolled


def test_namespace_labels_are_a_read_only_copy() -> None:
    labels = dict(AMBIENT)
    namespace = Namespace("shop", labels)
    labels[DATAPLANE_MODE_LABEL] = "none"
    assert ambient_enrolled(namespace, {})
    with pytest.raises(TypeError):
        namespace.labels[DATAPLANE_MODE_LABEL] = "none"  # type: ignore[index]


# --- with_cni_pods: which pods are captured -------------------------------------------------


@pytest.mark.parametrize(
    ("namespaces", "workloads", "protocol"),
    [
        pytest.param((Namespace("shop", AMBIENT),), (), Protocol.HBONE, id="ambient-namespace"),
        pytest.param((Namespace("shop"),), (), Protocol.TCP, id="namespace-not-ambient"),
        pytest.param((), (), Protocol.TCP, id="namespace-unknown"),
        pytest.param(
            (Namespace("other", AMBIENT),), (), Protocol.TCP, id="another-namespace-ambient"
        ),
        pytest.param(
            (Namespace("shop", AMBIENT),),
            (declared(),),
            Protocol.HBONE,
            id="ambient-namespace-declared-tcp-without-opt-out",
        ),
        pytest.param(
            (Namespace("shop", AMBIENT),),
            (declared(labels=OPTED_OUT),),
            Protocol.TCP,
            id="ambient-namespace-pod-opted-out",
        ),
        pytest.param(
            (Namespace("shop"),),
            (declared(protocol=Protocol.HBONE),),
            Protocol.HBONE,
            id="declared-captured-in-plain-namespace",
        ),
        pytest.param(
            (),
            (declared(protocol=Protocol.HBONE),),
            Protocol.HBONE,
            id="declared-captured-namespace-unknown",
        ),
        pytest.param(
            (Namespace("shop", AMBIENT),),
            (declared(protocol=Protocol.HBONE, labels=OPTED_OUT),),
            Protocol.HBONE,
            id="declared-captured-wins-over-opt-out",
        ),
        pytest.param(
            (Namespace("shop"),),
            (declared(),),
            Protocol.TCP,
            id="declared-tcp-in-plain-namespace",
        ),
        pytest.param(
            (),
            (declared("other", "cart", protocol=Protocol.HBONE),),
            Protocol.TCP,
            id="declared-captured-same-name-other-namespace",
        ),
        pytest.param(
            (),
            (declared("shop", "till", protocol=Protocol.HBONE),),
            Protocol.TCP,
            id="declared-captured-same-namespace-other-name",
        ),
    ],
)
def test_pod_is_captured_by_namespace_rule_or_declared_capture(
    namespaces: tuple[Namespace, ...], workloads: tuple[Workload, ...], protocol: Protocol
) -> None:
    state = MeshState(workloads=workloads, namespaces=namespaces)
    assert joined(state, cni_pod()).protocol is protocol


def test_declared_workload_lends_its_identity_and_is_replaced() -> None:
    other = declared("shop", "till")
    state = MeshState(workloads=(declared(), other), namespaces=(Namespace("shop", AMBIENT),))
    pod = cni_pod(ips=("10.1.0.5", "fd00::5"), interface="net1", netns="/var/run/netns/x")
    result = with_cni_pods(state, [pod], NODE)

    assert [w.uid for w in result.workloads] == [other.uid, pod.uid]
    workload = result.workloads[-1]
    # From the declared workload: what only a source knows.
    assert workload.service_account == "cart-sa"
    assert dict(workload.labels) == {"app": "cart"}
    assert {k: dict(v) for k, v in workload.services.items()} == {
        "shop/cart.shop.svc.cluster.local": {80: 8080}
    }
    assert workload.trust_domain == "example.org"
    # From the pod and the agent: what the runtime knows.
    assert (workload.namespace, workload.name) == ("shop", "cart")
    assert workload.ips == ("10.1.0.5", "fd00::5")
    assert workload.netns == "/var/run/netns/x" and workload.interface == "net1"
    assert workload.node == NODE
    assert workload.protocol is Protocol.HBONE


def test_undeclared_pod_gets_defaults() -> None:
    workload = joined(MeshState(), cni_pod())
    assert workload.uid == "0b5d2c1e-uid"
    assert workload.service_account == "default"
    assert workload.trust_domain == DEFAULT_TRUST_DOMAIN
    assert dict(workload.services) == {} and dict(workload.labels) == {}
    assert workload.protocol is Protocol.TCP and not workload.captured
    assert workload.node == NODE and workload.netns == "/var/run/netns/cni-1"


@pytest.mark.parametrize(
    ("pod", "expected"),
    [
        pytest.param(cni_pod(uid=""), {"uid": f"cni//{CONTAINER_ID}"}, id="uid-from-container-id"),
        pytest.param(cni_pod(uid="u-1"), {"uid": "u-1"}, id="uid-from-pod"),
        pytest.param(cni_pod(name=""), {"name": CONTAINER_ID[:12]}, id="name-from-container-id"),
        pytest.param(cni_pod(namespace=""), {"namespace": "default"}, id="namespace-default"),
        pytest.param(cni_pod(interface=""), {"interface": "eth0"}, id="interface-default"),
        pytest.param(
            cni_pod(namespace="", name="", uid=""),
            {"uid": f"cni//{CONTAINER_ID}", "name": CONTAINER_ID[:12], "namespace": "default"},
            id="unnamed-pod",
        ),
    ],
)
def test_fallbacks_for_what_the_runtime_did_not_say(pod: CniPod, expected: dict[str, str]) -> None:
    workload = joined(MeshState(), pod)
    assert {key: getattr(workload, key) for key in expected} == expected


def test_pod_without_namespace_follows_the_default_namespace_rule() -> None:
    state = MeshState(namespaces=(Namespace("default", AMBIENT),))
    workload = joined(state, cni_pod(namespace="", name="", uid=""))
    assert workload.namespace == "default"
    assert workload.captured


def test_rest_of_the_state_is_kept_and_the_input_untouched() -> None:
    service = Service(name="cart", namespace="shop", hostname="cart.shop.svc.cluster.local")
    policy = parse_policy(
        {"name": "p", "namespace": "shop", "scope": "Namespace", "action": "Allow"}
    )
    namespaces = (Namespace("shop", AMBIENT), Namespace("other"))
    unrelated = declared("other", "db")
    state = MeshState((declared(), unrelated), (service,), (policy,), namespaces)
    result = with_cni_pods(state, [cni_pod(), cni_pod("c2", name="web", uid="u2")], NODE)

    assert result.services == (service,) and result.policies == (policy,)
    assert result.namespaces == namespaces
    assert [w.uid for w in result.workloads] == [unrelated.uid, "0b5d2c1e-uid", "u2"]
    assert state.workloads == (declared(), unrelated)  # a snapshot never changes
    # The new snapshot's indexes know the pods.
    assert result.workload_by_ip("10.1.0.5") is not None
    assert [w.uid for w in result.workloads_on(NODE)] == ["0b5d2c1e-uid", "u2"]


def test_no_pods_leaves_the_workloads_as_they_are() -> None:
    state = MeshState(workloads=(declared(),), namespaces=(Namespace("shop", AMBIENT),))
    assert with_cni_pods(state, [], NODE).workloads == state.workloads


# --- CniPods: the registry on disk -----------------------------------------------------------


def test_registry_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "node-1" / "cni-pods.json"  # the directory does not exist yet
    first = CniPods(path)
    a = cni_pod("a", ips=("10.1.0.5", "fd00::5"))
    b = cni_pod("b", name="web", uid="")
    c = cni_pod("c", name="db")
    for pod in (a, b, c):
        first.add(pod)
    assert first.remove("b") == b

    second = CniPods(path)
    assert second.all() == (a, c)
    assert second.get("a") == a and second.get("b") is None
    assert isinstance(second.get("a").ips, tuple)  # type: ignore[union-attr]
    assert [p.name for p in tmp_path.joinpath("node-1").iterdir()] == ["cni-pods.json"]


def test_add_of_a_known_container_replaces_it(tmp_path: Path) -> None:
    pods = CniPods(tmp_path / "cni-pods.json")
    pods.add(cni_pod("a", ips=("10.1.0.5",)))
    pods.add(cni_pod("a", ips=("10.1.0.6",)))
    assert CniPods(tmp_path / "cni-pods.json").all() == (cni_pod("a", ips=("10.1.0.6",)),)


def test_remove_of_an_unknown_container_is_none_and_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "cni-pods.json"
    pods = CniPods(path)
    assert pods.remove("nobody") is None
    assert not path.exists()


def test_missing_file_is_an_empty_registry(tmp_path: Path) -> None:
    pods = CniPods(tmp_path / "cni-pods.json")
    assert pods.all() == () and pods.get(CONTAINER_ID) is None


def test_keep_only_releases_exactly_the_containers_not_listed(tmp_path: Path) -> None:
    path = tmp_path / "cni-pods.json"
    pods = CniPods(path)
    for cid in ("a", "b", "c", "d"):
        pods.add(cni_pod(cid, name=cid))

    released = pods.keep_only(["b", "d", "not-ours"])
    assert sorted(released) == ["a", "c"]
    assert [p.container_id for p in pods.all()] == ["b", "d"]
    assert [p.container_id for p in CniPods(path).all()] == ["b", "d"]


def test_keep_only_with_everything_valid_releases_nothing(tmp_path: Path) -> None:
    pods = CniPods(tmp_path / "cni-pods.json")
    pods.add(cni_pod("a"))
    assert pods.keep_only(iter(["a"])) == []
    assert pods.keep_only(["a", "b"]) == []
    assert [p.container_id for p in pods.all()] == ["a"]


def test_keep_only_with_nothing_valid_releases_everything(tmp_path: Path) -> None:
    path = tmp_path / "cni-pods.json"
    pods = CniPods(path)
    pods.add(cni_pod("a"))
    pods.add(cni_pod("b"))
    assert sorted(pods.keep_only([])) == ["a", "b"]
    assert CniPods(path).all() == ()


def test_forget_vanished_drops_pods_whose_netns_is_gone(tmp_path: Path) -> None:
    path = tmp_path / "cni-pods.json"
    netns = {cid: tmp_path / f"netns-{cid}" for cid in ("a", "b", "c")}
    for file in netns.values():
        file.touch()
    pods = CniPods(path)
    for cid, file in netns.items():
        pods.add(cni_pod(cid, netns=str(file)))

    netns["b"].unlink()
    assert pods.forget_vanished() == ["b"]
    assert [p.container_id for p in pods.all()] == ["a", "c"]
    assert [p.container_id for p in CniPods(path).all()] == ["a", "c"]
    assert pods.forget_vanished() == []


def test_forget_vanished_after_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "cni-pods.json"
    kept = tmp_path / "netns-kept"
    kept.touch()
    before = CniPods(path)
    before.add(cni_pod("kept", netns=str(kept)))
    before.add(cni_pod("gone", netns=str(tmp_path / "never-existed")))

    after = CniPods(path)
    assert after.forget_vanished() == ["gone"]
    assert [p.container_id for p in CniPods(path).all()] == ["kept"]


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b'[{"container_id": "a", ', id="truncated"),
        pytest.param(b"\xff\xfe not utf-8", id="not-utf8"),
        pytest.param(b"null", id="null"),
        pytest.param(b"[1]", id="record-not-an-object"),
        pytest.param(b'{"a": 1}', id="object-not-a-list"),
        pytest.param(b'[{"container_id": "a"}]', id="record-missing-fields"),
        pytest.param(
            json.dumps([{**asdict(cni_pod()), "surprise": 1}]).encode(),
            id="record-unknown-field",
        ),
        pytest.param(json.dumps([{**asdict(cni_pod()), "ips": 5}]).encode(), id="ips-not-a-list"),
    ],
)
def test_damaged_file_starts_an_empty_registry_and_logs(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "cni-pods.json"
    path.write_bytes(content)
    with capture_logs() as logs:
        pods = CniPods(path)
    assert pods.all() == ()
    errors = [e for e in logs if e["log_level"] == "error"]
    assert len(errors) == 1 and errors[0]["path"] == str(path)
    # And it still works: the next change writes a good file.
    pods.add(cni_pod("a"))
    assert CniPods(path).all() == (cni_pod("a"),)
