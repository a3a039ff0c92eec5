"""Policy changes and live connections (agent in-process, tests/support/inprocess_mesh.py).

By default a policy change applies to new connections only. With --cut-denied-connections,
the agent re-asks the kernel about each live inbound connection (policy_probe) and resets
those the new policies deny.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import pytest

from agent.proxy.live_inbound import POLICY_CUT
from lab import probes
from tests.support.held import HeldConnection
from tests.support.inprocess_mesh import APP, Mesh, mesh_fixture, whoami_everywhere
from tests.support.waiting import eventually

pytestmark = pytest.mark.kernel


@pytest.fixture(scope="module")
def mesh() -> Iterator[Mesh]:
    yield from mesh_fixture("tl")


@pytest.fixture(scope="module")
def servers(mesh: Mesh) -> Iterator[None]:
    yield from whoami_everywhere(mesh)


def deny_both(mesh: Mesh) -> list[dict[str, object]]:
    return [
        {"name": "deny-outsider", "namespace": "default", "scope": "WorkloadSelector",
         "selector": {"matchLabels": {"app": "server-b"}}, "action": "Deny",
         "rules": [{"clauses": [{"matches": [{"sourceIps": [mesh.pod("outsider").ip]}]}]}]},
        {"name": "deny-client-a", "namespace": "default", "scope": "WorkloadSelector",
         "selector": {"matchLabels": {"app": "server-b"}}, "action": "Deny",
         "rules": [{"clauses": [{"matches": [
             {"principals": [{"exact": "cluster.local/ns/default/sa/client-a"}]}]}]}]},
    ]  # fmt: skip


def completed(mesh: Mesh, client: str) -> dict[str, object] | None:
    """server-b's agent's access log line of the last connection from `client`, if any."""
    ip = mesh.pod(client).ip
    lines = [e for e in mesh.events("connection complete", reporter="destination")
             if str(e["src.addr"]).split(":")[0] == ip]  # fmt: skip
    return lines[-1] if lines else None


def held_to_server_b(mesh: Mesh, pod: str) -> HeldConnection:
    return HeldConnection(mesh.pod(pod).netns_path, mesh.pod("server-b").ip, APP)


def test_live_connections_are_kept_by_default_and_cut_when_asked(mesh: Mesh, servers: None) -> None:
    plaintext, tunnelled = held_to_server_b(mesh, "outsider"), held_to_server_b(mesh, "client-a")
    try:
        assert (plaintext.exchange(), tunnelled.exchange()) == ("reply", "reply")
        mesh.set_policies(deny_both(mesh))
        # The default: the change applies to new connections only.
        assert (plaintext.exchange(), tunnelled.exchange()) == ("reply", "reply")
        outcome, _ = probes.try_connect(mesh.pod("outsider").netns_path,
                                        mesh.pod("server-b").ip, APP, timeout=1.5)  # fmt: skip
        assert outcome == "timeout"  # a new plaintext connection is dropped in the kernel
        # Asked for: the kernel re-checks each live inbound connection; both are now denied.
        live = mesh.proxy.live_connections()
        assert {c.src_ip for c in live} >= {mesh.pod("outsider").ip, mesh.pod("client-a").ip}
        assert mesh.loop.call(mesh.policy.cut_denied, live) == 2
        assert (plaintext.exchange(), tunnelled.exchange()) == ("reset", "reset")
        cut = mesh.events("connection cut by a policy change")
        assert {e["policy"] for e in cut} == {"default/deny-outsider", "default/deny-client-a"}
        # And each connection's access log line says so, the plaintext one too.
        for client in ("outsider", "client-a"):
            line = eventually(functools.partial(completed, mesh, client), f"{client}'s line")
            assert line["error"] == POLICY_CUT, line
    finally:
        plaintext.close()
        tunnelled.close()
        mesh.set_policies([])


def test_cutting_spares_connections_the_policies_still_allow(mesh: Mesh, servers: None) -> None:
    held = held_to_server_b(mesh, "client-a")
    try:
        assert held.exchange() == "reply"
        mesh.set_policies(deny_both(mesh)[:1])  # only the outsider is denied
        assert mesh.loop.call(mesh.policy.cut_denied, mesh.proxy.live_connections()) == 0
        assert held.exchange() == "reply"
    finally:
        held.close()
        mesh.set_policies([])
