"""A TCP connection kept open from inside a pod, to see what a policy change does to it."""

from __future__ import annotations

import socket
from pathlib import Path

from agent.netns import NetnsWorker


class HeldConnection:
    """Connected from the pod's netns to a whoami server; exchange() says what one line got:
    "reply", "reset", or "closed ..."."""

    def __init__(self, netns_path: Path | str, host: str, port: int) -> None:
        self._worker = NetnsWorker(str(netns_path))
        try:
            self.sock: socket.socket = self._worker.call(
                lambda: socket.create_connection((host, port), timeout=5)
            )
        except BaseException:
            self._worker.close()
            raise
        self.address = "{}:{}".format(*self.sock.getsockname())

    def exchange(self) -> str:
        def inside() -> str:
            try:
                self.sock.sendall(b"ping\n")
                line = self.sock.recv(4096)
            except ConnectionResetError:
                return "reset"
            return "reply" if line.startswith(b"peer=") else f"closed {line!r}"

        return self._worker.call(inside)

    def close(self) -> None:
        self._worker.call(self.sock.close)
        self._worker.close()
