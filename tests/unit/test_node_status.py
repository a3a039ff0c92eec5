"""What the admin endpoints show, built from a NodeStatus without a kernel."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from agent.node_status import NodeStatus
from agent.state.service import Service
from agent.state.store import MeshState, StateStore
from agent.telemetry.connections import ConnectionTelemetry


def status_with(state: MeshState) -> NodeStatus:
    status = NodeStatus(
        "node-1", Path("/sys/fs/bpf/x"), asyncio.Event(), ConnectionTelemetry(False)
    )
    status.store = StateStore(state)
    return status


def test_the_config_dump_shows_services_with_their_ports() -> None:
    service = Service("web", "shop", "web.shop.svc.cluster.local", ("10.96.0.10",), {80: 8080})
    dump = status_with(MeshState(services=(service,))).config_dump()
    (shown,) = json.loads(json.dumps(dump))["services"]
    assert shown == {"name": "web", "namespace": "shop", "hostname": service.hostname,
                     "vips": ["10.96.0.10"], "ports": {"80": 8080}}  # fmt: skip


class Rejecting:
    rejected = "config rejected, the last good one stays in force: mesh.yaml: the file is empty"


def test_readiness_names_a_rejected_config() -> None:
    status = status_with(MeshState())
    status.source = Rejecting()
    assert Rejecting.rejected in status.not_ready()
