"""`ambient-agent bench`: what the mesh costs, against no mesh and against Envoy, measured on
the lab in one invocation.

The same measurements run between the same pods at the same addresses in three modes:

- baseline: the lab without agents; the pods talk through the nodes' plain routing.
- envoy: still no agents, but a pair of Envoys does HBONE between the pods: one in the client
  pod (tcp_proxy tunneling: CONNECT with :authority = the real target, over HTTP/2 with TLS
  1.3 mutual TLS, to the server pod's port 15008), one in each server pod terminating the
  CONNECTs (bench/envoy_hbone.py). The clients connect to the client Envoy's loopback
  listeners, one per target, instead of the target.
- mesh: the node agents run; every connection between enrolled pods is captured in the
  client pod, tunnelled as HBONE and delivered by the server node's agent.

One lab stays up for the whole bench: the agents are started for each mesh run and stopped
after it with `--on-exit unenroll`, which takes the tc programs, routing rules and sysctls
out of the pods again; every baseline and envoy run first checks that the pods are plain
(no agent, no tc filter, no capture rule). Throughput is measured in `rounds` alternating
runs (baseline, envoy, mesh, baseline, ...) and reported as the median per mode, so a slow
minute of a shared machine spreads over all modes; latency and connection rate run once per
mode, in the last round.

Measured from client-a (node-1): TCP throughput with iperf3 to server-b (node-2) and to
server-a (node-1); 1 KiB request/response latency and new connections per second to an echo
server in server-b; CPU (all CPUs, and the proxies alone) per GB moved and per 1,000
connections; the proxies' peak RSS. Benchmarks do not assert speed: exit 0 when every
measurement completed, 1 with the reason when one failed, 130 when interrupted. The lab and
every Envoy are torn down in every case.
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
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TextIO, TypeVar

from agent.datapath.abi import PORT_HBONE
from agent.identity.ca import CertificateAuthority
from agent.identity.manager import WorkloadCertificate
from agent.identity.spiffe import DEFAULT_TRUST_DOMAIN, SpiffeId
from agent.netns import NetnsWorker
from agent.waypoint.envoy_process import EnvoyError
from bench import envoy_hbone
from bench.envoy_hbone import Envoy, HboneEndpoint, Tunnel
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
MODES = ("baseline", "envoy", "mesh")
# The agents leave nothing in the pods when they stop, so the lab can go on plain.
AGENT_ARGS = ("--on-exit", "unenroll")
# Under the lab's run dir (removed with the lab); also how leftovers of a killed run are found.
ENVOY_DIR = "bench-envoy"
# The proxies finish their last connections' bookkeeping (close, access log) just after the
# client: CPU is read after this pause.
SETTLE_SECONDS = 0.5
GB = 1e9

T = TypeVar("T")


class BenchError(RuntimeError):
    """A measurement could not be made; the message says which and why."""


@dataclass(frozen=True)
class Settings:
    rounds: int  # throughput runs per mode, alternated between the modes
    iperf_seconds: int
    rr_requests: int
    rr_warmup: int  # not counted: the first exchanges pay for cold caches and a new tunnel
    rr_max_seconds: float  # the latency loop stops here even if rr_requests are not done
    conn_seconds: float
    conn_max: int  # a cap below the ephemeral port range, whatever the speed


FULL = Settings(
    rounds=3,
    iperf_seconds=5,
    rr_requests=10_000,
    rr_warmup=200,
    rr_max_seconds=60.0,
    conn_seconds=5.0,
    conn_max=20_000,
)
QUICK = Settings(
    rounds=1,
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
    # connect to the reply's last byte: what a new connection's first request waits
    Metric("connection_latency_p50", "new connection + 64 B RR p50 (us)", "us", 0),
)
THROUGHPUT_METRICS = ("cross_node_throughput", "same_node_throughput")


@dataclass(frozen=True)
class CpuReading:
    """CPU seconds used so far: all CPUs' non-idle time, and the proxies' own (None: none)."""

    system: float
    proxies: float | None

    def since(self, earlier: CpuReading) -> CpuReading:
        proxies = None
        if self.proxies is not None and earlier.proxies is not None:
            proxies = self.proxies - earlier.proxies
        return CpuReading(self.system - earlier.system, proxies)


@dataclass
class ThroughputRun:
    round: int  # from 1
    gbit_per_s: float
    bytes_received: int  # iperf3's end.sum_received.bytes
    cpu_system_seconds: float
    cpu_proxies_seconds: float | None


@dataclass
class ModeResult:
    # Throughput: the median of the runs; latency and connections/s: the one run.
    values: dict[str, float] = field(default_factory=dict)
    throughput_runs: dict[str, list[ThroughputRun]] = field(
        default_factory=lambda: {key: [] for key in THROUGHPUT_METRICS}
    )
    rr_samples: int = 0
    connections: int = 0
    connection_seconds: float = 0.0
    connection_cpu_system_seconds: float = 0.0
    connection_cpu_proxies_seconds: float | None = None
    # VmHWM of each proxy process ("agent node-1", "envoy client-a", ...), the highest of this
    # mode's runs, each read at the end of its run.
    peak_rss_mib: dict[str, float] = field(default_factory=dict)
    # VmRSS at the end of the mode's last run: what the proxy holds then, beside its peak.
    rss_at_end_mib: dict[str, float] = field(default_factory=dict)
    # envoy and mesh: proof the traffic went through the proxies, connections per target
    # summed over the runs (agents' access logs; server Envoys' CONNECTs answered 200).
    tunnelled: dict[str, int] = field(default_factory=dict)
    # Connections the proxies logged as failed (agents: an error; Envoys: a CONNECT not
    # answered 200), by destination port.
    proxy_errors: dict[str, int] = field(default_factory=dict)
    proxy_error_examples: list[str] = field(default_factory=list)
    # TIME_WAIT sockets `ss -K` could not remove from the pods before this mode's runs (the
    # most of any run); 0 unless the kernel lacks CONFIG_INET_DIAG_DESTROY.
    time_wait_left: int = 0


@dataclass(frozen=True)
class Targets:
    """Where the clients in client-a connect for each measurement in a mode."""

    cross_iperf: tuple[str, int]
    same_iperf: tuple[str, int]
    echo: tuple[str, int]


@dataclass
class Run:
    """One mode's turn in one round: where to connect and which proxy processes to watch."""

    mode: str
    round: int  # from 1
    targets: Targets
    proxy_pids: dict[str, int]  # label -> pid; empty in baseline
    envoys: dict[str, Envoy] = field(default_factory=dict)  # pod name -> Envoy (envoy mode)
    agent_log_offsets: dict[str, int] = field(default_factory=dict)  # mesh: node -> events


