"""`ambient-agent bench --soak`, small (200 connections, 6 s, an echo a second): it holds every
connection through the mesh with no error, samples both agents, and leaves nothing behind.
The full run (10,000 for 10 minutes) is a bench, not a test."""

from __future__ import annotations

import pytest

from bench import soak
from tests.support.labs import running_lab

pytestmark = pytest.mark.kernel


def test_a_quick_soak_holds_every_connection() -> None:
    with running_lab("sq") as lab:
        report = soak.measure(lab, connections=200, seconds=6, every=1.0)
    print(soak.format_report(report))
    assert report.established == 200 and report.errors == {}
    assert report.round_trips >= 200 * 4  # about 5 echoes each in 6 s
    assert set(report.agents) == {"start", "peak", "end"}
    assert all(s.fds > 0 for s in report.agents["end"].values())
