"""`ambient-agent bench`: what the mesh costs, measured on the lab in one invocation.

The same measurements run twice between the same pods at the same addresses: first on a lab
with node agents, where every connection between enrolled pods is captured in the client pod,
tunnelled as HBONE (HTTP/2 CONNECT over mutual TLS) and delivered by the server node's agent;
then on the lab brought up again without agents, where the pods talk through the nodes' plain
routing. The only difference between the two is the mesh.

Measured from client-a (node-1): TCP throughput with iperf3 to server-b (node-2) and to
server-a (node-1); 1 KiB request/response latency and new connections per second to an echo
server in server-b. Benchmarks do not assert speed: exit 0 when every measurement completed,
1 with the reason when one failed, 130 when interrupted. The lab is torn down in every case.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from types import FrameType
from typing import Any, TextIO, TypeVar

from agent.netns import NetnsWorker
from lab import agents, control, probes
from lab.network import LabState, PodState

IPERF_PORT = 5201
ECHO_PORT = 9000
RR_SIZE = 1024
CONN_SIZE = 64
IO_TIMEOUT = 5.0  # one send or receive; a stalled exchange fails instead of hanging
CLIENT = "client-a"
CROSS_NODE_SERVER = "server-b"
SAME_NODE_SERVER = "server-a"
MODES = ("baseline", "mesh")

T = TypeVar("T")


class BenchError(RuntimeError):
    """A measurement could not be made; the message says which and why."""


@dataclass(frozen=True)
class Settings:
    iperf_seconds: int
    rr_requests: int
    rr_warmup: int  # not counted: the first exchanges pay for cold caches and a new tunnel
    rr_max_seconds: float  # the latency loop stops here even if rr_requests are not done
    conn_seconds: float
    conn_max: int  # a cap below the ephemeral port range, whatever the speed


FULL = Settings(
    iperf_seconds=5,
    rr_requests=10_000,
    rr_warmup=200,
    rr_max_seconds=60.0,
    conn_seconds=5.0,
    conn_max=20_000,
)
QUICK = Settings(
    iperf_seconds=1,
    rr_requests=300,
    rr_warmup=20,
    rr_max_seconds=15.0,
    conn_seconds=1.0,
    conn_max=2_000,
)


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str
    digits: int


METRICS = (
    Metric("cross_node_throughput", "cross-node throughput (Gbit/s)", "Gbit/s", 2),
    Metric("same_node_throughput", "same-node throughput (Gbit/s)", "Gbit/s", 2),
    Metric("rr_latency_p50", "1 KiB RR latency p50 (us)", "us", 0),
    Metric("rr_latency_p99", "1 KiB RR latency p99 (us)", "us", 0),
    Metric("connections_per_second", "new connections/s", "conn/s", 0),
)


@dataclass
class ModeResult:
    values: dict[str, float] = field(default_factory=dict)
    rr_samples: int = 0
    connections: int = 0
    connection_seconds: float = 0.0
    # Mesh only: CPU time (user + system) both node agents spent per new connection. Steadier
    # than connections/s on a shared machine, whose speed varies from minute to minute.
    agent_cpu_per_connection_us: float | None = None
    # Mesh only: proof the traffic went through the agents, read from their logs.
    tunnelled: dict[str, int] = field(default_factory=dict)
    # Connections the agents logged as ended by an error, by destination port.
    agent_errors: dict[str, int] = field(default_factory=dict)
    agent_error_examples: list[str] = field(default_factory=list)


def run_bench(name: str, json_output: bool, quick: bool) -> int:
    settings = QUICK if quick else FULL
    log = sys.stderr if json_output else sys.stdout
    results: dict[str, ModeResult] = {}
    with _sigterm_as_interrupt():
        try:
            # Mesh first: it is the part that can fail (agents, tunnels), so it fails early.
            # Each mode gets a fresh lab of the same topology, hence the same addresses.
            for mode in ("mesh", "baseline"):
                results[mode] = _measure(name, mode, settings, log)
        except KeyboardInterrupt:
            print("interrupted: tearing the lab down", file=sys.stderr)
            _teardown(name)
            return 130
        except Exception as exc:
            print(f"bench failed: {exc}", file=sys.stderr)
            _teardown(name)
            if json_output:
                print(json.dumps({"ok": False, "error": str(exc)}, indent=2))
            return 1
        if not _teardown(name):
            return 1
    report = _report(name, quick, settings, results)
    if json_output:
        print(json.dumps(report, indent=2))
    else:
        print()
        print(format_table(report))
        for note in report["notes"]:
            print(f"note: {note}")
        for warning in report["warnings"]:
            print(f"warning: {warning}")
    return 0


def _measure(name: str, mode: str, settings: Settings, log: TextIO) -> ModeResult:
    mesh = mode == "mesh"
    control.down(name)  # leftovers of a run killed hard, or of the previous mode
    what = "with node agents (the mesh)" if mesh else "without agents (baseline)"
    print(f"{mode}: bringing lab '{name}' up {what}...", file=log)
    state = control.up(name, None, agents_too=mesh)
    client = probes.pod(state, CLIENT)
    cross, same = probes.pod(state, CROSS_NODE_SERVER), probes.pod(state, SAME_NODE_SERVER)
    result = ModeResult()
    values = result.values
    with _iperf_server(cross), _iperf_server(same), _echo_server(cross):
        values["cross_node_throughput"] = _iperf(client, cross, settings.iperf_seconds)
        print(
            f"{mode}: {CLIENT} -> {cross.name} {values['cross_node_throughput']:.2f} Gbit/s",
            file=log,
        )
        values["same_node_throughput"] = _iperf(client, same, settings.iperf_seconds)
        print(
            f"{mode}: {CLIENT} -> {same.name} {values['same_node_throughput']:.2f} Gbit/s", file=log
        )
        samples = _in_pod(client, lambda stop: _rr_client(cross.ip, settings, stop))
        result.rr_samples = len(samples)
        values["rr_latency_p50"] = percentile(samples, 50) / 1000
        values["rr_latency_p99"] = percentile(samples, 99) / 1000
        print(
            f"{mode}: 1 KiB RR {len(samples)} requests, p50 {values['rr_latency_p50']:.0f} us "
            f"p99 {values['rr_latency_p99']:.0f} us",
            file=log,
        )
        cpu_before = _agents_cpu_seconds(name) if mesh else 0.0
        count, seconds = _in_pod(client, lambda stop: _conn_client(cross.ip, settings, stop))
        result.connections, result.connection_seconds = count, seconds
        values["connections_per_second"] = count / seconds
        cpu = ""
        if mesh and count:
            # The agents finish their last connections' bookkeeping just after the client.
            time.sleep(0.5)
            used = _agents_cpu_seconds(name) - cpu_before
            result.agent_cpu_per_connection_us = used / count * 1e6
            cpu = f", agents' CPU {result.agent_cpu_per_connection_us:.0f} us per connection"
        print(
            f"{mode}: {count} connections in {seconds:.1f} s, "
            f"{values['connections_per_second']:.0f}/s{cpu}",
            file=log,
        )
    if mesh:
        _check_tunnelled(state, result, expected_echo=1 + count)
    control.down(name)
    return result


def _agents_cpu_seconds(name: str) -> float:
    """User + system CPU time of the lab's node agents so far (/proc/<pid>/stat)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in agents.lab_agent_pids(name):
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / ticks