def run_bench(name: str, json_output: bool, quick: bool) -> int:
    settings = QUICK if quick else FULL
    log = sys.stderr if json_output else sys.stdout
    results = {mode: ModeResult() for mode in MODES}
    started = time.monotonic()
    with _sigterm_as_interrupt():
        try:
            _measure_all(name, settings, results, log)
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
    report = _report(name, quick, settings, results, time.monotonic() - started)
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


def _measure_all(
    name: str, settings: Settings, results: dict[str, ModeResult], log: TextIO
) -> None:
    _stop_envoys(name)  # leftovers of a run killed hard
    control.down(name)
    print(f"bringing lab '{name}' up (agents only for the mesh runs)...", file=log)
    state = control.up(name, None, agents_too=False)
    client = probes.pod(state, CLIENT)
    cross, same = probes.pod(state, CROSS_NODE_SERVER), probes.pod(state, SAME_NODE_SERVER)
    identities = _EnvoyIdentities()
    # The servers stay up for the whole bench: the modes only change what is between them.
    with _iperf_server(cross), _iperf_server(same), _echo_server(cross):
        for round_number in range(1, settings.rounds + 1):
            last = round_number == settings.rounds
            for mode in MODES:
                result = results[mode]
                left = _clear_time_wait(state)
                result.time_wait_left = max(result.time_wait_left, left)
                with _mode_run(mode, round_number, state, identities, log) as run:
                    _measure_run(state, client, run, settings, result, last, log)
    for mode in MODES:
        values = results[mode].values
        for key in THROUGHPUT_METRICS:
            values[key] = statistics.median(
                r.gbit_per_s for r in results[mode].throughput_runs[key]
            )


