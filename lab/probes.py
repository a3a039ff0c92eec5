"""Things a demo or test does inside the lab: serve in a pod, connect from a pod, read what
the node agents logged about the connection."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from agent.netns import NetnsWorker
from lab.network import STATE_ROOT, LabState, PodState


@dataclass(frozen=True)
class Exchange:
    """One request/reply from a pod: where the client stood and what the server saw."""

    client: str  # ip:port of the client socket
    reply: str
    server_saw: str  # the peer address the whoami server reported


def pod(state: LabState, name: str) -> PodState:
    for candidate in state.pods:
        if candidate.name == name:
            return candidate
    raise KeyError(name)


def talk(netns_path: Path, host: str, port: int, message: str, timeout: float = 5.0) -> Exchange:
    """Connect from inside a netns, send a line, read the whoami reply."""

    def inside() -> Exchange:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            local = sock.getsockname()
            sock.sendall(message.encode() + b"\n")
            reply = sock.makefile("r").readline().strip()
        fields = dict(part.split("=", 1) for part in reply.split(" ") if "=" in part)
        return Exchange(f"{local[0]}:{local[1]}", reply, fields.get("peer", ""))

    worker = NetnsWorker(str(netns_path))
    try:
        return worker.call(inside)
    finally:
        worker.close()


class PodServerError(RuntimeError):
    pass


SERVER_START_TIMEOUT = 15.0


@contextlib.contextmanager
def pod_server(target: PodState, port: int, argv: list[str]) -> Iterator[None]:
    """A server process in the pod's netns, listening on `port` for the duration of the
    block, and always stopped afterwards."""
    proc = subprocess.Popen(
        ["ip", "netns", "exec", target.netns, *argv],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_listening(target, port, proc, argv[0])
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


def whoami_server(target: PodState, port: int = 8080) -> contextlib.AbstractContextManager[None]:
    return pod_server(target, port, [sys.executable, "-m", "lab.whoami", "--port", str(port)])


def wait_listening(target: PodState, port: int, proc: subprocess.Popen[Any], what: str) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise PodServerError(f"{what} in {target.name} exited with {proc.returncode}: {err}")
        listening = subprocess.run(
            ["ip", "netns", "exec", target.netns, "ss", "-Hltn", f"sport = :{port}"],
            capture_output=True, text=True, timeout=10,
        ).stdout  # fmt: skip
        if listening.strip():
            return
        time.sleep(0.05)
    raise PodServerError(
        f"{what} in {target.name} not listening on {port} after {SERVER_START_TIMEOUT:.0f}s"
    )


def agent_events(state: LabState, node: str) -> list[dict[str, Any]]:
    log = Path(state.agents[node]["log"])
    events = []
    for line in log.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            events.append(json.loads(line))
    return events


def wait_for_event(
    state: LabState, node: str, timeout: float = 5.0, since: int = 0, **match: object
) -> dict[str, Any] | None:
    """The first event of the node's agent whose fields equal `match` (dots in keys as
    __, e.g. src__addr="10.0.0.1:4000"), waiting up to `timeout` seconds for it. `since`:
    only events after the first `since` of the log (a count taken before an action)."""
    wanted = {key.replace("__", "."): value for key, value in match.items()}
    deadline = time.monotonic() + timeout
    while True:
        for event in agent_events(state, node)[since:]:
            if all(event.get(key) == value for key, value in wanted.items()):
                return event
        if time.monotonic() > deadline:
            return None
        time.sleep(0.05)


def edit_config(state: LabState, edit: Callable[[dict[str, Any]], None]) -> None:
    """Change the lab's config as a user edits the file: read, `edit`, written atomically
    (the agents and waypoints follow it)."""
    config = STATE_ROOT / state.name / "mesh.yaml"
    document = yaml.safe_load(config.read_text())
    edit(document)
    partial = config.with_suffix(".partial")
    partial.write_text(yaml.safe_dump(document, sort_keys=False))
    partial.replace(config)


def apply_policies(
    state: LabState, documents: list[dict[str, Any]], nodes: tuple[str, ...], timeout: float = 10
) -> None:
    """Replace the policies in the lab's config, as a user edits the file (atomically), and
    wait until the agents of `nodes` have written them into the kernel: each has logged
    "policies applied" with as many policies since the write. Any later line would not do:
    an agent still applying an earlier edit logs one too (the demo met it, with the DENY
    it waited for not yet in force)."""
    config = Path(f"/run/ambient-lab/{state.name}/mesh.yaml")
    document = yaml.safe_load(config.read_text())
    since = {node: len(agent_events(state, node)) for node in nodes}
    if document.get("policies") == documents:
        return  # an unchanged file is not reloaded
    document["policies"] = documents
    partial = config.with_suffix(".partial")
    partial.write_text(yaml.safe_dump(document, sort_keys=False))
    partial.replace(config)
    for node in nodes:
        applied = wait_for_event(state, node, timeout, since[node], event="policies applied",
                                 policies=len(documents))  # fmt: skip
        if applied is None:
            raise TimeoutError(f"the agent on {node} did not apply the {len(documents)} policies")


def try_connect(netns: Path, host: str, port: int, timeout: float) -> tuple[str, str]:
    """(outcome, client address): "reply" (a whoami answer came back), "timeout" (nothing
    answered: a SYN dropped), "reset" or "closed" (refused after the connect)."""

    def inside() -> tuple[str, str]:
        with socket.socket() as sock:
            sock.settimeout(timeout)
            sock.bind(("0.0.0.0", 0))
            try:
                sock.connect((host, port))
                sock.sendall(b"hello\n")
                reply = sock.makefile("r").readline()
                outcome = "reply" if reply else "closed"
            except TimeoutError:
                outcome = "timeout"
            except ConnectionResetError:
                # Also from connect() itself, when the reset comes before the caller wakes.
                outcome = "reset"
            local = sock.getsockname()  # the address the connect took, even after a reset
            return outcome, f"{local[0]}:{local[1]}"

    worker = NetnsWorker(str(netns))
    try:
        return worker.call(inside)
    finally:
        worker.close()


@dataclass(frozen=True)
class Sample:
    name: str  # as exposed, e.g. istio_tcp_sent_bytes_total
    labels: dict[str, str]
    value: float


def http_request(
    netns_path: Path,
    url: str,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    timeout: float = 5.0,
) -> tuple[int, str]:
    """(status, body) of one HTTP request from inside a netns, never through a proxy the
    environment names; an HTTP error status is returned, not raised."""

    def inside() -> tuple[int, str]:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        request = urllib.request.Request(url, method=method, headers=headers or {})
        try:
            with opener.open(request, timeout=timeout) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    worker = NetnsWorker(str(netns_path))
    try:
        return worker.call(inside)
    finally:
        worker.close()


def parse_metrics(text: str) -> list[Sample]:
    return [
        Sample(sample.name, dict(sample.labels), sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


def scrape_waypoint(state: LabState, gateway: str) -> list[Sample]:
    """A lab waypoint's /stats/prometheus, fetched from inside its pod."""
    pod_name = state.waypoints[gateway]["pod"].partition("/")[2]  # "namespace/name"
    target = pod(state, pod_name)
    url = f"http://{target.ip}:15020/stats/prometheus"
    status, text = http_request(target.netns_path, url)
    if status != 200:
        raise RuntimeError(f"{url} of waypoint {gateway} answered {status}: {text[:200]}")
    return parse_metrics(text)