# -- servers in the server pods ------------------------------------------------------------


def _iperf_server(target: PodState) -> contextlib.AbstractContextManager[None]:
    return probes.pod_server(target, IPERF_PORT, ["iperf3", "-s", "-p", str(IPERF_PORT)])


def _echo_server(target: PodState) -> contextlib.AbstractContextManager[None]:
    code = f"from bench.datapath import serve_echo; serve_echo({ECHO_PORT})"
    return probes.pod_server(target, ECHO_PORT, [sys.executable, "-c", code])


def serve_echo(port: int) -> None:
    """Echo server for the latency and connection-rate measurements (runs in the server pod)."""

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # asyncio sets TCP_NODELAY on its TCP transports, so replies are not held back.
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(echo, "0.0.0.0", port, backlog=4096)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


# -- clients in the client pod -------------------------------------------------------------


def _iperf(client: PodState, server: PodState, seconds: int) -> float:
    """Gbit/s the iperf3 server received from the client."""
    argv = [
        "ip",
        "netns",
        "exec",
        client.netns,
        "iperf3",
        "-c",
        server.ip,
        "-p",
        str(IPERF_PORT),
        "-t",
        str(seconds),
        "-J",
    ]
    what = f"iperf3 {client.name} -> {server.name} ({server.ip}:{IPERF_PORT})"
    try:
        # On an exception (timeout, Ctrl-C) subprocess.run kills the client before raising.
        done = subprocess.run(
            argv, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=seconds + 30
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"{what}: no result after {exc.timeout:.0f}s") from None
    try:
        report = json.loads(done.stdout)
    except ValueError:
        report = {}
    error = report.get("error") if isinstance(report, dict) else None
    if done.returncode != 0 or error:
        reason = error or done.stderr.strip() or done.stdout.strip()[-300:]
        raise BenchError(f"{what} failed (exit {done.returncode}): {reason}")
    try:
        bits = float(report["end"]["sum_received"]["bits_per_second"])
    except (KeyError, TypeError, ValueError) as exc:
        raise BenchError(f"{what}: no sum_received in its JSON ({exc!r})") from None
    if bits <= 0:
        raise BenchError(f"{what}: received nothing")
    return bits / 1e9


