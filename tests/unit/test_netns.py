"""NetnsWorker's sockets: made in the worker's namespace, on the calling thread."""

from __future__ import annotations

import fcntl
import os
import socket
import subprocess
import uuid
from collections.abc import Iterator

import pytest

from agent.datapath import abi
from agent.inpod import sockets
from agent.netns import NetnsWorker

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="setns(2) needs root (CAP_SYS_ADMIN)")

SIOCGSKNS = 0x894C  # linux/sockios.h: an fd of the socket's network namespace


def _netns_inode(sock: socket.socket) -> int:
    fd = fcntl.ioctl(sock.fileno(), SIOCGSKNS)
    try:
        return os.fstat(fd).st_ino
    finally:
        os.close(fd)


@pytest.fixture
def other_netns() -> Iterator[str]:
    name = f"ambient-test-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield f"/run/netns/{name}"
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=True)


def test_tcp_sockets_are_made_in_the_workers_namespace_and_the_thread_comes_back(
    other_netns: str,
) -> None:
    home = os.stat("/proc/thread-self/ns/net").st_ino
    pod = os.stat(other_netns).st_ino
    assert home != pod
    worker = NetnsWorker(other_netns)
    try:
        made = [worker.tcp_socket() for _ in range(3)]
        try:
            assert [_netns_inode(s) for s in made] == [pod] * 3
            assert all(s.proto == socket.IPPROTO_TCP for s in made)
        finally:
            for sock in made:
                sock.close()
        assert os.stat("/proc/thread-self/ns/net").st_ino == home
        with socket.socket() as mine:
            assert _netns_inode(mine) == home  # what the thread makes itself stays home
    finally:
        worker.close()


def test_new_upstream_sets_the_agent_mark_and_binds_transparently() -> None:
    worker = NetnsWorker("/proc/self/ns/net")
    try:
        with sockets.new_upstream(worker, ("127.0.0.1", 0)) as sock:
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) == abi.AGENT_MARK
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
            assert sock.getsockopt(socket.SOL_IP, sockets.IP_TRANSPARENT) == 1
            assert sock.getsockname()[0] == "127.0.0.1" and not sock.getblocking()
    finally:
        worker.close()
