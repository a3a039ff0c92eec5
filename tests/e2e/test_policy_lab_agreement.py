"""Way three of three: every case of the semantics table with real connections in the lab.

The lab reproduces the table's world (world-topology.yaml): the same addresses and
identities, with agent processes. For each case the agents' config gets the case's policies
(a rewrite of the file, as a user would make it), and the source connects to the server for
real: an enrolled source through HBONE (the destination agent's connect to the app is what
agent_connect4 decides, from the identity verified in TLS), the out-of-mesh source in
plaintext (decided by pod_ingress; a denied SYN is dropped, so the client times out). The
outcome must be the table's verdict, and an HBONE denial must name the table's policy.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.netns import NetnsWorker
from agent.sources.authorization_policy import to_local_document
from agent.state.policy import Reason, Verdict
from lab import probes
from lab.network import LabState, load_state
from tests.support.policy_cases import CASES, Case

pytestmark = pytest.mark.kernel

TOPOLOGY = Path(__file__).parents[1] / "support" / "policy-world-topology.yaml"
SOURCES = {"10.240.1.2": "client", "10.240.1.5": "client-other", "10.240.1.9": "admin",
           "10.240.9.9": "plain"}  # fmt: skip
PLAINTEXT_TIMEOUT = 2.0


def cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "agent", *args], check=True, capture_output=True,
                   timeout=300)  # fmt: skip


@pytest.fixture(scope="module")
def world() -> Iterator[LabState]:
    name = "tw" + uuid.uuid4().hex[:6]
    try:
        cli("lab", "up", "--name", name, "--topology", str(TOPOLOGY))
        state = load_state(name)
        assert state is not None
        server = probes.pod(state, "server")
        with probes.whoami_server(server, 8080), probes.whoami_server(server, 9090):
            yield state
    finally:
        subprocess.run([sys.executable, "-m", "agent", "lab", "down", "--name", name],
                       check=False, capture_output=True)  # fmt: skip


def _log(state: LabState, node: str) -> list[dict[str, Any]]:
    return probes.agent_events(state, node)


def _apply(state: LabState, case: Case, number: int) -> None:
    # A policy that applies to nobody makes every case's file differ, so every case reloads.
    marker = {"name": f"case-{number}", "namespace": "marker", "scope": "Namespace",
              "action": "Deny", "rules": []}  # fmt: skip
    documents = [marker, *(to_local_document(p) for p in case.policies)]
    probes.apply_policies(state, documents, ("node-2",))


def _attempt(state: LabState, case: Case) -> tuple[Verdict, str]:
    """Connect for real; the verdict the mesh gave, and the client's address."""
    conn = case.conn
    source = probes.pod(state, SOURCES[conn.src_ip])
    plaintext = conn.src_identity is None

    def inside() -> tuple[Verdict, str]:
        with socket.socket() as sock:
            sock.bind((conn.src_ip, 0))
            client = f"{conn.src_ip}:{sock.getsockname()[1]}"
            sock.settimeout(PLAINTEXT_TIMEOUT if plaintext else 5.0)
            try:
                sock.connect((conn.dst_ip, conn.dst_port))
                sock.sendall(b"policy\n")
                reply = sock.makefile("r").readline()
            except (TimeoutError, ConnectionResetError, ConnectionRefusedError):
                return Verdict.DENY, client
            return (Verdict.ALLOW if reply.startswith("peer=") else Verdict.DENY), client

    worker = NetnsWorker(str(source.netns_path))
    try:
        return worker.call(inside)
    finally:
        worker.close()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_real_connections_get_the_semantics_tables_verdict(world: LabState, case: Case) -> None:
    _apply(world, case, CASES.index(case))
    verdict, client = _attempt(world, case)
    assert verdict == case.expected.verdict
    if case.conn.src_identity is not None and verdict is Verdict.DENY:
        # The destination agent answered 401 with the kernel's reason and policy.
        deadline = time.monotonic() + 5
        while not (lines := [e for e in _log(world, "node-2")
                             if e.get("event") == "connection complete"
                             and e.get("src.addr") == client]):  # fmt: skip
            assert time.monotonic() < deadline, "no access log line for the denied tunnel"
            time.sleep(0.05)
        error = str(lines[-1].get("error"))
        expected = case.expected
        assert error.startswith(f"denied: {expected.reason.value}"), json.dumps(lines[-1])
        if expected.reason is Reason.DENIED_BY_POLICY:
            assert f"({expected.policy})" in error