def _measure_run(
    state: LabState,
    client: PodState,
    run: Run,
    settings: Settings,
    result: ModeResult,
    latency_too: bool,
    log: TextIO,
) -> None:
    mode, targets = run.mode, run.targets
    tag = f"(run {run.round}/{settings.rounds})"
    pids = list(run.proxy_pids.values())
    # Connections each destination must have seen through the proxies in this run.
    expected = {"cross_node_throughput": 0, "same_node_throughput": 0, "echo": 0}
    for key, server, target in (
        ("cross_node_throughput", CROSS_NODE_SERVER, targets.cross_iperf),
        ("same_node_throughput", SAME_NODE_SERVER, targets.same_iperf),
    ):
        before = _cpu_reading(pids, mode)
        gbit, received = _iperf(client, server, target, settings.iperf_seconds)
        used = _cpu_reading(pids, mode).since(before)
        result.throughput_runs[key].append(
            ThroughputRun(run.round, gbit, received, used.system, used.proxies)
        )
        expected[key] = 2  # iperf3's control connection and its data connection
        print(f"{mode}: {CLIENT} -> {server} {gbit:.2f} Gbit/s {tag}", file=log)
    if latency_too:
        host, port = targets.echo
        samples = _in_pod(client, lambda stop: _rr_client(host, port, settings, stop))
        result.rr_samples = len(samples)
        values = result.values
        values["rr_latency_p50"] = percentile(samples, 50) / 1000
        values["rr_latency_p99"] = percentile(samples, 99) / 1000
        print(
            f"{mode}: 1 KiB RR {len(samples)} requests, p50 {values['rr_latency_p50']:.0f} us "
            f"p99 {values['rr_latency_p99']:.0f} us",
            file=log,
        )
        before = _cpu_reading(pids, mode)
        seconds, durations = _in_pod(client, lambda stop: _conn_client(host, port, settings, stop))
        count = len(durations)
        time.sleep(SETTLE_SECONDS)
        used = _cpu_reading(pids, mode).since(before)
        result.connections, result.connection_seconds = count, seconds
        result.connection_cpu_system_seconds = used.system
        result.connection_cpu_proxies_seconds = used.proxies
        values["connections_per_second"] = count / seconds
        values["connection_latency_p50"] = percentile(durations, 50) / 1000
        print(
            f"{mode}: {count} connections in {seconds:.1f} s, "
            f"{values['connections_per_second']:.0f}/s, "
            f"p50 {values['connection_latency_p50']:.0f} us each",
            file=log,
        )
        expected["echo"] = 1 + count  # the RR connection, then the new ones
    for label, pid in run.proxy_pids.items():
        memory = _memory_mib(pid, label)
        result.peak_rss_mib[label] = max(memory["VmHWM"], result.peak_rss_mib.get(label, 0.0))
        result.rss_at_end_mib[label] = memory["VmRSS"]
    if mode == "mesh":
        _check_tunnelled(state, run, result, expected)
    elif mode == "envoy":
        _check_through_envoys(state, run, result, expected)


# -- the modes -----------------------------------------------------------------------------


@contextlib.contextmanager
def _mode_run(
    mode: str, round_number: int, state: LabState, identities: _EnvoyIdentities, log: TextIO
) -> Iterator[Run]:
    cross, same = probes.pod(state, CROSS_NODE_SERVER), probes.pod(state, SAME_NODE_SERVER)
    direct = Targets((cross.ip, IPERF_PORT), (same.ip, IPERF_PORT), (cross.ip, ECHO_PORT))
    if mode == "baseline":
        _check_plain(state)
        yield Run(mode, round_number, direct, {})
    elif mode == "envoy":
        _check_plain(state)
        with _envoys(state, round_number, identities, log) as run:
            yield run
    else:
        with _agents(state, round_number, direct, log) as run:
            yield run


@contextlib.contextmanager
def _agents(state: LabState, round_number: int, direct: Targets, log: TextIO) -> Iterator[Run]:
    print("mesh: starting the node agents...", file=log)
    offsets = {node.name: 0 for node in state.nodes}
    for node in state.nodes:
        with contextlib.suppress(KeyError, OSError):  # no log yet before the first start
            offsets[node.name] = len(probes.agent_events(state, node.name))
    try:
        agents.start_agents(state, AGENT_ARGS)
        # The waypoint runs too, idle, as on a lab brought up with agents.
        agents.start_waypoints(state)
        pids = {f"agent {node}": int(info["pid"]) for node, info in state.agents.items()}
        yield Run("mesh", round_number, direct, pids, agent_log_offsets=offsets)
    finally:
        agents.stop_waypoints(state.name)
        agents.stop_agents(state.name)


class _EnvoyIdentities:
    """One CA for the bench's Envoys and a certificate per pod, under the pod's service
    account, as the agents would issue it."""

    def __init__(self) -> None:
        self.ca = CertificateAuthority.create(DEFAULT_TRUST_DOMAIN)
        self._issued: dict[str, WorkloadCertificate] = {}

    def identity(self, pod: PodState) -> SpiffeId:
        return SpiffeId(DEFAULT_TRUST_DOMAIN, pod.namespace, pod.service_account)

    def certificate(self, pod: PodState) -> WorkloadCertificate:
        if pod.name not in self._issued:
            self._issued[pod.name] = envoy_hbone.issue_workload_certificate(
                self.ca, self.identity(pod)
            )
        return self._issued[pod.name]


