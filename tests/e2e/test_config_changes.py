"""Config edits on agent processes in the lab: a file that is empty or holds a bad value is
refused, the last good state stays in force (pods enrolled, capture on) and readiness says
so; a relabelled pod is updated in place, its live connections untouched."""

from __future__ import annotations

import contextlib
import json
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.netns import NetnsWorker
from lab import agents, probes
from lab.network import LabState
from tests.support.labs import running_lab

pytestmark = pytest.mark.kernel

ECHO_PORT = 9400


@pytest.fixture(scope="module")
def lab() -> Iterator[LabState]:
    with running_lab("cc") as lab:
        yield lab


@pytest.fixture
def config(lab: LabState) -> Iterator[Path]:
    """The lab's config file, put back as it was after the test."""
    path = agents.lab_dir(lab.name) / "mesh.yaml"
    original = path.read_text()
    try:
        yield path
    finally:
        write(path, original)
        wait_ready(lab, "node-1")


def write(path: Path, text: str) -> None:
    partial = path.with_suffix(".partial")
    partial.write_text(text)
    partial.replace(path)


def readiness(lab: LabState, node: str) -> tuple[int, str]:
    return probes.admin_get(lab, node, "http://127.0.0.1:15021/healthz/ready")


def wait_ready(lab: LabState, node: str) -> None:
    deadline = time.monotonic() + 10
    while readiness(lab, node)[0] != 200:
        assert time.monotonic() < deadline, readiness(lab, node)
        time.sleep(0.05)


def wait_for(lab: LabState, node: str, since: int, event: str, **match: str) -> dict[str, Any]:
    found = probes.wait_for_event(lab, node, 10, since, event=event, **match)
    assert found is not None, f"no {event!r} {match} on {node}"
    return found


def config_dump(lab: LabState, node: str) -> dict[str, Any]:
    _, body = probes.admin_get(lab, node, "http://127.0.0.1:15000/config_dump")
    dump: dict[str, Any] = json.loads(body)
    return dump


def edit_workload(config: Path, name: str, **fields: Any) -> None:
    document = yaml.safe_load(config.read_text())
    for workload in document["workloads"]:
        if workload["name"] == name:
            workload.update(fields)
    write(config, yaml.safe_dump(document, sort_keys=False))


def no_reenrollment(lab: LabState, node: str, since: int) -> bool:
    later = probes.agent_events(lab, node)[since:]
    return not [e for e in later if e.get("event") in ("pod unenrolled", "pod enrolled")]


def emptied(text: str) -> str:
    return ""


def cut_mid_address(text: str) -> str:
    """Where a copy cut short most often ends: mid-value. (One cut exactly between two
    entries is a valid, smaller file: no parser can tell; the source reads a file only once
    it has stopped changing.)"""
    return text[: text.index("10.240.1.3") + len("10.240")]


def null_section(text: str) -> str:
    return "workloads:\n"


def bad_service_account_on_node_2(text: str) -> str:
    return text.replace("serviceAccount: server-b", "serviceAccount: bad sa")


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (emptied, "the file is empty"),
        (cut_mid_address, "workload is missing 'node'"),
        (null_section, "workloads must be a list"),
        (bad_service_account_on_node_2, "serviceAccount 'bad sa'"),
    ],
)
def test_a_refused_config_keeps_the_last_good_state_and_says_so(
    lab: LabState, config: Path, edit: Any, reason: str
) -> None:
    before = config_dump(lab, "node-1")["enrolled"]
    assert before
    since = len(probes.agent_events(lab, "node-1"))
    text = config.read_text()
    edited = edit(text)
    assert edited != text
    write(config, edited)
    rejected = wait_for(lab, "node-1", since, "config rejected")
    assert reason in rejected["error"]
    status, body = readiness(lab, "node-1")
    assert status == 503 and "config rejected, the last good one stays in force" in body
    assert config_dump(lab, "node-1")["enrolled"] == before
    client, server = probes.pod(lab, "client-a"), probes.pod(lab, "server-b")
    with probes.whoami_server(server, 9401):
        exchange = probes.talk(client.netns_path, server.ip, 9401, "still meshed")
    assert exchange.reply.startswith("peer=")
    captured = wait_for(lab, "node-1", since, "connection complete", direction="outbound")
    assert captured["dst.addr"] == f"{server.ip}:9401"
    # A good file again: in force, and ready.
    write(config, text)
    edit_workload(config, "client-a", labels={"app": "client-a", "edited": "yes"})
    wait_for(lab, "node-1", since, "config reloaded")
    wait_ready(lab, "node-1")


class Held:
    """A connection from client-a to an echo server in server-b, kept open across a change."""

    def __init__(self, lab: LabState, host: str, port: int) -> None:
        worker = NetnsWorker(str(probes.pod(lab, "client-a").netns_path))
        try:
            self.sock = worker.call(lambda: socket.create_connection((host, port), timeout=5))
        finally:
            worker.close()

    def echo(self, data: bytes) -> bytes:
        self.sock.sendall(data)
        got = b""
        while len(got) < len(data):
            chunk = self.sock.recv(len(data) - len(got))
            if not chunk:
                raise ConnectionError("closed by the mesh")
            got += chunk
        return got


@contextlib.contextmanager
def held_connection(lab: LabState, port: int) -> Iterator[Held]:
    server = probes.pod(lab, "server-b")
    code = f"from bench.datapath import serve_echo; serve_echo({port})"
    with probes.pod_server(server, port, [sys.executable, "-c", code]):
        held = Held(lab, server.ip, port)
        try:
            assert held.echo(b"before") == b"before"
            yield held
        finally:
            held.sock.close()


def test_a_relabelled_pod_is_updated_in_place_under_live_connections(
    lab: LabState, config: Path
) -> None:
    with held_connection(lab, ECHO_PORT) as held:
        since = len(probes.agent_events(lab, "node-2"))
        edit_workload(config, "server-b", labels={"app": "server-b", "version": "v2"})
        wait_for(lab, "node-2", since, "config reloaded")
        wait_ready(lab, "node-2")
        assert held.echo(b"after the relabel") == b"after the relabel"
        assert no_reenrollment(lab, "node-2", since)
        dumped = next(w for w in config_dump(lab, "node-2")["workloads"]
                      if w["name"] == "server-b")  # fmt: skip
        assert dumped["labels"]["version"] == "v2"


def test_a_new_service_account_is_taken_in_place_by_new_handshakes(
    lab: LabState, config: Path
) -> None:
    with held_connection(lab, ECHO_PORT + 1) as held:
        since = len(probes.agent_events(lab, "node-2"))
        edit_workload(config, "server-b", serviceAccount="server-b-v2")
        wait_for(lab, "node-2", since, "pod identity changed in place")
        assert held.echo(b"still open") == b"still open"
        server = probes.pod(lab, "server-b")
        with probes.whoami_server(server, 9402):
            exchange = probes.talk(probes.pod(lab, "client-a").netns_path, server.ip, 9402,
                                   "new handshake")  # fmt: skip
        assert exchange.reply.startswith("peer=")
        done = wait_for(lab, "node-2", since, "connection complete", dst__addr=f"{server.ip}:9402")
        assert done["dst.identity"].endswith("/sa/server-b-v2")
        assert no_reenrollment(lab, "node-2", since)