def _in_pod(pod: PodState, fn: Callable[[threading.Event], T]) -> T:
    """Run fn on a thread inside the pod's netns. fn polls `stop`, set when we are interrupted,
    so the thread (and with it close()) ends promptly after Ctrl-C."""
    stop = threading.Event()
    worker = NetnsWorker(str(pod.netns_path))
    try:
        return worker.call(lambda: fn(stop))
    finally:
        stop.set()
        worker.close()


def _connect(host: str, port: int) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=IO_TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _recv_exactly(sock: socket.socket, size: int) -> None:
    buffer = memoryview(bytearray(size))
    got = 0
    while got < size:
        n = sock.recv_into(buffer[got:])
        if n == 0:
            raise BenchError(f"the echo server closed the connection after {got} of {size} bytes")
        got += n


def _rr_client(host: str, settings: Settings, stop: threading.Event) -> list[int]:
    """Nanoseconds per 1 KiB request/response, sequential, on one connection."""
    payload = b"r" * RR_SIZE
    samples: list[int] = []
    deadline = time.monotonic() + settings.rr_max_seconds
    try:
        with _connect(host, ECHO_PORT) as sock:
            for i in range(settings.rr_warmup + settings.rr_requests):
                if stop.is_set() or time.monotonic() > deadline:
                    break
                start = time.perf_counter_ns()
                sock.sendall(payload)
                _recv_exactly(sock, RR_SIZE)
                if i >= settings.rr_warmup:
                    samples.append(time.perf_counter_ns() - start)
    except OSError as exc:
        raise BenchError(
            f"1 KiB RR to {host}:{ECHO_PORT} failed after {len(samples)} requests: {exc}"
        ) from None
    # Fewer than asked means the time limit hit: the percentiles still hold, the count says so.
    if len(samples) < 10:
        raise BenchError(
            f"1 KiB RR to {host}:{ECHO_PORT}: only {len(samples)} requests "
            f"in {settings.rr_max_seconds:.0f}s"
        )
    return samples


def _conn_client(host: str, settings: Settings, stop: threading.Event) -> tuple[int, float]:
    """Sequential connect + one small exchange + close until the time or count limit."""
    payload = b"c" * CONN_SIZE
    count = 0
    start = time.monotonic()
    end = start + settings.conn_seconds
    try:
        while count < settings.conn_max and time.monotonic() < end and not stop.is_set():
            with _connect(host, ECHO_PORT) as sock:
                sock.sendall(payload)
                _recv_exactly(sock, CONN_SIZE)
            count += 1
    except OSError as exc:
        raise BenchError(f"connection {count + 1} to {host}:{ECHO_PORT} failed: {exc}") from None
    elapsed = time.monotonic() - start
    if count == 0:
        raise BenchError(f"no connection to {host}:{ECHO_PORT} completed")
    return count, elapsed


def percentile(samples: list[int], pct: float) -> float:
    """Nearest-rank percentile: a value that was actually measured."""
    ordered = sorted(samples)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return float(ordered[rank - 1])


# -- evidence that the mesh run went through the mesh -----------------------------------------


def _check_tunnelled(state: LabState, result: ModeResult, expected_echo: int) -> None:
    """Count the HBONE connections each server node's agent delivered, from its access log.

    A mesh figure that bypassed the agents would be a baseline figure under a wrong name, so
    a destination with no tunnelled connection fails the run. The log line is written when
    a connection ends, hence a short wait for the last ones.
    """
    targets = {
        "cross_node_throughput": (probes.pod(state, CROSS_NODE_SERVER), IPERF_PORT, 2),
        "same_node_throughput": (probes.pod(state, SAME_NODE_SERVER), IPERF_PORT, 2),
        "echo": (probes.pod(state, CROSS_NODE_SERVER), ECHO_PORT, expected_echo),
    }
    deadline = time.monotonic() + 5
    while True:
        events = {node.name: probes.agent_events(state, node.name) for node in state.nodes}
        counts = {
            key: sum(
                1
                for event in events[pod.node]
                if event.get("event") == "connection complete"
                and event.get("direction") == "inbound"
                and event.get("route") == "hbone"
                and event.get("dst.addr") == f"{pod.ip}:{port}"
            )
            for key, (pod, port, _) in targets.items()
        }
        done = all(counts[key] >= want for key, (_, _, want) in targets.items())
        if done or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    result.tunnelled = counts
    for node, node_events in events.items():
        for event in node_events:
            if event.get("event") != "connection complete" or not event.get("error"):
                continue
            port = str(event.get("dst.addr", "")).rsplit(":", 1)[-1]
            result.agent_errors[port] = result.agent_errors.get(port, 0) + 1
            if len(result.agent_error_examples) < 5:
                result.agent_error_examples.append(
                    f"{node}: {event.get('direction')} {event.get('src.addr')} -> "
                    f"{event.get('dst.addr')}: {event['error']}"
                )
    missing = [key for key, count in counts.items() if count == 0]
    if missing:
        raise BenchError(
            f"mesh run not tunnelled through the agents: {', '.join(missing)} "
            "(no HBONE connection in the server node's agent log)"
        )


