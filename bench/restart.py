"""`ambient-agent bench --restart`: restart a node agent under a stream of connections and
count what got past the mesh while it was away.

On a lab with agents, node-1's agent is restarted again and again, three ways: killed
(SIGKILL), stopped (SIGTERM, the default exit that hands the pods to the next agent), and
killed with its datapath record marked as an earlier build, so the next agent compiles new
programs and moves the pods onto them. Meanwhile:

- client-a (node-1, in the mesh) opens a connection to server-b (node-2) every 2 ms. In the
  mesh it crosses the node network as HBONE (port 15008); tcpdump on the lab's bridge counts
  every packet from client-a's address to or from port 8080: plaintext that left the pod.
- outsider (node-2, out of the mesh) opens a connection to server-a (node-1) every 2 ms,
  which an AuthorizationPolicy denies; server-a's app counts the connections that reached
  it from outsider's address. The same tcpdump sees outsider's SYNs cross the bridge, which
  shows the witness sees plaintext when there is some.

Reports restart-to-ready (a new agent process started until its ready file), both counts,
and the clients' outcomes. Like every bench it asserts nothing: exit 0 when it ran.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from lab import agents, control, probes
from lab.network import BRIDGE, LabState, PodState

PORT = 8080
NODE = "node-1"
MODES = ("kill", "term", "recompile")
SETTLE = 1.0  # seconds of stream before each restart and after the agent is ready again
STOP_TIMEOUT = 20.0


@dataclass
class RestartReport:
    rounds: int
    restart_to_ready_s: dict[str, list[float]] = field(default_factory=dict)
    plaintext_packets_from_client: int = 0
    witness_packets_from_outsider: int = 0
    denied_connections_reaching_app: int = 0
    client_outcomes: dict[str, int] = field(default_factory=dict)
    outsider_outcomes: dict[str, int] = field(default_factory=dict)
    adopted: dict[str, list[bool]] = field(default_factory=dict)

    @property
    def all_ready_s(self) -> list[float]:
        return [s for times in self.restart_to_ready_s.values() for s in times]


def deny_outsider(outsider: PodState) -> dict[str, Any]:
    return {
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "deny-outsider", "namespace": "default"},
        "spec": {"selector": {"matchLabels": {"app": "server-a"}}, "action": "DENY",
                 "rules": [{"from": [{"source": {"ipBlocks": [outsider.ip]}}]}]},
    }  # fmt: skip


def run_restart_bench(name: str, rounds: int, json_output: bool) -> int:
    control.down(name)
    state = control.up(name, None)
    try:
        report = measure(state, rounds)
    finally:
        control.down(name)
    if json_output:
        print(json.dumps(asdict(report) | {"median_ready_s": _median(report.all_ready_s)}))
    else:
        print(format_report(report))
    return 0


def measure(state: LabState, rounds: int) -> RestartReport:
    """The restarts, on a lab that is up with its agents."""
    client, server_b = probes.pod(state, "client-a"), probes.pod(state, "server-b")
    outsider, server_a = probes.pod(state, "outsider"), probes.pod(state, "server-a")
    probes.apply_policies(state, [deny_outsider(outsider)], (NODE,))
    report = RestartReport(rounds=rounds)
    with (
        _bridge_capture(state) as captured,
        pod_process(server_b, "serve", str(PORT)),
        pod_process(server_a, "serve", str(PORT)) as server_a_result,
        pod_process(client, "connect", server_b.ip, str(PORT)) as client_result,
        pod_process(outsider, "connect", server_a.ip, str(PORT)) as outsider_result,
    ):
        time.sleep(SETTLE)
        for _ in range(rounds):
            for mode in MODES:
                seconds, adopted = _restart(state, mode)
                report.restart_to_ready_s.setdefault(mode, []).append(round(seconds, 3))
                report.adopted.setdefault(mode, []).append(adopted)
                time.sleep(SETTLE)
    sources = captured()
    report.plaintext_packets_from_client = sources.get(client.ip, 0)
    report.witness_packets_from_outsider = sources.get(outsider.ip, 0)
    accepted = server_a_result().get("accepted_by_source", {})
    report.denied_connections_reaching_app = int(accepted.get(outsider.ip, 0))
    report.client_outcomes = client_result().get("outcomes", {})
    report.outsider_outcomes = outsider_result().get("outcomes", {})
    return report


def _restart(state: LabState, mode: str) -> tuple[float, bool]:
    """Stop the node's agent the mode's way and start a new one; returns (seconds from the
    new process's start until it was ready, whether it adopted the pinned programs)."""
    agents.stop_agent(state, NODE, signal.SIGTERM if mode == "term" else signal.SIGKILL)
    if mode == "recompile":
        record = agents.lab_dir(state.name) / "agent-state" / NODE / "datapath.json"
        data = json.loads(record.read_text())
        data["version"] = "an earlier build"
        record.write_text(json.dumps(data))
    since = len(probes.agent_events(state, NODE))  # the new agent's log follows the old's
    started = time.monotonic()
    agents.restart_agent(state, NODE)
    ready = time.monotonic() - started
    loaded = probes.wait_for_event(state, NODE, since=since, event="datapath loaded")
    return ready, bool(loaded and loaded.get("adopted"))


@contextlib.contextmanager
def pod_process(pod: PodState, *args: str) -> Iterator[Any]:
    """bench.stream in the pod; yields a function that returns its JSON result once the
    block has ended (the process is stopped with SIGTERM on the way out)."""
    argv = ["ip", "netns", "exec", pod.netns, sys.executable, "-m", "bench.stream", *args]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    result: dict[str, Any] = {}
    try:
        if args[0] == "serve":
            probes.wait_listening(pod, int(args[1]), proc, "bench.stream serve")
        yield lambda: result
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        last = [line for line in out.splitlines() if line.startswith("{")]
        result.update(json.loads(last[-1]) if last else {})


_PACKET = re.compile(r" IP (\d+\.\d+\.\d+\.\d+)\.\d+ > ")


@contextlib.contextmanager
def _bridge_capture(state: LabState) -> Iterator[Any]:
    """tcpdump on the lab's bridge for TCP port 8080; yields a function that returns the
    packet count by source address once the block has ended."""
    argv = ["ip", "netns", "exec", state.fabric_netns, "tcpdump", "-l", "-n", "-i", BRIDGE,
            "-s", "96", f"tcp port {PORT}"]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    banner = ""
    while "listening on" not in banner:  # printed once capturing has begun
        line = proc.stderr.readline()
        if not line:
            proc.kill()
            raise RuntimeError(f"tcpdump did not start: {banner.strip()}")
        banner += line
    counts: dict[str, int] = {}
    try:
        yield lambda: counts
    finally:
        time.sleep(0.2)  # the last packets in flight
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=STOP_TIMEOUT)
        for line in out.splitlines():
            if match := _PACKET.search(line):
                counts[match[1]] = counts.get(match[1], 0) + 1


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def format_report(report: RestartReport) -> str:
    lines = [f"agent restarts on {NODE}, {report.rounds} round(s) of {', '.join(MODES)}, "
             "a connection every 2 ms from client-a and from outsider", ""]  # fmt: skip
    for mode, times in report.restart_to_ready_s.items():
        adopted = sum(report.adopted.get(mode, []))
        lines.append(f"  {mode:<10} restart to ready: median {_median(times)} s, max "
                     f"{max(times)} s (adopted the pins {adopted}/{len(times)})")  # fmt: skip
    lines += [
        "",
        f"  plaintext packets from client-a on the node network: "
        f"{report.plaintext_packets_from_client}",
        f"  denied connections (outsider -> server-a) that reached the app: "
        f"{report.denied_connections_reaching_app}",
        f"  witness: outsider's plaintext packets seen on the bridge: "
        f"{report.witness_packets_from_outsider}",
        f"  client-a outcomes: {report.client_outcomes}",
        f"  outsider outcomes: {report.outsider_outcomes}",
    ]
    return "\n".join(lines)