TUNNEL_CROSS_IPERF = "to_cross_node_iperf"
TUNNEL_SAME_IPERF = "to_same_node_iperf"
TUNNEL_ECHO = "to_cross_node_echo"


@contextlib.contextmanager
def _envoys(
    state: LabState, round_number: int, identities: _EnvoyIdentities, log: TextIO
) -> Iterator[Run]:
    """A server Envoy in each server pod on <pod ip>:15008 and a client Envoy in client-a
    with a loopback listener per target; all stopped on the way out, whatever happened."""
    print("envoy: starting the Envoys...", file=log)
    client = probes.pod(state, CLIENT)
    cross, same = probes.pod(state, CROSS_NODE_SERVER), probes.pod(state, SAME_NODE_SERVER)
    roots = identities.ca.root_pem
    workdir = agents.lab_dir(state.name) / ENVOY_DIR / f"round-{round_number}"
    started: dict[str, Envoy] = {}
    try:
        for server in (same, cross):
            config = envoy_hbone.envoy_as_hbone_server(
                identities.certificate(server), roots, (server.ip, PORT_HBONE)
            )
            started[server.name] = _start_envoy(config, workdir / server.name, server)
        endpoints = [
            HboneEndpoint(server.name, (server.ip, PORT_HBONE), identities.identity(server))
            for server in (cross, same)
        ]
        loopback = ("127.0.0.1", 0)
        tunnels = [
            Tunnel(TUNNEL_CROSS_IPERF, loopback, f"{cross.ip}:{IPERF_PORT}", cross.name),
            Tunnel(TUNNEL_SAME_IPERF, loopback, f"{same.ip}:{IPERF_PORT}", same.name),
            Tunnel(TUNNEL_ECHO, loopback, f"{cross.ip}:{ECHO_PORT}", cross.name),
        ]
        config = envoy_hbone.envoy_as_hbone_client(
            identities.certificate(client), roots, tunnels, endpoints
        )
        client_envoy = started[client.name] = _start_envoy(config, workdir / client.name, client)
        targets = Targets(
            ("127.0.0.1", client_envoy.port(TUNNEL_CROSS_IPERF)),
            ("127.0.0.1", client_envoy.port(TUNNEL_SAME_IPERF)),
            ("127.0.0.1", client_envoy.port(TUNNEL_ECHO)),
        )
        pids = {f"envoy {pod}": envoy.pid for pod, envoy in started.items() if envoy.pid}
        yield Run("envoy", round_number, targets, pids, envoys=dict(started))
    finally:
        for envoy in started.values():
            envoy.stop()


def _start_envoy(config: envoy_hbone.JsonObject, workdir: Path, pod: PodState) -> Envoy:
    # Default concurrency (one worker per CPU), as a proxy in a pod would run; its log,
    # stdout and access log go to files in `workdir`.
    envoy = Envoy(config, workdir, netns=pod.netns_path, concurrency=None, log_level="warning")
    try:
        envoy.start()
    except EnvoyError as exc:
        raise BenchError(f"the Envoy in {pod.name} did not start: {exc}") from None
    return envoy


def _stop_envoys(name: str) -> None:
    agents.terminate(envoy_pids(name))


def envoy_pids(name: str) -> list[int]:
    """The Envoys of this lab's bench, also those a killed run left: found by their config."""
    return agents.pids_with_argument("--config-path", f"{agents.lab_dir(name) / ENVOY_DIR}/")


def _check_plain(state: LabState) -> None:
    """Fail unless nothing of the mesh is left between the pods: no agent of the lab, and in
    every enrolled pod no tc filter and no capture routing rule (what unenrolling removes)."""
    if pids := agents.lab_agent_pids(state.name):
        raise BenchError(f"node agents still running (pids {pids}): the pods are not plain")
    for pod in state.pods:
        if not pod.ambient:
            continue
        found = []
        for hook in ("ingress", "egress"):
            filters = _in_netns(pod, ["tc", "filter", "show", "dev", pod.interface, hook])
            if filters.strip():
                found.append(f"{hook} filter: {filters.strip().splitlines()[-1]}")
        rules = _in_netns(pod, ["ip", "rule", "show"])
        found += [f"rule: {line.strip()}" for line in rules.splitlines() if "fwmark" in line]
        if found:
            raise BenchError(
                f"{pod.name} still has the mesh's capture after the agents stopped: "
                + "; ".join(found)
            )


