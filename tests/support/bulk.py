"""Byte-exact bulk transfers between two pods: each side sends a seeded pseudo-random stream
and hashes what it receives, so both directions are checked at once."""

from __future__ import annotations

import hashlib
import random
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from agent.netns import NetnsWorker

BLOCK = 1024 * 1024


def pattern(seed: int, size: int) -> Iterator[bytes]:
    rng = random.Random(seed)
    for _ in range(size // BLOCK):
        yield rng.randbytes(BLOCK)


def expected_digest(seed: int, size: int) -> str:
    digest = hashlib.sha256()
    for block in pattern(seed, size):
        digest.update(block)
    return digest.hexdigest()


def _send_pattern(sock: socket.socket, seed: int, size: int, then_fin: bool) -> None:
    for block in pattern(seed, size):
        sock.sendall(block)
    if then_fin:
        sock.shutdown(socket.SHUT_WR)


def _exchange(sock: socket.socket, seed: int, size: int) -> str:
    """Send pattern(seed) (then FIN) while hashing everything received until the peer's FIN."""
    digest = hashlib.sha256()
    sender = threading.Thread(target=_send_pattern, args=(sock, seed, size, True))
    sender.start()
    while chunk := sock.recv(BLOCK):
        digest.update(chunk)
    sender.join()
    return digest.hexdigest()


def serve_once(netns: Path, port: int, seed: int, size: int) -> Callable[[], str]:
    """A listener in the netns for one connection; returns a wait() for the received digest."""
    worker = NetnsWorker(str(netns))
    try:
        listener = worker.call(lambda: socket.create_server(("0.0.0.0", port)))
    finally:
        worker.close()
    result: list[str] = []

    def serve() -> None:
        with listener:
            conn, _ = listener.accept()
            with conn:
                result.append(_exchange(conn, seed, size))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()

    def wait(timeout: float = 600) -> str:
        thread.join(timeout)
        return result[0] if result else "no result"

    return wait


def transfer(netns: Path, host: str, port: int, seed: int, size: int) -> str:
    """From inside the netns: connect, exchange, return the digest of what came back."""

    def inside() -> str:
        with socket.create_connection((host, port), timeout=60) as sock:
            return _exchange(sock, seed, size)

    worker = NetnsWorker(str(netns))
    try:
        return worker.call(inside)
    finally:
        worker.close()
