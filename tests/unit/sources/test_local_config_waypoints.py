"""What the local config holds for waypoints: HTTPRoutes, policies attached by targetRefs,
ports' application protocols, and the allow-only-waypoint option (as L4 policies)."""

from __future__ import annotations

import pytest

from agent.sources.local_config import ConfigError, parse_local_config
from agent.sources.local_source import mesh_state_of
from agent.state.policy import WorkloadSelectorTarget, applies_to
from agent.state.store import MeshState
from agent.state.waypoint_only import POLICY_PREFIX
from agent.state.waypoint_policy import WaypointAction

CONFIG = """
workloads:
  - {uid: c, name: client, namespace: default, serviceAccount: client,
     workloadIps: [10.240.1.2], protocol: HBONE, node: n1}
  - {uid: e, name: echo-a, namespace: default, serviceAccount: echo,
     workloadIps: [10.240.1.3], protocol: HBONE, node: n1,
     services: {default/echo.default.svc.cluster.local: {}}}
  - {uid: w, name: waypoint, namespace: default, serviceAccount: waypoint,
     workloadIps: [10.240.1.4], protocol: TCP, node: n1,
     services: {default/waypoint.default.svc.cluster.local: {15008: 15008}}}
services:
  - name: echo
    namespace: default
    vips: [10.96.0.20]
    ports: {80: 8080}
    appProtocols: {80: HTTP}
    waypoint: {destination: 10.96.0.50, name: waypoint, namespace: default,
               allowOnlyWaypoint: %s}
  - {name: waypoint, namespace: default, vips: [10.96.0.50], ports: {15008: 15008}}
policies:
  - apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {name: deny-admin, namespace: default}
    spec:
      targetRefs: [{kind: Service, group: "", name: echo}]
      action: DENY
      rules: [{to: [{operation: {paths: ["/admin*"]}}]}]
httpRoutes:
  - apiVersion: gateway.networking.k8s.io/v1
    kind: HTTPRoute
    metadata: {name: echo, namespace: default}
    spec:
      parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
      rules: [{backendRefs: [{name: echo, port: 80}]}]
"""


def mesh_state_from_text(text: str) -> MeshState:
    return mesh_state_of(parse_local_config(text, "mesh.yaml"))


def test_routes_waypoint_policies_and_protocols_are_read() -> None:
    config = parse_local_config(CONFIG % "false", "mesh.yaml")
    assert [r.key for r in config.routes] == ["default/echo"]
    assert config.policies == ()  # the targetRefs policy is the waypoint's, not L4
    (policy,) = config.waypoint_policies
    assert (policy.key, policy.action) == ("default/deny-admin", WaypointAction.DENY)
    echo = next(s for s in config.services if s.name == "echo")
    assert echo.declares_http(80) and not echo.declares_http(81)


def test_allow_only_waypoint_admits_the_waypoint_identity_at_the_pods_it_serves() -> None:
    assert mesh_state_from_text(CONFIG % "false").policies == ()
    state = mesh_state_from_text(CONFIG % "true")
    (guard,) = state.policies
    assert guard.key == f"default/{POLICY_PREFIX}waypoint"
    assert guard.workload_uids == ("e",)  # echo-a backs the bound Service; client does not
    assert applies_to(guard, WorkloadSelectorTarget("default", {}, "e"))
    assert not applies_to(guard, WorkloadSelectorTarget("default", {}, "c"))
    (((match,),),) = guard.rules
    assert [p.value for p in match.principals] == ["cluster.local/ns/default/sa/waypoint"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("allowOnlyWaypoint: true", "allowOnlyWaypoint: maybe"), "must be true or false"),
        (("appProtocols: {80: HTTP}", "appProtocols: [http]"), "appProtocols must be a mapping"),
        (
            ("rules: [{backendRefs", "bogus: 1\n      rules: [{backendRefs"),
            "HTTPRoute default/echo",
        ),
        (('paths: ["/admin*"]', 'paths: ["/admin/{*}"]'), "policy default/deny-admin"),
    ],
)
def test_a_broken_waypoint_entry_refuses_the_file(change: tuple[str, str], message: str) -> None:
    text = (CONFIG % "true").replace(*change)
    with pytest.raises(ConfigError, match=r"mesh\.yaml:") as caught:
        parse_local_config(text, "mesh.yaml")
    assert message in str(caught.value)