BENCH_PODS = (CLIENT, SAME_NODE_SERVER, CROSS_NODE_SERVER)


def _clear_time_wait(state: LabState) -> int:
    """Destroy the TIME_WAIT sockets the previous run left in the bench's pods, so that every
    run starts from the same socket state; returns how many are left (0 when it worked).

    Why: the connection-rate run leaves ~15,000 TIME_WAIT sockets in client-a for a minute
    (baseline's, 5 s at ~3,000/s), and with them in place the mesh's new connections/s that
    follow measured less than half (150/s against 340-360/s after they were destroyed)."""
    left = 0
    for name in BENCH_PODS:
        pod = probes.pod(state, name)
        _in_netns(pod, ["ss", "-K", "-Htan", "state", "time-wait"])
        left += len(_in_netns(pod, ["ss", "-Htan", "state", "time-wait"]).splitlines())
    return left


def _in_netns(pod: PodState, argv: list[str]) -> str:
    done = subprocess.run(
        ["nsenter", f"--net={pod.netns_path}", "--", *argv],
        capture_output=True, text=True, timeout=10, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    if done.returncode != 0:
        raise BenchError(f"{' '.join(argv)} in {pod.name} failed: {done.stderr.strip()}")
    return done.stdout


# -- CPU and memory ------------------------------------------------------------------------


def _cpu_reading(proxy_pids: list[int], mode: str) -> CpuReading:
    proxies = None if mode == "baseline" else _processes_cpu_seconds(proxy_pids)
    return CpuReading(_system_busy_seconds(), proxies)


def _system_busy_seconds() -> float:
    """Non-idle CPU time of all CPUs so far (/proc/stat): user, nice, system, irq, softirq,
    steal. idle and iowait are idle; guest time is already part of user."""
    with open("/proc/stat") as stat:
        fields = stat.readline().split()
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _processes_cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of these processes (all their threads) so far."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            raise BenchError(f"proxy process {pid} is gone") from None
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / ticks


def _memory_mib(pid: int, label: str) -> dict[str, float]:
    """VmHWM (peak resident set) and VmRSS of a process, in MiB (/proc/<pid>/status)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        raise BenchError(f"{label} (pid {pid}) is gone") from None
    found = {}
    for line in status.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            found[key] = round(int(value.split()[0]) / 1024, 1)
    if len(found) != 2:
        raise BenchError(f"no VmHWM or VmRSS in /proc/{pid}/status ({label})")
    return found


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


def _iperf(
    client: PodState, server: str, target: tuple[str, int], seconds: int
) -> tuple[float, int]:
    """(Gbit/s, bytes) the iperf3 server received from the client, which connects to
    `target`: the server itself, or the client Envoy's listener for it."""
    host, port = target
    argv = [
        "ip", "netns", "exec", client.netns,
        "iperf3", "-c", host, "-p", str(port), "-t", str(seconds), "-J",
    ]  # fmt: skip
    what = f"iperf3 {client.name} -> {server} ({host}:{port})"
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
        received = report["end"]["sum_received"]
        bits, size = float(received["bits_per_second"]), int(received["bytes"])
    except (KeyError, TypeError, ValueError) as exc:
        raise BenchError(f"{what}: no sum_received in its JSON ({exc!r})") from None
    if bits <= 0 or size <= 0:
        raise BenchError(f"{what}: received nothing")
    return bits / 1e9, size


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


def _rr_client(host: str, port: int, settings: Settings, stop: threading.Event) -> list[int]:
    """Nanoseconds per 1 KiB request/response, sequential, on one connection."""
    payload = b"r" * RR_SIZE
    samples: list[int] = []
    deadline = time.monotonic() + settings.rr_max_seconds
    try:
        with _connect(host, port) as sock:
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
            f"1 KiB RR to {host}:{port} failed after {len(samples)} requests: {exc}"
        ) from None
    # Fewer than asked means the time limit hit: the percentiles still hold, the count says so.
    if len(samples) < 10:
        raise BenchError(
            f"1 KiB RR to {host}:{port}: only {len(samples)} requests "
            f"in {settings.rr_max_seconds:.0f}s"
        )
    return samples


