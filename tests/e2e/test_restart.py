"""A node agent restarted under a stream of connections (a new one every 2 ms) lets nothing
past the mesh: killed, stopped, or replaced by one that compiles new programs. tcpdump on the
lab's bridge is the witness for plaintext, the app's own count for denied connections; the
same capture seeing the out-of-mesh client's plaintext shows the witness can see some."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from bench import restart
from lab.network import LabState
from tests.support.labs import running_lab

pytestmark = pytest.mark.kernel


@pytest.fixture
def lab() -> Iterator[LabState]:
    with running_lab("rs") as lab:
        yield lab


def test_restarts_under_a_connection_stream_fail_closed(lab: LabState) -> None:
    report = restart.measure(lab, rounds=1)
    print(restart.format_report(report))
    assert report.plaintext_packets_from_client == 0
    assert report.denied_connections_reaching_app == 0
    assert report.witness_packets_from_outsider > 0
    # Killed and stopped agents hand their pins on; a changed build compiles anew.
    assert report.adopted == {"kill": [True], "term": [True], "recompile": [False]}
    assert report.client_outcomes.get("reply", 0) > 0
    assert report.outsider_outcomes.get("reply", 0) == 0