# -- report --------------------------------------------------------------------------------


def _report(
    name: str, quick: bool, settings: Settings, results: dict[str, ModeResult]
) -> dict[str, Any]:
    metrics: dict[str, Any] = {}
    for metric in METRICS:
        baseline = results["baseline"].values[metric.key]
        mesh = results["mesh"].values[metric.key]
        metrics[metric.key] = {
            "label": metric.label,
            "unit": metric.unit,
            "baseline": baseline,
            "mesh": mesh,
            "mesh_over_baseline": mesh / baseline if baseline else None,
        }
    warnings = []
    for mode in MODES:
        result = results[mode]
        if result.rr_samples < settings.rr_requests:
            warnings.append(
                f"{mode}: latency from {result.rr_samples} of {settings.rr_requests} "
                f"requests (time limit {settings.rr_max_seconds:.0f}s)"
            )
    notes = []
    for port, count in sorted(results["mesh"].agent_errors.items()):
        if port == str(IPERF_PORT):
            # iperf3 closes a connection with unread data at the end of each test, mesh or
            # not (TcpExtTCPAbortOnClose in the server pod): the agents relay that RST.
            notes.append(
                f"mesh: the agents logged {count} iperf3 connection(s) ending in a "
                "reset; iperf3 resets one at the end of every test, mesh or not"
            )
        else:
            warnings.append(
                f"mesh: the agents logged {count} connection(s) to port {port} "
                "ending in an error, e.g. "
                f"{results['mesh'].agent_error_examples[0]}"
            )
    return {
        "ok": True,
        "lab": name,
        "quick": quick,
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release()},
        "settings": asdict(settings),
        "paths": {
            "cross_node_throughput": f"{CLIENT} -> {CROSS_NODE_SERVER}:{IPERF_PORT} (iperf3)",
            "same_node_throughput": f"{CLIENT} -> {SAME_NODE_SERVER}:{IPERF_PORT} (iperf3)",
            "rr_latency": f"{CLIENT} -> {CROSS_NODE_SERVER}:{ECHO_PORT}, one connection",
            "connections_per_second": f"{CLIENT} -> {CROSS_NODE_SERVER}:{ECHO_PORT}",
        },
        "metrics": metrics,
        "details": {mode: asdict(results[mode]) for mode in MODES},
        "warnings": warnings,
        "notes": notes,
    }


def format_table(report: dict[str, Any]) -> str:
    lines = [f"{'metric':<32}{'baseline':>10}{'mesh':>10}{'mesh/baseline':>16}"]
    for metric in METRICS:
        row = report["metrics"][metric.key]
        ratio = row["mesh_over_baseline"]
        lines.append(
            f"{metric.label:<32}{row['baseline']:>10.{metric.digits}f}"
            f"{row['mesh']:>10.{metric.digits}f}"
            f"{'-' if ratio is None else f'{ratio:.3f}':>16}"
        )
    cpu = report["details"]["mesh"]["agent_cpu_per_connection_us"]
    if cpu is not None:
        lines.append(f"{'node agents CPU per new connection (us)':<42}{cpu:>10.0f}")
    machine = report["machine"]
    lines.append(
        f"({machine['cpus']} CPUs, kernel {machine['kernel']}; latency and connections: "
        f"{report['paths']['rr_latency'].split(',')[0]})"
    )
    return "\n".join(lines)


# -- signals and teardown ------------------------------------------------------------------


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM takes the Ctrl-C path (teardown, exit 130); the old handler comes back after."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return

    def interrupted(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupted)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _teardown(name: str) -> bool:
    """control.down with Ctrl-C and SIGTERM held off: an impatient second Ctrl-C must not leave
    agents or namespaces behind. down() is bounded (agents get SIGKILL after a grace).
    False, said on stderr, if something could not be removed."""
    main = threading.current_thread() is threading.main_thread()

    def later(signum: int, frame: FrameType | None) -> None:
        print("still tearing the lab down...", file=sys.stderr)

    signals = (signal.SIGINT, signal.SIGTERM) if main else ()
    previous = {sig: signal.signal(sig, later) for sig in signals}
    try:
        control.down(name)
    except Exception as exc:
        print(
            f"tearing lab '{name}' down failed: {exc}; run `ambient-agent lab down --name {name}`",
            file=sys.stderr,
        )
        return False
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return True