def _conn_client(
    host: str, port: int, settings: Settings, stop: threading.Event
) -> tuple[float, list[int]]:
    """Sequential connect + one small exchange + close until the time or count limit; the
    seconds it took and each connection's nanoseconds from connect to reply."""
    payload = b"c" * CONN_SIZE
    durations: list[int] = []
    start = time.monotonic()
    end = start + settings.conn_seconds
    try:
        while len(durations) < settings.conn_max and time.monotonic() < end and not stop.is_set():
            began = time.perf_counter_ns()
            with _connect(host, port) as sock:
                sock.sendall(payload)
                _recv_exactly(sock, CONN_SIZE)
                durations.append(time.perf_counter_ns() - began)
    except OSError as exc:
        raise BenchError(
            f"connection {len(durations) + 1} to {host}:{port} failed: {exc}"
        ) from None
    elapsed = time.monotonic() - start
    if not durations:
        raise BenchError(f"no connection to {host}:{port} completed")
    return elapsed, durations


def percentile(samples: list[int], pct: float) -> float:
    """Nearest-rank percentile: a value that was actually measured."""
    ordered = sorted(samples)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return float(ordered[rank - 1])


# -- evidence that the envoy and mesh runs went through their proxies -------------------------


def _destinations(state: LabState) -> dict[str, tuple[PodState, int]]:
    return {
        "cross_node_throughput": (probes.pod(state, CROSS_NODE_SERVER), IPERF_PORT),
        "same_node_throughput": (probes.pod(state, SAME_NODE_SERVER), IPERF_PORT),
        "echo": (probes.pod(state, CROSS_NODE_SERVER), ECHO_PORT),
    }


def _wait_for_counts(
    count: Callable[[], dict[str, int]], expected: dict[str, int], timeout: float = 5.0
) -> dict[str, int]:
    """The proxies log a connection when it ends, so the last ones may take a moment."""
    deadline = time.monotonic() + timeout
    while True:
        counts = count()
        done = all(counts.get(key, 0) >= want for key, want in expected.items())
        if done or time.monotonic() > deadline:
            return counts
        time.sleep(0.1)


def _record_counts(
    mode: str, result: ModeResult, counts: dict[str, int], expected: dict[str, int], how: str
) -> None:
    for key, count in counts.items():
        result.tunnelled[key] = result.tunnelled.get(key, 0) + count
    # A figure that bypassed the proxies, even in part, would be a baseline figure (or a mix)
    # under a wrong name: every connection the clients made must be in the proxies' logs.
    missing = [
        f"{key} {counts.get(key, 0)} of {want}"
        for key, want in expected.items()
        if counts.get(key, 0) < want
    ]
    if missing:
        raise BenchError(f"{mode} run not tunnelled: {', '.join(missing)} ({how})")


def _check_tunnelled(
    state: LabState, run: Run, result: ModeResult, expected: dict[str, int]
) -> None:
    """Count the connections each server node's agent delivered in this run, from its access
    log: over HBONE cross-node; same-node also "local", the agents' same-node shortcut that
    delivers without a tunnel."""
    destinations = _destinations(state)
    routes = {key: {"hbone"} for key in destinations}
    routes["same_node_throughput"] = {"hbone", "local"}

    def events() -> dict[str, list[dict[str, Any]]]:
        return {
            node.name: probes.agent_events(state, node.name)[run.agent_log_offsets[node.name] :]
            for node in state.nodes
        }

    def count() -> dict[str, int]:
        logged = events()
        return {
            key: sum(
                1
                for event in logged[pod.node]
                if event.get("event") == "connection complete"
                and event.get("direction") == "inbound"
                and event.get("route") in routes[key]
                and event.get("dst.addr") == f"{pod.ip}:{port}"
            )
            for key, (pod, port) in destinations.items()
        }

    counts = _wait_for_counts(count, expected)
    for node, node_events in events().items():
        for event in node_events:
            if event.get("event") != "connection complete" or not event.get("error"):
                continue
            _record_error(
                result,
                str(event.get("dst.addr", "")),
                f"{node}: {event.get('direction')} {event.get('src.addr')} -> "
                f"{event.get('dst.addr')}: {event['error']}",
            )
    _record_counts("mesh", result, counts, expected, "no connection in the server node's agent log")


def _check_through_envoys(
    state: LabState, run: Run, result: ModeResult, expected: dict[str, int]
) -> None:
    """Count the CONNECTs each server Envoy answered 200 per target, from its access log."""
    destinations = _destinations(state)

    def entries() -> dict[str, list[envoy_hbone.JsonObject]]:
        return {pod: run.envoys[pod].access_log() for pod in (CROSS_NODE_SERVER, SAME_NODE_SERVER)}

    def count() -> dict[str, int]:
        logged = entries()
        return {
            key: sum(
                1
                for entry in logged[pod.name]
                if entry.get("method") == "CONNECT"
                and str(entry.get("status")) == "200"
                and entry.get("authority") == f"{pod.ip}:{port}"
            )
            for key, (pod, port) in destinations.items()
        }

    counts = _wait_for_counts(count, expected)
    for pod, pod_entries in entries().items():
        for entry in pod_entries:
            if str(entry.get("status")) != "200":
                _record_error(
                    result,
                    str(entry.get("authority", "")),
                    f"envoy {pod}: {entry.get('method')} {entry.get('authority')} answered "
                    f"{entry.get('status')} (flags {entry.get('flags')})",
                )
    _record_counts(
        "envoy", result, counts, expected, "no CONNECT answered 200 in the server Envoy's log"
    )


