"""Loopback TCP connections for the relay tests: pairs, how a reader sees the end, resets,
the process's open fds."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator


def tcp_pair(buffer: int | None = None) -> tuple[socket.socket, socket.socket]:
    """(connecting side, accepted side) of one loopback connection; with `buffer`, both
    sockets' send and receive buffers fixed at that (no autotuning)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.socket()
        if buffer is not None:
            for sock in (listener, client):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer)
        client.connect(listener.getsockname())
        accepted, _ = listener.accept()
    if buffer is not None:
        accepted.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer)
    return client, accepted


def receive_outcome(sock: socket.socket) -> str:
    """How the connection ends for a reader: "eof" after the bytes, or "reset"."""
    sock.settimeout(10)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        return "reset"
    return "eof"


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@contextlib.contextmanager
def closing(*socks: socket.socket) -> Iterator[None]:
    try:
        yield
    finally:
        for sock in socks:
            sock.close()
