"""The capture listeners take a burst: they listen with the 4096 backlog set for them (not
asyncio's default 100), and 1000 connections opened at once from a pod leave the kernel's
listen-overflow counter of the pod's netns at 0."""

from __future__ import annotations

import selectors
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from agent.datapath import abi
from agent.inpod.sockets import LISTEN_BACKLOG
from agent.netns import NetnsWorker
from lab import probes
from lab.network import LabState
from tests.support.labs import running_lab

pytestmark = pytest.mark.kernel

ECHO_PORT = 9500
BURST = 1000


@pytest.fixture(scope="module")
def lab() -> Iterator[LabState]:
    with running_lab("bl") as lab:
        yield lab


def in_pod(lab: LabState, pod: str, *argv: str) -> str:
    netns = probes.pod(lab, pod).netns
    return subprocess.run(["ip", "netns", "exec", netns, *argv], check=True,
                          capture_output=True, text=True).stdout  # fmt: skip


def listen_overflows(lab: LabState, pod: str) -> int:
    # nstat -a: absolute values; the netns's own counters (they are per netns).
    out = in_pod(lab, pod, "nstat", "-az", "TcpExtListenOverflows")
    return sum(int(line.split()[1]) for line in out.splitlines() if "ListenOverflows" in line)


def test_the_capture_listeners_have_the_full_backlog(lab: LabState) -> None:
    for port in (abi.PORT_OUTBOUND, abi.PORT_INBOUND, abi.PORT_HBONE):
        line = in_pod(lab, "client-a", "ss", "-Hltn", f"sport = :{port}")
        assert line.split()[2] == str(LISTEN_BACKLOG), line  # Send-Q of a listener: backlog


def test_a_burst_of_connections_overflows_no_listen_queue(lab: LabState) -> None:
    server = probes.pod(lab, "server-b")
    code = f"from bench.datapath import serve_echo; serve_echo({ECHO_PORT})"
    before = listen_overflows(lab, "client-a")
    with probes.pod_server(server, ECHO_PORT, [sys.executable, "-c", code]):
        worker = NetnsWorker(str(probes.pod(lab, "client-a").netns_path))
        try:
            socks = worker.call(lambda: [socket.socket() for _ in range(BURST)])
        finally:
            worker.close()
        connected = 0
        selector = selectors.DefaultSelector()
        try:
            for sock in socks:
                sock.setblocking(False)
                sock.connect_ex((server.ip, ECHO_PORT))
                selector.register(sock, selectors.EVENT_WRITE)
            while connected < BURST:
                ready = selector.select(timeout=10)
                assert ready, f"only {connected} of {BURST} connected"
                for key, _ in ready:
                    selector.unregister(key.fileobj)
                    done = key.fileobj
                    assert isinstance(done, socket.socket)
                    assert done.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
                    connected += 1
        finally:
            selector.close()
            for sock in socks:
                sock.close()
    assert listen_overflows(lab, "client-a") == before