def admin_get(state: LabState, node: str, url: str) -> tuple[int, str]:
    """(status, body) of a GET from inside the node's netns (the agent's admin ports are
    there, on loopback); an HTTP error status is returned, not raised."""
    netns = next(n for n in state.nodes if n.name == node).netns_path

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


def agent_memory(state: LabState, node: str) -> tuple[float, int]:
    """(RSS in MiB, open fds) of the node's agent process."""
    pid = int(state.agents[node]["pid"])
    rss = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = round(int(line.split()[1]) / 1024, 1)
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def scrape(state: LabState, node: str, port: int = 15020) -> list[Sample]:
    """The node agent's /metrics, fetched from inside the node's netns."""
    status, text = admin_get(state, node, f"http://127.0.0.1:{port}/metrics")
    if status != 200:
        raise RuntimeError(f"/metrics of {node}'s agent answered {status}: {text[:200]}")
    return parse_metrics(text)


def exchange(
    state: LabState, client: str, server: str, port: int, request: int, response: int
) -> str:
    """One connection of known size: the client sends `request` bytes and half-closes, the
    server (a listener in the server pod) reads to the end and answers `response` bytes.
    Returns the client's address; raises if either side saw a different byte count."""
    target = pod(state, server)
    listener_worker = NetnsWorker(str(target.netns_path))
    try:
        listener = listener_worker.call(lambda: socket.create_server(("0.0.0.0", port)))
    finally:
        listener_worker.close()
    got: list[int] = []

    def serve() -> None:
        with listener:
            listener.settimeout(10)
            conn, _ = listener.accept()
            with conn:
                got.append(_drain(conn))
                conn.sendall(b"r" * response)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()

    def inside() -> tuple[str, int]:
        with socket.create_connection((target.ip, port), timeout=10) as sock:
            local = sock.getsockname()
            sock.sendall(b"q" * request)
            sock.shutdown(socket.SHUT_WR)
            return f"{local[0]}:{local[1]}", _drain(sock)

    worker = NetnsWorker(str(pod(state, client).netns_path))
    try:
        address, received = worker.call(inside)
    finally:
        worker.close()
    thread.join(10)
    if got != [request] or received != response:
        raise AssertionError(f"server read {got}, client read {received}: not the sizes sent")
    return address


def _drain(sock: socket.socket) -> int:
    total = 0
    while chunk := sock.recv(65536):
        total += len(chunk)
    return total
