"""`ambient-agent bench --soak`: many tunnelled connections held open for a long time.

On a lab with agents, client-a (node-1) opens N connections to an echo server in server-b
(node-2), in batches; each is captured in client-a, carried as an HBONE stream to node-2 and
delivered to the app, and counts as established once its first echo is back (the time that
takes is reported). Every connection then exchanges 16 bytes every 30 s for the whole run
and checks the echo. Reported: connections established, errors by kind (a reset, a timeout, a
wrong echo), round trips, and both agents' RSS and open fds at the start of the hold, their
peak, and at the end. Defaults: 10,000 connections for 10 minutes. Asserts nothing: exit 0
when it ran.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import resource
import socket
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

from agent.netns import NetnsWorker
from lab import control, probes
from lab.network import LabState

ECHO_PORT = 9600
BATCH = 500  # connections opened at once
# Seconds between a connection's exchanges (jittered): 10,000 connections make ~330
# exchanges a second, each through both agents; at 5 s (2,000 a second) two Python agents on
# two cores fall behind and exchanges time out: a throughput limit, not a holding one.
EXCHANGE_EVERY = 30.0
IO_TIMEOUT = 15.0  # one echo while held
SETUP_TIMEOUT = 120.0  # connect and first echo, in a burst of thousands
FD_LIMIT = 65536


@dataclass
class AgentSample:
    rss_mib: float
    fds: int


@dataclass
class SoakReport:
    connections: int
    seconds: float
    exchange_every: float
    established: int = 0
    setup_s: dict[str, float] = field(default_factory=dict)  # connect to first echo
    round_trips: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    agents: dict[str, dict[str, AgentSample]] = field(default_factory=dict)


def run_soak(name: str, connections: int, minutes: float, json_output: bool) -> int:
    _raise_fd_limit()  # the lab's agents inherit it
    control.down(name)
    state = control.up(name, None)
    try:
        report = measure(state, connections, minutes * 60)
    finally:
        control.down(name)
    if json_output:
        print(json.dumps(asdict(report)))
    else:
        print(format_report(report))
    return 0


def _raise_fd_limit() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = max(hard, FD_LIMIT) if os.geteuid() == 0 else hard
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))


def measure(
    state: LabState, connections: int, seconds: float, every: float = EXCHANGE_EVERY
) -> SoakReport:
    server = probes.pod(state, "server-b")
    code = f"from bench.datapath import serve_echo; serve_echo({ECHO_PORT})"
    report = SoakReport(connections, seconds, every)
    with probes.pod_server(server, ECHO_PORT, [sys.executable, "-c", code]):
        asyncio.run(_hold(state, server.ip, report))
    return report


async def _hold(state: LabState, host: str, report: SoakReport) -> None:
    worker = NetnsWorker(str(probes.pod(state, "client-a").netns_path))
    errors: Counter[str] = Counter()
    streams: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    setup: list[float] = []
    try:
        for start in range(0, report.connections, BATCH):
            count = min(BATCH, report.connections - start)
            opened = await asyncio.gather(
                *(_open(worker, host, setup) for _ in range(count)), return_exceptions=True
            )
            for result in opened:
                if isinstance(result, BaseException):
                    errors[f"setup: {type(result).__name__}"] += 1
                else:
                    streams.append(result)
        report.established = len(streams)
        setup.sort()
        if setup:
            report.setup_s = {"median": round(setup[len(setup) // 2], 3),
                              "p99": round(setup[int(len(setup) * 0.99)], 3),
                              "max": round(setup[-1], 3)}  # fmt: skip
        report.agents["start"] = _sample_agents(state)
        peak = dict(report.agents["start"])
        deadline = time.monotonic() + report.seconds
        sampler = asyncio.create_task(_sample_peak(state, peak, deadline))
        counts = await asyncio.gather(
            *(_exchange(r, w, deadline, report.exchange_every, errors) for r, w in streams)
        )
        await sampler
        report.round_trips = sum(counts)
        report.agents["peak"] = peak
        report.agents["end"] = _sample_agents(state)
    finally:
        for _, writer in streams:
            writer.close()
        worker.close()
    report.errors = dict(errors)


async def _open(
    worker: NetnsWorker, host: str, setup: list[float]
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connected end to end: the first echo came back (the tunnel exists). Its time goes to
    `setup`: under a burst of thousands, the last wait in queues for seconds."""
    started = time.monotonic()
    sock = worker.call(socket.socket)  # made in client-a's netns
    sock.setblocking(False)
    try:
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, (host, ECHO_PORT)),
                               SETUP_TIMEOUT)  # fmt: skip
        reader, writer = await asyncio.open_connection(sock=sock)
    except BaseException:
        sock.close()
        raise
    try:
        message = os.urandom(16)
        writer.write(message)
        if await asyncio.wait_for(reader.readexactly(16), SETUP_TIMEOUT) != message:
            raise ValueError("wrong echo")
    except BaseException:
        writer.close()
        raise
    setup.append(time.monotonic() - started)
    return reader, writer


async def _exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, deadline: float, every: float,
    errors: Counter[str],
) -> int:  # fmt: skip
    done = 0
    await asyncio.sleep(random.uniform(0, every))
    while time.monotonic() < deadline:
        message = os.urandom(16)
        try:
            writer.write(message)
            echoed = await asyncio.wait_for(reader.readexactly(16), IO_TIMEOUT)
        except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
            errors[f"exchange: {type(exc).__name__}"] += 1
            return done
        if echoed != message:
            errors["exchange: wrong echo"] += 1
            return done
        done += 1
        await asyncio.sleep(every * random.uniform(0.8, 1.2))
    return done


async def _sample_peak(state: LabState, peak: dict[str, AgentSample], deadline: float) -> None:
    while time.monotonic() < deadline:
        await asyncio.sleep(min(5.0, max(0.0, deadline - time.monotonic())))
        for node, sample in _sample_agents(state).items():
            seen = peak[node]
            peak[node] = AgentSample(max(seen.rss_mib, sample.rss_mib), max(seen.fds, sample.fds))


def _sample_agents(state: LabState) -> dict[str, AgentSample]:
    return {node: AgentSample(*probes.agent_memory(state, node)) for node in state.agents}


def format_report(report: SoakReport) -> str:
    lines = [
        f"soak: {report.connections} connections client-a -> server-b (HBONE across nodes), "
        f"held {report.seconds:.0f} s, an echo every {report.exchange_every:g} s each",
        f"  established {report.established} (connect to first echo: {report.setup_s}), "
        f"round trips {report.round_trips}, errors "
        f"{sum(report.errors.values())} {report.errors or ''}",
    ]
    for when, samples in report.agents.items():
        shown = ", ".join(f"{node} RSS {s.rss_mib} MiB fds {s.fds}" for node, s in samples.items())
        lines.append(f"  agents at {when:<5}: {shown}")
    return "\n".join(lines)
