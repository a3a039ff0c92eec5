"""The lab and demo as a user drives them: real agent processes, the CLI, bpftool."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.lab.agents import lab_agent_pids, lab_pin_root

pytestmark = pytest.mark.kernel


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", *args], capture_output=True, text=True, check=check,
        timeout=300,
    )  # fmt: skip


def assert_nothing_left(name: str) -> None:
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"{name}-" not in netns
    assert not lab_pin_root(name).exists()
    assert lab_agent_pids(name) == []
    assert not Path(f"/run/ambient-lab/{name}").exists()


@pytest.fixture
def lab_name() -> Iterator[str]:
    name = "te" + uuid.uuid4().hex[:6]
    yield name
    cli("lab", "down", "--name", name, check=False)


def test_demo_shows_the_three_paths_with_verified_identities_and_cleans_up(
    lab_name: str,
) -> None:
    done = cli("demo", "--json", "--name", lab_name, check=False)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["ok"] is True
    cross, same, plaintext = result["steps"]
    for step in (cross, same):
        assert step["facts"]["source_identity_verified_by_server"] == (
            "spiffe://cluster.local/ns/default/sa/client-a"
        )
        assert step["facts"]["server_saw"].startswith("10.240.1.2:")
    assert cross["facts"]["destination_identity_verified_by_client"].endswith("/sa/server-b")
    assert same["facts"]["destination_identity_verified_by_client"].endswith("/sa/server-a")
    assert plaintext["facts"]["server_saw"].startswith("10.240.2.4:")
    assert all(all(step["checks"].values()) for step in result["steps"])
    kernel = result["kernel"]
    assert kernel["node-1"]["verdicts"]["DELIVER_OUTBOUND_LISTENER"] >= 2
    assert kernel["node-2"]["verdicts"]["DELIVER_INBOUND_LISTENER"] >= 1
    assert kernel["node-2"]["verdicts"]["PASS_HBONE"] >= 1
    assert_nothing_left(lab_name)


def _status(name: str) -> dict[str, Any]:
    status: dict[str, Any] = json.loads(cli("lab", "status", "--json", "--name", name).stdout)
    return status


def test_lab_commands_and_recovery_after_agents_are_killed(lab_name: str) -> None:
    cli("lab", "up", "--name", lab_name)
    status = _status(lab_name)
    assert status["up"] is True
    assert {n["name"] for n in status["nodes"]} == {"node-1", "node-2"}
    pods = {p["name"]: p for p in status["pods"]}
    client = pods["client-a"]
    assert (client["netns"], client["ip"], client["ambient"]) == (
        f"{lab_name}-client-a", "10.240.1.2", True,
    )  # fmt: skip
    assert pods["outsider"]["ambient"] is False
    assert all(agent["running"] for agent in status["agents"].values())

    shown = cli("lab", "exec", "--name", lab_name, "client-a", "--", "ip", "-4", "addr", "show")
    assert "10.240.1.2/24" in shown.stdout

    # The agents' maps, printed field by field by bpftool while the lab is up.
    pods_map = lab_pin_root(lab_name) / "node-1" / "maps" / "pods"
    dump = subprocess.run(
        ["bpftool", "map", "dump", "pinned", str(pods_map)], capture_output=True, text=True,
        check=True,
    ).stdout  # fmt: skip
    assert '"outbound_captured":' in dump and '"flags": 1' in dump
    node_pins = str(pods_map.parents[1])
    ctl = subprocess.run(
        [sys.executable, "-m", "agent.ctl", "pods", "--json", "--pin-dir", node_pins],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert [p["ip"] for p in json.loads(ctl.stdout)[node_pins]] == [
        "10.240.1.2", "10.240.1.3",
    ]  # fmt: skip

    # A crash: agents die without unenrolling or unpinning. `lab down` still cleans up.
    for pid in lab_agent_pids(lab_name):
        os.kill(pid, signal.SIGKILL)
    assert lab_pin_root(lab_name).exists()
    cli("lab", "down", "--name", lab_name)
    assert_nothing_left(lab_name)
    cli("lab", "down", "--name", lab_name)  # idempotent
    assert _status(lab_name)["up"] is False


def test_lab_exec_names_the_unknown_target(lab_name: str) -> None:
    cli("lab", "up", "--no-agents", "--name", lab_name)
    done = cli("lab", "exec", "--name", lab_name, "nosuchpod", "--", "true", check=False)
    assert done.returncode == 1
    assert "no node or pod 'nosuchpod'" in done.stderr
