"""The mesh every DNS test asks about."""

from __future__ import annotations

import pytest

from agent.dns.names import MeshNames
from agent.state.service import Service
from agent.state.store import MeshState

SERVICES = (
    Service("echo", "default", "echo.default.svc.cluster.local", ("10.96.0.10", "fd00::10")),
    Service("echo", "other", "echo.other.svc.cluster.local", ("10.96.1.10",)),
    Service("v4only", "default", "v4only.default.svc.cluster.local", ("10.96.0.11",)),
    Service("db", "default", "db.default.svc.cluster.local", ()),  # headless
    # A hostname outside the cluster domain, as a ServiceEntry gives one.
    Service("api", "default", "api.example.com", ("240.240.0.1",)),
)


@pytest.fixture
def names() -> MeshNames:
    return MeshNames.of(MeshState(services=SERVICES))