def _record_error(result: ModeResult, address: str, example: str) -> None:
    port = address.rsplit(":", 1)[-1]
    result.proxy_errors[port] = result.proxy_errors.get(port, 0) + 1
    if len(result.proxy_error_examples) < 5:
        result.proxy_error_examples.append(example)


# -- report --------------------------------------------------------------------------------


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def _per(total: float | None, amount: float) -> float | None:
    return None if total is None or not amount else total / amount


def _resources(result: ModeResult) -> dict[str, Any]:
    """CPU seconds per GB (each throughput path, over all its runs) and per 1,000 new
    connections, all CPUs and the proxies alone; peak RSS per proxy."""
    per_gb: dict[str, Any] = {}
    for key, path in (
        ("cross_node_throughput", "cross_node"),
        ("same_node_throughput", "same_node"),
    ):
        runs = result.throughput_runs[key]
        moved = sum(r.bytes_received for r in runs) / GB
        proxies = [r.cpu_proxies_seconds for r in runs]
        proxy_total = None if None in proxies else sum(p for p in proxies if p is not None)
        per_gb[path] = {
            "system": _per(sum(r.cpu_system_seconds for r in runs), moved),
            "proxies": _per(proxy_total, moved),
            "gb_moved": moved,
        }
    thousands = result.connections / 1000
    return {
        "cpu_seconds_per_gb": per_gb,
        "cpu_seconds_per_1000_connections": {
            "system": _per(result.connection_cpu_system_seconds, thousands),
            "proxies": _per(result.connection_cpu_proxies_seconds, thousands),
        },
        "peak_rss_mib": dict(result.peak_rss_mib),
        "rss_at_end_mib": dict(result.rss_at_end_mib),
        "peak_rss_mib_total": sum(result.peak_rss_mib.values()) if result.peak_rss_mib else None,
    }


def _report(
    name: str, quick: bool, settings: Settings, results: dict[str, ModeResult], seconds: float
) -> dict[str, Any]:
    metrics: dict[str, Any] = {}
    for metric in METRICS:
        row: dict[str, Any] = {"label": metric.label, "unit": metric.unit}
        row |= {mode: results[mode].values[metric.key] for mode in MODES}
        row["mesh_over_baseline"] = _ratio(row["mesh"], row["baseline"])
        row["mesh_over_envoy"] = _ratio(row["mesh"], row["envoy"])
        metrics[metric.key] = row
    warnings = []
    for mode in MODES:
        result = results[mode]
        if result.rr_samples < settings.rr_requests:
            warnings.append(
                f"{mode}: latency from {result.rr_samples} of {settings.rr_requests} "
                f"requests (time limit {settings.rr_max_seconds:.0f}s)"
            )
    for mode in MODES:
        if left := results[mode].time_wait_left:
            warnings.append(
                f"{mode}: {left} TIME_WAIT socket(s) of earlier runs could not be removed "
                "(ss -K; CONFIG_INET_DIAG_DESTROY): its new connections/s may be understated"
            )
    notes = []
    for mode in ("envoy", "mesh"):
        result = results[mode]
        for port, count in sorted(result.proxy_errors.items()):
            if mode == "mesh" and port == str(IPERF_PORT):
                # iperf3 closes a connection with unread data at the end of each test, mesh or
                # not (TcpExtTCPAbortOnClose in the server pod): the agents relay that RST.
                notes.append(
                    f"mesh: the agents logged {count} iperf3 connection(s) ending in a "
                    "reset; iperf3 resets one at the end of every test, mesh or not"
                )
            else:
                warnings.append(
                    f"{mode}: {count} connection(s) to port {port} logged as failed by the "
                    f"proxies, e.g. {result.proxy_error_examples[0]}"
                )
    cross, same = CROSS_NODE_SERVER, SAME_NODE_SERVER
    return {
        "ok": True,
        "lab": name,
        "quick": quick,
        "seconds": round(seconds, 1),
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release()},
        "settings": asdict(settings),
        "order": [f"{mode} {r + 1}" for r in range(settings.rounds) for mode in MODES],
        "paths": {
            "cross_node_throughput": f"{CLIENT} -> {cross}:{IPERF_PORT} (iperf3)",
            "same_node_throughput": f"{CLIENT} -> {same}:{IPERF_PORT} (iperf3)",
            "rr_latency": f"{CLIENT} -> {cross}:{ECHO_PORT}, one connection",
            "connections_per_second": f"{CLIENT} -> {cross}:{ECHO_PORT}",
            "envoy": f"{CLIENT} Envoy (127.0.0.1 listener per target) -> HBONE -> Envoy on "
            f"<server pod ip>:15008 in {cross} and {same}",
            # Not like for like on one node: the agents deliver there without HBONE or TLS,
            # the Envoys still tunnel with mTLS.
            "mesh": f"cross-node: {CLIENT}'s agent -> HBONE (mTLS) -> {cross}'s agent; "
            f"same-node: {CLIENT}'s agent delivers to {same} itself (route local, no TLS)",
        },
        "metrics": metrics,
        "resources": {mode: _resources(results[mode]) for mode in MODES},
        "details": {mode: asdict(results[mode]) for mode in MODES},
        "warnings": warnings,
        "notes": notes,
    }


