"""Config edits on agent processes in the lab: a file that is empty or holds a bad value is
refused, the last good state stays in force (pods enrolled, capture on) and readiness says
so; a relabelled pod is updated in place, its live connections untouched."""

from __future__ import annotations

import json
import socket
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.netns import NetnsWorker
from lab import agents, control, probes
from lab.network import LabState

pytestmark = pytest.mark.kernel

ECHO_PORT = 9400


@pytest.fixture(scope="module")
def lab() -> Iterator[LabState]:
    name = "cc" + uuid.uuid4().hex[:6]
    try:
        yield control.up(name, None)
    finally:
        control.down(name)


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


def in_node(lab: LabState, node: str, url: str) -> tuple[int, str]:
    netns = next(n for n in lab.nodes if n.name == node).netns_path

    def inside() -> tuple[int, str]:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    worker = NetnsWorker(str(netns))
    try:
        return worker.call(inside)
    finally:
        worker.close()


def readiness(lab: LabState, node: str) -> tuple[int, str]:
    return in_node(lab, node, "http://127.0.0.1:15021/healthz/ready")


def wait_ready(lab: LabState, node: str) -> None:
    deadline = time.monotonic() + 10
    while readiness(lab, node)[0] != 200:
        assert time.monotonic() < deadline, readiness(lab, node)
        time.sleep(0.05)


def events_after(lab: LabState, node: str, count: int) -> list[dict[str, Any]]:
    return probes.agent_events(lab, node)[count:]


def wait_for(lab: LabState, node: str, since: int, event: str) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while True:
        found = [e for e in events_after(lab, node, since) if e.get("event") == event]
        if found:
            return found[0]
        assert time.monotonic() < deadline, f"no {event!r} on {node}"
        time.sleep(0.05)


def enrolled(lab: LabState, node: str) -> list[str]:
    _, body = in_node(lab, node, "http://127.0.0.1:15000/config_dump")
    names: list[str] = json.loads(body)["enrolled"]
    return names


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
    before = enrolled(lab, "node-1")
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
    assert enrolled(lab, "node-1") == before
    client, server = probes.pod(lab, "client-a"), probes.pod(lab, "server-b")
    with probes.whoami_server(server, 9401):
        exchange = probes.talk(client.netns_path, server.ip, 9401, "still meshed")
    assert exchange.reply.startswith("peer=")
    captured = wait_for(lab, "node-1", since, "connection captured")
    assert captured["dst.addr"] == f"{server.ip}:9401"
    # A good file again: in force, and ready.
    document = yaml.safe_load(text)
    document["workloads"][0]["labels"]["edited"] = "yes"
    write(config, yaml.safe_dump(document, sort_keys=False))
    wait_for(lab, "node-1", since, "config reloaded")
    wait_ready(lab, "node-1")


class Held:
    """A connection from a pod to an echo server, kept open across a change."""

    def __init__(self, lab: LabState, source: str, host: str, port: int) -> None:
        worker = NetnsWorker(str(probes.pod(lab, source).netns_path))
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


def test_a_relabelled_pod_is_updated_in_place_under_live_connections(
    lab: LabState, config: Path
) -> None:
    server = probes.pod(lab, "server-b")
    code = f"from bench.datapath import serve_echo; serve_echo({ECHO_PORT})"
    with probes.pod_server(server, ECHO_PORT, [sys.executable, "-c", code]):
        held = Held(lab, "client-a", server.ip, ECHO_PORT)
        try:
            assert held.echo(b"before") == b"before"
            since = len(probes.agent_events(lab, "node-2"))
            document = yaml.safe_load(config.read_text())
            for workload in document["workloads"]:
                if workload["name"] == "server-b":
                    workload["labels"] = {**workload["labels"], "version": "v2"}
            write(config, yaml.safe_dump(document, sort_keys=False))
            wait_for(lab, "node-2", since, "config reloaded")
            wait_ready(lab, "node-2")
            assert held.echo(b"after the relabel") == b"after the relabel"
            later = events_after(lab, "node-2", since)
            assert not [e for e in later if e.get("event") in ("pod unenrolled", "pod enrolled")]
            _, body = in_node(lab, "node-2", "http://127.0.0.1:15000/config_dump")
            dumped = next(w for w in json.loads(body)["workloads"] if w["name"] == "server-b")
            assert dumped["labels"]["version"] == "v2"
        finally:
            held.sock.close()


def test_a_new_service_account_is_taken_in_place_by_new_handshakes(
    lab: LabState, config: Path
) -> None:
    server = probes.pod(lab, "server-b")
    code = f"from bench.datapath import serve_echo; serve_echo({ECHO_PORT + 1})"
    with probes.pod_server(server, ECHO_PORT + 1, [sys.executable, "-c", code]):
        held = Held(lab, "client-a", server.ip, ECHO_PORT + 1)
        try:
            assert held.echo(b"as server-b") == b"as server-b"
            since = len(probes.agent_events(lab, "node-2"))
            document = yaml.safe_load(config.read_text())
            for workload in document["workloads"]:
                if workload["name"] == "server-b":
                    workload["serviceAccount"] = "server-b-v2"
            write(config, yaml.safe_dump(document, sort_keys=False))
            wait_for(lab, "node-2", since, "pod identity changed in place")
            assert held.echo(b"still open") == b"still open"
            with probes.whoami_server(server, 9402):
                exchange = probes.talk(probes.pod(lab, "client-a").netns_path, server.ip, 9402,
                                       "new handshake")  # fmt: skip
            assert exchange.reply.startswith("peer=")
            deadline = time.monotonic() + 10
            while not (
                done := [e for e in events_after(lab, "node-2", since) if _to_port(e, 9402)]
            ):
                assert time.monotonic() < deadline, "no connection complete for :9402 on node-2"
                time.sleep(0.05)
            assert done[-1]["dst.identity"].endswith("/sa/server-b-v2")
            later = events_after(lab, "node-2", since)
            assert not [e for e in later if e.get("event") in ("pod unenrolled", "pod enrolled")]
        finally:
            held.sock.close()


def _to_port(event: dict[str, Any], port: int) -> bool:
    return event.get("event") == "connection complete" and str(event.get("dst.addr", "")).endswith(
        f":{port}"
    )