def _cell(value: float | None, digits: int, width: int) -> str:
    return f"{'-' if value is None else f'{value:.{digits}f}':>{width}}"


def _row(label: str, values: dict[str, float | None], digits: int) -> str:
    cells = "".join(_cell(values.get(mode), digits, 10) for mode in MODES)
    ratios = _cell(_ratio(values.get("mesh"), values.get("baseline")), 3, 15)
    ratios += _cell(_ratio(values.get("mesh"), values.get("envoy")), 3, 12)
    return f"{label:<38}{cells}{ratios}"


def format_table(report: dict[str, Any]) -> str:
    header = "".join(f"{mode:>10}" for mode in MODES)
    lines = [f"{'metric':<38}{header}{'mesh/baseline':>15}{'mesh/envoy':>12}"]
    for metric in METRICS:
        lines.append(_row(metric.label, report["metrics"][metric.key], metric.digits))
    resources = report["resources"]
    for path, name in (("cross_node", "cross-node"), ("same_node", "same-node")):
        for who, what in (("system", "all CPUs"), ("proxies", "proxies")):
            values = {m: resources[m]["cpu_seconds_per_gb"][path][who] for m in MODES}
            lines.append(_row(f"CPU s per GB {name}, {what}", values, 2))
    for who, what in (("system", "all CPUs"), ("proxies", "proxies")):
        values = {m: resources[m]["cpu_seconds_per_1000_connections"][who] for m in MODES}
        lines.append(_row(f"CPU s per 1000 connections, {what}", values, 2))
    totals = {m: resources[m]["peak_rss_mib_total"] for m in MODES}
    lines.append(_row("peak RSS of the proxies, sum (MiB)", totals, 1))
    lines.append("peak RSS per proxy (VmHWM, MiB; VmRSS at the end in parentheses):")
    for mode in MODES:
        peaks, at_end = resources[mode]["peak_rss_mib"], resources[mode]["rss_at_end_mib"]
        if peaks:
            each = ", ".join(
                f"{label} {rss:.1f} ({at_end[label]:.1f})" for label, rss in peaks.items()
            )
            lines.append(f"  {mode}: {each}")
    machine, rounds = report["machine"], report["settings"]["rounds"]
    lines.append(
        f"({machine['cpus']} CPUs, kernel {machine['kernel']}; throughput: median of {rounds} "
        f"alternating run(s) per mode; latency and connections: "
        f"{report['paths']['rr_latency'].split(',')[0]})"
    )
    lines.append("(same-node mesh: the agents deliver without HBONE or TLS; envoy: HBONE, mTLS)")
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
    """Stop the bench's Envoys, then control.down, with Ctrl-C and SIGTERM held off: an
    impatient second Ctrl-C must not leave Envoys, agents or namespaces behind. Both are
    bounded (SIGKILL after a grace). False, said on stderr, if something could not be
    removed."""
    main = threading.current_thread() is threading.main_thread()

    def later(signum: int, frame: FrameType | None) -> None:
        print("still tearing the lab down...", file=sys.stderr)

    signals = (signal.SIGINT, signal.SIGTERM) if main else ()
    previous = {sig: signal.signal(sig, later) for sig in signals}
    try:
        # Envoys first: they are processes in the pods, and keep their netns alive.
        _stop_envoys(name)
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
